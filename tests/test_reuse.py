"""Chunk reuse across requests (kvpatch.reuse): exact prefixes are lossless on every family,
missing chunks and repaired seams are recomputed exactly, approximate reuse is only as good as
its repair, and the Engine API reports what it reused."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import kvpatch
from kvpatch.compat import output_cache
from kvpatch.reuse.chunk_hash import ChunkHasher
from kvpatch.reuse.chunker import chunk_spans
from kvpatch.reuse.rope import KeyRotator
from kvpatch.testing import tiny_model

FAMILIES = sorted(kvpatch.supported_families())
#: The families whose patch spec accepts a chunker stage (patches/*.yaml `refuses`).
CHUNKER_FAMILIES = [f for f in FAMILIES if kvpatch.supported_families()[f].accepts_stage_kind("chunker")]
CHUNK = 8


def reuse_config(matcher: str = "exact", recompute: str = "none", **recompute_params: object) -> dict:
    stages = [
        {"kind": "chunker", "impl": "fixed", "params": {"size": CHUNK}},
        {"kind": "matcher", "impl": matcher, **({"params": {"repair": "configured"}} if matcher == "approximate" else {})},
        {"kind": "recompute", "impl": recompute, "params": recompute_params},
        {"kind": "store", "impl": "memory", "params": {"budget_bytes": 2**26}},
    ]
    return {"name": "test_reuse", "stages": stages, "fidelity": {"lossless": matcher == "exact"}}


def tokens(length: int, seed: int, batch: int = 1) -> torch.Tensor:
    return torch.randint(5, 300, (batch, length), generator=torch.Generator().manual_seed(seed))


def greedy(model: torch.nn.Module, ids: torch.Tensor, new: int = 8) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                              do_sample=False)


def last_logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, logits_to_keep=1).logits[:, -1]


# -- chunking and hashing ---------------------------------------------------------------------------

def test_chunk_spans_fixed_tail_and_segments() -> None:
    assert chunk_spans(list(range(20)), 8) == [(0, 8), (8, 16), (16, 20)]
    assert chunk_spans(list(range(20)), 8, segment_starts=[5]) == [(0, 5), (5, 13), (13, 20)]
    with pytest.raises(ValueError, match="chunk size"):
        chunk_spans([1, 2], 0)


def test_chunk_spans_boundary_window_moves_cut_after_boundary_token() -> None:
    ids = [1] * 30
    ids[9] = 99  # a "newline" at index 9: cut right after it, at 10
    assert chunk_spans(ids, 8, boundary_window=2, boundary_tokens={99})[0] == (0, 10)
    assert chunk_spans(ids, 8, boundary_window=1, boundary_tokens={99})[0] == (0, 8)  # out of reach


def test_shared_prefix_chunks_hash_alike_and_namespaces_separate() -> None:
    a, b = tokens(40, 1)[0].tolist(), None
    b = a[:30] + tokens(10, 2)[0].tolist()
    hasher = ChunkHasher("model-a")
    ha = hasher.prefix_hashes(a, chunk_spans(a, 8))
    hb = hasher.prefix_hashes(b, chunk_spans(b, 8))
    assert ha[:3] == hb[:3] and ha[3] != hb[3]
    assert ChunkHasher("model-b").prefix_hashes(a, chunk_spans(a, 8))[0] != ha[0]
    assert ChunkHasher("model-a", "blake2b").prefix_hashes(a, chunk_spans(a, 8))[0] != ha[0]
    # content hashes ignore history: the same 8 tokens anywhere hash alike
    assert hasher.content_hashes(a[8:16], [(0, 8)]) == hasher.content_hashes(a, [(8, 16)])


def test_hashes_are_identical_in_another_process() -> None:
    code = ("from kvpatch.reuse.chunk_hash import ChunkHasher;"
            "print(ChunkHasher('ns').prefix_hashes(list(range(50)), [(0, 16), (16, 50)])[-1])")
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert other == ChunkHasher("ns").prefix_hashes(list(range(50)), [(0, 16), (16, 50)])[-1]


# -- exact reuse --------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", CHUNKER_FAMILIES)
def test_exact_prefix_reuse_is_lossless(family: str) -> None:
    reference, model = tiny_model(family), tiny_model(family)
    handle = kvpatch.apply(model, reuse_config())
    first = tokens(37, 1)
    shared = torch.cat([first[:, :30], tokens(9, 2)], dim=1)  # 30 shared tokens: not a chunk multiple
    for ids, reused in ((first, 0), (shared, 24), (first, 36)):  # the last one hits the whole prompt but 1 token
        assert torch.equal(greedy(model, ids), greedy(reference, ids))
        assert handle.reuse.last.reused_tokens == reused
    batch = torch.cat([torch.cat([first[:, :20], tokens(5, 3)], 1), torch.cat([first[:, :20], tokens(5, 4)], 1)])
    assert torch.equal(greedy(model, batch), greedy(reference, batch))
    assert handle.reuse.last.reused_tokens == 2 * 16


def test_beam_search_and_sampling_reuse_and_match_unpatched() -> None:
    reference, model = tiny_model("llama"), tiny_model("llama")
    handle = kvpatch.apply(model, reuse_config())
    ids = tokens(30, 8)
    kwargs = dict(attention_mask=torch.ones_like(ids), max_new_tokens=6, min_new_tokens=6)
    greedy(model, ids)  # stores the prompt's chunks
    with torch.no_grad():
        beams = model.generate(ids, num_beams=3, do_sample=False, **kwargs)
        assert handle.reuse.last.reused_tokens == 3 * 29  # every beam row reuses all but the last token
        assert torch.equal(beams, reference.generate(ids, num_beams=3, do_sample=False, **kwargs))
        torch.manual_seed(3)
        sampled = model.generate(ids, do_sample=True, **kwargs)
        torch.manual_seed(3)
        assert torch.equal(sampled, reference.generate(ids, do_sample=True, **kwargs))


def test_plain_forward_is_not_trimmed_but_feeds_the_store() -> None:
    model = tiny_model("llama")
    handle = kvpatch.apply(model, reuse_config())
    ids = tokens(20, 1)
    with torch.no_grad():
        full = model(input_ids=ids).logits
    assert full.shape[1] == 20 and handle.reuse.last.written_chunks == 3
    with torch.no_grad():
        assert model(input_ids=ids).logits.shape[1] == 20  # all positions still computed


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma3_text", "qwen2"])
def test_missing_chunk_between_stored_ones_is_recomputed_exactly(family: str) -> None:
    reference, donor, model = tiny_model(family), tiny_model(family), tiny_model(family)
    donor_handle = kvpatch.apply(donor, reuse_config())
    handle = kvpatch.apply(model, reuse_config())
    ids = tokens(37, 5)
    last_logits(donor, ids)
    for chunk in donor_handle.reuse.store.iter_chunks():
        if chunk.start != 16:  # leave a hole at [16, 24)
            handle.reuse.store.put(chunk)
    torch.testing.assert_close(last_logits(model, ids), last_logits(reference, ids), atol=1e-5, rtol=0)
    assert handle.reuse.last.recomputed_tokens == CHUNK and handle.reuse.last.reused_tokens == 36 - CHUNK
    longer = torch.cat([ids, tokens(12, 6)], dim=1)  # chunks past the last stored one are new
    torch.testing.assert_close(last_logits(model, longer), last_logits(reference, longer), atol=1e-5, rtol=0)
    last_logits(model, longer)  # everything computed before was exact and written back: no hole now
    assert handle.reuse.last.recomputed_tokens == 0 and handle.reuse.last.reused_tokens == 48


# -- approximate reuse ----------------------------------------------------------------------------

def _reordered_documents(model: torch.nn.Module, handle: kvpatch.PatchHandle) -> torch.Tensor:
    """Warm two 16-token documents separately; return a prompt with them swapped plus a query."""
    doc_a, doc_b, query = tokens(16, 11), tokens(16, 12), tokens(5, 13)
    last_logits(model, doc_a)
    last_logits(model, doc_b)
    handle.reuse.set_segment_starts([16, 32])
    return torch.cat([doc_b, doc_a, query], dim=1)


# (not phi3: its tiny config slides an 8-token window over every layer, so a moved 16-token
# document sees only itself near the query and re-rotation alone is exact)
@pytest.mark.parametrize("family", ["llama", "gemma3_text", "qwen2"])
@pytest.mark.parametrize("recompute, params, exact", [
    ("none", {}, False),
    ("selective", {"seam_tokens": CHUNK}, True),  # every moved token recomputed: exact
    ("selective", {"seam_tokens": 2}, False),
    ("cacheblend", {"ratio": 1.0, "check_layer": 0}, True),
])
def test_approximate_reuse_is_exact_only_when_fully_repaired(family: str, recompute: str, params: dict, exact: bool) -> None:
    reference, model = tiny_model(family), tiny_model(family)
    handle = kvpatch.apply(model, reuse_config("approximate", recompute, **params))
    prompt = _reordered_documents(model, handle)
    patched, expected = last_logits(model, prompt), last_logits(reference, prompt)
    stats = handle.reuse.last
    assert stats.reused_tokens == 32 and stats.approximate_tokens == 16  # doc_b exact, doc_a moved
    assert torch.allclose(patched, expected, atol=1e-4, rtol=0) == exact


def test_cacheblend_recomputes_the_requested_fraction() -> None:
    model = tiny_model("llama")
    handle = kvpatch.apply(model, reuse_config("approximate", "cacheblend", ratio=0.25, check_layer=0))
    last_logits(model, _reordered_documents(model, handle))
    assert handle.reuse.last.recomputed_tokens == 4 and handle.reuse.last.check_tokens == 16


def test_gpt2_approximate_matcher_falls_back_to_exact_reuse(caplog: pytest.LogCaptureFixture) -> None:
    reference, model = tiny_model("gpt2"), tiny_model("gpt2")
    handle = kvpatch.apply(model, reuse_config("approximate", "cacheblend"))
    assert "exact prefixes only" in caplog.text
    prompt = _reordered_documents(model, handle)
    torch.testing.assert_close(last_logits(model, prompt), last_logits(reference, prompt), atol=1e-5, rtol=0)
    assert handle.reuse.last.approximate_tokens == 0


@pytest.mark.parametrize("family", ["llama", "phi3", "gemma3_text"])
def test_rerotated_keys_equal_keys_computed_at_the_new_position(family: str) -> None:
    model = tiny_model(family)
    ids = tokens(6, 3)

    def layer0_kv(offset: int) -> torch.Tensor:
        with torch.no_grad():
            out = model(input_ids=ids, position_ids=torch.arange(6)[None] + offset, use_cache=True)
        layer = output_cache(out).layers[0]
        return torch.stack([layer.keys[0], layer.values[0]])[None]

    moved = KeyRotator.for_model(model).rotate(layer0_kv(0), 7)
    torch.testing.assert_close(moved, layer0_kv(7), atol=1e-5, rtol=0)
    assert not torch.allclose(layer0_kv(0), layer0_kv(7), atol=1e-3)


# -- Engine --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def engine() -> kvpatch.Engine:
    return kvpatch.Engine.from_pretrained("kvpatch-ref", config="prefix_reuse")


SYSTEM = "def read_config(path):\n    \"\"\"Read a configuration file and return a dict.\"\"\"\n" * 12


def test_engine_reuses_warmed_prefix_and_matches_no_reuse(engine: kvpatch.Engine) -> None:
    warm = engine.warm(SYSTEM)
    assert warm.chunks_written > 0
    result = engine.generate(SYSTEM + "def main():\n", max_new_tokens=12)
    assert result.kv_reuse_ratio > 0.4 and len(result.tokens) == 12  # the warmed text's full chunks
    assert 0 < result.ttft_ms <= result.total_ms
    report = engine.verify_correctness([SYSTEM + "class Config:\n"], max_new_tokens=12)
    assert report.identical and report.min_logit_cosine > 0.9999
    assert report.prompts[0].kv_reuse_ratio > 0.9


def test_engine_stream_yields_the_generated_text(engine: kvpatch.Engine) -> None:
    prompt = SYSTEM + "import os\n"
    streamed = "".join(engine.stream(prompt, max_new_tokens=10))
    assert streamed == engine.generate(prompt, max_new_tokens=10).output_text


def test_engine_snapshot_round_trip_starts_a_new_engine_warm(engine: kvpatch.Engine, tmp_path) -> None:
    engine.warm(SYSTEM)
    path = engine.export_snapshot(tmp_path / "chunks.safetensors")
    model, tokenizer = kvpatch.models.load("kvpatch-ref")
    fresh = kvpatch.Engine(model, tokenizer, "prefix_reuse")
    assert fresh.import_snapshot(path) > 0
    prompt = SYSTEM + "def parse(text):\n"
    result = fresh.generate(prompt, max_new_tokens=8)
    assert result.kv_reuse_ratio > 0.4
    with fresh.reuse.paused():
        assert fresh.generate(prompt, max_new_tokens=8).tokens == result.tokens


def test_engine_reuses_reordered_documents_approximately() -> None:
    model, tokenizer = kvpatch.models.load("kvpatch-ref")
    engine = kvpatch.Engine(model, tokenizer, "rag_reuse")
    system = "# Snippets follow.\n"
    docs = [SYSTEM, "def write_config(path, data):\n    with open(path, 'w') as f:\n        f.write(data)\n" * 10]
    for doc in docs:
        engine.warm([system, doc])
    result = engine.generate([system, docs[1], docs[0], "def main():\n"], max_new_tokens=6)
    assert result.approximate_ratio > 0.3 and result.kv_reuse_ratio > result.approximate_ratio
    assert result.recomputed_tokens > 0  # CacheBlend repaired part of the moved chunks


def test_engine_needs_a_reuse_config() -> None:
    model = tiny_model("llama")
    from kvpatch.testing import tiny_tokenizer

    with pytest.raises(kvpatch.ConfigError, match="no chunk reuse stages"):
        kvpatch.Engine.from_pretrained(model, config="default", tokenizer=tiny_tokenizer())


def test_write_back_cuts_chunks_in_one_split_as_slicing_would() -> None:
    """The write-back's gather of back-to-back equal chunks in one stack equals a slice per chunk,
    for runs inside one computed range, a span across two ranges (assembled prefix + the
    forward's part) and one past the computed columns."""
    from kvpatch.patch.reuse_controller import _chunk_kvs, _slice_sources

    gen = torch.Generator().manual_seed(0)

    def layers(tokens: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(torch.randn(2, 3, tokens, 4, generator=gen), torch.randn(2, 3, tokens, 4, generator=gen))
                for _ in range(5)]

    sources = [(0, layers(10)), (10, layers(14))]  # columns [0, 10) then [10, 24)
    spans = [(0, 4), (4, 8), (8, 12), (12, 15), (15, 18), (18, 21), (21, 24), (24, 30)]  # runs, a crossing, beyond
    for row in (0, 1):
        got = _chunk_kvs(sources, row, spans)
        for span, kv in zip(spans, got):
            expected = _slice_sources(sources, row, *span)
            if expected is None:
                assert kv is None, span
            else:
                assert kv.shape == (5, 2, 3, span[1] - span[0], 4) and torch.equal(kv, expected), span
