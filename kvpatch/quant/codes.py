"""`Codes`: the encoded K or V of a run of tokens, in a layout every quantizer shares.

Every tensor of a `Codes` has shape `[batch, heads, blocks, ...]`: axis 2 counts blocks of
`block_tokens` tokens (1 for per-token codes; the group size for KIVI keys, which share scales
across tokens). Keeping that one convention lets the cache layer append, slice, reorder beams,
count bytes and snapshot any quantizer's output without knowing what the tensors mean.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Codes:
    tensors: dict[str, torch.Tensor]
    block_tokens: int
    #: The unencoded last-dimension size (head dim), needed to decode and to count bits/element.
    dim: int

    @property
    def num_blocks(self) -> int:
        return int(next(iter(self.tensors.values())).shape[2])

    @property
    def num_tokens(self) -> int:
        return self.num_blocks * self.block_tokens

    @property
    def batch_heads(self) -> tuple[int, int]:
        first = next(iter(self.tensors.values()))
        return int(first.shape[0]), int(first.shape[1])

    def nbytes(self) -> int:
        """Bytes of every tensor: packed values, scales, zero points, norms, indices."""
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def bits_per_element(self) -> float:
        """Stored bits per encoded K/V element, everything included (the honest rate)."""
        batch, heads = self.batch_heads
        elements = batch * heads * self.num_tokens * self.dim
        return 8.0 * self.nbytes() / elements if elements else 0.0

    def _map(self, fn) -> "Codes":
        return Codes({name: fn(t) for name, t in self.tensors.items()}, self.block_tokens, self.dim)

    def slice_blocks(self, start: int, stop: int) -> "Codes":
        return self._map(lambda t: t[:, :, start:stop])

    def select_blocks(self, blocks: torch.Tensor) -> "Codes":
        return self._map(lambda t: t.index_select(2, blocks.to(t.device)))

    def select_batch(self, index: torch.Tensor) -> "Codes":
        """Rows of the batch, in `index` order (beam search reorder, batch selection)."""
        return self._map(lambda t: t.index_select(0, index.to(t.device)))

    def repeat_batch(self, repeats: int) -> "Codes":
        return self._map(lambda t: t.repeat_interleave(repeats, dim=0))

    def clone(self) -> "Codes":
        """Own storage (a slice of a larger buffer would keep the whole buffer alive)."""
        return self._map(torch.clone)

    def to(self, device: torch.device | str) -> "Codes":
        return self._map(lambda t: t.to(device))

    def storage_tensors(self) -> list[torch.Tensor]:
        return list(self.tensors.values())

    @staticmethod
    def cat(parts: list["Codes"]) -> "Codes":
        """Concatenate along the token (block) axis; all parts must come from one quantizer."""
        if len(parts) == 1:
            return parts[0]
        first = parts[0]
        for p in parts[1:]:
            if p.block_tokens != first.block_tokens or p.dim != first.dim or p.tensors.keys() != first.tensors.keys():
                raise ValueError("cannot concatenate codes of different layouts")
        return Codes(
            {name: torch.cat([p.tensors[name] for p in parts], dim=2) for name in first.tensors},
            first.block_tokens,
            first.dim,
        )
