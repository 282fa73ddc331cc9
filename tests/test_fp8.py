"""`quantizer/fp8`: the error bound of each format, exact round trip of what fp8 can represent,
zero groups, random access, scales per group, and misfits refused at `apply`."""

from __future__ import annotations

import pytest
import torch

import kvpatch
from kvpatch.registry import get_stage_class
from kvpatch.testing import tiny_model

Fp8 = get_stage_class("quantizer", "fp8")
MANTISSA_BITS = {"e4m3": 3, "e5m2": 2}


def quantizer(fmt: str = "e4m3", group_size: int | None = None):
    return Fp8(Fp8.Params(format=fmt, group_size=group_size))


@pytest.mark.parametrize("group_size", [None, 16])
@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
def test_error_is_within_half_a_step_of_each_element(fmt: str, group_size: int | None) -> None:
    x = torch.randn(2, 3, 29, 64, generator=torch.Generator().manual_seed(0)) * torch.logspace(-3, 2, 64)
    q = quantizer(fmt, group_size)
    codes = q.encode(x, "key")
    y = q.decode(codes, "key", torch.float32)
    scale = codes.tensors["scale"].repeat_interleave(group_size or 64, dim=-1)
    fp8 = torch.float8_e4m3fn if fmt == "e4m3" else torch.float8_e5m2
    subnormal_step = torch.finfo(fp8).smallest_normal * 2.0 ** -MANTISSA_BITS[fmt]
    bound = torch.maximum(x.abs() * 2.0 ** -(MANTISSA_BITS[fmt] + 1), scale * subnormal_step / 2) * 1.0001
    assert ((y - x).abs() <= bound).all()
    assert codes.tensors["codes"].dtype == torch.uint8 and codes.bits_per_element() == 8 + 32 / (group_size or 64)


def test_values_fp8_represents_come_back_exactly_and_zeros_stay_zero() -> None:
    q = quantizer()
    exact = torch.tensor([0.0, 448.0, -448.0, 1.0, 0.5, -3.5, 0.015625, 2.0 ** -9]).reshape(1, 1, 1, 8)
    assert torch.equal(q.decode(q.encode(exact, "value"), "value", torch.float32), exact)  # absmax 448: scale 1
    zeros = torch.zeros(1, 2, 3, 8)
    assert torch.equal(q.decode(q.encode(zeros, "key"), "key", torch.float32), zeros)


def test_random_access_and_dtype() -> None:
    q = quantizer("e5m2", 8)
    x = torch.randn(1, 2, 10, 16, dtype=torch.bfloat16)
    codes = q.encode(x, "key")
    full = q.decode(codes, "key", torch.bfloat16)
    assert full.dtype == torch.bfloat16
    picked = torch.tensor([9, 0, 4])
    assert torch.equal(q.decode_tokens(codes, "key", picked, torch.bfloat16), full[:, :, picked])


def test_a_group_size_that_does_not_divide_head_dim_is_refused_at_apply() -> None:
    model = tiny_model("llama")  # head_dim 16
    config = kvpatch.load_config("fp8").model_dump()
    config["stages"][0]["params"]["group_size"] = 6
    with pytest.raises(kvpatch.ConfigError, match="group_size"):
        kvpatch.apply(model, config)
    assert kvpatch.get_handle(model) is None
