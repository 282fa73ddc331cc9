"""Scorers and the budget evictor: scores match a direct computation, the eviction contract
holds (positions, masks), a deterministic policy equals the unpatched model under the
equivalent attention mask, and every family generates under a budget."""

from __future__ import annotations

import pytest
import torch

import kvpatch
from kvpatch.compat import cache_kwarg, output_cache
from kvpatch.cache import LayerLayout
from kvpatch.patch.cache_events import PaddedBatchError
from kvpatch.pipeline import Pipeline
from kvpatch.stages.evictor import EvictingLayer
from kvpatch.stages.scorers import QUERY_CHUNK, attention_mass
from kvpatch.testing import prompt_ids, tiny_model

FAMILIES = sorted(kvpatch.supported_families())
#: The families whose patch spec accepts an evictor stage (patches/*.yaml `refuses`).
EVICTOR_FAMILIES = [f for f in FAMILIES if kvpatch.supported_families()[f].accepts_stage_kind("evictor")]
SCORERS = sorted(kvpatch.available_stages()["scorer"])


def evict_config(scorer: str, **evictor: object) -> kvpatch.PipelineConfig:
    return kvpatch.load_config({
        "name": f"test-{scorer}",
        "fidelity": {"lossless": False},
        "stages": [{"kind": "scorer", "impl": scorer}, {"kind": "evictor", "impl": "budget", "params": evictor}],
    })


def _reference_mass(query, key, scaling, last):
    groups = query.shape[1] // key.shape[1]
    k = key.repeat_interleave(groups, 1).double()
    q_len, k_len = query.shape[2], key.shape[2]
    logits = (query.double() @ k.transpose(-1, -2)) * scaling
    visible = torch.ones(q_len, k_len, dtype=torch.bool).tril(k_len - q_len)
    probs = logits.masked_fill(~visible, float("-inf")).softmax(-1)[:, :, q_len - last :]
    return probs.sum(2).reshape(key.shape[0], key.shape[1], groups, k_len).sum(2)


@pytest.mark.parametrize("q_len, k_len, last", [(1, 9, 1), (300, 300, 300), (300, 340, 32), (5, 5, 2)])
def test_attention_mass_matches_full_softmax(q_len: int, k_len: int, last: int) -> None:
    torch.manual_seed(0)
    query, key = torch.randn(2, 6, q_len, 16), torch.randn(2, 2, k_len, 16)
    got = attention_mass(query, key, 0.25, last_queries=None if last == q_len else last)
    torch.testing.assert_close(got.double(), _reference_mass(query, key, 0.25, last), atol=1e-5, rtol=1e-5)
    assert q_len <= QUERY_CHUNK or got.shape == (2, 2, k_len)


def test_eviction_contract_of_the_layer() -> None:
    config = evict_config("streaming", max_tokens=10, sink_tokens=2, recent_tokens=4)
    pipeline = Pipeline(config)
    layer = pipeline.layer_builder.make_layer(LayerLayout(0))
    assert isinstance(layer, EvictingLayer)
    k, v = torch.randn(1, 2, 30, 8), torch.randn(1, 2, 30, 8)
    out_k, _ = layer.update(k, v)
    assert torch.equal(out_k, k), "update returns every token; eviction waits for the forward's end"
    layer.after_forward()
    assert layer.get_seq_length() == 30 and layer.kept == 10
    assert layer.get_mask_sizes(1) == (11, 20)
    assert layer.positions[0, 0].tolist() == [0, 1] + list(range(22, 30))  # sinks + most recent
    assert torch.equal(layer.keys[0, :, 2:], k[0, :, 22:])
    layer.update(torch.randn(1, 2, 1, 8), torch.randn(1, 2, 1, 8))
    layer.after_forward()
    assert layer.kept == 10 and layer.positions[0, 0].tolist() == [0, 1] + list(range(23, 31))


def _streaming_mask(length: int, prefill: int, budget: int, sinks: int) -> torch.Tensor:
    """What a streaming cache lets each position see: everything during the prefill, then the
    sinks, the `budget - sinks` latest earlier tokens, and itself."""
    visible = torch.ones(length, length, dtype=torch.bool).tril()
    for t in range(prefill, length):
        visible[t, sinks : max(sinks, t - (budget - sinks))] = False
    return visible


@pytest.mark.parametrize("family", ["llama", "gpt2"])  # no sliding layers: the mask is the whole story
def test_streaming_eviction_equals_masked_full_attention(family: str) -> None:
    """Positions, mask sizes and RoPE after eviction are right iff the evicting cache gives the
    same logits as the unpatched model told, by a 4-D mask, to ignore exactly the evicted keys."""
    model = tiny_model(family)
    prefill, steps, budget, sinks = 20, 10, 12, 3
    ids = prompt_ids(batch=1, length=prefill + steps)
    mask = _streaming_mask(prefill + steps, prefill, budget, sinks)
    with torch.no_grad():
        reference = model(input_ids=ids, attention_mask=mask[None, None]).logits[0, prefill - 1 :]
        kvpatch.apply(model, evict_config("streaming", max_tokens=budget, sink_tokens=sinks, recent_tokens=budget - sinks))
        out = model(input_ids=ids[:, :prefill], use_cache=True)
        logits = [out.logits[0, -1]]
        for t in range(prefill, prefill + steps):
            out = model(input_ids=ids[:, t : t + 1], use_cache=True, **{cache_kwarg(model): output_cache(out)})
            logits.append(out.logits[0, -1])
    patched = torch.stack(logits)[:-1]
    torch.testing.assert_close(patched, reference[: steps], atol=1e-4, rtol=0)
    assert output_cache(out).layers[0].kept <= budget + 1


def test_budget_at_least_the_sequence_is_exact() -> None:
    model = tiny_model("llama")
    ids = prompt_ids(batch=1, length=16)
    gen = dict(max_new_tokens=10, do_sample=False)
    with torch.no_grad():
        reference = model.generate(ids, **gen)
        kvpatch.apply(model, evict_config("h2o", max_tokens=64))
        assert torch.equal(model.generate(ids, **gen), reference)


@pytest.mark.parametrize("scorer", SCORERS)
@pytest.mark.parametrize("family", EVICTOR_FAMILIES)
def test_every_scorer_and_family_generates_within_budget(scorer: str, family: str) -> None:
    model = tiny_model(family)
    ids = prompt_ids(batch=2, length=40)
    handle = kvpatch.apply(model, evict_config(scorer, ratio=0.5, sink_tokens=2, recent_tokens=4))
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False)
        beams = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, num_beams=2, do_sample=False)
    assert out.shape == (2, 48) and beams.shape == (2, 44)
    cache = handle.last_cache
    assert cache.get_seq_length() == 43
    for layer in cache.layers:
        if isinstance(layer, EvictingLayer):
            assert layer.kept <= 22 + 1 and layer.positions.shape[-1] == layer.kept


def test_padded_batches_are_refused_clearly() -> None:
    model = tiny_model("llama")
    kvpatch.apply(model, evict_config("tova", ratio=0.5))
    ids = prompt_ids(batch=2, length=12)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    with pytest.raises(PaddedBatchError, match="config 'test-tova' evicts tokens, which does not support padded batches"):
        model.generate(ids, attention_mask=mask, max_new_tokens=2)


def test_invalid_evictor_configs_are_named() -> None:
    with pytest.raises(kvpatch.ConfigError, match="exactly one of max_tokens or ratio"):
        evict_config("h2o", max_tokens=8, ratio=0.5)
    with pytest.raises(kvpatch.ConfigError, match="cannot be combined"):
        kvpatch.load_config({"name": "t", "fidelity": {"lossless": False}, "stages": [
            {"kind": "scorer", "impl": "h2o"}, {"kind": "evictor", "impl": "budget", "params": {"ratio": 0.5}},
            {"kind": "quantizer", "impl": "kivi"}, {"kind": "storage", "impl": "quantized"}]})


def offload_config(scorer: str = "h2o", **evictor: object) -> kvpatch.PipelineConfig:
    return kvpatch.load_config({
        "name": "test-offload",
        "fidelity": {"lossless": False},
        "stages": [{"kind": "scorer", "impl": scorer}, {"kind": "evictor", "impl": "budget", "params": evictor},
                   {"kind": "offloader", "impl": "cpu", "params": {"pin_memory": False}}],
    })


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_offloaded_tokens_restore_exactly(family: str) -> None:
    """With an offloader nothing is lost: the prompt's evicted K/V sit in host memory, and after
    `restore()` the cache is the full cache again, so the next forward equals the unpatched
    model's. (Tokens processed while the cache was evicted keep what they saw then.)"""
    model = tiny_model(family)
    ids = prompt_ids(batch=2, length=41)
    with torch.no_grad():
        reference = model(input_ids=ids).logits[:, -1]
        handle = kvpatch.apply(model, offload_config(ratio=0.25, sink_tokens=2, recent_tokens=4))
        out = model(input_ids=ids[:, :40], use_cache=True)
        cache = output_cache(out)
        evicting = [layer for layer in cache.layers if isinstance(layer, EvictingLayer)]
        assert evicting and all(layer.kept == 10 and layer.offloaded for layer in evicting)
        assert handle.stats()["kv_bytes"].get("cpu", 0) > 0 and handle.stats()["stages"]["offloader/cpu"]["bytes_offloaded"] > 0
        cache.restore()
        assert all(layer.kept == 40 and not layer.offloaded for layer in evicting)
        assert all(torch.equal(layer.positions[0, 0], torch.arange(40)) for layer in evicting)
        out = model(input_ids=ids[:, 40:41], use_cache=True, **{cache_kwarg(model): cache})
    torch.testing.assert_close(out.logits[:, -1], reference, atol=1e-5, rtol=0)
    assert all(layer.kept == 11 for layer in evicting), "the budget applies again after the forward"


def test_offloader_keeps_beams_consistent() -> None:
    model = tiny_model("llama")
    handle = kvpatch.apply(model, offload_config(ratio=0.5, sink_tokens=2, recent_tokens=4))
    ids = prompt_ids(batch=1, length=30)
    with torch.no_grad():
        beams = model.generate(ids, max_new_tokens=5, num_beams=3, do_sample=False)
    assert beams.shape == (1, 35)
    layer = handle.last_cache.layers[0]
    assert all(chunk[0].shape[0] == layer.keys.shape[0] for chunk in layer.offloaded)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: pinned buffers and the side stream")
def test_offload_and_restore_on_cuda() -> None:
    model = tiny_model("llama").cuda()
    ids = prompt_ids(batch=2, length=41).cuda()
    config = kvpatch.load_config({
        "name": "cuda-offload", "fidelity": {"lossless": False},
        "stages": [{"kind": "scorer", "impl": "h2o"},
                   {"kind": "evictor", "impl": "budget", "params": {"ratio": 0.25, "sink_tokens": 2, "recent_tokens": 4}},
                   {"kind": "offloader", "impl": "cpu"}],
    })
    with torch.no_grad():
        reference = model(input_ids=ids).logits[:, -1]
        handle = kvpatch.apply(model, config)
        cache = output_cache(model(input_ids=ids[:, :40], use_cache=True))
        layer = cache.layers[0]
        assert layer.offloaded[0][0].device.type == "cpu" and layer.offloaded[0][0].is_pinned()
        assert handle.stats()["kv_bytes"]["cpu"] > 0
        cache.restore()
        out = model(input_ids=ids[:, 40:41], use_cache=True, **{cache_kwarg(model): cache})
    torch.testing.assert_close(out.logits[:, -1], reference, atol=1e-4, rtol=0)
    handle.pipeline.stages[-1].cleanup()
