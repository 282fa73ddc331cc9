"""Where each row's tokens sit in a batch as servers send it: left-padded to the longest prompt.

`tokenizer(prompts, padding=True)` (left padding) + `generate(input_ids, attention_mask=mask)`
puts row b's `n_b` real tokens in the last `n_b` columns, and generate numbers them `0..n_b-1`
through `position_ids` (the mask's cumsum). A stored chunk holds K/V of given tokens at given
positions, so chunk reuse can serve a row, or learn from it, only where its real tokens carry
exactly those positions. Anything else (right padding, holes in the mask, a 4-D mask, a padded
batch without position ids, which the model then numbers by column) has no layout here: the
caller neither reuses nor stores it, and the forward runs unchanged. `right_aligned` lays the
rows' reused K/V into that layout (each behind its own padding).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..reuse.blend import KVLayers


@dataclass(frozen=True)
class BatchLayout:
    """Row b of a `[B, length]` batch: `pads[b]` padding columns, then its real tokens."""

    length: int
    pads: tuple[int, ...]

    @property
    def real_tokens(self) -> list[int]:
        return [self.length - pad for pad in self.pads]

    def suffix_start(self, reusable: list[int]) -> int:
        """The first column the forward must compute when row b could take its first
        `reusable[b]` tokens from the store: every row computes the same columns, so the row
        with the most tokens left decides, and the others reuse only up to that column (their
        later reusable tokens are computed instead; the forward costs the same)."""
        left = max((n - r for n, r in zip(self.real_tokens, reusable)), default=1)
        return self.length - max(left, 1)


def batch_layout(input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                 position_ids: torch.Tensor | None) -> BatchLayout | None:
    """The layout of a prefill's batch, or None where its rows are not left-padded prompts whose
    real tokens are numbered from 0 (see the module docstring)."""
    batch, length = input_ids.shape
    if attention_mask is None:
        pads = torch.zeros(batch, dtype=torch.long)
    else:
        if attention_mask.dim() != 2 or attention_mask.shape != input_ids.shape:
            return None
        real = attention_mask.detach().cpu().bool()
        pads = length - real.sum(-1)
        if not torch.equal(real, torch.arange(length)[None] >= pads[:, None]):
            return None  # not left padding: a pad after a real token, or a hole
    expected = torch.arange(length)[None] - pads[:, None]
    if position_ids is None:
        if bool(pads.any()):
            return None  # the model numbers padded rows by column: not the positions of a chunk
    else:
        if position_ids.dim() != 2 or position_ids.shape[-1] != length:
            return None
        given = position_ids.detach().cpu().long().expand(batch, length)
        if not torch.equal(given[expected >= 0], expected[expected >= 0]):
            return None
    return BatchLayout(length, tuple(int(p) for p in pads))


def right_aligned(rows: list[KVLayers | None], width: int) -> KVLayers:
    """Per layer `[B, H, width, D]` K/V with each row's tokens right-aligned behind zeros (its
    padding; None: a row that is all padding there). One row of full width is not copied."""
    like = next(row for row in rows if row is not None)

    def column(index: int, part: int) -> torch.Tensor:
        ref = like[index][part]
        aligned = []
        for row in rows:
            tensor = row[index][part] if row is not None else ref[:, :0]
            if tensor.shape[-2] < width:
                zeros = ref.new_zeros(ref.shape[0], width - tensor.shape[-2], ref.shape[-1])
                tensor = torch.cat([zeros, tensor], dim=-2)
            aligned.append(tensor)
        return aligned[0].unsqueeze(0) if len(aligned) == 1 else torch.stack(aligned)

    return [(column(i, 0), column(i, 1)) for i in range(len(like))]
