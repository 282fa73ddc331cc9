"""Code layouts that fused kernels read directly, declared by the quantizer that writes them.

A quantizer says what its codes look like by returning one of these from
`QuantizerStage.kernel_layout()`; the fused decode kernel (kernels/triton_decode.py) dispatches
on the type of that object, never on the stage's name, so a plug-in quantizer that writes the
same layout under another name is fused too, and one that declares nothing falls back to the
torch kernels with the reason logged. Plain frozen data and no torch: the kernels layer imports
this module without importing any stage.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class KiviPacking:
    """Codes `packed` / `scale` / `zero` exactly as `quantizer/kivi` writes them
    (`quant.groupwise`): keys per channel over groups of `group_size` tokens, values per token
    over groups of `group_size` channels, `bits`-bit codes packed into bytes. The Triton encoder
    (`kernels/triton_quantize.py`) writes the same bytes."""

    bits: int
    group_size: int


@dataclass(frozen=True)
class FibQuantCodes:
    """Codes `index` (one `code_bits`-bit codeword per `block_dim` rotated coordinates) and
    `norm` (per token) as `quantizer/fibquant` writes them. The kernel attends in the rotated
    space, so the quantizer also provides `rotation(dim, device)` and
    `codebook(role, dim, device)`, as `quantizer/fibquant` does."""

    block_dim: int
    code_bits: int


#: Every layout a fused kernel reads.
KernelLayout = KiviPacking | FibQuantCodes
