"""Families kvpatch cannot patch are refused clearly; a patch that does not take effect is caught."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import kvpatch

SMALL = dict(vocab_size=64, hidden_size=32, num_attention_heads=4, num_hidden_layers=2)


def _model(model_type: str, **overrides: object) -> torch.nn.Module:
    kwargs = {**SMALL, **overrides}
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **kwargs)).eval()


REFUSED = {
    "falcon": {},
    "bloom": {"n_head": 4, "n_layer": 2},
    "gpt_neo": {"num_layers": 2, "attention_types": [[["global", "local"], 1]], "num_heads": 4},
    "mpt": {"d_model": 32, "n_heads": 4, "n_layers": 2},
}


@pytest.mark.parametrize("model_type", sorted(REFUSED))
def test_known_unsupported_family_is_refused_with_reason(model_type: str) -> None:
    model = _model(model_type, **REFUSED[model_type])
    with pytest.raises(kvpatch.UnsupportedModelError, match=f"does not support model_type '{model_type}'.*AttentionInterface"):
        kvpatch.apply(model, "default")
    assert kvpatch.get_handle(model) is None


def test_hybrid_family_is_refused_with_reason() -> None:
    model = _model("lfm2", intermediate_size=64, num_key_value_heads=2, layer_types=["conv", "full_attention"])
    with pytest.raises(kvpatch.UnsupportedModelError, match="does not support model_type 'lfm2'.*hybrid model"):
        kvpatch.apply(model, "default")
    assert kvpatch.get_handle(model) is None


def test_unverified_family_is_refused() -> None:
    model = _model("opt", ffn_dim=64, max_position_embeddings=64, word_embed_proj_dim=32)
    with pytest.raises(kvpatch.UnsupportedModelError, match="has not verified model_type 'opt'"):
        kvpatch.apply(model, "default")


def test_patch_that_does_not_take_effect_is_detected_and_rolled_back() -> None:
    """A family whose attention bypasses the interface, disguised as a supported one.

    Bloom, not falcon: transformers 5.25 moved FalconAttention onto the AttentionInterface.
    """
    model = _model("bloom", **REFUSED["bloom"])
    original = model.config._attn_implementation
    model.config.model_type = "llama"
    with pytest.raises(kvpatch.UnsupportedModelError, match="did not take effect.*0 of 2 layers"):
        kvpatch.apply(model, "default")
    assert model.config._attn_implementation == original
    assert kvpatch.get_handle(model) is None
