"""The plug-in promise: a stage of every kind, written outside kvpatch, registers and runs.

Each test writes the source of a small plug-in stage into a module under `tmp_path`, imports it
from there (`register_stage` runs at import, as it would for a user's package), puts it in a
config in place of the built-in of its kind, and checks that config the way the config matrix
does: a lossless plug-in reproduces the unpatched model (logits within 1e-5, identical greedy
tokens); a lossy one stays inside the `fidelity` bounds its config declares. Every test also shows
that the plug-in's own code ran (its counters, its layer type, the keys or spans it produced),
so a kind whose stages kvpatch silently replaces by its built-in fails here.

Chunk reuse (chunker, hasher, index, matcher, store, recompute) only acts on a forward that keeps
the last position's logits (`generate`'s prefill), so the reuse checks prefill with
`logits_to_keep=1` and include a second request that reuses the first one's chunks.
"""

from __future__ import annotations

import importlib
import sys
import textwrap
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType

import pytest
import torch
from transformers.cache_utils import DynamicCache, DynamicSlidingWindowLayer

import kvpatch
from kvpatch import registry
from kvpatch.compat import cache_kwarg, output_cache
from kvpatch.cache import layer_layouts
from kvpatch.stages.evictor import EvictingLayer
from kvpatch.stages.storage_quantized import QuantizedLayer
from kvpatch.testing import prompt_ids, tiny_model, tiny_tokenizer
from test_config_matrix import _teacher_forced_logits, check_fidelity

#: The config matrix's families: the plug-ins that do not reuse chunks run on each. In the tiny
#: mistral and phi3 every layer slides a window (bounded already), so storage, quantizer, scorer
#: and evictor plug-ins, like the built-ins, leave every layer to DynamicSlidingWindowLayer there.
FAMILIES = sorted(kvpatch.supported_families())
#: The families whose patch spec accepts an evictor stage (patches/*.yaml `refuses`).
EVICTOR_FAMILIES = [f for f in FAMILIES if kvpatch.supported_families()[f].accepts_stage_kind("evictor")]
#: The families whose patch spec accepts a quantizer stage (patches/*.yaml `refuses`).
QUANTIZER_FAMILIES = [f for f in FAMILIES if kvpatch.supported_families()[f].accepts_stage_kind("quantizer")]
GEN = dict(max_new_tokens=16, min_new_tokens=16, do_sample=False)
CHUNK = 8


# -- loading a plug-in from a file ------------------------------------------------------------------

PluginLoader = Callable[[str], ModuleType]


@pytest.fixture
def load_plugin(tmp_path: Path) -> Iterator[PluginLoader]:
    """Write a plug-in's source to a module under `tmp_path` and import it. Every load gets a
    fresh module and stage name (`__NAME__` in the source), so reruns in one process never
    collide; afterwards the registry forgets the plug-ins (it has no unregister: built-ins
    registered meanwhile stay) and the modules are dropped."""
    before = {kind: set(names) for kind, names in kvpatch.available_stages().items()}
    loaded: list[str] = []

    def load(source: str) -> ModuleType:
        tag = uuid.uuid4().hex[:10]
        module_name = f"kvpatch_user_plugin_{tag}"
        (tmp_path / f"{module_name}.py").write_text(textwrap.dedent(source).replace("__NAME__", f"user_{tag}"))
        sys.path.insert(0, str(tmp_path))
        try:
            importlib.invalidate_caches()
            module = importlib.import_module(module_name)
        finally:
            sys.path.remove(str(tmp_path))
        loaded.append(module_name)
        assert module.NAME in kvpatch.available_stages()[module.KIND]
        return module

    yield load
    for table in (registry._SPECS, registry._CLASSES):
        for kind, entries in table.items():
            for name in set(entries) - before[kind]:
                del entries[name]
    for name in loaded:
        sys.modules.pop(name, None)


# -- the config matrix's checks -------------------------------------------------------------------

def _reuse_teacher_forced_logits(model: torch.nn.Module, ids: torch.Tensor, forced: torch.Tensor) -> torch.Tensor:
    """`_teacher_forced_logits` with the prefill keeping only the last logits, as `generate`'s
    does: the only prefill that chunk reuse acts on."""
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
        steps = [out.logits[:, -1]]
        for i in range(forced.shape[1] - 1):
            out = model(input_ids=forced[:, i : i + 1], use_cache=True, **{cache_kwarg(model): output_cache(out)})
            steps.append(out.logits[:, -1])
    return torch.stack(steps, dim=1)


def _generate(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(ids, attention_mask=torch.ones_like(ids), **GEN)


def _matrix_check(config_dict: dict, family: str = "llama") -> tuple[kvpatch.PatchHandle, dict[str, float]]:
    """The config matrix's test on one family: prompt_ids(2, 20), 12 teacher-forced steps and 16
    greedy tokens, patched vs unpatched."""
    config = kvpatch.load_config(config_dict)
    model = tiny_model(family)
    ids, forced = prompt_ids(batch=2, length=20), prompt_ids(batch=2, length=12, seed=7)
    reference = _teacher_forced_logits(model, ids, forced)
    reference_tokens = _generate(model, ids)
    handle = kvpatch.apply(model, config)
    patched = _teacher_forced_logits(model, ids, forced)
    patched_tokens = _generate(model, ids)
    return handle, check_fidelity(config, patched, reference, patched_tokens, reference_tokens)


def _full_layers(handle: kvpatch.PatchHandle) -> list:
    """The last cache's full-attention layers (the ones a storage/evictor plug-in builds);
    checks that every sliding-window layer is transformers' own."""
    layouts = layer_layouts(handle.model.config)
    layers = handle.last_cache.layers
    assert all(isinstance(layer, DynamicSlidingWindowLayer)
               for layer, layout in zip(layers, layouts) if layout.sliding_window is not None)
    return [layer for layer, layout in zip(layers, layouts) if layout.sliding_window is None]


def _reuse_stages(**replace: dict) -> list[dict]:
    """configs/prefix_reuse.yaml with CHUNK-token chunks and a small store; `replace` puts a
    stage in place of the built-in of its kind (or adds one, for a kind it lacks)."""
    stages = {
        "chunker": {"kind": "chunker", "impl": "fixed", "params": {"size": CHUNK}},
        "hasher": {"kind": "hasher", "impl": "chained"},
        "matcher": {"kind": "matcher", "impl": "exact"},
        "index": None,
        "recompute": None,
        "store": {"kind": "store", "impl": "memory", "params": {"budget_bytes": 2**26}},
    }
    stages.update(replace)
    return [s for s in stages.values() if s is not None]


def _lossless_reuse_check(config_dict: dict) -> tuple[kvpatch.PatchHandle, list[int]]:
    """A lossless reuse config, the matrix's way, over two requests: the first fills the store,
    the second shares its first 16 tokens (two chunks of 8) and must reuse them. Returns the
    handle and the reused tokens of each request's teacher-forced prefill."""
    config = kvpatch.load_config(config_dict)
    assert config.fidelity.lossless
    reference, model = tiny_model("llama"), tiny_model("llama")
    handle = kvpatch.apply(model, config)
    first = prompt_ids(batch=2, length=20)
    second = torch.cat([first[:, :16], prompt_ids(batch=2, length=6, seed=3)], dim=1)
    forced = prompt_ids(batch=2, length=12, seed=7)
    reused = []
    for ids in (first, second):
        patched = _reuse_teacher_forced_logits(model, ids, forced)
        reused.append(handle.reuse.last.reused_tokens)
        expected = _reuse_teacher_forced_logits(reference, ids, forced)
        check_fidelity(config, patched, expected, _generate(model, ids), _generate(reference, ids))
    assert reused[0] == 0 and reused[1] > 0, reused
    return handle, reused


# -- chunker ----------------------------------------------------------------------------------------

CHUNKER = '''
    """A chunker plug-in: one fixed grid of `size` tokens from the prompt's start, plus a cut at
    every segment start (the grid does not restart after one, unlike chunker/fixed)."""
    from kvpatch.params import Size
    from kvpatch.registry import Stage, StageParams, register_stage

    KIND, NAME = "chunker", "__NAME__"


    @register_stage(KIND, NAME)
    class GridChunker(Stage):
        """Cuts at every multiple of `size` and at every segment start."""

        requires = ("matcher", "store")

        class Params(StageParams):
            size: Size = 6

        def __init__(self, params):
            super().__init__(params)
            self.calls = 0

        def spans(self, token_ids, segment_starts=()):
            self.calls += 1
            n = len(token_ids)
            cuts = {0, n, *range(self.params.size, n, self.params.size)}
            cuts.update(s for s in segment_starts if 0 < s < n)
            ordered = sorted(cuts)
            return list(zip(ordered[:-1], ordered[1:]))
'''


def test_chunker_plugin(load_plugin: PluginLoader) -> None:
    plugin = load_plugin(CHUNKER)
    chunker = {"kind": "chunker", "impl": plugin.NAME, "params": {"size": 6}}
    handle, reused = _lossless_reuse_check({"name": "plugin_chunker", "stages": _reuse_stages(chunker=chunker)})
    stage = next(s for s in handle.pipeline.stages if s.kind == "chunker")
    assert isinstance(stage, plugin.GridChunker) and stage.calls > 0
    # its 6-token grid, not chunker/fixed's 8: the 16 shared tokens hold two whole chunks of 6
    assert reused[1] == 2 * 12
    sizes = {chunk.num_tokens for chunk in handle.reuse.store.iter_chunks()}
    assert 6 in sizes and CHUNK not in sizes and max(sizes) == 6


def test_chunker_plugin_through_the_engine(load_plugin: PluginLoader) -> None:
    """The Engine (text in, text out) takes a plug-in chunker too, and reuses a warmed prefix."""
    plugin = load_plugin(CHUNKER)
    chunker = {"kind": "chunker", "impl": plugin.NAME, "params": {"size": 6}}
    engine = kvpatch.Engine(tiny_model("llama"), tiny_tokenizer(),
                            {"name": "plugin_engine", "stages": _reuse_stages(chunker=chunker)})
    prefix = "The same system prompt, every time.\n"
    assert engine.warm(prefix).chunks_written > 0
    result = engine.generate(prefix + "And a question?", max_new_tokens=4)
    assert result.kv_reuse_ratio > 0.5
    with engine.reuse.paused():
        assert engine.generate(prefix + "And a question?", max_new_tokens=4).tokens == result.tokens


# -- hasher -----------------------------------------------------------------------------------------

HASHER = '''
    """A hasher plug-in: chunk keys from BLAKE2s (hashlib) with a personalisation string, over the
    same little-endian int64 token bytes as hasher/chained."""
    import hashlib

    import torch
    from pydantic import Field

    from kvpatch.registry import Stage, StageParams, register_stage

    KIND, NAME = "hasher", "__NAME__"


    def as_bytes(token_ids):
        if isinstance(token_ids, bytes):
            return token_ids
        tensor = torch.as_tensor(token_ids, dtype=torch.int64).cpu().contiguous()
        return tensor.numpy().astype("<i8", copy=False).tobytes()


    class Blake2sKeys:
        """Prefix-chained and content-only keys of a prompt's chunks under one namespace."""

        def __init__(self, namespace, person, digest_size):
            self.person, self.digest_size, self.digests = person, digest_size, 0
            self.namespace = self._digest(b"namespace", namespace.encode())

        def _digest(self, tag, *parts):
            self.digests += 1
            h = hashlib.blake2s(tag, digest_size=self.digest_size, person=self.person)
            for part in parts:
                h.update(b"\\0" + part)
            return h.hexdigest()

        def prefix_hash(self, parent, tokens):
            return self._digest(b"prefix", parent.encode(), tokens)

        def content_hash(self, tokens):
            return self._digest(b"content", self.namespace.encode(), tokens)

        def hashes(self, token_ids, spans, content=True):
            data, parent, prefixes, contents = as_bytes(token_ids), self.namespace, [], []
            for start, end in spans:
                tokens = data[8 * start : 8 * end]
                parent = self.prefix_hash(parent, tokens)
                prefixes.append(parent)
                contents.append(self.content_hash(tokens) if content else "")
            return prefixes, contents

        def binding_problem(self, chunk):
            if chunk.namespace != self.namespace:
                return "another model's namespace"
            tokens = as_bytes(chunk.token_ids)
            if self.prefix_hash(chunk.parent_hash, tokens) != chunk.prefix_hash:
                return "its token ids and parent key do not hash to its key"
            if self.content_hash(tokens) != chunk.content_hash:
                return "its token ids do not hash to its content hash"
            return None

        def require_shareable(self, where):
            """BLAKE2s is collision resistant: its keys may go to disk, Redis and snapshots."""


    @register_stage(KIND, NAME)
    class Blake2sHasher(Stage):
        """BLAKE2s chunk keys, personalised (two deployments with other `person`s never share)."""

        class Params(StageParams):
            person: str = Field(default="kvp-s", max_length=8)
            digest_size: int = Field(default=32, ge=16, le=32)

        def make_hasher(self, namespace):
            self.keys = Blake2sKeys(namespace, self.params.person.encode(), self.params.digest_size)
            return self.keys
'''


def test_hasher_plugin(load_plugin: PluginLoader) -> None:
    plugin = load_plugin(HASHER)
    hasher = {"kind": "hasher", "impl": plugin.NAME, "params": {"person": "test", "digest_size": 20}}
    handle, reused = _lossless_reuse_check({"name": "plugin_hasher", "stages": _reuse_stages(hasher=hasher)})
    assert reused[1] == 2 * 16
    keys = handle.reuse.hasher
    assert isinstance(keys, plugin.Blake2sKeys) and keys.digests > 0
    chunks = list(handle.reuse.store.iter_chunks())
    assert chunks and all(len(c.prefix_hash) == 40 and c.namespace == keys.namespace for c in chunks)
    for chunk in chunks:  # every stored key is the plug-in's BLAKE2s of the chunk's tokens
        tokens = plugin.as_bytes(chunk.token_ids)
        assert chunk.prefix_hash == keys.prefix_hash(chunk.parent_hash, tokens)
        assert keys.binding_problem(chunk) is None


# -- index --------------------------------------------------------------------------------------------

INDEX = '''
    """An index plug-in: chunk key -> store slot in a plain dict, with its own counters."""
    from kvpatch.registry import Stage, StageParams, register_stage

    KIND, NAME = "index", "__NAME__"


    @register_stage(KIND, NAME)
    class CountingDictIndex(Stage):
        """A dict keyed by the chunk key, counting puts, lookups, hits and deletes."""

        class Params(StageParams):
            count_lookups: bool = True

        def __init__(self, params):
            super().__init__(params)
            self.slots = {}
            self.counts = {"puts": 0, "lookups": 0, "hits": 0, "deletes": 0}

        def put(self, key, slot):
            self.counts["puts"] += 1
            self.slots[key] = slot

        def get(self, key):
            slot = self.slots.get(key)
            if self.params.count_lookups:
                self.counts["lookups"] += 1
                self.counts["hits"] += slot is not None
            return slot

        def delete(self, key):
            self.counts["deletes"] += 1
            return self.slots.pop(key, None) is not None

        def __len__(self):
            return len(self.slots)

        def stats(self):
            return {"size": len(self.slots), **self.counts}
'''


def test_index_plugin(load_plugin: PluginLoader) -> None:
    plugin = load_plugin(INDEX)
    index = {"kind": "index", "impl": plugin.NAME}
    handle, reused = _lossless_reuse_check({"name": "plugin_index", "stages": _reuse_stages(index=index)})
    assert reused[1] == 2 * 16
    stage = next(s for s in handle.pipeline.stages if s.kind == "index")
    assert isinstance(stage, plugin.CountingDictIndex) and handle.reuse.store.index is stage
    stats = handle.stats()["stages"][f"index/{plugin.NAME}"]
    assert stats["puts"] > 0 and stats["hits"] > 0 and stats["size"] == len(list(handle.reuse.store.iter_chunks()))


# -- matcher ------------------------------------------------------------------------------------------

MATCHER = '''
    """A matcher plug-in: exact prefix matches only, and it stops looking at the first miss (a
    chunk after a missing one is recomputed anyway when only the leading run is reused)."""
    from kvpatch.registry import Stage, StageParams, register_stage
    from kvpatch.reuse.matcher import ChunkMatch, MatchPlan

    KIND, NAME = "matcher", "__NAME__"


    @register_stage(KIND, NAME)
    class LeadingRunMatcher(Stage):
        """Exact matches of the leading run of chunks; lossless."""

        requires = ("chunker", "store")
        approximate = False

        class Params(StageParams):
            pass

        def __init__(self, params):
            super().__init__(params)
            self.lookups = self.matched = 0

        def match(self, spans, prefix_hashes, content_hashes, store, approximate=False):
            matches, missed = [], False
            for span, prefix, content in zip(spans, prefix_hashes, content_hashes):
                chunk = None
                if not missed:
                    self.lookups += 1
                    chunk = store.get(prefix)
                    if chunk is not None and chunk.num_tokens != span[1] - span[0]:
                        chunk = None
                    missed = chunk is None
                self.matched += chunk is not None
                matches.append(ChunkMatch(span, prefix, content, "exact" if chunk is not None else "miss", chunk))
            return MatchPlan(matches)
'''


def test_matcher_plugin(load_plugin: PluginLoader) -> None:
    plugin = load_plugin(MATCHER)
    matcher = {"kind": "matcher", "impl": plugin.NAME}
    handle, reused = _lossless_reuse_check({"name": "plugin_matcher", "stages": _reuse_stages(matcher=matcher)})
    assert reused[1] == 2 * 16
    stage = handle.reuse.matcher
    assert isinstance(stage, plugin.LeadingRunMatcher)
    # per row, chunks [0,8) [8,16) [16,end): the first prefill looks up one chunk (a miss: it stops
    # there, where matcher/exact looks up all three), its generate hits all three; the second
    # prompt's prefill hits two and misses its own tail, which its generate then hits
    assert (stage.lookups, stage.matched) == (2 * (1 + 3 + 3 + 3), 2 * (0 + 3 + 2 + 3))
    assert handle.reuse.store.stats()["misses"] == 2 * (1 + 1)


# -- store ---------------------------------------------------------------------------------------------

STORE = '''
    """A chunk store plug-in: chunks in a dict with least-recently-used eviction by count, checked
    against the hasher it is bound to before they are admitted."""
    from collections import OrderedDict

    from kvpatch.params import Size
    from kvpatch.registry import Stage, StageParams, register_stage

    KIND, NAME = "store", "__NAME__"


    @register_stage(KIND, NAME)
    class LRUDictStore(Stage):
        """At most `max_chunks` chunks in RAM, as they are (dense): lossless."""

        class Params(StageParams):
            max_chunks: Size = 64

        def __init__(self, params):
            super().__init__(params)
            self.hasher = None
            self.chunks = OrderedDict()
            self.counts = {"hits": 0, "misses": 0, "puts": 0, "refused": 0, "evictions": 0}

        @property
        def namespace(self):
            return self.hasher.namespace if self.hasher is not None else ""

        def bind(self, hasher, shapes):
            self.hasher = hasher

        def contains(self, prefix_hash):
            return prefix_hash in self.chunks

        def get(self, prefix_hash):
            chunk = self.chunks.get(prefix_hash)
            self.counts["hits" if chunk is not None else "misses"] += 1
            if chunk is not None:
                self.chunks.move_to_end(prefix_hash)
            return chunk

        def get_by_content(self, content_hash):
            return next((c for c in reversed(self.chunks.values()) if c.content_hash == content_hash), None)

        def put(self, chunk):
            if chunk.codec != "dense" or (self.hasher is not None and self.hasher.binding_problem(chunk)):
                self.counts["refused"] += 1
                return False
            self.counts["puts"] += 1
            self.chunks[chunk.prefix_hash] = chunk
            while len(self.chunks) > self.params.max_chunks:
                self.chunks.popitem(last=False)
                self.counts["evictions"] += 1
            return True

        def stats(self):
            return {"chunks": len(self.chunks), **self.counts}
'''


def test_store_plugin(load_plugin: PluginLoader) -> None:
    plugin = load_plugin(STORE)
    store = {"kind": "store", "impl": plugin.NAME, "params": {"max_chunks": 32}}
    handle, reused = _lossless_reuse_check({"name": "plugin_store", "stages": _reuse_stages(store=store)})
    assert reused[1] == 2 * 16
    assert isinstance(handle.reuse.store, plugin.LRUDictStore)
    stats = handle.stats()["stages"][f"store/{plugin.NAME}"]
    assert stats["puts"] > 0 and stats["hits"] > 0 and stats["refused"] == 0 and stats["chunks"] > 0


# -- recompute (approximate reuse, lossy) ---------------------------------------------------------

RECOMPUTE = '''
    """A recompute plug-in: repair each approximately reused chunk by recomputing its first
    `head_tokens` and last `tail_tokens` tokens against the real context, in every layer."""
    import torch

    from kvpatch.params import Count
    from kvpatch.registry import Stage, StageParams, register_stage

    KIND, NAME = "recompute", "__NAME__"


    @register_stage(KIND, NAME)
    class HeadTailRecompute(Stage):
        """Recompute both ends of every moved chunk (its seams with its new neighbours)."""

        class Params(StageParams):
            sink_tokens: Count = 0
            head_tokens: Count = 2
            tail_tokens: Count = 1

        def __init__(self, params):
            super().__init__(params)
            self.calls = self.chosen = 0

        def recompute_positions(self, spans, until):
            self.calls += 1
            picked = set()
            for start, end in spans:
                picked.update(range(start, min(start + self.params.head_tokens, end)))
                picked.update(range(max(end - self.params.tail_tokens, start), end))
            self.chosen += len(picked)
            return torch.tensor(sorted(picked), dtype=torch.long)
'''


def _rag_config(recompute: dict) -> dict:
    """configs/rag_reuse.yaml with CHUNK-token chunks, `recompute` in place of CacheBlend (the
    matcher's `repair: configured` makes approximate chunks use it) and its declared bound."""
    return {"name": "plugin_rag", "fidelity": {"lossless": False, "min_logit_cosine": 0.9},
            "stages": _reuse_stages(matcher={"kind": "matcher", "impl": "approximate", "params": {"repair": "configured"}},
                                    recompute=recompute)}


def _reordered_request(model: torch.nn.Module, handle: kvpatch.PatchHandle) -> torch.Tensor:
    """Warm two 16-token documents on their own; return a prompt with them swapped plus a query
    (document b is then an exact prefix, document a two approximate chunks at a new position)."""
    doc_a, doc_b, query = prompt_ids(1, 16, seed=11), prompt_ids(1, 16, seed=12), prompt_ids(1, 5, seed=13)
    for doc in (doc_a, doc_b):
        with torch.no_grad():
            model(input_ids=doc, logits_to_keep=1)
    handle.reuse.set_segment_starts([16, 32])
    return torch.cat([doc_b, doc_a, query], dim=1)


@pytest.mark.parametrize("head, exact", [(2, False), (CHUNK, True)])
def test_recompute_plugin(load_plugin: PluginLoader, head: int, exact: bool) -> None:
    plugin = load_plugin(RECOMPUTE)
    recompute = {"kind": "recompute", "impl": plugin.NAME, "params": {"head_tokens": head, "tail_tokens": 1}}
    config = kvpatch.load_config(_rag_config(recompute))
    reference, model = tiny_model("llama"), tiny_model("llama")
    handle = kvpatch.apply(model, config)
    prompt = _reordered_request(model, handle)
    forced = prompt_ids(batch=1, length=12, seed=7)
    patched = _reuse_teacher_forced_logits(model, prompt, forced)
    stats, stage = handle.reuse.last, handle.reuse.recompute
    expected = _reuse_teacher_forced_logits(reference, prompt, forced)
    assert stats.reused_tokens == 32 and stats.approximate_tokens == 16  # doc_b exact, doc_a moved
    # what the plug-in chose, and only that, was recomputed: both ends of each of doc_a's chunks
    per_chunk = min(head + 1, CHUNK)
    assert isinstance(stage, plugin.HeadTailRecompute) and stage.calls == 1
    assert stats.recomputed_tokens == stage.chosen == 2 * per_chunk
    check_fidelity(config, patched, expected, patched.argmax(-1), expected.argmax(-1))
    # recomputing every moved token restores exactness; two of eight per chunk does not
    assert torch.allclose(patched, expected, atol=1e-4, rtol=0) == exact


# -- storage ---------------------------------------------------------------------------------------

STORAGE = '''
    """A storage plug-in, declared: each layer keeps K/V in a storage dtype of its own and hands
    attention the compute dtype. float64/float32 round-trip a float32 model exactly (lossless);
    16-bit storage does not, which the declaration's rule says."""
    from typing import Literal

    import torch
    from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

    from kvpatch.registry import Stage, StageParams, declare_stage, register_stage

    KIND, NAME = "storage", "__NAME__"


    class Params(StageParams):
        dtype: Literal["float64", "float32", "bfloat16", "float16"] = "float64"


    declare_stage(KIND, NAME, f"{__name__}:CastStorage", Params,
                  lossless=lambda p: p.dtype in ("float64", "float32"), builds_layers=True)


    class CastLayer(DynamicLayer):
        """Dense K/V held in `store_dtype`."""

        def __init__(self, store_dtype):
            super().__init__()
            self.store_dtype, self.updates = store_dtype, 0

        def update(self, key_states, value_states, *args, **kwargs):
            self.updates += 1
            dtype = key_states.dtype
            keys, values = super().update(key_states.to(self.store_dtype), value_states.to(self.store_dtype),
                                          *args, **kwargs)
            return keys.to(dtype), values.to(dtype)


    @register_stage(KIND, NAME)
    class CastStorage(Stage):
        """Full-attention layers store K/V in `dtype`; sliding-window layers stay as dense keeps them."""

        Params = Params

        def make_layer(self, layout):
            if layout.sliding_window is not None:
                return DynamicSlidingWindowLayer(sliding_window=layout.sliding_window)
            return CastLayer(getattr(torch, self.params.dtype))
'''


@pytest.mark.parametrize("family", FAMILIES)
def test_storage_plugin(load_plugin: PluginLoader, family: str) -> None:
    plugin = load_plugin(STORAGE)
    handle, _ = _matrix_check({"name": "plugin_storage", "stages": [{"kind": "storage", "impl": plugin.NAME}]}, family)
    full = _full_layers(handle)
    assert all(isinstance(layer, plugin.CastLayer) and layer.keys.dtype == torch.float64 and layer.updates > 0
               for layer in full)


def test_storage_plugin_lossy_rule(load_plugin: PluginLoader) -> None:
    """The declaration's rule decides losslessness from the params: bfloat16 is refused in a
    lossless config and meets the bound its lossy config declares."""
    plugin = load_plugin(STORAGE)
    stage = {"kind": "storage", "impl": plugin.NAME, "params": {"dtype": "bfloat16"}}
    with pytest.raises(kvpatch.ConfigError, match=f"lossy: storage/{plugin.NAME}"):
        kvpatch.load_config({"name": "t", "stages": [stage]})
    handle, fidelity = _matrix_check({"name": "plugin_storage_bf16", "stages": [stage],
                                      "fidelity": {"lossless": False, "min_logit_cosine": 0.99}})
    assert fidelity["max_abs"] > 1e-4  # it did round the K/V
    assert all(layer.keys.dtype == torch.bfloat16 for layer in handle.last_cache.layers)


# -- quantizer ----------------------------------------------------------------------------------------

QUANTIZER = '''
    """A quantizer plug-in: symmetric absmax integer codes per token and head (one float32 scale
    per token), stored as int8."""
    from typing import Literal

    import torch

    from kvpatch.quant.base import QuantizerStage
    from kvpatch.quant.codes import Codes
    from kvpatch.registry import StageParams, register_stage

    KIND, NAME = "quantizer", "__NAME__"


    @register_stage(KIND, NAME)
    class AbsmaxQuantizer(QuantizerStage):
        """Per-token absmax: x ~ round(x / s) * s with s = max|x| / (2**(bits-1) - 1)."""

        class Params(StageParams):
            bits: Literal[8, 6, 4] = 8

        def __init__(self, params):
            super().__init__(params)
            self.encoded_tokens = self.decoded_tokens = 0

        def encode(self, x, role):
            self._check_input(x, role)
            levels = 2 ** (self.params.bits - 1) - 1
            scale = x.float().abs().amax(dim=-1, keepdim=True) / levels
            scale = torch.where(scale > 0, scale, torch.ones_like(scale))
            q = (x.float() / scale).round().clamp(-levels, levels).to(torch.int8)
            self.encoded_tokens += x.shape[0] * x.shape[1] * x.shape[2]
            return Codes({"q": q, "scale": scale}, 1, x.shape[-1])

        def decode(self, codes, role, dtype):
            q, scale = codes.tensors["q"], codes.tensors["scale"]
            self.decoded_tokens += q.shape[0] * q.shape[1] * q.shape[2]
            return (q.float() * scale).to(dtype)

        def stats(self):
            return {"encoded_tokens": self.encoded_tokens, "decoded_tokens": self.decoded_tokens}
'''


@pytest.mark.parametrize("family", QUANTIZER_FAMILIES)
def test_quantizer_plugin(load_plugin: PluginLoader, family: str) -> None:
    plugin = load_plugin(QUANTIZER)
    config = {"name": "plugin_quantizer",
              "stages": [{"kind": "quantizer", "impl": plugin.NAME, "params": {"bits": 8}},
                         {"kind": "storage", "impl": "quantized", "params": {"residual_length": 4, "sink_tokens": 2}}],
              "fidelity": {"lossless": False, "min_logit_cosine": 0.99, "min_top1_agreement": 0.9}}
    handle, fidelity = _matrix_check(config, family)
    stats = handle.stats()["stages"][f"quantizer/{plugin.NAME}"]
    full = _full_layers(handle)
    assert all(isinstance(layer, QuantizedLayer) and layer.key_codes.tensors["q"].dtype == torch.int8 for layer in full)
    ran = bool(full)
    assert (stats["encoded_tokens"] > 0, stats["decoded_tokens"] > 0) == (ran, ran)
    assert (fidelity["max_abs"] > 1e-4) == ran  # lossy indeed where the codes are read


# -- scorer -------------------------------------------------------------------------------------------

SCORER = '''
    """A scorer plug-in: keep tokens whose keys have a small L1 norm (a key-norm heuristic, by
    its own norm), no attention needed."""
    from kvpatch.registry import StageParams, register_stage
    from kvpatch.stages.scorers import ScorerStage

    KIND, NAME = "scorer", "__NAME__"


    @register_stage(KIND, NAME)
    class KeyL1Scorer(ScorerStage):
        """Score = -sum |k| over the head dimension."""

        needs_attention = False

        class Params(StageParams):
            pass

        def __init__(self, params):
            super().__init__(params)
            self.calls = 0

        def score(self, ctx):
            self.calls += 1
            return -ctx.key.float().abs().sum(dim=-1)
'''


@pytest.mark.parametrize("family", EVICTOR_FAMILIES)
def test_scorer_plugin(load_plugin: PluginLoader, family: str) -> None:
    plugin = load_plugin(SCORER)
    sinks, recent, budget = 2, 4, 12
    config = {"name": "plugin_scorer", "fidelity": {"lossless": False, "min_logit_cosine": 0.5},
              "stages": [{"kind": "scorer", "impl": plugin.NAME},
                         {"kind": "evictor", "impl": "budget",
                          "params": {"max_tokens": budget, "sink_tokens": sinks, "recent_tokens": recent}}]}
    handle, _ = _matrix_check(config, family)
    scorer = next(s for s in handle.pipeline.stages if s.kind == "scorer")
    full = [i for i, layout in enumerate(layer_layouts(handle.model.config)) if layout.sliding_window is None]
    assert isinstance(scorer, plugin.KeyL1Scorer) and (scorer.calls > 0) == bool(full)
    if not full:
        return
    # after a prefill, the kept tokens are the sinks, the recent window and the best-scored rest
    model, ids = tiny_model(family), prompt_ids(batch=2, length=20)
    with torch.no_grad():
        keys = output_cache(model(input_ids=ids, use_cache=True)).layers[full[0]].keys  # exact before eviction
    kvpatch.apply(model, config)
    with torch.no_grad():
        layer = output_cache(model(input_ids=ids, use_cache=True)).layers[full[0]]
    assert isinstance(layer, EvictingLayer) and layer.kept == budget and layer.seen == 20
    protected = torch.zeros(20, dtype=torch.bool)
    protected[:sinks] = protected[20 - recent :] = True
    score = (-keys.float().abs().sum(-1)).masked_fill(protected, float("inf"))
    chosen = score.argsort(dim=-1, descending=True, stable=True)[..., :budget].sort(dim=-1).values
    assert torch.equal(layer.positions, chosen)


# -- evictor ----------------------------------------------------------------------------------------

EVICTOR = '''
    """An evictor plug-in with its own cache layer: attention sinks plus a sliding window of the
    most recent tokens (StreamingLLM), following the eviction contract: `get_seq_length` counts
    every token seen, `get_mask_sizes` is (kept + new, seen - kept), `update` returns all K/V and
    tokens leave after the forward (`after_forward`)."""
    import torch
    from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

    from kvpatch.compat import query_length
    from kvpatch.params import Count, Size
    from kvpatch.registry import Stage, StageParams, register_stage

    KIND, NAME = "evictor", "__NAME__"


    class SinkWindowLayer(DynamicLayer):
        """The first `sinks` tokens and the last `window`."""

        def __init__(self, sinks, window):
            super().__init__()
            self.sinks, self.window = sinks, window
            self.seen = self.evictions = 0

        def update(self, key_states, value_states, *args, **kwargs):
            self.seen += key_states.shape[-2]
            return super().update(key_states, value_states, *args, **kwargs)

        def after_forward(self):
            if not self.is_initialized or self.keys.shape[-2] <= self.sinks + self.window:
                return
            keep = lambda t: torch.cat([t[..., : self.sinks, :], t[..., -self.window :, :]], dim=-2)
            self.keys, self.values = keep(self.keys), keep(self.values)
            self.evictions += 1

        @property
        def kept(self):
            return self.keys.shape[-2] if self.is_initialized else 0

        def get_seq_length(self):
            return self.seen

        def get_mask_sizes(self, query):
            return self.kept + query_length(query), self.seen - self.kept

        def crop(self, tokens_to_remove):
            raise NotImplementedError("a sink-window cache cannot be cropped")

        def reset(self):
            self.seen = self.evictions = 0
            super().reset()


    @register_stage(KIND, NAME)
    class SinkWindowEvictor(Stage):
        """Keeps `sink_tokens` + `window` tokens per layer; lossy."""

        lossless = False
        builds_layers = True
        needs_cache_events = True

        class Params(StageParams):
            sink_tokens: Count = 4
            window: Size = 8

        def make_layer(self, layout):
            if layout.sliding_window is not None:
                return DynamicSlidingWindowLayer(sliding_window=layout.sliding_window)
            return SinkWindowLayer(self.params.sink_tokens, self.params.window)
'''


@pytest.mark.parametrize("family", EVICTOR_FAMILIES)
def test_evictor_plugin(load_plugin: PluginLoader, family: str) -> None:
    plugin = load_plugin(EVICTOR)
    config = {"name": "plugin_evictor", "fidelity": {"lossless": False, "min_logit_cosine": 0.5},
              "stages": [{"kind": "evictor", "impl": plugin.NAME, "params": {"sink_tokens": 2, "window": 10}}]}
    handle, fidelity = _matrix_check(config, family)
    full = _full_layers(handle)
    assert all(isinstance(layer, plugin.SinkWindowLayer) and layer.kept == 12 and layer.seen == 20 + 16 - 1
               and layer.evictions > 0 for layer in full)
    assert handle.last_cache.get_seq_length() == 35
    assert (fidelity["max_abs"] > 1e-4) == bool(full)  # tokens really left


# -- offloader --------------------------------------------------------------------------------------

OFFLOADER = '''
    """An offloader plug-in: host copies that are checksummed when they leave the device and
    verified when they come back (a corrupted copy is an error, never attended)."""
    import hashlib

    import torch

    from kvpatch.registry import Stage, StageParams, register_stage

    KIND, NAME = "offloader", "__NAME__"


    def digest(tensor):
        return hashlib.blake2b(tensor.contiguous().view(torch.uint8).numpy().tobytes(), digest_size=16).digest()


    @register_stage(KIND, NAME)
    class VerifiedOffloader(Stage):
        """CPU copies with a BLAKE2b digest each, checked by `to_device`."""

        class Params(StageParams):
            verify: bool = True

        def __init__(self, params):
            super().__init__(params)
            self.sums = {}
            self.counts = {"offloaded": 0, "restored": 0, "verified": 0, "bytes": 0}

        def to_host(self, tensor):
            host = tensor.detach().to("cpu", copy=True)
            self.sums[host.data_ptr()] = digest(host)
            self.counts["offloaded"] += 1
            self.counts["bytes"] += host.numel() * host.element_size()
            return host

        def to_device(self, tensor, device):
            self.counts["restored"] += 1
            expected = self.sums.pop(tensor.data_ptr(), None)
            if self.params.verify and expected is not None:
                if digest(tensor) != expected:
                    raise RuntimeError("offloaded K/V changed while on the host")
                self.counts["verified"] += 1
            return tensor.to(device)

        def stats(self):
            return dict(self.counts)
'''


def test_offloader_plugin(load_plugin: PluginLoader) -> None:
    plugin = load_plugin(OFFLOADER)
    config = {"name": "plugin_offloader", "fidelity": {"lossless": False, "min_logit_cosine": 0.5},
              "stages": [{"kind": "scorer", "impl": "hybrid"},
                         {"kind": "evictor", "impl": "budget",
                          "params": {"max_tokens": 12, "sink_tokens": 2, "recent_tokens": 0, "recent_fraction": 0.5}},
                         {"kind": "offloader", "impl": plugin.NAME}]}
    handle, _ = _matrix_check(config)
    offloader = next(s for s in handle.pipeline.stages if s.kind == "offloader")
    assert isinstance(offloader, plugin.VerifiedOffloader) and offloader.counts["offloaded"] > 0
    assert handle.stats()["kv_bytes_offloaded"] > 0
    # a prefill evicts to the budget through the plug-in; restore() brings every token back, exactly
    model, ids = tiny_model("llama"), prompt_ids(batch=2, length=20)
    with torch.no_grad():
        reference: DynamicCache = output_cache(model(input_ids=ids, use_cache=True))
    handle = kvpatch.apply(model, config)
    offloader = next(s for s in handle.pipeline.stages if s.kind == "offloader")
    with torch.no_grad():
        cache = output_cache(model(input_ids=ids, use_cache=True))
    assert all(layer.kept == 12 and layer.offloaded for layer in cache.layers)
    cache.restore()
    assert offloader.counts["verified"] == offloader.counts["restored"] == offloader.counts["offloaded"] > 0
    for layer, expected in zip(cache.layers, reference.layers):
        assert torch.equal(layer.keys, expected.keys) and torch.equal(layer.values, expected.values)


def test_offloader_plugin_as_the_cold_tier(load_plugin: PluginLoader) -> None:
    plugin = load_plugin(OFFLOADER)
    config = {"name": "plugin_cold_tier", "fidelity": {"lossless": False, "min_logit_cosine": 0.5},
              "stages": [{"kind": "scorer", "impl": "h2o"},
                         {"kind": "evictor", "impl": "tiered",
                          "params": {"hot": {"max_tokens": 8}, "warm": {"max_tokens": 4}, "sink_tokens": 2,
                                     "recent_tokens": 4}},
                         {"kind": "offloader", "impl": plugin.NAME}]}
    handle, _ = _matrix_check(config)
    offloader = next(s for s in handle.pipeline.stages if s.kind == "offloader")
    assert offloader.counts["offloaded"] > 0 and handle.stats()["kv_bytes_offloaded"] > 0


# -- every kind ---------------------------------------------------------------------------------------

PLUGINS = {"storage": STORAGE, "chunker": CHUNKER, "hasher": HASHER, "index": INDEX, "matcher": MATCHER,
           "recompute": RECOMPUTE, "store": STORE, "scorer": SCORER, "evictor": EVICTOR, "quantizer": QUANTIZER,
           "offloader": OFFLOADER}


def test_every_kind_has_a_plugin_here(load_plugin: PluginLoader) -> None:
    """A new kind in STAGE_KINDS needs a plug-in test here; every plug-in registers as its kind,
    with the facts its class states."""
    assert set(PLUGINS) == set(registry.STAGE_KINDS)
    for kind, source in PLUGINS.items():
        module = load_plugin(source)
        assert module.KIND == kind
        spec = registry.get_stage_spec(kind, module.NAME)
        assert spec.implementation.startswith(module.__name__ + ":")
        assert registry.get_stage_class(kind, module.NAME).__module__ == module.__name__
