"""The lossless default config must reproduce the unpatched model for every supported family."""

from __future__ import annotations

import pytest
import torch
from transformers import pipeline

import kvpatch
from kvpatch.compat import cache_kwarg, output_cache
from kvpatch.cache import KVPatchCache
from kvpatch.testing import TINY_CONFIGS, prompt_ids, tiny_model, tiny_tokenizer

FAMILIES = sorted(kvpatch.supported_families())

ATOL = 1e-5


def test_every_supported_family_has_a_tiny_model() -> None:
    assert set(FAMILIES) <= set(TINY_CONFIGS)
    assert {"llama", "mistral", "qwen2", "qwen3", "gpt2", "phi3", "gemma2", "gemma3_text"} <= set(FAMILIES)


def _prefill_then_decode(model: torch.nn.Module, ids: torch.Tensor, steps: int) -> list[torch.Tensor]:
    """Logits of a prefill followed by `steps` one-token decode steps through the cache."""
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=True)
        logits = [out.logits]
        for _ in range(steps):
            next_ids = logits[-1][:, -1:].argmax(-1)
            out = model(input_ids=next_ids, use_cache=True, **{cache_kwarg(model): output_cache(out)})
            logits.append(out.logits)
    return logits


def test_forward_logits_match_through_prefill_and_decode(tiny: torch.nn.Module) -> None:
    ids = prompt_ids(length=20)  # longer than the tiny sliding window (8)
    reference = _prefill_then_decode(tiny, ids, steps=12)
    handle = kvpatch.apply(tiny, "default")
    patched = _prefill_then_decode(tiny, ids, steps=12)
    assert isinstance(handle.last_cache, KVPatchCache), "the forward did not go through a kvpatch cache"
    for step, (ref, got) in enumerate(zip(reference, patched)):
        torch.testing.assert_close(got, ref, atol=ATOL, rtol=0, msg=lambda m: f"step {step}: {m}")


def test_greedy_generation_identical_for_32_tokens(tiny: torch.nn.Module) -> None:
    ids = prompt_ids(length=16)
    kwargs = dict(max_new_tokens=32, do_sample=False, min_new_tokens=32)
    with torch.no_grad():
        reference = tiny.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)
    handle = kvpatch.apply(tiny, "default")
    with torch.no_grad():
        patched = tiny.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)
    assert torch.equal(patched, reference)
    stats = handle.stats()
    assert stats["tokens"] == 16 + 32 - 1  # the last generated token is never fed back
    assert stats["kv_bytes_total"] > 0 and stats["batch_size"] == 2


def test_padded_batch_matches(tiny: torch.nn.Module) -> None:
    ids = prompt_ids(batch=3, length=14)
    mask = torch.ones_like(ids)
    mask[0, :5] = 0  # left padding of different lengths
    mask[2, :9] = 0
    ids = ids.masked_fill(mask == 0, 256)
    kwargs = dict(attention_mask=mask, max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=256)
    with torch.no_grad():
        ref_logits = tiny(input_ids=ids, attention_mask=mask).logits
        reference = tiny.generate(ids, **kwargs)
    kvpatch.apply(tiny, "default")
    with torch.no_grad():
        logits = tiny(input_ids=ids, attention_mask=mask).logits
        patched = tiny.generate(ids, **kwargs)
    real = mask.bool()
    torch.testing.assert_close(logits[real], ref_logits[real], atol=ATOL, rtol=0)
    assert torch.equal(patched, reference)


def test_beam_search_matches(tiny: torch.nn.Module) -> None:
    ids = prompt_ids(batch=2, length=10)
    kwargs = dict(attention_mask=torch.ones_like(ids), max_new_tokens=10, min_new_tokens=10, num_beams=3,
                  do_sample=False, num_return_sequences=2)
    with torch.no_grad():
        reference = tiny.generate(ids, **kwargs)
    kvpatch.apply(tiny, "default")
    with torch.no_grad():
        patched = tiny.generate(ids, **kwargs)
    assert torch.equal(patched, reference)


def test_sampling_matches_with_same_seed(tiny: torch.nn.Module) -> None:
    ids = prompt_ids(batch=2, length=10)
    kwargs = dict(attention_mask=torch.ones_like(ids), max_new_tokens=16, min_new_tokens=16, do_sample=True,
                  top_k=20, temperature=0.9)
    torch.manual_seed(123)
    with torch.no_grad():
        reference = tiny.generate(ids, **kwargs)
    kvpatch.apply(tiny, "default")
    torch.manual_seed(123)
    with torch.no_grad():
        patched = tiny.generate(ids, **kwargs)
    assert torch.equal(patched, reference)


def test_unpatch_restores_exactly(tiny: torch.nn.Module) -> None:
    ids = prompt_ids(length=12)
    original_attention = tiny.config._attn_implementation
    with torch.no_grad():
        before = tiny(input_ids=ids).logits
    handle = kvpatch.apply(tiny, "default")
    assert tiny.config._attn_implementation == "kvpatch"
    handle.remove()
    with torch.no_grad():
        after = tiny(input_ids=ids).logits
        out = tiny(input_ids=ids, use_cache=True)
    assert torch.equal(before, after)
    assert tiny.config._attn_implementation == original_attention
    assert not tiny._forward_pre_hooks and kvpatch.get_handle(tiny) is None
    assert output_cache(out) is not None and not isinstance(output_cache(out), KVPatchCache)
    assert not any(hasattr(m, "_kvpatch_kernel") for m in tiny.modules())


def test_text_generation_pipeline_works_unchanged() -> None:
    model, tokenizer = tiny_model("llama"), tiny_tokenizer()
    generator = pipeline("text-generation", model=model, tokenizer=tokenizer, device="cpu")
    kwargs = dict(max_new_tokens=10, do_sample=False, return_full_text=False)
    reference = generator(["def add(a, b):", "x"], **kwargs)
    kvpatch.apply(model, "default")
    patched = generator(["def add(a, b):", "x"], **kwargs)
    assert patched == reference
    assert kvpatch.get_handle(model).stats()["kv_bytes_total"] > 0


def test_torch_kernel_matches_sdpa_kernel(tiny: torch.nn.Module) -> None:
    ids = prompt_ids(length=18)
    with torch.no_grad():
        reference = tiny(input_ids=ids).logits
    kvpatch.apply(tiny, {"name": "torch-kernel", "kernels": {"attention": "torch"}})
    with torch.no_grad():
        patched = tiny(input_ids=ids).logits
    torch.testing.assert_close(patched, reference, atol=ATOL, rtol=0)


def test_user_supplied_kvpatch_cache_is_used_and_reported(tiny: torch.nn.Module) -> None:
    handle = kvpatch.apply(tiny, "default")
    cache = handle.new_cache()
    ids = prompt_ids(batch=1, length=9)
    with torch.no_grad():
        out = tiny(input_ids=ids, use_cache=True, **{cache_kwarg(tiny): cache})
    assert output_cache(out) is cache and cache.get_seq_length() == 9
    assert handle.stats()["tokens"] == 9
    handle.release_cache()
    assert handle.stats()["kv_bytes_total"] == 0


def test_double_apply_and_double_unpatch_are_refused() -> None:
    model = tiny_model("llama")
    kvpatch.apply(model, "default")
    with pytest.raises(kvpatch.PatchStateError, match="already patched"):
        kvpatch.apply(model, "default")
    kvpatch.unpatch(model)
    with pytest.raises(kvpatch.PatchStateError, match="not patched"):
        kvpatch.unpatch(model)
