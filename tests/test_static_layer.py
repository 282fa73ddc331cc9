"""`storage/quantized` with `capacity_tokens` (StaticQuantizedLayer, CUDA-graph capturable decode).

The static layer must be a pure re-layout of the dynamic one: same codes, same residual, so the
same logits, bit for bit, at every decode step (flushes included), after multi-token forwards,
crops and snapshots. The fused kernel over it and graph capture are in tests/test_kernels.py.
"""

from __future__ import annotations

import pytest
import torch

import kvpatch
from kvpatch.compat import cache_kwarg, output_cache
from kvpatch.errors import ConfigError
from kvpatch.stages.storage_quantized import QuantizedLayer
from kvpatch.stages.storage_quantized_static import StaticQuantizedLayer
from kvpatch.testing import prompt_ids, tiny_model

PROMPT = 20


def _config(bits: int, sinks: int, capacity: int | None, residual: int = 8) -> dict:
    storage = {"residual_length": residual, "sink_tokens": sinks}
    if capacity is not None:
        storage["capacity_tokens"] = capacity
    return {
        "name": "static-check",
        "fidelity": {"lossless": False},
        "stages": [
            {"kind": "quantizer", "impl": "kivi", "params": {"bits": bits, "group_size": 8}},
            {"kind": "storage", "impl": "quantized", "params": storage},
        ],
    }


def _decode(config: dict, ids: torch.Tensor, chunks: list[int]) -> tuple[torch.Tensor, list]:
    """Prefill PROMPT tokens, then forwards of `chunks` tokens each; all last-position logits."""
    model = tiny_model("llama")
    kvpatch.apply(model, config)
    logits, start = [], PROMPT
    with torch.no_grad():
        out = model(ids[:, :PROMPT], use_cache=True)
        for size in chunks:
            out = model(ids[:, start : start + size], use_cache=True, **{cache_kwarg(model): output_cache(out)})
            logits.append(out.logits[:, -1])
            start += size
    return torch.stack(logits, 1), output_cache(out).layers


@pytest.mark.parametrize("bits, sinks", [(4, 2), (2, 0)])
def test_static_layer_decodes_exactly_like_the_dynamic_layer(bits: int, sinks: int) -> None:
    ids = prompt_ids(batch=2, length=PROMPT + 40)
    chunks = [1] * 40  # five flushes of 8-token blocks
    dynamic, dynamic_layers = _decode(_config(bits, sinks, None), ids, chunks)
    static, static_layers = _decode(_config(bits, sinks, 64), ids, chunks)
    assert all(type(layer) is StaticQuantizedLayer and layer.static for layer in static_layers)
    assert torch.equal(static, dynamic)
    layer, reference = static_layers[0], dynamic_layers[0]
    assert layer.get_seq_length() == reference.get_seq_length() == PROMPT + 40
    assert layer.counts.tolist() == layer.host_counts == [(reference.quantized_tokens) // 8, layer.host_counts[1],
                                                          reference.keys.shape[-2]]
    layer.materialize()
    assert not layer.static
    assert torch.equal(layer.keys, reference.keys) and torch.equal(layer.values, reference.values)
    for name, tensor in reference.key_codes.tensors.items():
        assert torch.equal(layer.key_codes.tensors[name], tensor)
        assert layer.key_codes.tensors[name].untyped_storage().nbytes() == tensor.untyped_storage().nbytes()


def test_multi_token_forwards_between_decode_steps() -> None:
    """Forwards of 3 tokens stay static (ring write of several slots, causal among them); 12
    tokens (more than a block) go through the dynamic code and re-arm."""
    ids = prompt_ids(batch=2, length=PROMPT + 40)
    chunks = [1, 1, 3, 1, 12, 1, 1, 3, 5, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1]
    dynamic, _ = _decode(_config(4, 2, None), ids, chunks)
    static, layers = _decode(_config(4, 2, 64), ids, chunks)
    assert layers[0].static
    assert torch.equal(static, dynamic)


def test_crop_and_reset() -> None:
    ids = prompt_ids(batch=1, length=PROMPT + 10)
    _, layers = _decode(_config(4, 2, 64), ids, [1] * 10)
    layer = layers[0]
    _, reference_layers = _decode(_config(4, 2, None), ids, [1] * 10)
    layer.crop(-3)
    reference_layers[0].crop(-3)
    assert layer.get_seq_length() == reference_layers[0].get_seq_length() == PROMPT + 7
    assert torch.equal(layer.decoded()[0], reference_layers[0].decoded()[0])
    layer.reset()
    reference_layers[0].reset()
    assert not layer.static and layer.counts is None
    assert layer.get_seq_length() == reference_layers[0].get_seq_length()  # transformers' reset rule


def test_capacity_is_enforced_with_a_clear_error() -> None:
    ids = prompt_ids(batch=1, length=PROMPT + 30)
    with pytest.raises(ConfigError, match="capacity_tokens=16"):
        _decode(_config(4, 2, 16), ids, [1])
    with pytest.raises(ConfigError, match="cache is full .capacity_tokens=24"):
        _decode(_config(4, 2, 24), ids, [1] * 10)
    with pytest.raises(ConfigError, match="residual_length .12. must be a multiple"):
        _decode(_config(4, 2, 64, residual=12), ids, [1])
    with pytest.raises(ValueError, match="capacity_tokens"):
        _decode(_config(4, 2, 0), ids, [1])


def test_snapshot_of_a_static_cache_continues_exactly(tmp_path) -> None:
    ids = prompt_ids(batch=1, length=PROMPT + 20)
    config = _config(4, 2, 64)
    model = tiny_model("llama")
    handle = kvpatch.apply(model, config)
    with torch.no_grad():
        out = model(ids[:, :PROMPT], use_cache=True)
        for i in range(PROMPT, PROMPT + 10):
            out = model(ids[:, i : i + 1], use_cache=True, **{cache_kwarg(model): output_cache(out)})
        cache = output_cache(out)
        path = handle.export_snapshot(tmp_path / "static.safetensors", cache=cache, token_ids=ids[:, : PROMPT + 10])
        restored = handle.import_snapshot(path)
        assert isinstance(restored.layers[0], QuantizedLayer)
        a = b = None
        for i in range(PROMPT + 10, PROMPT + 20):
            a = model(ids[:, i : i + 1], use_cache=True, **{cache_kwarg(model): cache}).logits
            b = model(ids[:, i : i + 1], use_cache=True, **{cache_kwarg(model): restored}).logits
            assert torch.equal(a, b)
    assert restored.layers[0].static and cache.layers[0].static
