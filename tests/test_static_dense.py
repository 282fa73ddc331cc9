"""`storage/dense` with `static: true` (StaticDenseLayer): fixed buffers, a device-side length.

The static layer must be a pure re-layout of `DynamicLayer`: the same K/V, so the same logits
and greedy tokens through plain `generate` (padded batches, sampling, growth past the first
buffer, crops and reassigned K/V included). Graph capture itself needs a GPU
(tools/gpu/cuda_paths.sh runs tests/test_decode_graphs.py there).
"""

from __future__ import annotations

import pytest
import torch

import kvpatch
from kvpatch.cache import graph_step_layers
from kvpatch.compat import cache_kwarg, output_cache
from kvpatch.errors import ConfigError
from kvpatch.kernels.packed import PackedKV
from kvpatch.stages.storage_dense_static import CAPACITY_ALIGN, StaticDenseLayer, grown_capacity
from kvpatch.testing import prompt_ids, tiny_model


def _static(capacity: int | None = None, graphs: bool = False) -> dict:
    params: dict = {"static": True}
    if capacity is not None:
        params["capacity_tokens"] = capacity
    config = {"name": "static-dense", "stages": [{"kind": "storage", "impl": "dense", "params": params}]}
    if graphs:
        config.update(kernels={"attention": "triton"}, compile={"cuda_graphs": True})
    return config


def _generate(model_type: str, config: str | dict, ids: torch.Tensor, mask: torch.Tensor, **kwargs):
    model = tiny_model(model_type)
    handle = kvpatch.apply(model, config)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=12, return_dict_in_generate=True,
                         output_logits=True, pad_token_id=0, **kwargs)
    return out, handle


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "mistral", "gemma2"])
def test_static_dense_generate_equals_default(model_type: str) -> None:
    """Greedy tokens identical, logits within float tolerance, on a left-padded batch; every
    full-attention layer is static (sliding-window layers keep their own trimmed layer)."""
    ids = prompt_ids(batch=3, length=20)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    mask[2, :11] = 0
    reference, _ = _generate(model_type, "default", ids, mask, do_sample=False)
    static, handle = _generate(model_type, _static(), ids, mask, do_sample=False)
    assert torch.equal(static.sequences, reference.sequences)
    torch.testing.assert_close(torch.stack(static.logits), torch.stack(reference.logits), atol=1e-5, rtol=1e-5)
    layers = handle.last_cache.layers
    assert all(isinstance(layer, StaticDenseLayer) or layer.is_sliding for layer in layers)
    assert model_type == "mistral" or any(isinstance(layer, StaticDenseLayer) for layer in layers)
    for layer in layers:
        if isinstance(layer, StaticDenseLayer):
            assert layer.length == layer.get_seq_length() == 31 and layer.capacity >= 31


def test_sampling_is_unchanged() -> None:
    ids = prompt_ids(batch=2, length=16)
    mask = torch.ones_like(ids)
    outs = []
    for config in ("default", _static()):
        torch.manual_seed(7)
        outs.append(_generate("llama", config, ids, mask, do_sample=True, top_k=20)[0].sequences)
    assert torch.equal(outs[0], outs[1])


def _layer_steps(chunks: list[int], capacity: int | None) -> tuple[StaticDenseLayer, torch.Tensor, torch.Tensor]:
    """Feed random K/V in `chunks` of tokens into a static layer; also return what was fed."""
    generator = torch.Generator().manual_seed(0)
    layer = StaticDenseLayer(capacity)
    keys = torch.randn(2, 3, sum(chunks), 8, generator=generator)
    values = torch.randn(2, 3, sum(chunks), 8, generator=generator)
    start = 0
    for size in chunks:
        out_k, out_v = layer.update(keys[:, :, start : start + size], values[:, :, start : start + size])
        start += size
        if isinstance(out_k, PackedKV):
            out_k, out_v = out_k.dense()
        assert torch.equal(out_k, keys[:, :, :start]) and torch.equal(out_v, values[:, :, :start])
        assert int(layer.counts[2]) == layer.length == start == layer.get_seq_length()
    return layer, keys, values


def test_layer_grows_past_its_buffer_and_keeps_every_token() -> None:
    layer, keys, _ = _layer_steps([20] + [1] * 10 + [300] + [1] * 300, capacity=24)
    # 24 -> room for the 25th token plus headroom -> the 300-token chunk fits -> grown again
    assert grown_capacity(25, 24) == 512 and layer.capacity == grown_capacity(631, 24)
    assert layer.capacity % CAPACITY_ALIGN == 0
    assert torch.equal(layer.keys, keys)


def test_crop_and_reassigned_kv_are_picked_up_at_the_next_update() -> None:
    layer, keys, values = _layer_steps([20, 1, 1], capacity=64)
    layer.crop(-2)
    assert layer.get_seq_length() == 20 and layer.graph_step_problem(1) is not None
    layer.update(keys[:, :, 20:21], values[:, :, 20:21])
    assert torch.equal(layer.keys, keys[:, :, :21]) and int(layer.counts[2]) == 21
    layer.batch_select_indices(torch.tensor([1]))
    out, _ = layer.update(keys[1:, :, 21:22], values[1:, :, 21:22])
    assert torch.equal(out.dense()[0], keys[1:, :, :22]) and layer.buffer_keys.shape[0] == 1


def test_buffer_bytes_are_counted_as_resident() -> None:
    """The whole preallocated buffer is what the layer holds, whatever the valid length."""
    model = tiny_model("llama")
    handle = kvpatch.apply(model, _static(capacity=512))
    model.generate(prompt_ids(batch=1, length=10), max_new_tokens=2, do_sample=False)
    layer = handle.last_cache.layers[0]
    per_layer = 2 * layer.buffer_keys.numel() * layer.buffer_keys.element_size()
    assert handle.stats()["kv_bytes_resident"] == per_layer * len(handle.last_cache.layers)
    assert graph_step_layers(handle.last_cache) is not None


def test_cuda_graphs_need_the_fused_kernel() -> None:
    config = _static(graphs=True)
    config["kernels"] = {"attention": "sdpa"}
    with pytest.raises(ConfigError, match="cuda_graphs.*triton"):
        kvpatch.load_config(config)


def test_graph_config_without_a_gpu_runs_eagerly_and_exactly() -> None:
    """On a CPU the graph wrapper steps aside (no CUDA step) and the fused kernel falls back."""
    ids = prompt_ids(batch=2, length=16)
    mask = torch.ones_like(ids)
    reference, _ = _generate("llama", "default", ids, mask, do_sample=False)
    graphed, handle = _generate("llama", _static(graphs=True), ids, mask, do_sample=False)
    assert torch.equal(graphed.sequences, reference.sequences)
    assert handle.stats()["decode_graphs"] == {"graph_replays": 0, "graph_captures": 0, "graphs_kept": 0}
    kvpatch.unpatch(handle.model)
    assert "forward" not in handle.model.__dict__


def test_prefix_reuse_into_static_layers_is_exact() -> None:
    """Reused chunk K/V loaded into a fresh cache land in the static buffers: the second request
    reuses as much as plain `prefix_reuse` and generates the same tokens."""
    from kvpatch.engine import Engine
    from kvpatch.testing import tiny_tokenizer

    config = kvpatch.load_config("prefix_reuse").model_dump()
    config["stages"].insert(0, {"kind": "storage", "impl": "dense", "params": {"static": True}})
    config.update(name="prefix_reuse_static", kernels={"attention": "triton"}, compile={"cuda_graphs": True})
    prompt = "The quick brown fox jumps over the lazy dog. " * 8
    results = []
    for source in ("prefix_reuse", config):
        model = tiny_model("llama")
        engine = Engine(model, tiny_tokenizer(), source)
        engine.generate([prompt + "first question?"], max_new_tokens=6)
        results.append(engine.generate([prompt + "second question?"], max_new_tokens=6))
    assert isinstance(kvpatch.get_handle(model).last_cache.layers[0], StaticDenseLayer)
    assert results[1].kv_reuse_ratio == results[0].kv_reuse_ratio > 0.5
    assert results[1].tokens == results[0].tokens


def test_snapshot_of_a_static_dense_cache_continues_exactly(tmp_path) -> None:
    """A static dense cache exports as a dense snapshot and imports into static layers that
    continue token for token like the original (the restored layer re-arms its buffer)."""
    ids = prompt_ids(batch=1, length=30)
    model = tiny_model("llama")
    handle = kvpatch.apply(model, _static(capacity=64))
    name = cache_kwarg(model)
    with torch.no_grad():
        cache = output_cache(model(ids[:, :20], use_cache=True))
        for i in range(20, 24):
            cache = output_cache(model(ids[:, i : i + 1], use_cache=True, **{name: cache}))
        path = handle.export_snapshot(tmp_path / "static-dense.safetensors", cache=cache, token_ids=ids[:, :24])
        restored = handle.import_snapshot(path)
        assert all(isinstance(layer, StaticDenseLayer) for layer in restored.layers)
        for i in range(24, 30):
            a = model(ids[:, i : i + 1], use_cache=True, **{name: cache}).logits
            b = model(ids[:, i : i + 1], use_cache=True, **{name: restored}).logits
            assert torch.equal(a, b)
    assert restored.layers[0].get_seq_length() == cache.layers[0].get_seq_length() == 30

