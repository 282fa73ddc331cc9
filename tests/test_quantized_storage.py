"""KIVI quantizer and `storage/quantized`: round-trip bounds, random access, append without
re-quantization, and the quantized cache inside real models of every family."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import kvpatch
from kvpatch.compat import cache_kwarg, output_cache
from kvpatch.config import StageConfig
from kvpatch.cache import cache_kv_bytes, layer_layouts
from kvpatch.quant.groupwise import SCALE_DTYPE
from kvpatch.stages.storage_quantized import QuantizedLayer
from kvpatch.testing import prompt_ids, tiny_model

FAMILIES = sorted(kvpatch.supported_families())
#: The families whose patch spec accepts a quantizer stage (patches/*.yaml `refuses`).
QUANTIZER_FAMILIES = [f for f in FAMILIES if kvpatch.supported_families()[f].accepts_stage_kind("quantizer")]


def kivi(bits: int = 4, group_size: int = 32):
    return StageConfig(kind="quantizer", impl="kivi", params={"bits": bits, "group_size": group_size}).build()


def quantized_config(bits: int, group_size: int, residual: int) -> kvpatch.PipelineConfig:
    return kvpatch.load_config({
        "name": "test-quantized",
        "fidelity": {"lossless": False},
        "stages": [
            {"kind": "quantizer", "impl": "kivi", "params": {"bits": bits, "group_size": group_size}},
            {"kind": "storage", "impl": "quantized", "params": {"residual_length": residual}},
        ],
    })


@settings(max_examples=60, deadline=None)
@given(
    bits=st.sampled_from([2, 4, 8]),
    group=st.sampled_from([4, 8, 16]),
    blocks=st.integers(1, 4),
    heads=st.integers(1, 3),
    batch=st.integers(1, 2),
    dim_groups=st.integers(1, 4),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
    role=st.sampled_from(["key", "value"]),
    scale=st.floats(0.01, 100.0),
    seed=st.integers(0, 2**16),
)
def test_kivi_round_trip_error_is_within_half_a_step(bits, group, blocks, heads, batch, dim_groups, dtype, role, scale, seed):
    """Every element decodes within half a quantization step of its group (plus float16 rounding
    of the group's minimum and the output dtype's rounding)."""
    torch.manual_seed(seed)
    dim = group * dim_groups
    x = (torch.randn(batch, heads, blocks * group, dim) * scale).to(dtype)
    q = kivi(bits, group)
    codes = q.encode(x, role)
    y = q.decode(codes, role, torch.float32)
    assert y.shape == x.shape and torch.isfinite(y).all()
    xf = x.float()
    grouped = xf.reshape(batch, heads, blocks, group, dim) if role == "key" else xf.reshape(batch, heads, blocks * group, dim_groups, group)
    axis = 3 if role == "key" else 4
    span = (grouped.amax(axis, keepdim=True) - grouped.amin(axis, keepdim=True)).expand_as(grouped)
    magnitude = grouped.abs().amax(axis, keepdim=True).expand_as(grouped)
    step = span / ((1 << bits) - 1)
    bound = 0.5 * step * (1 + 2e-3) + magnitude * 2 * torch.finfo(SCALE_DTYPE).eps + 1e-6
    err = (y - xf).reshape(grouped.shape).abs()
    assert (err <= bound).all(), (err - bound).max()
    assert q.decode(codes, role, dtype).dtype == dtype


@pytest.mark.parametrize("bits, group", [(8, 32), (4, 32), (2, 32), (4, 64)])
def test_kivi_rate_counts_scales_and_zero_points(bits: int, group: int) -> None:
    x = torch.randn(2, 2, 128, 64)
    q = kivi(bits, group)
    for role in ("key", "value"):
        assert q.encode(x, role).bits_per_element() == pytest.approx(bits + 32 / group)


def test_kivi_random_access_equals_batch_decode_and_codes_are_deterministic() -> None:
    x = torch.randn(2, 3, 96, 64)
    q = kivi(2, 32)
    tokens = torch.tensor([95, 0, 31, 32, 50, 50])
    for role in ("key", "value"):
        codes = q.encode(x, role)
        full = q.decode(codes, role, torch.float32)
        assert torch.equal(q.decode_tokens(codes, role, tokens, torch.float32), full[:, :, tokens])
        again = q.encode(x.clone(), role)
        assert all(torch.equal(codes.tensors[k], again.tensors[k]) for k in codes.tensors)


def test_kivi_rejects_bad_lengths() -> None:
    with pytest.raises(ValueError, match="multiple of 32"):
        kivi(4, 32).encode(torch.randn(1, 1, 40, 64), "key")
    with pytest.raises(ValueError, match="must divide head_dim"):
        kivi(4, 48).encode(torch.randn(1, 1, 4, 64), "value")


def _layer(residual: int, group: int = 8, bits: int = 4) -> QuantizedLayer:
    return QuantizedLayer(kivi(bits, group), residual)


def test_append_never_requantizes_stored_tokens() -> None:
    layer = _layer(residual=16)
    calls = []
    encode = layer.quantizer.encode
    layer.quantizer.encode = lambda x, role: calls.append(x.shape[-2]) or encode(x, role)  # type: ignore[method-assign]
    k, v = torch.randn(1, 2, 40, 16), torch.randn(1, 2, 40, 16)
    out_k, _ = layer.update(k, v)
    assert torch.equal(out_k, k), "the tokens of the current forward are returned in full precision"
    assert layer.quantized_tokens == 24 and layer.keys.shape[-2] == 16 and calls == [24, 24]
    snapshot = {name: t.clone() for name, t in layer.key_codes.tensors.items()}
    for step in range(20):
        layer.update(torch.randn(1, 2, 1, 16), torch.randn(1, 2, 1, 16))
    # Two more blocks of 8 were encoded (one call per role per block); the first 24 tokens' codes are untouched.
    assert calls == [24, 24, 8, 8, 8, 8]
    assert layer.get_seq_length() == 60 and layer.quantized_tokens == 40
    assert 16 <= layer.keys.shape[-2] < 16 + 8
    assert all(torch.equal(layer.key_codes.tensors[n][:, :, :3], snapshot[n]) for n in snapshot)


def test_crop_inside_and_beyond_the_residual() -> None:
    layer = _layer(residual=8)
    k, v = torch.randn(1, 1, 40, 16), torch.randn(1, 1, 40, 16)
    layer.update(k, v)
    before_k, _ = layer.decoded()
    layer.crop(-3)
    assert layer.get_seq_length() == 37
    assert torch.equal(layer.decoded()[0], before_k[..., :37, :])
    layer.crop(-20)
    assert layer.get_seq_length() == 17
    torch.testing.assert_close(layer.decoded()[0], before_k[..., :17, :], atol=0.2, rtol=0)


def test_residual_window_longer_than_the_sequence_is_exact() -> None:
    model = tiny_model("llama")
    ids = prompt_ids(batch=2, length=20)
    gen = dict(attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False)
    with torch.no_grad():
        reference = model.generate(ids, **gen)
        kvpatch.apply(model, quantized_config(bits=2, group_size=8, residual=64))
        assert torch.equal(model.generate(ids, **gen), reference)


@pytest.mark.parametrize("family", QUANTIZER_FAMILIES)
def test_quantized_cache_in_every_family(family: str) -> None:
    """Small residual so that most of the context is quantized: 4-bit stays close, KV shrinks,
    and generate (greedy, beams) runs."""
    model = tiny_model(family)
    ids = prompt_ids(batch=2, length=48)
    with torch.no_grad():
        unpatched = model(ids, use_cache=True)
        reference = unpatched.logits[:, 24:]
        dense_bytes = sum(cache_kv_bytes(output_cache(unpatched)).values())
        handle = kvpatch.apply(model, quantized_config(bits=4, group_size=8, residual=4))
        out = model(ids[:, :24], use_cache=True)
        cache = output_cache(out)
        steps = []
        for i in range(24, 48):
            out = model(ids[:, i : i + 1], use_cache=True, **{cache_kwarg(model): cache})
            cache = output_cache(out)
            steps.append(out.logits[:, -1])
        patched = torch.stack(steps, dim=1)
        cosine = torch.nn.functional.cosine_similarity(patched, reference, dim=-1)
        assert cosine.min() > 0.99
        # Full-attention layers are quantized; sliding-window layers stay dense (bounded anyway).
        full_layers = [i for i, layout in enumerate(layer_layouts(model.config)) if layout.sliding_window is None]
        quantized = [i for i, layer in enumerate(cache.layers) if isinstance(layer, QuantizedLayer)]
        assert quantized == full_layers
        assert all(cache.layers[i].quantized_tokens >= 40 for i in quantized)
        assert cache.get_seq_length() == 48
        if quantized:
            assert handle.stats()["kv_bytes_total"] < dense_bytes
        beams = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, num_beams=2, do_sample=False)
        assert beams.shape == (2, 54)



def test_sink_tokens_stay_full_precision_and_own_their_storage() -> None:
    layer = QuantizedLayer(kivi(2, 8), residual_length=8, sink_tokens=3)
    k, v = torch.randn(2, 2, 30, 16), torch.randn(2, 2, 30, 16)
    layer.update(k[..., :2, :], v[..., :2, :])  # the sink fills across two calls
    layer.update(k[..., 2:, :], v[..., 2:, :])
    keys, values = layer.decoded()
    assert layer.get_seq_length() == 30 and layer.sink_length == 3 and layer.quantized_tokens == 16
    assert torch.equal(keys[..., :3, :], k[..., :3, :]) and torch.equal(values[..., :3, :], v[..., :3, :])
    assert torch.equal(keys[..., -11:, :], k[..., -11:, :])  # residual: 8 + the 3 not filling a block
    assert layer.sink_keys.untyped_storage().nbytes() == layer.sink_keys.numel() * 4
    layer.reorder_cache(torch.tensor([1, 0]))
    assert torch.equal(layer.decoded()[0][0, :, :3], k[1, :, :3])


def test_compiled_decode_matches_eager_decode() -> None:
    ids = prompt_ids(batch=1, length=40)
    logits = []
    for compiled in (False, True):
        torch._dynamo.reset()
        model = tiny_model("llama")
        config = quantized_config(bits=4, group_size=8, residual=4).model_dump()
        config["stages"][1]["params"]["compile_decode"] = compiled
        handle = kvpatch.apply(model, config)
        with torch.no_grad():
            out = model(ids[:, :30], use_cache=True)
            for i in range(30, 40):
                out = model(ids[:, i : i + 1], use_cache=True, **{cache_kwarg(model): output_cache(out)})
        logits.append(out.logits)
        compiled_fns = handle.pipeline.storage.quantizer.__dict__.get("_compiled_decoders", {})
        assert len(compiled_fns) == (2 if compiled else 0)  # one per role
    torch.testing.assert_close(logits[1], logits[0], atol=1e-5, rtol=1e-5)
