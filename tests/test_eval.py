"""The fidelity harness: its numbers match independent computations, a lossless config scores as
lossless, and a deliberately broken cache is caught."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
from transformers.cache_utils import DynamicLayer

import kvpatch
from kvpatch.eval import EvalResult, EvalSettings, evaluate, plot_fidelity_vs_memory, reference_run
from kvpatch.eval.bounds import EXACT, Deviation
from kvpatch.cli.evaluate import eval_command
from kvpatch.cli.parser import add_eval_arguments
from kvpatch.eval.harness import attention_modules
from kvpatch.eval.metrics import window_spans
from kvpatch.models import load_named
from kvpatch.testing import noisy_values_config, tiny_model, tiny_tokenizer

QUICK = EvalSettings.quick()


class _ZeroValueLayer(DynamicLayer):
    """Stores zeros instead of the values: attention over the cache returns garbage."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        return super().update(key_states, torch.zeros_like(value_states), *args, **kwargs)


@kvpatch.register_stage("storage", "_test_broken")
class _BrokenStorage(kvpatch.Stage):
    """Test-only lossy storage that the harness must flag."""

    lossless = False

    def make_layer(self, layout) -> DynamicLayer:
        return _ZeroValueLayer()


BROKEN = {
    "name": "broken",
    "fidelity": {"lossless": False, "min_logit_cosine": 0.99},
    "stages": [{"kind": "storage", "impl": "_test_broken"}],
}


@pytest.fixture(scope="module")
def reference() -> tuple[torch.nn.Module, object]:
    return kvpatch.models.load("kvpatch-ref")


@pytest.fixture(scope="module")
def quick_reference(reference) -> object:
    """The unpatched side of the quick preset, measured once for this module's configs (as
    `kvpatch eval` shares it across configs)."""
    model, tokenizer = reference
    return reference_run(model, tokenizer, QUICK)


@pytest.fixture(scope="module")
def default_result(reference, quick_reference) -> EvalResult:
    model, tokenizer = reference
    return evaluate(model, tokenizer, "default", reference=quick_reference)


@pytest.fixture(scope="module")
def broken_result(reference, quick_reference) -> EvalResult:
    model, tokenizer = reference
    return evaluate(model, tokenizer, BROKEN, reference=quick_reference)


def _plain_perplexity(model: torch.nn.Module, ids: list[int], window: int, stride: int) -> float:
    """Sliding-window perplexity written out longhand: every token after the first is predicted
    once, from the window that first reaches it, with log-softmax + gather and no cache."""
    nll, count, done = 0.0, 0, 1  # ids[0] has no prediction
    start = 0
    while done < len(ids):
        chunk = ids[start : start + window]
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=torch.tensor([chunk]), use_cache=False).logits[0].double(), -1)
        for pos in range(max(done, start + 1), start + len(chunk)):
            nll -= logp[pos - start - 1, ids[pos]].item()
            count += 1
        done = start + len(chunk)
        start += stride
    return math.exp(nll / count)


def test_unpatched_perplexity_matches_plain_loop(reference, default_result: EvalResult) -> None:
    model, tokenizer = reference
    ids = kvpatch.data.needle.encode(tokenizer, kvpatch.models.reference.heldout_text())[: QUICK.ppl_max_tokens]
    expected = _plain_perplexity(model, ids, QUICK.ppl_window, QUICK.ppl_stride)
    assert default_result.ppl_unpatched == pytest.approx(expected, rel=1e-4)
    assert 1.0 < expected < 50.0  # the trained model, not a random one


def _targets(n: int, window: int, stride: int) -> list[int]:
    return [t for begin, end, k in window_spans(n, window, stride) for t in range(end - k, end)]


def test_window_spans_score_every_token_once() -> None:
    for n, window, stride in [(10, 4, 2), (10, 4, 3), (1000, 256, 128), (5, 8, 3)]:
        assert _targets(n, window, stride) == list(range(1, n))
    # stride == window: non-overlapping windows, each window's first token unscored
    assert _targets(11, 4, 4) == [1, 2, 3, 5, 6, 7, 9, 10]


def test_default_config_is_lossless(default_result: EvalResult) -> None:
    r = default_result
    assert r.top1_agreement == 1.0
    assert r.logit_cosine_min >= 0.99999
    assert len(r.logit_cosine_per_step) == QUICK.decode_steps
    assert r.attn_cosine_per_layer is not None and len(r.attn_cosine_per_layer) == 6
    assert min(r.attn_cosine_per_layer) >= 0.99999
    assert abs(r.ppl_ratio - 1.0) <= 1e-4
    assert r.needle_patched == r.needle_unpatched and set(r.needle_patched) == {str(n) for n in QUICK.needle_lengths}
    assert r.kv_bytes_unpatched > 0 and r.kv_fraction == 1.0
    assert r.check_bounds(kvpatch.load_config("default").fidelity) == []
    assert json.loads(r.to_json())["config"] == "default"


def test_broken_cache_is_detected(broken_result: EvalResult, default_result: EvalResult) -> None:
    r = broken_result
    assert r.logit_cosine_min < 0.99
    assert r.top1_agreement < 0.9
    assert r.attn_cosine_min is not None and r.attn_cosine_min < 0.9
    assert r.ppl_ratio > 1.5
    assert r.ppl_unpatched == pytest.approx(default_result.ppl_unpatched, rel=1e-6)  # model restored
    violations = r.check_bounds(kvpatch.load_config(BROKEN).fidelity)
    assert len(violations) == 1 and "min_logit_cosine" in violations[0]
    strict = r.check_bounds(kvpatch.load_config("default").fidelity)
    assert any("top1" in v for v in strict) and any("ppl ratio" in v for v in strict)


def test_evaluate_restores_and_requires_unpatched_model(reference) -> None:
    model, tokenizer = reference
    assert kvpatch.get_handle(model) is None
    kvpatch.apply(model, "default")
    try:
        with pytest.raises(kvpatch.PatchStateError):
            evaluate(model, tokenizer, "default", settings=QUICK)
    finally:
        kvpatch.unpatch(model)


def test_attention_capture_skipped_with_reason_for_other_layouts() -> None:
    model = tiny_model("gpt2")
    modules, reason = attention_modules(model)
    assert modules is None and reason
    text = kvpatch.models.reference.heldout_text()[:4000]
    short = dataclasses.replace(QUICK, needle_lengths=(256,))  # gpt2-tiny has 512 positions
    result = evaluate(model, tiny_tokenizer(), "default", settings=short, text=text)
    assert result.attn_cosine_per_layer is None and result.attn_skipped_reason == reason
    assert result.violations() == []


def test_cli_writes_json_and_plot(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    add_eval_arguments(parser)
    runs = [["--model", "tiny-llama", "--config", "default", "--out", str(tmp_path)],
            ["--model", "tiny-llama", "--config", "default", "--out", str(tmp_path), "--name", "second"]]
    for argv in runs:
        assert eval_command(parser.parse_args(argv)) == 0
        assert "default" in capsys.readouterr().out
    assert json.loads((tmp_path / "eval-default.json").read_text())["top1_agreement"] == 1.0
    # one plot per run name: the second run (named) does not overwrite the first (default name)
    for name in ("tiny-llama-quick", "second"):
        assert (tmp_path / f"fidelity-{name}.png").read_bytes()[:4] == b"\x89PNG"


def test_plot_has_one_point_per_config(tmp_path: Path, default_result, broken_result) -> None:
    path = tmp_path / "f.png"
    plot_fidelity_vs_memory([default_result.to_dict(), broken_result.to_dict()], path)
    assert path.stat().st_size > 1000


@pytest.mark.parametrize("dtype, passes, fails", [
    ("float32", 1e-4, 1e-3),  # float32: the floor is ~0, so the exact allowance decides
    ("bfloat16", 1e-3, 1e-1),  # bf16: ~4x the measured noise floor is allowed, a real error is not
])
def test_lossless_bounds_follow_the_dtype_and_still_fail_real_errors(dtype: str, passes: float, fails: float) -> None:
    model, tokenizer = kvpatch.models.load("kvpatch-ref", dtype=dtype)
    reference = reference_run(model, tokenizer, QUICK)
    assert reference.floor_backend != model.config._attn_implementation
    allowance = Deviation.from_dict(evaluate(model, tokenizer, "default", reference=reference).lossless_allowance)
    if dtype == "bfloat16":
        assert reference.floor.attention > 1e-6 and allowance.attention > EXACT.attention  # widened by the dtype
    else:
        assert allowance == EXACT
    assert evaluate(model, tokenizer, "default", reference=reference).violations() == []
    assert evaluate(model, tokenizer, noisy_values_config(passes), reference=reference).violations() == []
    flagged = evaluate(model, tokenizer, noisy_values_config(fails), reference=reference).violations()
    assert flagged and all(v.startswith("lossless:") for v in flagged)


def test_a_sharded_model_folder_loads_like_a_single_file(tmp_path: Path, reference) -> None:
    model, tokenizer = reference
    model.save_pretrained(tmp_path, max_shard_size="10MB")
    tokenizer.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors.index.json").is_file() and not (tmp_path / "model.safetensors").exists()
    assert len(list(tmp_path.glob("model-*-of-*.safetensors"))) > 1
    loaded, loaded_tokenizer = load_named(str(tmp_path))
    ids = torch.tensor([loaded_tokenizer("def main():\n    return 1").input_ids])
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=0)


def test_a_folder_without_weights_names_what_it_lacks(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(kvpatch.KVPatchError, match="weights"):
        load_named(str(tmp_path))
