"""quantizer/fibquant: spherical vector quantization codes, codebooks, rotations and calibration.

Error bounds are measured on Gaussian K/V (the rotated unit vectors of Gaussian data are exactly
uniform on the sphere, the law the codebook is built for), block_dim=8, default params:

    code_bits            4       8       12      (head_dim 64: 0.75, 1.25, 1.75 bits/element)
    aggregate rel. err   0.883   0.601   0.437   (30k vectors; head_dim 16..128: 0.86-0.89,
                                                  0.57-0.61, 0.41-0.44)
    worst single vector  1.18    0.87    0.69    (max over 30k vectors, any head_dim 16..128)

At 1 bit per coordinate no quantizer can beat a relative error of 0.5 on Gaussian data (the
rate-distortion bound 2^-R), and the uncalibrated product codebook sits near scalar 1-bit
quantization (0.60); Lloyd refinement brings it to ~0.57. The aggregate error of any tensor is
at most its worst vector's, so property tests over arbitrary shapes use the worst-vector bounds
(with margin) and the large-sample tests use the aggregate ones.
"""

from __future__ import annotations

import hashlib
import math
import re
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import kvpatch
from kvpatch.quant import Codes
from kvpatch.quant.fibquant_codebook import (
    auto_radial_levels,
    lloyd_refine,
    product_codebook,
    quantization_mse,
    radial_levels_at_quantiles,
    radial_log_density,
    sample_sphere_blocks,
    sphere_points,
)
from kvpatch.quant.rotation import make_rotation
from kvpatch.registry import get_stage_class

FibQuantizer = get_stage_class("quantizer", "fibquant")

#: Worst single-vector relative error (measured max + margin) per code_bits, block_dim 8.
WORST_VECTOR_ERROR = {4: 1.25, 8: 0.95, 12: 0.75}
#: Aggregate relative error on >= 2048 Gaussian vectors of head_dim 64 (measured + ~3%).
AGGREGATE_ERROR = {4: 0.91, 8: 0.62, 12: 0.45}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def make(**params: object) -> FibQuantizer:
    """The analytic codebook unless a test asks for the source-model refinement (which costs
    seconds per new shape and is tested on its own)."""
    params.setdefault("source_lloyd_iters", 0)
    return FibQuantizer(FibQuantizer.Params(**params))


def gaussian(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def roundtrip(stage: FibQuantizer, x: torch.Tensor, role: str = "key") -> torch.Tensor:
    return stage.decode(stage.encode(x, role), role, x.dtype)


def relative_error(x: torch.Tensor, decoded: torch.Tensor) -> float:
    x, decoded = x.float(), decoded.float()
    return float((x - decoded).norm() / x.norm())


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1) @ v


def codes_digest(codes: Codes) -> str:
    return hashlib.sha256(b"".join(codes.tensors[n].contiguous().view(torch.uint8).numpy().tobytes()
                                   for n in ("norm", "index"))).hexdigest()


# ---------------------------------------------------------------- encode / decode properties


@settings(max_examples=25, deadline=None)
@given(
    batch=st.integers(1, 2), heads=st.integers(1, 3), tokens=st.integers(1, 40),
    head_dim=st.sampled_from([16, 32, 64, 128]), dtype=st.sampled_from(DTYPES),
    code_bits=st.sampled_from([4, 8, 12]), rotation=st.sampled_from(["hadamard", "orthogonal"]),
    seed=st.integers(0, 2**16), zeros=st.lists(st.integers(0, 39), max_size=3),
)
def test_roundtrip_shape_dtype_finite_error_and_zeros(batch: int, heads: int, tokens: int, head_dim: int,
                                                      dtype: torch.dtype, code_bits: int, rotation: str,
                                                      seed: int, zeros: list[int]) -> None:
    x = gaussian(batch, heads, tokens, head_dim, seed=seed, dtype=dtype)
    zero_tokens = sorted({t for t in zeros if t < tokens})
    x[:, :, zero_tokens] = 0
    decoded = roundtrip(make(code_bits=code_bits, rotation=rotation), x)
    assert decoded.shape == x.shape and decoded.dtype == dtype
    assert torch.isfinite(decoded).all()
    assert torch.equal(decoded[:, :, zero_tokens], torch.zeros_like(decoded[:, :, zero_tokens]))
    if len(zero_tokens) < tokens:
        assert relative_error(x, decoded) < WORST_VECTOR_ERROR[code_bits]


@pytest.mark.parametrize("rotation", ["hadamard", "orthogonal", "none"])
def test_error_bounds_and_monotone_in_code_bits(rotation: str) -> None:
    x = gaussian(1, 4, 512, 64, seed=1)
    errors = [relative_error(x, roundtrip(make(code_bits=b, rotation=rotation), x)) for b in (4, 8, 12)]
    for bits, error in zip((4, 8, 12), errors):
        assert error < AGGREGATE_ERROR[bits], (bits, error)
    assert errors[0] > errors[1] > errors[2]


def test_sub_one_bit_and_fractional_rates_work() -> None:
    """Below ~0.3 index bits per coordinate the analytic codebook is worse than decoding zeros
    (measured: 1.04-1.15 at 0.125-0.25 bits): its radii are not shrunk towards 0 the way an
    MSE-optimal codebook's are. Lloyd refinement, even on unrelated Gaussian data, fixes that."""
    x = gaussian(1, 2, 256, 64, seed=2)
    calibration = gaussian(1, 4, 512, 64, seed=9)
    for block_dim, code_bits, bits in [(16, 8, 0.75), (8, 3, 0.625), (32, 4, 0.375), (4, 6, 1.75)]:
        stage = make(block_dim=block_dim, code_bits=code_bits, lloyd_iters=5)
        codes = stage.encode(x, "value")
        assert codes.bits_per_element() == pytest.approx(bits)
        if code_bits / block_dim >= 0.375:
            assert relative_error(x, stage.decode(codes, "value", x.dtype)) < 1.0
        stage.calibrate(calibration, "value")
        assert relative_error(x, roundtrip(stage, x, "value")) < 0.97


def test_block_dim_one_and_whole_vector_blocks() -> None:
    x = gaussian(1, 1, 64, 16, seed=3)
    scalar = make(block_dim=1, code_bits=4)
    assert relative_error(x, roundtrip(scalar, x)) < 0.15  # 4-bit scalar quantization of each coordinate
    whole = make(block_dim=16, code_bits=12)
    assert relative_error(x, roundtrip(whole, x)) < 0.8
    assert torch.allclose(whole.state_tensors()["codebook.key.16"].norm(dim=1), torch.ones(1 << 12))


def test_norm_dtype_and_overflow_clamp() -> None:
    x = gaussian(1, 1, 8, 64, seed=4) * 1e5  # norms ~8e5, beyond float16's 65504
    codes = make(norm_dtype="float16").encode(x, "key")
    assert codes.tensors["norm"].dtype == torch.float16 and torch.isfinite(codes.tensors["norm"]).all()
    stage = make(norm_dtype="bfloat16")
    codes = stage.encode(x, "key")
    assert codes.tensors["norm"].dtype == torch.bfloat16
    assert relative_error(x, stage.decode(codes, "key", torch.float32)) < AGGREGATE_ERROR[8] + 0.2


def test_bits_per_element_is_exact() -> None:
    for head_dim, block_dim, code_bits in [(64, 8, 8), (128, 8, 12), (64, 8, 4), (32, 4, 6), (16, 16, 8), (16, 16, 16)]:
        codes = make(block_dim=block_dim, code_bits=code_bits).encode(gaussian(2, 1, 3, head_dim), "key")
        assert codes.bits_per_element() == code_bits / block_dim + 16 / head_dim
        assert codes.tensors["index"].dtype == torch.uint8 and codes.block_tokens == 1
    assert make().encode(gaussian(1, 1, 1, 64), "key").bits_per_element() == 1.25  # 12.8x vs float16


@pytest.mark.parametrize("rotation", ["hadamard", "orthogonal", "none"])
def test_random_access_is_bitwise_equal_to_full_decode(rotation: str) -> None:
    stage = make(rotation=rotation)
    codes = stage.encode(gaussian(2, 3, 37, 64, seed=5), "value")
    full = stage.decode(codes, "value", torch.float16)
    for token in range(37):
        one = stage.decode_tokens(codes, "value", torch.tensor([token]), torch.float16)
        assert torch.equal(one[:, :, 0], full[:, :, token]), token
    picked = torch.tensor([30, 2, 2, 17])
    assert torch.equal(stage.decode_tokens(codes, "value", picked, torch.float16), full[:, :, picked])


@pytest.mark.parametrize("rotation", ["hadamard", "orthogonal"])
def test_decode_traces_fullgraph(rotation: str) -> None:
    stage = make(rotation=rotation, code_bits=12)
    codes = stage.encode(gaussian(1, 2, 9, 32, seed=6), "key")
    compiled = torch.compile(stage.decode, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(codes, "key", torch.bfloat16), stage.decode(codes, "key", torch.bfloat16))


# ---------------------------------------------------------------- determinism

SUBPROCESS = """
import hashlib, torch
from kvpatch.registry import get_stage_class
cls = get_stage_class("quantizer", "fibquant")
x = torch.randn(1, 2, 16, 64, generator=torch.Generator().manual_seed(8))
for rotation in ("hadamard", "orthogonal"):
    codes = cls(cls.Params(rotation=rotation, seed=7, source_lloyd_iters=0)).encode(x, "key")
    print(hashlib.sha256(b"".join(codes.tensors[n].contiguous().view(torch.uint8).numpy().tobytes()
                                  for n in ("norm", "index"))).hexdigest())
"""


def test_codes_are_deterministic_per_seed_within_and_across_processes() -> None:
    x = gaussian(1, 2, 16, 64, seed=8)
    here = []
    for rotation in ("hadamard", "orthogonal"):
        a = make(rotation=rotation, seed=7).encode(x, "key")
        b = make(rotation=rotation, seed=7).encode(x, "key")
        other = make(rotation=rotation, seed=8).encode(x, "key")
        assert all(torch.equal(a.tensors[n], b.tensors[n]) for n in a.tensors)
        assert not torch.equal(a.tensors["index"], other.tensors["index"])
        here.append(codes_digest(a))
    result = subprocess.run([sys.executable, "-c", SUBPROCESS], capture_output=True, text=True, check=True)
    assert result.stdout.split() == here


def test_rotations_are_orthogonal_and_seeded() -> None:
    u = gaussian(5, 64, seed=9)
    for kind in ("hadamard", "orthogonal"):
        rotation = make_rotation(kind, 64, seed=3)
        y = rotation.forward(u)
        assert torch.allclose(y.norm(dim=1), u.norm(dim=1), atol=1e-4)
        assert torch.allclose(rotation.inverse(y), u, atol=1e-4)
        assert not torch.allclose(make_rotation(kind, 64, seed=4).forward(u), y)
    assert torch.equal(make_rotation("none", 64, 0).forward(u), u)


# ---------------------------------------------------------------- codebook


def test_radial_law_is_the_spherical_beta_norm() -> None:
    k, dim = 8, 64
    r = (torch.arange(100_000, dtype=torch.float64) + 0.5) / 100_000
    p = torch.exp(radial_log_density(r, k, dim))
    assert float(p.sum() / 100_000) == pytest.approx(1.0, abs=1e-6)
    # E||b||^2 = k / D for a uniform unit vector, and the samples follow the same law.
    assert float((r * r * p).sum() / 100_000) == pytest.approx(k / dim, abs=1e-6)
    samples = sample_sphere_blocks(k, dim, 20_000, seed=0).double().norm(dim=1)
    assert float((samples**2).mean()) == pytest.approx(k / dim, rel=0.02)
    median = radial_levels_at_quantiles(k, dim, 1, companding=False)
    assert float((samples < median).double().mean()) == pytest.approx(0.5, abs=0.02)


@pytest.mark.parametrize("k, dim", [(2, 16), (4, 32), (8, 64), (16, 128), (8, 16)])
def test_radii_increasing_in_unit_interval_and_companding_spreads_them(k: int, dim: int) -> None:
    plain = radial_levels_at_quantiles(k, dim, 8, companding=False)
    companded = radial_levels_at_quantiles(k, dim, 8, companding=True)
    for radii in (plain, companded):
        assert (radii.diff() > 0).all() and (radii > 0).all() and (radii <= 1).all()
    # p^(1/3) has heavier tails than p: the extreme levels move outwards.
    assert companded[0] < plain[0] and companded[-1] > plain[-1]


def test_codebook_structure_and_size() -> None:
    book = product_codebook(8, 64, code_bits=8, levels=4, companding=True)
    assert book.shape == (256, 8) and book.dtype == torch.float32
    radii = book.norm(dim=1).reshape(4, 64)
    assert torch.allclose(radii, radii[:, :1].expand(4, 64), atol=1e-6)  # row i * 64 + j: radius i
    assert (radii[:, 0].diff() > 0).all()
    assert product_codebook(8, 64, code_bits=8, levels=3, companding=True).shape == (3 * 85, 8)  # floor(256/3)


@pytest.mark.parametrize("k", [2, 3, 4, 5, 8, 16])
def test_directions_are_unit_vectors(k: int) -> None:
    points = sphere_points(k, 200)
    assert points.shape == (200, k)
    assert torch.allclose(points.norm(dim=1), torch.ones(200, dtype=torch.float64), atol=1e-12)


def test_low_dimensional_direction_sets_have_their_closed_forms() -> None:
    angles = torch.atan2(sphere_points(2, 12)[:, 1], sphere_points(2, 12)[:, 0])
    assert torch.allclose(torch.remainder(angles.diff(), 2 * math.pi), torch.full((11,), 2 * math.pi / 12, dtype=torch.float64))
    fib = sphere_points(3, 300)
    j = torch.arange(300, dtype=torch.float64)
    assert torch.allclose(fib[:, 0], 1 - (2 * j + 1) / 300, atol=1e-4)  # equal-area latitude bands
    longitude = torch.atan2(fib[:, 2], fib[:, 1])
    golden_angle = 2 * math.pi * (2 / (1 + math.sqrt(5)))
    assert torch.allclose(torch.remainder(longitude.diff() - golden_angle + 1, 2 * math.pi) - 1,
                          torch.zeros(299, dtype=torch.float64), atol=1e-9)


@pytest.mark.parametrize("k, count", [(3, 64), (3, 512), (4, 256), (8, 256), (8, 4096)])
def test_quasi_uniform_directions_beat_random_points(k: int, count: int) -> None:
    def min_distance(points: torch.Tensor) -> float:
        d = torch.cdist(points, points)
        return float(d.fill_diagonal_(math.inf).min())

    test_points = sample_sphere_blocks(k, k, 4000, seed=1).double()

    def angular_mse(points: torch.Tensor) -> float:  # 1 - cos^2 to the best direction
        return float((1 - (test_points @ points.T).max(dim=1).values.clamp(min=0) ** 2).mean())

    ours = sphere_points(k, count)
    randoms = [torch.nn.functional.normalize(gaussian(count, k, seed=s).double(), dim=1) for s in range(3)]
    assert min_distance(ours) > max(min_distance(r) for r in randoms)
    assert angular_mse(ours) < min(angular_mse(r) for r in randoms)


def test_automatic_split_is_the_best_power_of_two() -> None:
    k, dim, bits = 4, 32, 6
    chosen = auto_radial_levels(k, dim, bits, True)
    samples = sample_sphere_blocks(k, dim, 2048, seed=0)
    mse = {2**e: quantization_mse(samples, product_codebook(k, dim, bits, 2**e, True)) for e in range(bits + 1)}
    assert mse[chosen] == min(mse.values())
    stage = make(code_bits=bits, block_dim=k, rotation="none")
    stage.encode(gaussian(1, 1, 1, dim), "key")
    assert torch.equal(stage.state_tensors()["codebook.key.32"], product_codebook(k, dim, bits, chosen, True))


# ---------------------------------------------------------------- Lloyd-Max calibration


def test_lloyd_refinement_never_raises_mse_and_calibrate_lowers_error() -> None:
    blocks = sample_sphere_blocks(8, 64, 8192, seed=2)
    book = product_codebook(8, 64, 8, 1, True)
    mses = [quantization_mse(blocks, lloyd_refine(book, blocks, iters)) for iters in range(4)]
    assert all(later <= earlier + 1e-7 for earlier, later in zip(mses, mses[1:])) and mses[-1] < 0.95 * mses[0]

    x = gaussian(1, 4, 512, 64, seed=3)
    stage = make(lloyd_iters=4)
    before = relative_error(x, roundtrip(stage, x))
    original = stage.state_tensors()["codebook.key.64"]
    stage.calibrate(x, "key")
    assert relative_error(x, roundtrip(stage, x)) < before - 0.01
    assert not torch.equal(stage.state_tensors()["codebook.key.64"], original)
    assert stage.stats()["calibrated"] == ["key.64"]


def test_calibration_on_other_gaussian_data_generalises() -> None:
    stage = make(code_bits=4, lloyd_iters=5)
    x = gaussian(1, 4, 256, 64, seed=4)
    before = relative_error(x, roundtrip(stage, x))
    stage.calibrate(gaussian(1, 4, 512, 64, seed=5), "key")
    assert relative_error(x, roundtrip(stage, x)) < before - 0.05


def test_first_encode_calibration_is_deterministic_and_persistable() -> None:
    x = gaussian(1, 2, 256, 64, seed=6)
    a, b = make(calibration="first_encode", lloyd_iters=3), make(calibration="first_encode", lloyd_iters=3)
    codes_a, codes_b = a.encode(x, "key"), b.encode(x, "key")
    assert codes_digest(codes_a) == codes_digest(codes_b)
    state = a.state_tensors()
    assert torch.equal(state["codebook.key.64"], b.state_tensors()["codebook.key.64"])
    assert not torch.equal(state["codebook.key.64"], analytic_state(x)["codebook.key.64"])
    assert a.stats()["calibrated"] == ["key.64"]

    restored = make()
    restored.load_state_tensors(state)
    assert torch.equal(restored.decode(codes_a, "key", torch.float32), a.decode(codes_a, "key", torch.float32))
    assert codes_digest(restored.encode(x, "key")) == codes_digest(codes_a)


def analytic_state(x: torch.Tensor) -> dict[str, torch.Tensor]:
    stage = make()
    stage.encode(x, "key")
    return stage.state_tensors()


def test_short_first_encode_freezes_the_analytic_codebook() -> None:
    stage = make(calibration="first_encode", lloyd_iters=3)
    short = gaussian(1, 2, 10, 64, seed=7)
    codes = stage.encode(short, "value")
    decoded = stage.decode(codes, "value", torch.float32)
    stage.encode(gaussian(1, 2, 300, 64, seed=8), "value")  # long, but the codebook is in use
    assert stage.stats()["calibrated"] == []
    assert torch.equal(stage.decode(codes, "value", torch.float32), decoded)


# ---------------------------------------------------------------- attention fidelity


def test_attention_output_cosine() -> None:
    """Random Gaussian q, k, v: attention is nearly uniform, so errors do not cancel and the
    cosine tracks sqrt(1 - rel_err^2) of K and V (measured: 0.68 at 8 bits, 0.83 at 12)."""
    q, k, v = (gaussian(1, 4, 256, 64, seed=s) for s in (10, 11, 12))
    exact = attention(q, k, v)
    cosines = []
    for bits in (4, 8, 12):
        stage = make(code_bits=bits)
        approx = attention(q, roundtrip(stage, k, "key"), roundtrip(stage, v, "value"))
        cosines.append(float(torch.nn.functional.cosine_similarity(exact, approx, dim=-1).mean()))
    assert cosines[1] >= 0.65 and cosines[2] >= 0.8
    assert cosines[0] < cosines[1] < cosines[2]


# ---------------------------------------------------------------- params and errors


def test_builds_with_default_params() -> None:
    config = kvpatch.load_config({"name": "t", "fidelity": {"lossless": False, "min_logit_cosine": 0.0},
                                  "stages": [{"kind": "quantizer", "impl": "fibquant", "params": {}}]})
    stage = config.stages[0].build()
    assert isinstance(stage, FibQuantizer) and not stage.lossless and stage.block_tokens("key") == 1
    assert stage.params.code_bits == 8 and stage.params.block_dim == 8


@pytest.mark.parametrize("params, fragment", [
    ({"code_bits": 0}, "code_bits"),
    ({"code_bits": 17}, "code_bits"),
    ({"block_dim": 0}, "block_dim"),
    ({"radial_levels": 300}, "radial_levels"),
    ({"rotation": "random"}, "rotation"),
    ({"calibration": "first_encode"}, "lloyd_iters"),
])
def test_invalid_params_name_the_param(params: dict, fragment: str) -> None:
    with pytest.raises(kvpatch.ConfigError, match=fragment):
        kvpatch.load_config({"name": "t", "stages": [{"kind": "quantizer", "impl": "fibquant", "params": params}]})


def test_invalid_head_dims_raise_clear_errors() -> None:
    with pytest.raises(ValueError, match="block_dim=6 must divide head_dim=64"):
        make(block_dim=6).encode(gaussian(1, 1, 2, 64), "key")
    with pytest.raises(ValueError, match="rotation='hadamard' needs a power-of-two head_dim, got 48"):
        make().encode(gaussian(1, 1, 2, 48), "key")
    assert roundtrip(make(rotation="orthogonal"), gaussian(1, 1, 2, 48)).shape == (1, 1, 2, 48)
    with pytest.raises(ValueError, match=re.escape("'codebook.<key|value>.<head_dim>'")):
        make().load_state_tensors({"rotation.key.64": torch.zeros(256, 8)})
    with pytest.raises(ValueError, match="block_dim=8"):
        make().load_state_tensors({"codebook.key.64": torch.zeros(256, 4)})


@pytest.mark.parametrize("block_dim, code_bits", [(8, 8), (16, 4)])
def test_source_refinement_lowers_error_and_beats_decoding_zeros(block_dim: int, code_bits: int) -> None:
    """Lloyd steps on the spherical source model itself shrink low-rate cells toward their
    centroids: lower error on unseen Gaussian data, and below 1 (decoding zeros) at 0.25 bits."""
    x = gaussian(1, 4, 1024, 64, seed=11)
    analytic = relative_error(x, roundtrip(make(block_dim=block_dim, code_bits=code_bits), x))
    refined = relative_error(x, roundtrip(make(block_dim=block_dim, code_bits=code_bits, source_lloyd_iters=8), x))
    assert refined < analytic * 0.97
    assert refined < 1.0
