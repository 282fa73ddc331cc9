"""The storage of `evictor/tiered`'s warm and cold tiers: each tier holds its tokens as whole
blocks per KV head (a block is the smallest run of tokens the quantizer encodes at once, so a
token is encoded once and never re-encoded when it moves), and moves, gathers and decodes them
as blocks. The tier policy (budgets, scores, promotion) is `TieredLayer`'s; this module only
knows how the codes of a tier are laid out.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from ..quant.base import Role
from ..quant.codes import Codes

#: `(block_tokens, dim)` of each role's codes: what `Codes` needs besides its tensors.
CodesLayout = dict[str, tuple[int, int]]


class Codec(Protocol):
    """What tiers need of a quantizer (`QuantizerStage` or `FullPrecision`)."""

    def block_tokens(self, role: Role) -> int: ...
    def encode(self, x: torch.Tensor, role: Role) -> Codes: ...
    def decode(self, codes: Codes, role: Role, dtype: torch.dtype) -> torch.Tensor: ...


class FullPrecision:
    """The codec of a config without a quantizer: warm and cold keep the tensors as they are
    (lossless tiers: cold tokens are the only difference from the full cache)."""

    def block_tokens(self, role: Role) -> int:
        return 1

    def encode(self, x: torch.Tensor, role: Role) -> Codes:
        return Codes({"x": x}, 1, x.shape[-1])

    def decode(self, codes: Codes, role: Role, dtype: torch.dtype) -> torch.Tensor:
        return codes.tensors["x"].to(dtype)


def resident_kv(codec: Codec, layout: CodesLayout, warm: dict[str, torch.Tensor],
                hot_k: torch.Tensor, hot_v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Decoded warm codes (`warm`: the tier's `key.*` / `value.*` tensors) followed by hot, keys
    and values, in hot's dtype. A free function of tensors so that it can be compiled whole."""
    keys = codec.decode(role_codes(warm, "key", layout["key"]), "key", hot_k.dtype)
    values = codec.decode(role_codes(warm, "value", layout["value"]), "value", hot_v.dtype)
    return torch.cat([keys, hot_k], dim=-2), torch.cat([values, hot_v], dim=-2)


def role_codes(tensors: dict[str, torch.Tensor], role: Role, layout: tuple[int, int]) -> Codes:
    """The `Codes` of one role from a tier's tensors (named `key.*` / `value.*`)."""
    prefix = f"{role}."
    return Codes({n[len(prefix):]: t for n, t in tensors.items() if n.startswith(prefix)}, *layout)


def unit_index(index: torch.Tensor, units: int, like: torch.Tensor) -> torch.Tensor:
    """Block indices `[B, H, n]` -> indices of their units along axis 2 of `like`, expanded to
    its trailing dims (for gather / scatter)."""
    index = index.to(like.device)
    unit = (index.unsqueeze(-1) * units + torch.arange(units, device=like.device)).flatten(2)
    return unit.view(*unit.shape, *([1] * (like.dim() - 3))).expand(*unit.shape, *like.shape[3:])


def rank_blocks(block_scores: torch.Tensor, keep: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per head, the indices of the `keep` best-scored blocks in their original order (a tier
    stays in the order its blocks arrived) and of the others, best first."""
    order = block_scores.argsort(dim=-1, descending=True, stable=True)
    return order[..., :keep].sort(dim=-1).values, order[..., keep:]


@dataclass
class TierBlocks:
    """One tier's tokens as whole blocks per KV head: every tensor is `[B, H, units, ...]`
    with `per_block[name]` units per block (codes blocks, or tokens for positions/scores)."""

    tensors: dict[str, torch.Tensor]
    per_block: dict[str, int]

    @staticmethod
    def encode(codec: Codec, block: int, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor,
               scores: torch.Tensor) -> tuple[TierBlocks, CodesLayout]:
        """Tokens `[B, H, n, ...]` (n a multiple of `block`) as blocks of `codec`'s codes, with
        the layout that `decode` needs to read them back."""
        key_codes, value_codes = codec.encode(keys, "key"), codec.encode(values, "value")
        layout = {"key": (key_codes.block_tokens, key_codes.dim), "value": (value_codes.block_tokens, value_codes.dim)}
        tensors = {f"key.{n}": t for n, t in key_codes.tensors.items()}
        tensors |= {f"value.{n}": t for n, t in value_codes.tensors.items()}
        per_block = {n: block // key_codes.block_tokens for n in tensors if n.startswith("key.")}
        per_block |= {n: block // value_codes.block_tokens for n in tensors if n.startswith("value.")}
        tensors |= {"pos": positions, "score": scores.float()}
        return TierBlocks(tensors, per_block | {"pos": block, "score": block}), layout

    def decode(self, codec: Codec, layout: CodesLayout, dtype: torch.dtype,
               values: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Keys (and values) of the tier in `dtype`, on the tier's device."""
        keys = codec.decode(self.codes("key", layout["key"]), "key", dtype)
        if not values:
            return keys, None
        return keys, codec.decode(self.codes("value", layout["value"]), "value", dtype)

    @property
    def blocks(self) -> int:
        name = next(iter(self.tensors))
        return self.tensors[name].shape[2] // self.per_block[name]

    def take(self, index: torch.Tensor) -> TierBlocks:
        """The blocks at `index` (`[B, H, n]`, per head)."""
        return TierBlocks({name: t.gather(2, unit_index(index, self.per_block[name], t))
                           for name, t in self.tensors.items()}, self.per_block)

    def put(self, index: torch.Tensor, blocks: TierBlocks) -> None:
        """Overwrite the blocks at `index` with `blocks`, in place."""
        for name, t in self.tensors.items():
            t.scatter_(2, unit_index(index, self.per_block[name], t), blocks.tensors[name].to(t.device))

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> TierBlocks:
        return TierBlocks({name: fn(t) for name, t in self.tensors.items()}, self.per_block)

    def keys_only(self) -> TierBlocks:
        """The key codes alone (to score blocks without copying their values)."""
        return TierBlocks({n: t for n, t in self.tensors.items() if n.startswith("key.")}, self.per_block)

    def codes(self, role: Role, layout: tuple[int, int]) -> Codes:
        return role_codes(self.tensors, role, layout)

    def kv_tensors(self) -> list[torch.Tensor]:
        return [t for n, t in self.tensors.items() if n.startswith(("key.", "value."))]

    def token_view(self, name: str) -> torch.Tensor:
        """A per-token tensor (`pos`, `score`) as `[B, H, blocks, block]`."""
        t = self.tensors[name]
        return t.view(*t.shape[:2], self.blocks, self.per_block[name])

    @staticmethod
    def cat(parts: Sequence[TierBlocks]) -> TierBlocks:
        if len(parts) == 1:
            return parts[0]
        return TierBlocks({name: torch.cat([p.tensors[name].to(parts[0].tensors[name].device) for p in parts], dim=2)
                           for name in parts[0].tensors}, parts[0].per_block)

    @staticmethod
    def where(cond: torch.Tensor, a: TierBlocks, b: TierBlocks) -> TierBlocks:
        """Per block (`cond`: `[B, H, n]`), `a`'s block where true, else `b`'s."""
        out = {}
        for name, ta in a.tensors.items():
            c = cond.to(ta.device).repeat_interleave(a.per_block[name], dim=2)
            out[name] = torch.where(c.view(*c.shape, *([1] * (ta.dim() - 3))), ta, b.tensors[name].to(ta.device))
        return TierBlocks(out, a.per_block)
