"""Stages checked against the model's shapes at `apply`: a config that cannot work on this model
is refused there, naming stage, field, the model's value and what was expected, and the model is
left exactly as it was (issue 24: kivi4 used to apply and then fail inside generate)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

import kvpatch
from kvpatch.model_shapes import ModelShapes
from kvpatch.registry import get_stage_class
from kvpatch.testing import prompt_ids, tiny_model

REGISTERED = [(kind, name) for kind, names in kvpatch.available_stages().items() for name in names]
#: A typical large model (Llama-3-8B-like): every stage's defaults must fit it.
TYPICAL = ModelShapes(model_type="llama", head_dim=128, kv_heads=8, num_layers=32, vocab_size=128256)


def quantized(quantizer: str, params: dict[str, Any], **storage: Any) -> dict[str, Any]:
    return {"name": "t", "fidelity": {"lossless": False},
            "stages": [{"kind": "quantizer", "impl": quantizer, "params": params},
                       {"kind": "storage", "impl": "quantized", "params": {"residual_length": 4, **storage}}]}


def reuse(chunker: dict[str, Any] | None = None, recompute: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"name": "t", "fidelity": {"lossless": False},
            "stages": [{"kind": "chunker", "impl": "fixed", "params": chunker or {}},
                       {"kind": "matcher", "impl": "approximate"}, {"kind": "store", "impl": "memory"},
                       {"kind": "recompute", "impl": "cacheblend", "params": recompute or {}}]}


# The tiny models have head_dim 16, 2 layers and a vocabulary of 320.
MISFITS = [
    pytest.param(quantized("kivi", {"bits": 4, "group_size": 32}),
                 ["quantizer/kivi", "params.group_size is 32", "head_dim is 16", "a divisor of 16"], id="kivi-group"),
    pytest.param(quantized("kivi", {"bits": 2, "group_size": 6}), ["params.group_size is 6", "[1, 2, 4, 8, 16]"],
                 id="kivi-group-not-divisor"),
    pytest.param(quantized("fibquant", {"block_dim": 3}), ["quantizer/fibquant", "params.block_dim is 3", "head_dim is 16"],
                 id="fibquant-block"),
    pytest.param(quantized("kivi", {"group_size": 8}, residual_length=4, capacity_tokens=64),
                 ["storage/quantized", "residual_length (4) must be a multiple of the quantizer's block (8 tokens)"],
                 id="static-residual"),
    pytest.param(reuse(chunker={"boundary_token_ids": [10, 320, 5000]}),
                 ["chunker/fixed", "params.boundary_token_ids is [320, 5000]", "vocab_size is 320", "below 320"],
                 id="token-ids"),
    pytest.param(reuse(recompute={"check_layer": 2}),
                 ["recompute/cacheblend", "params.check_layer is 2", "number of layers is 2"], id="check-layer"),
]


@pytest.mark.parametrize("config, fragments", MISFITS)
def test_misfit_is_refused_at_apply_and_the_model_left_unpatched(config: dict[str, Any], fragments: list[str]) -> None:
    model = tiny_model("llama")
    attention_before = model.config._attn_implementation
    with pytest.raises(kvpatch.ConfigError) as info:
        kvpatch.apply(model, config)
    message = str(info.value)
    for fragment in ["does not fit this llama model", *fragments]:
        assert fragment in message, f"{fragment!r} missing from: {message}"
    assert "\n" not in message
    assert kvpatch.get_handle(model) is None
    assert model.config._attn_implementation == attention_before
    assert not model._forward_pre_hooks and not model._forward_hooks


def test_fitting_kivi_applies_and_generates_past_the_residual_window() -> None:
    model = tiny_model("llama")
    handle = kvpatch.apply(model, quantized("kivi", {"bits": 4, "group_size": 8}))
    ids = prompt_ids(batch=1, length=40)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False)
    assert out.shape[1] == 44 and handle.stats()["tokens"] >= 40


def test_default_check_layer_is_not_refused_on_a_shallow_model() -> None:
    """The default (1) is clamped to the last layer; only an explicit out-of-range value is an error."""
    stage = get_stage_class("recompute", "cacheblend")(get_stage_class("recompute", "cacheblend").Params())
    shallow = ModelShapes(model_type="llama", head_dim=16, kv_heads=2, num_layers=1, vocab_size=320)
    assert stage.model_problems(shallow) == []


def test_hadamard_needs_a_power_of_two_head_dim() -> None:
    cls = get_stage_class("quantizer", "fibquant")
    odd = ModelShapes(model_type="phi", head_dim=80, kv_heads=32, num_layers=32, vocab_size=51200)
    problems = cls(cls.Params(block_dim=8)).model_problems(odd)
    assert len(problems) == 1 and "params.rotation is 'hadamard'" in problems[0] and "orthogonal" in problems[0]
    assert cls(cls.Params(block_dim=8, rotation="orthogonal")).model_problems(odd) == []


@pytest.mark.parametrize("kind, name", REGISTERED)
def test_every_stage_default_fits_a_typical_model(kind: str, name: str) -> None:
    cls = get_stage_class(kind, name)
    assert cls(cls.Params()).model_problems(TYPICAL) == []


def test_model_shapes_read_head_dim_like_the_rest_of_kvpatch() -> None:
    assert ModelShapes.of(tiny_model("llama").config) == ModelShapes("llama", 16, 2, 2, 320)
    gpt2 = ModelShapes.of(tiny_model("gpt2").config)  # no head_dim attribute: hidden_size // heads
    assert (gpt2.head_dim, gpt2.kv_heads, gpt2.num_layers) == (16, 4, 2)
