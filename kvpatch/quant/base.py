"""`QuantizerStage`: what every quantizer stage implements, and what it gets for free.

A quantizer turns K or V `[batch, heads, tokens, head_dim]` into `Codes` and back. Keys and values
may be encoded differently (KIVI quantizes keys per channel and values per token), so every call
names its `role`. Random access (`decode_tokens`) is generic: decode the blocks that hold the
requested tokens and pick them out, so a quantizer only writes `encode` and `decode`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar, Literal

import torch

from ..registry import Stage
from .codes import Codes
from .kernel_layouts import KernelLayout

Role = Literal["key", "value"]


class QuantizerStage(Stage, ABC):
    #: Quantizers change outputs: the default for plug-in quantizers (built-ins declare it in
    #: their spec, and `register_stage` checks the two agree).
    lossless: ClassVar[bool] = False  # type: ignore[misc]

    def block_tokens(self, role: Role) -> int:
        """Tokens that must be encoded together (encode lengths are multiples of it)."""
        return 1

    def kernel_layout(self) -> KernelLayout | None:
        """The layout of this quantizer's codes that a fused kernel can read in place
        (`quant.kernel_layouts`), or None: attention then decodes the codes with `decode`. A
        quantizer that writes KIVI's or FibQuant's layout declares it here, whatever its name."""
        return None

    @abstractmethod
    def encode(self, x: torch.Tensor, role: Role) -> Codes: ...

    @abstractmethod
    def decode(self, codes: Codes, role: Role, dtype: torch.dtype) -> torch.Tensor: ...

    def compiled_decode(self, codes: Codes, role: Role, dtype: torch.dtype) -> torch.Tensor:
        """`decode` through torch.compile, one compiled function per (role, layout, dtype):
        6-10x faster on a GPU (docs/compression.md), at the price of a compile on first use."""
        compiled = self.__dict__.setdefault("_compiled_decoders", {})
        key = (role, codes.block_tokens, codes.dim, dtype)
        if key not in compiled:
            block, dim = codes.block_tokens, codes.dim

            def decode(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
                return self.decode(Codes(tensors, block, dim), role, dtype)

            compiled[key] = torch.compile(decode)
        return compiled[key](codes.tensors)

    def decode_tokens(self, codes: Codes, role: Role, tokens: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Decode only the tokens at positions `tokens` (1-D), `[batch, heads, len(tokens), dim]`."""
        block = codes.block_tokens
        tokens = tokens.to(torch.long)
        decoded = self.decode(codes.select_blocks(tokens // block), role, dtype)
        within = torch.arange(tokens.numel(), device=decoded.device) * block + (tokens.to(decoded.device) % block)
        return decoded.index_select(2, within)

    def _check_input(self, x: torch.Tensor, role: Role) -> None:
        if x.dim() != 4:
            raise ValueError(f"{self.name}: expected K/V of shape [batch, heads, tokens, head_dim], got {tuple(x.shape)}")
        if x.shape[2] % self.block_tokens(role):
            raise ValueError(
                f"{self.name}: {role} tokens ({x.shape[2]}) must be a multiple of {self.block_tokens(role)}"
            )
