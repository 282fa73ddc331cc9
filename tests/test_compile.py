"""Compile-first: the patched decoder runs under torch.compile without kvpatch graph breaks,
honours the config's compile options, and decode steps of growing length do not recompile."""

from __future__ import annotations

import sys
from pathlib import Path
from unittest import mock

import pytest
import torch
import torch._dynamo

import kvpatch
from kvpatch.compat import cache_kwarg
from kvpatch.runner import greedy_run
from kvpatch.testing import prompt_ids, tiny_model

KVPATCH_DIR = str(Path(kvpatch.__file__).resolve().parent)
COMPILED = {"name": "compiled", "description": "default + torch.compile", "compile": {"enabled": True}}


def _kvpatch_breaks(explanation: object) -> list[str]:
    """Graph-break reasons whose user stack passes through kvpatch's own code."""
    found = []
    for reason in explanation.break_reasons:  # type: ignore[attr-defined]
        frames = [f for f in reason.user_stack if str(Path(f.filename).resolve()).startswith(KVPATCH_DIR)]
        if frames:
            found.append(f"{reason.reason} at {frames[-1].filename}:{frames[-1].lineno}")
    return found


@pytest.mark.parametrize("model_type", sorted(kvpatch.supported_families()))
def test_no_graph_breaks_in_kvpatch_code(model_type: str) -> None:
    model = tiny_model(model_type)
    handle = kvpatch.apply(model, "default")
    decoder, name = model.base_model, cache_kwarg(model)
    cache = handle.new_cache()
    ids = prompt_ids(batch=1, length=12)
    torch._dynamo.reset()
    prefill = torch._dynamo.explain(decoder)(input_ids=ids, use_cache=True, **{name: cache})
    decoder(input_ids=ids, use_cache=True, **{name: cache})  # eager; explain() above also ran once
    assert cache.get_seq_length() == 2 * 12, "the decoder did not use the kvpatch cache"
    decode = torch._dynamo.explain(decoder)(input_ids=ids[:, :1], use_cache=True, **{name: cache})
    assert _kvpatch_breaks(prefill) == [] and _kvpatch_breaks(decode) == []
    assert prefill.graph_count >= 1 and decode.graph_count >= 1


def test_compile_options_are_honoured() -> None:
    model = tiny_model("llama")
    config = {**COMPILED, "compile": {"enabled": True, "mode": "max-autotune-no-cudagraphs", "dynamic": True,
                                      "fullgraph": True}}
    with mock.patch("torch.compile", wraps=torch.compile) as spy:
        kvpatch.apply(model, config)
    spy.assert_called_once()
    assert spy.call_args.kwargs == {"mode": "max-autotune-no-cudagraphs", "dynamic": True, "fullgraph": True}
    assert model.base_model._compiled_call_impl is not None
    kvpatch.unpatch(model)
    assert model.base_model._compiled_call_impl is None


@pytest.mark.slow
def test_compiled_prefill_and_decode_match_eager_without_recompiling() -> None:
    torch._dynamo.reset()
    model = tiny_model("llama")
    ids = prompt_ids(batch=2, length=12)
    with torch.no_grad():
        reference = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12,
                                   min_new_tokens=12, do_sample=False, output_logits=True,
                                   return_dict_in_generate=True)
    kvpatch.apply(model, {**COMPILED, "compile": {"enabled": True, "fullgraph": True}})
    cache = kvpatch.get_handle(model).new_cache()
    logits, next_ids = [], ids
    with torch.no_grad():
        for step in range(12):
            if step == 3:  # prefill + 2 growing decode steps may compile; after that, never again
                guard = torch._dynamo.config.patch(error_on_recompile=True)
                guard.__enter__()
            out = model(input_ids=next_ids, use_cache=True, **{cache_kwarg(model): cache})
            logits.append(out.logits[:, -1])
            next_ids = out.logits[:, -1:].argmax(-1)
        guard.__exit__(None, None, None)
    tokens = torch.cat([l.argmax(-1, keepdim=True) for l in logits], dim=1)
    assert torch.equal(tokens, reference.sequences[:, ids.shape[1]:])
    for got, ref in zip(logits, reference.logits):
        torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("hints", [True, False])
def test_a_new_prompt_length_does_not_recompile(hints: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """The pre-forward hook marks growing lengths dynamic, so after one prompt (prefill, first and
    steady decode steps compiled) a prompt of another length runs on the same graphs. Without the
    hints (the second case) dynamo specialises the prefill on the first length and recompiles."""
    if not hints:
        monkeypatch.setattr(sys.modules["kvpatch.patch.apply"], "mark_growing_dims_dynamic", lambda *a: None)
    torch._dynamo.reset()
    model = tiny_model("llama")
    kvpatch.apply(model, COMPILED)
    try:
        greedy_run(model, prompt_ids(batch=1, length=12), 5)
        frames = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        greedy_run(model, prompt_ids(batch=1, length=19), 5)
        recompiled = torch._dynamo.utils.counters["stats"]["unique_graphs"] - frames
    finally:
        kvpatch.unpatch(model)
    assert frames > 0
    assert (recompiled == 0) == hints
