"""Triton kernels (kvpatch/kernels/triton_*.py) against float64 and the torch path.

Without CUDA the kernels run in Triton's interpreter (tiny shapes only: it is ~1000x slower).
The interpreter must be on when triton is first imported, and `import torch` already imports
triton, so a process without TRITON_INTERPRET=1 runs this module again in a child process that
has it (see the end of the file). With CUDA the checks run on the GPU, plus real sizes.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Iterator

import pytest
import torch

import kvpatch
from kvpatch import registry
from kvpatch.compat import cache_kwarg, output_cache
from kvpatch.config import StageConfig
from kvpatch.kernels import math_attention
from kvpatch.kernels.packed import PackedKV
from kvpatch.kernels.decode_tuning import DecodeTuning, plan, policy_splits, split_count
from kvpatch.kernels.triton_decode import decode_attention
from kvpatch.kernels.triton_quantize import kivi_encode
from kvpatch.kernels import triton_support
from kvpatch.kernels.triton_support import interpreting, triton_unavailable_reason
from kvpatch.patch.attention import KERNEL_ATTR, kvpatch_attention
from kvpatch.quant.kernel_layouts import KiviPacking
from kvpatch.stages.quantizer_kivi import KiviQuantizer
from kvpatch.stages.storage_quantized import QuantizedLayer
from kvpatch.testing import prompt_ids, tiny_model

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def kivi(bits: int, group: int):
    return StageConfig(kind="quantizer", impl="kivi", params={"bits": bits, "group_size": group}).build()


def fibquant(block_dim: int):
    params = {"block_dim": block_dim, "code_bits": 8, "source_lloyd_iters": 0}
    return StageConfig(kind="quantizer", impl="fibquant", params=params).build()


def random_packed(batch: int, kv_heads: int, dim: int, bits: int, group: int, sinks: int, blocks: int,
                  residual: int, dtype: torch.dtype, quantizer=None) -> PackedKV:
    """Sinks + `blocks` KIVI blocks (or `quantizer`'s codes of blocks * group tokens) + residual of
    fresh random K/V (with a few outlier channels)."""
    quantizer = quantizer or kivi(bits, group)

    def draw(tokens: int) -> torch.Tensor:
        x = torch.randn(batch, kv_heads, tokens, dim, device=DEVICE)
        x[..., :: max(1, dim // 4)] *= 4.0
        return x.to(dtype)

    codes = (quantizer.encode(draw(blocks * group), "key"), quantizer.encode(draw(blocks * group), "value")) if blocks else (None, None)
    sink = (draw(sinks), draw(sinks)) if sinks else (None, None)
    return PackedKV(draw(residual), draw(residual), *sink, *codes, quantizer, quantizer.decode)


def reference(query: torch.Tensor, kv: PackedKV, scaling: float, lengths: torch.Tensor | None = None,
              mask: torch.Tensor | None = None) -> torch.Tensor:
    """Float64 attention over the decoded K/V; rows that see no key are zero."""
    keys, values = (t.double() for t in kv.dense())
    batch, q_heads, q_len, _ = query.shape
    total = keys.shape[2]
    groups = q_heads // keys.shape[1]
    keys, values = keys.repeat_interleave(groups, 1), values.repeat_interleave(groups, 1)
    scores = query.double() @ keys.transpose(-1, -2) * scaling
    ends = lengths.to(DEVICE) if lengths is not None else torch.full((batch,), total, device=DEVICE)
    last_visible = ends[:, None, None] - q_len + torch.arange(q_len, device=DEVICE)[None, :, None]
    visible = torch.arange(total, device=DEVICE)[None, None, :] <= last_visible
    if mask is not None:
        visible = visible & mask[:, 0, :, :total]
    scores = scores.masked_fill(~visible[:, None], float("-inf"))
    return (torch.softmax(scores, dim=-1).nan_to_num(0.0) @ values)


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref).norm() / ref.norm()).item()


# batch, kv heads, q heads per kv head, queries, head dim, bits, group, sinks, blocks, residual, dtype
CASES = [
    (1, 1, 1, 1, 64, 4, 8, 0, 9, 5, torch.float32),
    (2, 2, 4, 1, 128, 2, 32, 3, 3, 17, torch.bfloat16),
    (1, 2, 8, 1, 64, 4, 16, 4, 5, 1, torch.float16),
    (2, 1, 3, 2, 128, 8, 32, 1, 2, 31, torch.bfloat16),
    (1, 2, 2, 3, 64, 2, 16, 0, 7, 0, torch.float32),
    (3, 1, 5, 1, 64, 4, 64, 2, 2, 13, torch.bfloat16),
    (2, 2, 2, 1, 64, 4, 8, 0, 0, 45, torch.float16),  # no codes: a dense cache
]


def _tolerance(dtype: torch.dtype) -> float:
    # float32 dots are tf32 on a GPU; bf16 output rounding alone is ~2e-3
    return 1e-2 if dtype != torch.float32 or DEVICE.type == "cuda" else 1e-4


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c[:10])) + f"-{str(c[10])[6:]}")
def test_decode_matches_float64(case: tuple) -> None:
    batch, kv_heads, groups, q_len, dim, bits, group, sinks, blocks, residual, dtype = case
    kv = random_packed(batch, kv_heads, dim, bits, group, sinks, blocks, residual, dtype)
    query = torch.randn(batch, q_len, kv_heads * groups, dim, device=DEVICE).to(dtype).transpose(1, 2)
    out = decode_attention(query, kv, dim**-0.5)
    assert out.shape == query.shape and not out.isnan().any()
    assert relative_error(out, reference(query, kv, dim**-0.5)) < _tolerance(dtype)


@pytest.mark.parametrize("splits", [1, 31, 32, 33, 70])
def test_split_join_over_many_splits(splits: int) -> None:
    """The reduce joins its splits in loads of several at once: split counts around and over one
    load, with most splits seeing no token of some rows (a mask), match float64."""
    kv = random_packed(2, 2, 64, 4, 8, 2, 20, 9, torch.float32)
    query = torch.randn(2, 2, 4, 64, device=DEVICE).transpose(1, 2)  # 2 queries x 2 heads per kv head
    mask = torch.rand(2, 1, 2, kv.num_tokens, device=DEVICE) < 0.3
    mask[..., 0] = True
    out = decode_attention(query, kv, 0.125, mask=mask, tuning=DecodeTuning(num_splits=splits))
    assert relative_error(out, reference(query, kv, 0.125, mask=mask)) < _tolerance(torch.float32)


@pytest.mark.parametrize(("batch", "kv_heads", "groups", "q_len", "dim", "block_dim", "dtype"), [
    (1, 1, 4, 1, 64, 4, torch.float32), (2, 2, 3, 2, 128, 8, torch.bfloat16), (3, 1, 1, 1, 64, 4, torch.float16)])
def test_fibquant_codes_match_float64(batch: int, kv_heads: int, groups: int, q_len: int, dim: int, block_dim: int,
                                      dtype: torch.dtype) -> None:
    """FibQuant codes fused (rotated space, codebook gathers): same as float64 attention over the
    torch decode of the same codes."""
    kv = random_packed(batch, kv_heads, dim, 8, 8, 3, 9, 11, dtype, quantizer=fibquant(block_dim))
    query = torch.randn(batch, kv_heads * groups, q_len, dim, device=DEVICE).to(dtype)
    out = decode_attention(query, kv, dim**-0.5)
    assert out.shape == query.shape and not out.isnan().any()
    assert relative_error(out, reference(query, kv, dim**-0.5)) < _tolerance(dtype)


@pytest.mark.parametrize("score_join", [False, True])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_kivi_loop_variants(bits: int, score_join: bool) -> None:
    """Both KIVI loops (per-field softmax / joined score tile), with lengths and a padding mask,
    a partial last block and more than one tile per split."""
    kv = random_packed(2, 2, 64, bits, 16, 1, 11, 7, torch.bfloat16)
    total = kv.num_tokens
    query = torch.randn(2, 6, 1, 64, device=DEVICE, dtype=torch.bfloat16)
    lengths = torch.tensor([total, total - 40], device=DEVICE)
    mask = torch.rand(2, 1, 1, total, device=DEVICE) > 0.3
    tuning = DecodeTuning(score_join=score_join, block_n=64, num_splits=2)
    out = decode_attention(query, kv, 0.125, lengths=lengths, mask=mask, tuning=tuning)
    assert not out.isnan().any()
    assert relative_error(out, reference(query, kv, 0.125, lengths=lengths, mask=mask)) < 1e-2


def test_split_policies() -> None:
    """waveN fills one wave of N code programs per SM; coverN rounds up; a bad name is refused."""
    cpu = torch.device("cpu")  # 4 "SMs" off the GPU
    assert policy_splits(255, 2, cpu, "wave4") == 8 and policy_splits(255, 3, cpu, "wave4") == 5
    assert policy_splits(255, 3, cpu, "cover4") == 6 and policy_splits(3, 1, cpu, "cover8") == 3
    assert policy_splits(255, 64, cpu, "wave4") == 1
    with pytest.raises(ValueError, match="split_policy 'even4'"):
        policy_splits(10, 1, cpu, "even4")
    kv = random_packed(1, 2, 64, 4, 16, 0, 9, 3, torch.float32)
    query = torch.randn(1, 4, 1, 64, device=DEVICE)
    outs = [decode_attention(query, kv, 0.125, tuning=DecodeTuning(split_policy=policy)) for policy in ("wave1", "cover8")]
    torch.testing.assert_close(outs[0], outs[1], atol=1e-4, rtol=0)


def test_launch_plan_rules() -> None:
    """The per-kind rules of the launch plan: explicit knobs win, FibQuant tiles stay 64 tokens,
    a KIVI tile holds at least one group, the fp16 KIVI loop is register-capped and one-wave
    split, and a dense-only cache keeps at least 8 tiles per split."""
    bf16, cpu = torch.bfloat16, torch.device("cpu")
    gpu_kivi = plan(None, "kivi", bf16, interpret=False, group_size=256)
    assert (gpu_kivi.block_n, gpu_kivi.maxnreg, gpu_kivi.split_policy, gpu_kivi.fast_cvt) == (256, 128, "wave4", True)
    fp32_kivi = plan(None, "kivi", torch.float32, interpret=False, group_size=16)
    assert (fp32_kivi.block_n, fp32_kivi.num_stages, fp32_kivi.maxnreg, fp32_kivi.split_policy) == (64, 3, 0, "cover8")
    fib = plan(DecodeTuning(block_n=256), "fibquant", bf16, interpret=False)
    assert fib.block_n == 64 and not fib.fast_cvt and fib.maxnreg == 0
    explicit = plan(DecodeTuning(block_n=32, num_stages=4, maxnreg=0, split_policy="wave2"), "kivi", bf16, False, 16)
    assert (explicit.block_n, explicit.num_stages, explicit.maxnreg, explicit.split_policy) == (32, 4, 0, "wave2")
    dense = plan(None, "dense", bf16, interpret=True)
    assert dense.dense_block_n == dense.block_n == 64
    assert split_count(dense, "dense", 40, 1, cpu) == 5  # cover8 alone would give 32
    assert split_count(plan(DecodeTuning(num_splits=7), "dense", bf16, True), "dense", 40, 1, cpu) == 7


def test_per_sequence_lengths_and_mask() -> None:
    """Batch rows of different lengths (one empty), and a boolean padding mask: same as float64,
    rows with nothing visible are zero, not NaN."""
    kv = random_packed(4, 2, 64, 4, 16, 2, 6, 9, torch.bfloat16)
    total = kv.num_tokens
    query = torch.randn(4, 8, 2, 64, device=DEVICE, dtype=torch.bfloat16)
    lengths = torch.tensor([total, total - 37, 0, 5], device=DEVICE)
    out = decode_attention(query, kv, 0.125, lengths=lengths, tuning=DecodeTuning(num_splits=3))
    ref = reference(query, kv, 0.125, lengths=lengths)
    assert not out.isnan().any() and torch.equal(out[2], torch.zeros_like(out[2]))
    assert relative_error(out, ref) < 1e-2
    mask = torch.rand(4, 1, 2, total + 3, device=DEVICE) > 0.4
    mask[1] = False
    out = decode_attention(query, kv, 0.125, mask=mask)
    assert not out.isnan().any() and torch.equal(out[1], torch.zeros_like(out[1]))
    assert relative_error(out, reference(query, kv, 0.125, mask=mask)) < 1e-2


@pytest.mark.parametrize(("first", "count", "blocks"), [(0, 7, 3), (13, 9, 0), (5, 16, 5)])
def test_static_buffers_with_device_counts(first: int, count: int, blocks: int) -> None:
    """A static layer's parts: code buffers valid up to a device counter and a residual ring
    that wraps around (`PackedKV.counts`): the kernel reads only the valid tokens, in ring order."""
    dtype = torch.bfloat16
    for kv, valid in ((random_packed(2, 2, 64, 4, 16, 2, 6, 17, dtype), blocks),
                      (random_packed(2, 2, 64, 8, 16, 2, 6, 17, dtype, quantizer=fibquant(4)), 16 * blocks + 5)):
        kv.counts = torch.tensor([valid, first, count], device=DEVICE)
        kv.host_counts = (valid, first, count)
        assert kv.num_tokens == 2 + 16 * blocks + (5 if kv.key_codes.block_tokens == 1 else 0) + count
        query = torch.randn(2, 8, 1, 64, device=DEVICE, dtype=dtype)
        out = decode_attention(query, kv, 0.125)
        assert not out.isnan().any()
        assert relative_error(out, reference(query, kv, 0.125)) < 1e-2


@pytest.mark.parametrize(("capacity", "count", "sinks", "splits"), [(200, 131, 0, None), (64, 1, 0, 3), (96, 96, 3, 5)])
def test_dense_static_buffer_is_split_over_its_valid_tokens(capacity: int, count: int, sinks: int,
                                                            splits: int | None) -> None:
    """A full-precision buffer valid up to a device count (a static dense layer): the splits share
    the valid tokens and never read past them (the rest is NaN here), with or without a padding
    mask spanning the whole capacity."""
    kv = random_packed(2, 2, 64, 4, 16, sinks, 0, capacity, torch.bfloat16)
    kv.keys[..., count:, :] = float("nan")
    kv.values[..., count:, :] = float("nan")
    kv.counts = torch.tensor([0, 0, count], device=DEVICE)
    kv.host_counts = (0, 0, count)
    query = torch.randn(2, 8, 1, 64, device=DEVICE, dtype=torch.bfloat16)
    out = decode_attention(query, kv, 0.125, tuning=DecodeTuning(num_splits=splits))
    assert not out.isnan().any()
    assert relative_error(out, reference(query, kv, 0.125)) < 1e-2
    mask = torch.rand(2, 1, 1, sinks + capacity, device=DEVICE) > 0.3
    out = decode_attention(query, kv, 0.125, mask=mask, tuning=DecodeTuning(num_splits=splits))
    assert not out.isnan().any()
    assert relative_error(out, reference(query, kv, 0.125, mask=mask)) < 1e-2


def _model_logits(kernel: str, quantizer: tuple[str, dict] = ("kivi", {"bits": 4, "group_size": 8}),
                  storage: dict | None = None, decode_steps: int = 10) -> tuple[torch.Tensor, list]:
    """Last-position logits of `decode_steps` single-token forwards after a 20-token prefill, and the
    cache layers, for a tiny Llama under a quantized config (`storage`: extra storage params)."""
    model = tiny_model("llama").to(DEVICE)
    config = {
        "name": f"quantized-{kernel}",
        "fidelity": {"lossless": False},
        "kernels": {"attention": kernel},
        "stages": [
            {"kind": "quantizer", "impl": quantizer[0], "params": quantizer[1]},
            {"kind": "storage", "impl": "quantized", "params": {"residual_length": 8, "sink_tokens": 2, **(storage or {})}},
        ],
    }
    kvpatch.apply(model, config)
    ids = prompt_ids(batch=2, length=20 + decode_steps).to(DEVICE)
    steps = []
    with torch.no_grad():
        out = model(ids[:, :20], use_cache=True)
        for i in range(20, 20 + decode_steps):
            out = model(ids[:, i : i + 1], use_cache=True, **{cache_kwarg(model): output_cache(out)})
            steps.append(out.logits[:, -1])
    return torch.stack(steps, 1), output_cache(out).layers


def test_static_layer_through_the_fused_kernel() -> None:
    """capacity_tokens + kernels: triton gives the dynamic layer's logits (the split count may
    differ: float tolerance, not bits)."""
    static, layers = _model_logits("triton", storage={"capacity_tokens": 48}, decode_steps=16)
    assert all(layer.static and layer._encode is not None for layer in layers)  # the fused path ran
    dynamic, _ = _model_logits("triton", decode_steps=16)
    torch.testing.assert_close(static, dynamic, atol=1e-4 if DEVICE.type == "cpu" else 5e-2,
                               rtol=0)


def test_static_dense_layer_through_the_fused_kernel() -> None:
    """`default_graphs` (static dense buffers, fused kernel over the valid length, padding mask
    over the whole buffer) gives `default`'s tokens and logits under plain generate."""
    outs = []
    for config in ("default", "default_graphs"):
        model = tiny_model("llama").to(DEVICE)
        kvpatch.apply(model, config)
        ids = prompt_ids(batch=2, length=30).to(DEVICE)
        mask = torch.ones_like(ids)
        mask[1, :4] = 0
        outs.append(model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0,
                                   return_dict_in_generate=True, output_logits=True))
    assert torch.equal(outs[0].sequences, outs[1].sequences)
    torch.testing.assert_close(torch.stack(outs[1].logits), torch.stack(outs[0].logits),
                               atol=1e-4 if DEVICE.type == "cpu" else 5e-3, rtol=0)  # tf32 dots on a GPU


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")
def test_cuda_graph_decode_equals_eager_decode() -> None:
    """A decode step over the static quantized cache with the fused kernel captures into one CUDA
    graph, and its replays give the eager step's greedy tokens."""
    tokens = {}
    for use_graph in (False, True):
        model = tiny_model("llama").to(DEVICE)
        config = kvpatch.load_config("kivi4_triton").model_dump()
        config["stages"][0]["params"]["group_size"] = 8  # the tiny model's head_dim is 16
        config["stages"][1]["params"].update(capacity_tokens=512, residual_length=32)
        kvpatch.apply(model, config)
        ids = prompt_ids(batch=2, length=200).to(DEVICE)
        cache = kvpatch.get_handle(model).new_cache()
        decoder = kvpatch.CudaGraphDecoder(model, cache)
        tokens[use_graph] = decoder.generate(ids, 100, prefill_chunk=64, use_graph=use_graph)
        assert cache.layers[0].get_seq_length() == ids.shape[1] - 1 + 100
        assert cache.layers[0].static
    assert torch.equal(tokens[True], tokens[False])



@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize(("group", "dim", "dtype"), [(8, 64, torch.float32), (32, 128, torch.bfloat16), (16, 64, torch.float16)])
def test_encode_is_bitwise_the_torch_encode(bits: int, group: int, dim: int, dtype: torch.dtype) -> None:
    x = (torch.randn(2, 3, 3 * group, dim + 5, device=DEVICE) * 3).to(dtype)[..., 2 : dim + 2]  # strided view
    x[0, 0, :group] = 1.5  # a constant group: scale 0
    quantizer = kivi(bits, group)
    for role in ("key", "value"):
        expected, got = quantizer.encode(x, role), kivi_encode(x, role, bits, group)
        enabled = kivi_encode(x, role, bits, group, enabled=torch.ones((), dtype=torch.int64, device=DEVICE))
        assert (got.block_tokens, got.dim) == (expected.block_tokens, expected.dim)
        for name, tensor in expected.tensors.items():
            assert torch.equal(got.tensors[name], tensor), f"{role} {name}"
            assert torch.equal(enabled.tensors[name], tensor), f"{role} {name} (enabled flag)"


def test_patched_model_decodes_through_the_fused_kernel() -> None:
    """kivi + kernels.attention=triton: same logits as the torch path, and the fused kernel (and
    the Triton encoder) actually ran in every layer."""
    reference_logits, _ = _model_logits("torch")
    logits, layers = _model_logits("triton")
    assert all(isinstance(layer, QuantizedLayer) and layer._encode is not None for layer in layers)
    assert layers[0].quantized_tokens == 16
    # float32 dots are tf32 on a GPU
    torch.testing.assert_close(logits, reference_logits, atol=2e-3 if DEVICE.type == "cpu" else 5e-2, rtol=0)


def test_patched_model_decodes_fibquant_through_the_fused_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    from kvpatch.kernels import triton_decode

    fib = ("fibquant", {"block_dim": 4, "code_bits": 8, "source_lloyd_iters": 0})
    reference_logits, _ = _model_logits("torch", fib)
    calls = []
    fused = triton_decode.decode_attention
    monkeypatch.setattr(triton_decode, "decode_attention", lambda *a, **k: calls.append(1) or fused(*a, **k))
    logits, layers = _model_logits("triton", fib)
    assert len(calls) >= 10 * len(layers)  # every decode step of every layer (+ the probe of apply)
    torch.testing.assert_close(logits, reference_logits, atol=2e-3 if DEVICE.type == "cpu" else 5e-2, rtol=0)


class KiviPackedPlugin(KiviQuantizer):
    """A plug-in quantizer under its own name whose codes are KIVI's (inherited here); it declares
    `KiviPacking` (inherited too), and that capability, not a name, is what the kernel reads."""


class UndeclaredPlugin(KiviQuantizer):
    """The same codes without a declared layout: the kernel cannot know it may read them."""

    def kernel_layout(self) -> None:
        return None


@pytest.fixture
def plugin_quantizers() -> Iterator[None]:
    """Register the two plug-ins for one test; the registry forgets them afterwards."""
    register = {"_test_kivi_packed": KiviPackedPlugin, "_test_undeclared": UndeclaredPlugin}
    for name, cls in register.items():
        registry.register_stage("quantizer", name)(cls)
    yield
    for name in register:
        del registry._SPECS["quantizer"][name], registry._CLASSES["quantizer"][name]


def test_plugin_quantizer_with_a_kivi_layout_is_fused(plugin_quantizers: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """A quantizer named otherwise that declares `KiviPacking`: every decode step runs the fused
    kernel over its codes (and the Triton encoder writes them), with the torch path's logits."""
    from kvpatch.kernels import triton_decode

    params = {"bits": 4, "group_size": 8}
    assert KiviPackedPlugin(KiviPackedPlugin.Params(**params)).kernel_layout() == KiviPacking(4, 8)
    reference_logits, _ = _model_logits("torch", ("kivi", params))
    over_codes = []
    fused = triton_decode.decode_attention
    monkeypatch.setattr(triton_decode, "decode_attention",
                        lambda q, kv, *a, **k: over_codes.append(kv.key_codes is not None) or fused(q, kv, *a, **k))
    logits, layers = _model_logits("triton", ("_test_kivi_packed", params))
    assert all(type(layer.quantizer) is KiviPackedPlugin and layer._encode is not None for layer in layers)
    assert sum(over_codes) >= 10 * len(layers)  # every decode step of every layer read the codes
    torch.testing.assert_close(logits, reference_logits, atol=2e-3 if DEVICE.type == "cpu" else 5e-2, rtol=0)


def test_quantizer_without_a_kernel_layout_falls_back_with_the_reason(
        plugin_quantizers: None, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """The same codes without a declared layout: the torch kernels run, and the log says why."""
    from kvpatch.kernels import triton_decode

    monkeypatch.setattr(triton_support, "_logged", set())  # each reason is logged once per process
    over_codes = []
    fused = triton_decode.decode_attention
    monkeypatch.setattr(triton_decode, "decode_attention",
                        lambda q, kv, *a, **k: over_codes.append(kv.key_codes is not None) or fused(q, kv, *a, **k))
    params = {"bits": 4, "group_size": 8}
    reference_logits, _ = _model_logits("torch", ("kivi", params))
    with caplog.at_level(logging.WARNING, logger="kvpatch"):
        logits, layers = _model_logits("triton", ("_test_undeclared", params))
    assert "codes of quantizer '_test_undeclared' declare no fused layout" in caplog.text
    assert not any(over_codes)  # the fused kernel ran over no codes (a dense cache before the first flush is fine)
    assert all(type(layer.quantizer) is UndeclaredPlugin and layer._encode is None for layer in layers)
    torch.testing.assert_close(logits, reference_logits, atol=2e-3 if DEVICE.type == "cpu" else 5e-2, rtol=0)


class _Module(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        setattr(self, KERNEL_ATTR, "triton")


def test_fallback_is_logged_and_matches_torch(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    with monkeypatch.context() as patch:
        patch.delenv("TRITON_INTERPRET", raising=False)
        assert "CUDA" in triton_unavailable_reason(torch.zeros(1))
    query, key, value = torch.randn(1, 4, 1, 16), torch.randn(1, 2, 7, 16), torch.randn(1, 2, 7, 16)
    with caplog.at_level(logging.WARNING, logger="kvpatch"):
        out, _ = kvpatch_attention(_Module(), query.to(DEVICE), key.to(DEVICE), value.to(DEVICE), None, 0.25, softcap=5.0)
    assert "soft-capping" in caplog.text
    expected, _ = math_attention(query, key, value, None, 0.25, softcap=5.0)
    torch.testing.assert_close(out.cpu(), expected.transpose(1, 2), atol=1e-5, rtol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="real sizes need a CUDA GPU")
@pytest.mark.parametrize("bits", [2, 4])
def test_llama8b_heads_long_context_cuda(bits: int) -> None:
    """Llama-3-8B heads (32 q / 8 kv, d=128), 16K tokens, batch of 4 with different lengths."""
    kv = random_packed(4, 8, 128, bits, 32, 4, 512, 100, torch.bfloat16)
    query = torch.randn(4, 32, 1, 128, device=DEVICE, dtype=torch.bfloat16)
    lengths = torch.tensor([kv.num_tokens, 9000, 4097, 33], device=DEVICE)
    out = decode_attention(query, kv, 128**-0.5, lengths=lengths)
    assert not out.isnan().any()
    assert relative_error(out, reference(query, kv, 128**-0.5, lengths=lengths)) < 1e-2


if not torch.cuda.is_available() and not interpreting():
    # Kernels decorated without the interpreter cannot run on the CPU: collect only this test,
    # which runs every test above in a child process started with TRITON_INTERPRET=1.
    for _name in [name for name in globals() if name.startswith("test_")]:
        del globals()[_name]

    @pytest.mark.slow  # ~100 s: every kernel test again under TRITON_INTERPRET=1
    def test_kernels_in_triton_interpreter() -> None:
        env = {**os.environ, "TRITON_INTERPRET": "1"}
        child = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
                               env=env, capture_output=True, text=True, timeout=300, check=False)
        assert child.returncode == 0, child.stdout[-6000:] + child.stderr[-2000:]
        assert " passed" in child.stdout
