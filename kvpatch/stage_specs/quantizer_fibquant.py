"""`quantizer/fibquant`: spherical vector quantization (kvpatch/stages/quantizer_fibquant.py)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from ..params import Count, Seed, Size
from ..registry import StageParams, declare_stage

#: The random rotations before quantizing (kvpatch/quant/rotation.py builds them).
RotationKind = Literal["hadamard", "orthogonal", "none"]


class FibQuantParams(StageParams):
    #: Bits of each block's codebook index (the codebook has at most 2**code_bits entries).
    code_bits: Annotated[Size, Field(le=16)] = 8
    #: Coordinates per block (k); must divide head_dim. code_bits / block_dim bits per element.
    block_dim: Size = 8
    #: Radii in the product codebook. None: the split with the lowest MSE on seeded samples
    #: of the sphere, over powers of two (see `auto_radial_levels`). 1 when block_dim == head_dim.
    radial_levels: Size | None = None
    #: Place radii at quantiles of p(r)^(1/3) (Bennett-Gersho) rather than of p(r).
    companding: bool = True
    #: Random rotation before quantizing. "hadamard" needs a power-of-two head_dim.
    rotation: RotationKind = "hadamard"
    #: Seed of the rotation (the same seed gives the same codes on every machine).
    seed: Seed = 0
    norm_dtype: Literal["float16", "bfloat16"] = "float16"
    #: Lloyd-Max steps on seeded samples of the spherical source model when the codebook is
    #: built (data-independent; see `source_refined_codebook`). 0: the analytic codebook.
    source_lloyd_iters: Count = 8
    #: Lloyd-Max (k-means) iterations that `calibrate` runs on calibration data.
    lloyd_iters: Count = 0
    #: "first_encode": if a role's first encode has >= 256 tokens, that role's codebook is first
    #: calibrated on it (lloyd_iters steps), so all codes depend on that data. A shorter first
    #: encode fixes the analytic codebook for good (earlier codes must keep decoding). One
    #: codebook serves every layer, so it is calibrated on the first layer that encodes.
    calibration: Literal["none", "first_encode"] = "none"

    @model_validator(mode="after")
    def _consistent(self) -> "FibQuantParams":
        if self.radial_levels is not None and self.radial_levels > 1 << self.code_bits:
            raise ValueError(f"radial_levels ({self.radial_levels}) must be at most 2**code_bits = {1 << self.code_bits}")
        if self.calibration == "first_encode" and self.lloyd_iters == 0:
            raise ValueError("calibration 'first_encode' needs lloyd_iters > 0 (0 iterations would not calibrate)")
        return self


declare_stage("quantizer", "fibquant", "kvpatch.stages.quantizer_fibquant:FibQuantizer", FibQuantParams,
              lossless=False)
