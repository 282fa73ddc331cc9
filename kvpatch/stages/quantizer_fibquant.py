"""`quantizer/fibquant`: spherical vector quantization with fixed-rate, random-access codes.

Following FibQuant (arXiv 2605.11478), each token's K or V vector v is stored as its norm
(float16/bfloat16) plus, for every block of `block_dim` coordinates of the randomly rotated unit
vector v/||v||, the `code_bits`-bit index of the nearest codeword of one shared codebook. The
codebook is a product of radii (quantiles of the spherical-Beta radial law, Bennett-Gersho
companded) and quasi-uniform directions (Fibonacci / Roberts-Kronecker points), optionally
refined by Lloyd-Max on calibration data. Rate: code_bits / block_dim + 16 / head_dim bits per
element (D=64, k=8, b=8: 1.25 bits, 12.8x smaller than float16), fractional and below 1 bit too.

Every token is coded on its own, so any token decodes without its neighbours, and decoding
token i alone gives exactly row i of a full decode (the inverse rotation is batch-invariant).
"""

from __future__ import annotations

import torch

from ..model_shapes import ModelShapes, divisors, misfit
from ..quant.base import QuantizerStage, Role
from ..quant.codes import Codes
from ..quant.fibquant_codebook import auto_radial_levels, lloyd_refine, nearest_codeword, source_refined_codebook
from ..quant.kernel_layouts import FibQuantCodes
from ..quant.packing import pack_bits, unpack_bits
from ..quant.rotation import Rotation, check_rotation_dim, make_rotation
from ..registry import register_stage
from ..stage_specs.quantizer_fibquant import FibQuantParams

NORM_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}
#: Tokens an encode call needs before `calibration: first_encode` trusts it as calibration data.
FIRST_ENCODE_MIN_TOKENS = 256


@register_stage("quantizer", "fibquant")
class FibQuantizer(QuantizerStage):
    """Spherical vector quantization of each K/V token: a norm plus one codebook index per block."""

    Params = FibQuantParams
    params: FibQuantParams

    def __init__(self, params: FibQuantParams) -> None:
        super().__init__(params)
        #: Codebooks in use, float32 on the CPU, by (role, head_dim): the state to persist.
        self._codebooks: dict[tuple[Role, int], torch.Tensor] = {}
        self._device_codebooks: dict[tuple[Role, int, torch.device], torch.Tensor] = {}
        self._rotations: dict[tuple[int, torch.device], Rotation] = {}
        self._calibrated: set[tuple[Role, int]] = set()

    def encode(self, x: torch.Tensor, role: Role) -> Codes:
        self._check_input(x, role)
        dim = x.shape[-1]
        self._check_dim(dim)
        # Only before the role's codebook was first used: calibrating later would change what
        # earlier codes decode to.
        unused = (role, dim) not in self._codebooks
        if self.params.calibration == "first_encode" and unused and x.shape[2] >= FIRST_ENCODE_MIN_TOKENS:
            self.calibrate(x, role)
        p = self.params
        norm, index = encode_vectors(x, self.rotation(dim, x.device), self.codebook(role, dim, x.device),
                                     p.block_dim, p.code_bits, NORM_DTYPES[p.norm_dtype])
        return Codes({"norm": norm, "index": index}, 1, dim)

    def kernel_layout(self) -> FibQuantCodes:
        return FibQuantCodes(self.params.block_dim, self.params.code_bits)

    def decode(self, codes: Codes, role: Role, dtype: torch.dtype) -> torch.Tensor:
        norm, index = codes.tensors["norm"], codes.tensors["index"]
        device = index.device
        return decode_vectors(norm, index, self.rotation(codes.dim, device), self.codebook(role, codes.dim, device),
                              codes.dim, self.params.code_bits, dtype)

    def calibrate(self, x: torch.Tensor, role: Role, iters: int | None = None) -> None:
        """Refine `role`'s codebook by `iters` (default `lloyd_iters`) Lloyd-Max steps on the
        rotated unit blocks of `x [batch, heads, tokens, head_dim]` (zero vectors skipped). Runs
        on the CPU so the result is the same whatever device `x` is on. Codes encoded earlier
        with this role's previous codebook no longer decode to what they meant."""
        self._check_input(x, role)
        dim = x.shape[-1]
        self._check_dim(dim)
        u, norm = unit_vectors(x)
        blocks = self.rotation(dim, x.device).forward(u)[norm[..., 0] > 0].reshape(-1, self.params.block_dim)
        steps = self.params.lloyd_iters if iters is None else iters
        refined = lloyd_refine(self._master_codebook(role, dim), blocks.cpu(), steps)
        self._set_codebook(role, dim, refined)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The codebooks in use, as `codebook.<role>.<head_dim>` -> float32 CPU `[entries, block_dim]`
        (rotations are not included: they are rebuilt from the seed)."""
        return {f"codebook.{role}.{dim}": book.clone() for (role, dim), book in sorted(self._codebooks.items())}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Use codebooks saved by `state_tensors` (they count as calibrated for `first_encode`)."""
        for key, book in tensors.items():
            parts = key.split(".")
            if len(parts) != 3 or parts[0] != "codebook" or parts[1] not in ("key", "value") or not parts[2].isdigit():
                raise ValueError(f"fibquant: unknown state tensor {key!r}, expected 'codebook.<key|value>.<head_dim>'")
            role, dim = parts[1], int(parts[2])
            if book.dim() != 2 or book.shape[1] != self.params.block_dim or book.shape[0] > 1 << self.params.code_bits:
                raise ValueError(
                    f"fibquant: {key} has shape {tuple(book.shape)}, expected [<= 2**code_bits, block_dim={self.params.block_dim}]"
                )
            self._set_codebook(role, dim, book.detach().to("cpu", torch.float32))

    def stats(self) -> dict[str, object]:
        return {"codebooks": len(self._codebooks), "calibrated": sorted(f"{r}.{d}" for r, d in self._calibrated)}

    def model_problems(self, shapes: ModelShapes) -> list[str]:
        dim, k = shapes.head_dim, self.params.block_dim
        if dim % k:
            return [misfit("block_dim", k, "head_dim", dim, f"a divisor of {dim}: one of {divisors(dim)}")]
        try:
            check_rotation_dim(self.params.rotation, dim)
        except ValueError:
            return [misfit("rotation", self.params.rotation, "head_dim", dim,
                           "a power-of-two head_dim for 'hadamard'; use rotation: orthogonal")]
        return []

    def _check_dim(self, dim: int) -> None:
        k = self.params.block_dim
        if dim % k:
            raise ValueError(f"{self.name}: block_dim={k} must divide head_dim={dim}")
        check_rotation_dim(self.params.rotation, dim)

    def rotation(self, dim: int, device: torch.device) -> Rotation:
        """The rotation applied before quantizing (the fused kernel rotates queries by it)."""
        key = (dim, device)
        if key not in self._rotations:
            self._rotations[key] = make_rotation(self.params.rotation, dim, self.params.seed).to(device)
        return self._rotations[key]

    def _master_codebook(self, role: Role, dim: int) -> torch.Tensor:
        if (role, dim) not in self._codebooks:
            p = self.params
            if p.block_dim == dim:
                levels = 1  # the block is the whole unit vector: its radius is always 1
            else:
                levels = p.radial_levels or auto_radial_levels(p.block_dim, dim, p.code_bits, p.companding)
            self._codebooks[(role, dim)] = source_refined_codebook(
                p.block_dim, dim, p.code_bits, levels, p.companding, p.source_lloyd_iters
            )
        return self._codebooks[(role, dim)]

    def codebook(self, role: Role, dim: int, device: torch.device) -> torch.Tensor:
        """`role`'s codebook in use, float32 `[entries, block_dim]` on `device`."""
        key = (role, dim, device)
        if key not in self._device_codebooks:
            self._device_codebooks[key] = self._master_codebook(role, dim).to(device)
        return self._device_codebooks[key]

    def _set_codebook(self, role: Role, dim: int, codebook: torch.Tensor) -> None:
        self._codebooks[(role, dim)] = codebook
        self._calibrated.add((role, dim))
        for key in [key for key in self._device_codebooks if key[:2] == (role, dim)]:
            del self._device_codebooks[key]


def unit_vectors(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x / ||x||, ||x|| keepdim) in float32 along the last dim; zero vectors stay zero."""
    x = x.float()
    norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
    return x / torch.where(norm > 0, norm, torch.ones_like(norm)), norm


def encode_vectors(x: torch.Tensor, rotation: Rotation, codebook: torch.Tensor, block_dim: int, code_bits: int,
                   norm_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Norms `[..., 1]` (clamped to `norm_dtype`'s range) and packed block indices `[..., bytes]`."""
    u, norm = unit_vectors(x)
    blocks = rotation.forward(u).reshape(-1, block_dim)
    index = nearest_codeword(blocks, codebook).reshape(*x.shape[:-1], x.shape[-1] // block_dim)
    stored = norm.clamp(max=torch.finfo(norm_dtype).max).to(norm_dtype)
    return stored, pack_bits(index, code_bits)


def decode_vectors(norm: torch.Tensor, index: torch.Tensor, rotation: Rotation, codebook: torch.Tensor, dim: int,
                   code_bits: int, dtype: torch.dtype) -> torch.Tensor:
    """Inverse of `encode_vectors` for `dim`-vectors: gather codewords, undo the rotation, scale
    by the norm. Elementwise per row apart from the (batch-invariant) rotation."""
    block_dim = codebook.shape[1]
    index = unpack_bits(index, code_bits, dim // block_dim).long()
    rotated = codebook[index].reshape(*index.shape[:-1], dim)
    return (rotation.inverse(rotated) * norm.float()).to(dtype)
