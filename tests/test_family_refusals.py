"""Configs a family cannot run exactly are refused at apply, naming the family and why, and the
model is left exactly as it was (`refuses` in patches/<family>.yaml)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import kvpatch
from kvpatch.config import bundled_configs
from kvpatch.testing import prompt_ids, tiny_model

#: The bundled configs each family must refuse, and a phrase its reason must contain.
EXPECTED = {
    ("gpt_oss", "compiled_graphs"): "attention sink",
    ("gpt_oss", "default_graphs"): "attention sink",
    ("gpt_oss", "kivi4_triton"): "attention sink",
    **{("deepseek_v3", config): "latent attention" for config in (
        "compiled_graphs", "default_graphs", "fibquant", "fixed_budget", "fp8", "h2o", "kivi2", "kivi4",
        "kivi4_triton", "long_context", "prefix_reuse", "rag_reuse", "snapkv", "streaming", "tova")},
}
#: Families whose caches cannot be snapshotted, and a phrase the reason must contain.
NO_SNAPSHOTS = {"deepseek_v3": "latent attention"}
FAMILIES = kvpatch.supported_families()
REFUSED = sorted((family, config) for family, spec in FAMILIES.items() for config in bundled_configs()
                 if spec.config_problems(kvpatch.load_config(config)))


def test_the_declared_refusals_are_the_expected_ones() -> None:
    assert REFUSED == sorted(EXPECTED)


@pytest.mark.parametrize(("model_type", "config"), REFUSED)
def test_refused_config_names_family_and_reason(model_type: str, config: str) -> None:
    model = tiny_model(model_type)
    ids = prompt_ids(length=10)
    with torch.no_grad():
        before = model(input_ids=ids).logits
    family = FAMILIES[model_type].family
    with pytest.raises(kvpatch.ConfigError, match=f"does not fit the {family} family.*{EXPECTED[(model_type, config)]}"):
        kvpatch.apply(model, config)
    assert kvpatch.get_handle(model) is None and model.config._attn_implementation != "kvpatch"
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, before)


def test_snapshot_refusals_are_the_expected_ones() -> None:
    assert {t for t, spec in FAMILIES.items() if spec.refuses_snapshots} == set(NO_SNAPSHOTS)


@pytest.mark.parametrize("model_type", sorted(NO_SNAPSHOTS))
def test_snapshot_export_and_import_are_refused(model_type: str, tmp_path: Path) -> None:
    model = tiny_model(model_type)
    handle = kvpatch.apply(model, "default")
    with torch.no_grad():
        model(input_ids=prompt_ids(length=10), use_cache=True)
    with pytest.raises(kvpatch.UnsupportedModelError, match=f"cannot snapshot.*{NO_SNAPSHOTS[model_type]}"):
        handle.export_snapshot(tmp_path / "cache.safetensors")
    assert not (tmp_path / "cache.safetensors").exists()
    with pytest.raises(kvpatch.UnsupportedModelError, match=f"cannot snapshot.*{NO_SNAPSHOTS[model_type]}"):
        handle.import_snapshot(tmp_path / "cache.safetensors")
