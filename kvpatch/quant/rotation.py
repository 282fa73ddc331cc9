"""Seeded random rotations of the last dimension, for quantizers that want isotropic inputs.

Rotating a unit vector by a random orthogonal matrix makes its coordinates look like a uniform
point on the sphere whatever the data's outlier channels were, which is the distribution a
FibQuant codebook is designed for. Rotations are built on the CPU from a `torch.Generator`
seeded with the config's seed (so every process and machine builds the same one), then moved to
the compute device.

`inverse` is batch-invariant: the result for a row does not depend on how many other rows are
decoded with it (Hadamard: only elementwise ops; dense matrices: exact fixed-grid float64
arithmetic, so BLAS's shape-dependent summation order cannot matter), so random-access decoding
of one token equals the same row of a full decode, bit for bit.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from ..stage_specs.quantizer_fibquant import RotationKind

#: Dense rotation matrices and the vectors they inverse-rotate are rounded to multiples of
#: 2^-EXACT_BITS, so that float64 products of the two (2 * EXACT_BITS bits) are exact.
EXACT_BITS = 20


class Rotation(ABC):
    """An orthogonal map of the last dimension; `forward` before quantizing, `inverse` after."""

    @abstractmethod
    def forward(self, u: torch.Tensor) -> torch.Tensor: ...

    @abstractmethod
    def inverse(self, y: torch.Tensor) -> torch.Tensor: ...

    @abstractmethod
    def to(self, device: torch.device | str) -> "Rotation": ...


class IdentityRotation(Rotation):
    """No rotation (`rotation: none`): for inputs already isotropic, or to measure the gain."""

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        return u

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        return y

    def to(self, device: torch.device | str) -> "IdentityRotation":
        return self


class HadamardRotation(Rotation):
    """Random signs, then the normalised Walsh-Hadamard transform: O(D log D), D a power of two."""

    def __init__(self, signs: torch.Tensor) -> None:
        self.signs = signs
        self.scale = signs.shape[0] ** -0.5

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        return walsh_hadamard(u * self.signs) * self.scale

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        # H / sqrt(D) is symmetric and orthogonal, so it is its own inverse.
        return walsh_hadamard(y) * self.scale * self.signs

    def to(self, device: torch.device | str) -> "HadamardRotation":
        return HadamardRotation(self.signs.to(device))


class MatrixRotation(Rotation):
    """A dense orthogonal matrix `Q` whose entries lie on the 2^-EXACT_BITS grid (rows are mapped
    `u -> u @ Q`). `inverse` rounds its input to the same grid and multiplies in float64, where
    every product and partial sum is then exact: the result is the same for any summation order
    (BLAS blocking, batch size, device), so it is batch-invariant. Exact for entries of `y` up to 1
    in magnitude and D <= 2^(53 - 2 EXACT_BITS) = 8192; the grid costs ~1e-6 per entry."""

    def __init__(self, matrix: torch.Tensor) -> None:
        self.matrix = matrix.to(torch.float64)
        self.forward_matrix = matrix.to(torch.float32)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        return u @ self.forward_matrix

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        return (snap_to_grid(y.to(torch.float64)) @ self.matrix.T).to(y.dtype)

    def to(self, device: torch.device | str) -> "MatrixRotation":
        return MatrixRotation(self.matrix.to(device))


def walsh_hadamard(x: torch.Tensor) -> torch.Tensor:
    """Unnormalised fast Walsh-Hadamard transform of the last dim (a power of two).

    Only elementwise adds and subtracts, so each row's result is independent of the batch."""
    dim = x.shape[-1]
    lead = x.shape[:-1]
    half = 1
    while half < dim:
        pairs = x.reshape(*lead, dim // (2 * half), 2, half)
        a, b = pairs[..., 0, :], pairs[..., 1, :]
        x = torch.stack((a + b, a - b), dim=-2).reshape(*lead, dim)
        half *= 2
    return x


def snap_to_grid(x: torch.Tensor) -> torch.Tensor:
    """Round to the nearest multiple of 2^-EXACT_BITS (exact scaling by powers of two)."""
    return torch.round(x * 2.0**EXACT_BITS) * 2.0**-EXACT_BITS


def random_signs(dim: int, seed: int) -> torch.Tensor:
    """`dim` random ±1 (float32) from a CPU generator; integers, so identical on every machine."""
    generator = torch.Generator("cpu").manual_seed(seed)
    return (torch.randint(0, 2, (dim,), generator=generator) * 2 - 1).to(torch.float32)


def haar_orthogonal(dim: int, seed: int) -> torch.Tensor:
    """A Haar-random orthogonal matrix (float64, on the 2^-EXACT_BITS grid, so orthogonal to
    ~1e-6): QR of a seeded Gaussian in float64, with the signs of R's diagonal moved into Q so
    the result is unique (and uniformly distributed)."""
    generator = torch.Generator("cpu").manual_seed(seed)
    gaussian = torch.randn(dim, dim, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(gaussian)
    return snap_to_grid(q * torch.sign(torch.diagonal(r)))


def check_rotation_dim(kind: RotationKind, dim: int) -> None:
    """Raise a clear error when `kind` cannot rotate `dim`-vectors (Hadamard needs a power of two)."""
    if kind == "hadamard" and (dim < 1 or dim & (dim - 1)):
        raise ValueError(f"rotation='hadamard' needs a power-of-two head_dim, got {dim}; use rotation: orthogonal")


def make_rotation(kind: RotationKind, dim: int, seed: int) -> Rotation:
    """The `kind` rotation of `dim`-vectors for `seed`, on the CPU."""
    if kind == "none":
        return IdentityRotation()
    check_rotation_dim(kind, dim)
    if kind == "hadamard":
        return HadamardRotation(random_signs(dim, seed))
    if kind == "orthogonal":
        return MatrixRotation(haar_orthogonal(dim, seed))
    raise ValueError(f"unknown rotation {kind!r}; expected 'hadamard', 'orthogonal' or 'none'")
