"""Hot / warm / cold tiers (`evictor/tiered`) and the offloader's memory-mapped backing: exact
where nothing is lost, positions right through demotion and promotion, nothing dropped unless a
budget says so, clear errors for bad configs."""

from __future__ import annotations

import pytest
import torch

import kvpatch
from kvpatch.compat import cache_kwarg, output_cache
from kvpatch.cache import LayerLayout
from kvpatch.patch.cache_events import PaddedBatchError
from kvpatch.pipeline import Pipeline
from kvpatch.stages.offloader import CpuOffloader
from kvpatch.stages.tiered_layer import TieredLayer
from kvpatch.testing import prompt_ids, tiny_model


def tier_config(quantizer: dict | None = None, offloader: dict | None = None, scorer: str = "h2o",
                **tiers: object) -> kvpatch.PipelineConfig:
    stages: list[dict] = [{"kind": "scorer", "impl": scorer}, {"kind": "evictor", "impl": "tiered", "params": tiers}]
    if quantizer is not None:
        stages.insert(0, {"kind": "quantizer", "impl": "kivi", "params": quantizer})
    if offloader is not None:
        stages.append({"kind": "offloader", "impl": "cpu", "params": offloader})
    return kvpatch.load_config({"name": "test-tiers", "fidelity": {"lossless": False}, "stages": stages})


HOST = {"pin_memory": False}


def tiered_layers(cache) -> list[TieredLayer]:
    layers = [layer for layer in cache.layers if isinstance(layer, TieredLayer)]
    assert layers
    return layers


def all_positions(layer: TieredLayer) -> torch.Tensor:
    """Every position the layer holds, per head, sorted: `[B, H, tokens]`."""
    parts = [layer.positions]
    if layer.warm is not None:
        parts.append(layer.warm.tensors["pos"])
    parts += [c.tensors["pos"] for c in layer.cold]
    return torch.cat(parts, dim=-1).sort(dim=-1).values


def _teacher_forced(model, ids, steps):
    kwarg = cache_kwarg(model)
    with torch.no_grad():
        out = model(input_ids=ids[:, :-steps], use_cache=True)
        logits = [out.logits[:, -1]]
        for t in range(ids.shape[1] - steps, ids.shape[1]):
            out = model(input_ids=ids[:, t : t + 1], use_cache=True, **{kwarg: output_cache(out)})
            logits.append(out.logits[:, -1])
    return torch.stack(logits, 1), output_cache(out)


@pytest.mark.parametrize("family", ["llama", "qwen3", "gpt2"])
def test_full_precision_warm_without_cold_equals_unpatched(family: str) -> None:
    """Without a quantizer warm is full precision; with warm unlimited nothing goes cold, so the
    tiers only reorder the keys attention reads: logits and greedy tokens equal the unpatched
    model's although most tokens were demoted."""
    model = tiny_model(family)
    ids = prompt_ids(batch=2, length=40)
    gen = dict(attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False)
    with torch.no_grad():
        reference_logits = model(input_ids=ids).logits[:, -13:]
        reference_tokens = model.generate(ids, **gen)
    handle = kvpatch.apply(model, tier_config(hot={"max_tokens": 8}, sink_tokens=2, recent_tokens=4))
    logits, cache = _teacher_forced(model, ids, 12)
    torch.testing.assert_close(logits, reference_logits, atol=1e-5, rtol=0)
    layer = tiered_layers(cache)[0]
    assert layer.hot_tokens <= 8 and layer.warm_tokens >= 30, "most tokens must have been demoted"
    with torch.no_grad():
        assert torch.equal(model.generate(ids, **gen), reference_tokens)
    assert handle.stats()["stages"]["evictor/tiered"]["tokens_to_warm"] > 0


def test_budgets_larger_than_the_context_are_exact_with_a_quantizer() -> None:
    model = tiny_model("llama")
    ids = prompt_ids(batch=1, length=30)
    with torch.no_grad():
        reference = model(input_ids=ids).logits[:, -11:]
    kvpatch.apply(model, tier_config(quantizer={"bits": 2, "group_size": 8}, offloader=HOST,
                                     hot={"max_tokens": 64}, warm={"max_tokens": 64}))
    logits, cache = _teacher_forced(model, ids, 10)
    torch.testing.assert_close(logits, reference, atol=1e-5, rtol=0)
    assert all(layer.warm_tokens == 0 and not layer.cold for layer in tiered_layers(cache))


def test_quantized_warm_is_close_and_smaller() -> None:
    model = tiny_model("llama")
    ids = prompt_ids(batch=1, length=72)
    with torch.no_grad():
        reference = model(input_ids=ids).logits[:, -9:]
    handle = kvpatch.apply(model, tier_config(quantizer={"bits": 8, "group_size": 8}, hot={"max_tokens": 16},
                                              sink_tokens=2, recent_tokens=4))
    logits, cache = _teacher_forced(model, ids, 8)
    cosine = torch.nn.functional.cosine_similarity(logits.flatten(0, 1), reference.flatten(0, 1), dim=-1)
    assert cosine.min() > 0.999 and not torch.equal(logits, reference)
    layer = tiered_layers(cache)[0]
    sizes = layer.tier_bytes()
    assert layer.warm_tokens >= 48
    assert sizes["warm"] / layer.warm_tokens < 0.5 * sizes["hot"] / layer.hot_tokens, "8-bit codes vs float32"
    assert handle.stats()["stages"]["evictor/tiered"]["tokens_to_warm"] >= 48


def test_three_tiers_drop_nothing_and_keep_positions() -> None:
    """Hot, warm and cold together hold each position seen exactly once, per head and layer;
    `get_seq_length` counts them all and the mask sizes count the resident ones."""
    model = tiny_model("llama")
    ids = prompt_ids(batch=2, length=48)
    handle = kvpatch.apply(model, tier_config(quantizer={"bits": 4, "group_size": 8}, offloader=HOST,
                                              hot={"max_tokens": 12}, warm={"max_tokens": 16},
                                              sink_tokens=2, recent_tokens=4, promote_every=2))
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False)
    assert out.shape == (2, 72)
    cache = handle.last_cache
    for layer in tiered_layers(cache):
        seen = layer.get_seq_length()
        assert seen == 71
        assert torch.equal(all_positions(layer), torch.arange(seen).expand(2, layer.positions.shape[1], seen))
        assert layer.cold and layer.cold_tokens > 0 and layer.warm_tokens <= 16
        assert layer.get_mask_sizes(1) == (layer.kept + 1, seen - layer.kept)
        assert all(t.device.type == "cpu" for c in layer.cold for t in c.tensors.values())
    stats = handle.stats()["stages"]["evictor/tiered"]
    assert stats["blocks_to_cold"] > 0 and stats["blocks_dropped"] == 0


def _lossless_layer(**tiers: object) -> TieredLayer:
    pipeline = Pipeline(tier_config(offloader=HOST, **tiers))
    layer = pipeline.layer_builder.make_layer(LayerLayout(0))
    assert isinstance(layer, TieredLayer)
    return layer


def test_promotion_swaps_the_attended_cold_block_in_before_attention() -> None:
    """A query aimed at one cold token brings it back to warm within the same forward: the K/V
    handed to attention are rewritten in place, and every resident slot still holds the K/V of
    the position it is recorded at."""
    torch.manual_seed(0)
    layer = _lossless_layer(hot={"max_tokens": 6}, warm={"max_tokens": 4}, sink_tokens=1, recent_tokens=2,
                            promote_every=1, promote_window=1, promote_blocks=1)
    dim, seen = 8, 24
    keys, values = torch.randn(1, 1, seen, dim), torch.randn(1, 1, seen, dim)
    out_k, out_v = layer.update(keys, values)
    layer.observe_attention(torch.randn(1, 2, seen, dim), out_k, out_v, 0.3)
    layer.after_forward()
    cold_positions = layer.cold[0].tensors["pos"][0, 0].tolist()
    target = cold_positions[len(cold_positions) // 2]
    new_k, new_v = torch.randn(1, 1, 1, dim), torch.randn(1, 1, 1, dim)
    keys, values = torch.cat([keys, new_k], 2), torch.cat([values, new_v], 2)
    out_k, out_v = layer.update(new_k, new_v)
    query = (20 * keys[0, 0, target]).expand(1, 2, 1, dim).contiguous()
    layer.observe_attention(query, out_k, out_v, 1.0)
    resident = layer.resident_positions()[0, 0]
    assert target in resident.tolist() and target not in layer.cold[0].tensors["pos"][0, 0].tolist()
    torch.testing.assert_close(out_k[0, 0], keys[0, 0, resident])
    torch.testing.assert_close(out_v[0, 0], values[0, 0, resident])
    assert layer.stage.counters["blocks_promoted"] == 1
    layer.after_forward()
    assert torch.equal(all_positions(layer)[0, 0], torch.arange(seen + 1))


def test_restore_brings_cold_back_and_the_next_forward_is_exact() -> None:
    """Memory-mapped cold tier, lossless warm: after `restore()` everything is resident again and
    the next forward equals the unpatched model (the prefill saw every token)."""
    model = tiny_model("llama")
    ids = prompt_ids(batch=2, length=41)
    with torch.no_grad():
        reference = model(input_ids=ids).logits[:, -1]
        handle = kvpatch.apply(model, tier_config(offloader={"backing": "mmap"}, hot={"max_tokens": 8},
                                                  warm={"max_tokens": 8}, sink_tokens=2, recent_tokens=4))
        cache = output_cache(model(input_ids=ids[:, :40], use_cache=True))
        layers = tiered_layers(cache)
        assert all(layer.cold_tokens == 40 - layer.kept for layer in layers)
        offloader = next(s for s in handle.pipeline.stages if isinstance(s, CpuOffloader))
        assert offloader.mmap_dir is not None and any(offloader.mmap_dir.iterdir())
        cache.restore()
        assert all(layer.kept == 40 and not layer.cold for layer in layers)
        out = model(input_ids=ids[:, 40:41], use_cache=True, **{cache_kwarg(model): cache})
    torch.testing.assert_close(out.logits[:, -1], reference, atol=1e-5, rtol=0)
    directory = offloader.mmap_dir
    offloader.cleanup()
    assert not directory.exists()


def test_mmap_offloader_round_trip_and_cleanup(tmp_path) -> None:
    offloader = CpuOffloader(CpuOffloader.Params(backing="mmap", mmap_dir=str(tmp_path)))
    tensors = [torch.randn(2, 3, 5, 4), torch.randint(0, 255, (2, 3, 7), dtype=torch.uint8), torch.empty(1, 0, 4)]
    hosted = [offloader.to_host(t) for t in tensors]
    files = list(offloader.mmap_dir.iterdir())
    assert len(files) == 3 and offloader.mmap_dir.parent == tmp_path
    assert files[0].stat().st_size >= 2 * 3 * 5 * 4 * 4
    for original, host in zip(tensors, hosted):
        assert host.shape == original.shape and torch.equal(offloader.to_device(host, torch.device("cpu")), original)
    assert offloader.stats()["files_created"] == 3
    with offloader:
        pass  # the context manager cleans up
    assert not any(tmp_path.iterdir())


def test_padded_batches_are_refused() -> None:
    model = tiny_model("llama")
    kvpatch.apply(model, tier_config(hot={"max_tokens": 8}, sink_tokens=2, recent_tokens=4))
    ids = prompt_ids(batch=2, length=12)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    with pytest.raises(PaddedBatchError, match="config 'test-tiers' evicts tokens, which does not support padded batches"):
        model.generate(ids, attention_mask=mask, max_new_tokens=2)


def test_bad_tier_configs_are_named() -> None:
    with pytest.raises(kvpatch.ConfigError, match="max_tokens or ratio, not both"):
        tier_config(hot={"max_tokens": 64, "ratio": 0.1})
    with pytest.raises(kvpatch.ConfigError, match="must hold the sink and recent tokens"):
        tier_config(hot={"max_tokens": 8}, sink_tokens=4, recent_tokens=16)
    with pytest.raises(kvpatch.ConfigError, match="params.hot.tokens: unknown key"):
        tier_config(hot={"tokens": 8})
    with pytest.raises(kvpatch.ConfigError, match="needs a scorer"):
        kvpatch.load_config({"name": "t", "fidelity": {"lossless": False},
                             "stages": [{"kind": "evictor", "impl": "tiered"}]})
    with pytest.raises(ValueError, match="cold needs an offloader"):
        kvpatch.apply(tiny_model("llama"), tier_config(warm={"ratio": 0.5}))


def test_explicit_zero_cold_budget_drops() -> None:
    model = tiny_model("llama")
    handle = kvpatch.apply(model, tier_config(hot={"max_tokens": 8}, warm={"max_tokens": 8}, cold={"max_tokens": 0},
                                              sink_tokens=2, recent_tokens=4))
    with torch.no_grad():
        cache = output_cache(model(input_ids=prompt_ids(batch=1, length=40), use_cache=True))
    assert all(not layer.cold and layer.kept <= 16 for layer in tiered_layers(cache))
    assert handle.stats()["stages"]["evictor/tiered"]["blocks_dropped"] > 0


def test_batched_scoring_gives_the_per_step_scores() -> None:
    """`score_every` scores decode-step queries together, each masked to the keys it saw, and
    scores before any demotion: H2O scores and tiers match scoring every step."""
    ids = prompt_ids(batch=1, length=64)
    layers = []
    for every in (1, 5):
        model = tiny_model("llama")
        kvpatch.apply(model, tier_config(quantizer={"bits": 8, "group_size": 8}, hot={"max_tokens": 16},
                                         sink_tokens=2, recent_tokens=4, score_every=every))
        _, cache = _teacher_forced(model, ids, 14)
        layers.append(tiered_layers(cache)[0])
    per_step, batched = layers
    assert torch.equal(batched.resident_positions(), per_step.resident_positions())
    torch.testing.assert_close(batched.resident_scores(), per_step.resident_scores(), atol=1e-4, rtol=1e-4)
