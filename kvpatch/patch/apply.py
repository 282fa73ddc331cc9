"""`apply` / `unpatch`: install kvpatch on a loaded model through transformers' extension points.

What `apply` changes, all undone by `unpatch`:
1. the model's attention implementation -> kvpatch's registered attention function;
2. a forward pre-hook on the top-level model that hands a `KVPatchCache` to every forward that
   would otherwise get a fresh `DynamicCache` (plain `model(...)` and `generate`);
3. optionally, `torch.compile` of the decoder (`model.base_model`), outside the hook.
It then runs a two-token probe forward and refuses the model if kvpatch's attention did not run
in every layer: a family that ignores the attention interface is never left silently unpatched.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from ..compat import cache_kwarg
from ..config import ConfigSource, PipelineConfig, load_config
from ..errors import ConfigError, PatchStateError, UnsupportedModelError
from ..families import FamilySpec, family_spec
from ..pipeline import Pipeline
from .attention import ATTENTION_NAME, KERNEL_ATTR, probe_attention_calls, register_attention
from ..cache import KVPatchCache
from .cache_args import CacheResolver, as_keywords, positional_names, take_cache_argument, use_cache_flag
from .cache_events import CacheEvents
from .compile_hints import mark_growing_dims_dynamic
from ..concurrency import ForwardGuard
from .decode_graphs import DecodeGraphs
from .reuse_controller import ReuseController, reuse_namespace

logger = logging.getLogger("kvpatch")

HANDLE_ATTR = "_kvpatch_handle"


class PatchHandle:
    """What `apply` returns: the live pipeline of a patched model, its stats, and `remove()`."""

    def __init__(self, model: torch.nn.Module, config: PipelineConfig, family: FamilySpec) -> None:
        self.model = model
        self.config = config
        self.family = family
        self.pipeline = Pipeline(config)
        self._original_attention: str | None = model.config._attn_implementation
        self._attention_modules: list[torch.nn.Module] = []
        self._hook: torch.utils.hooks.RemovableHandle | None = None
        self._compiled = False
        self._last_cache: KVPatchCache | None = None
        self._cache_kwarg = cache_kwarg(model)
        self._forward_params = positional_names(model.forward)
        self._caches = CacheResolver(self.new_cache, self.owns, config.fidelity.lossless, config.name)
        self._events: CacheEvents | None = None
        self._post_hook: torch.utils.hooks.RemovableHandle | None = None
        #: Serialises top-level forwards across threads (installed last by `apply`).
        self._guard: ForwardGuard | None = None
        #: Chunk reuse across requests, when the config has reuse stages (kvpatch.reuse).
        self.reuse: ReuseController | None = None
        #: Decode steps replayed as CUDA graphs (`compile: {cuda_graphs: true}`).
        self.decode_graphs: DecodeGraphs | None = None

    # -- caches ---------------------------------------------------------------------------------
    def new_cache(self) -> KVPatchCache:
        """A fresh kvpatch cache for this model (pass it as `cache=` to reuse it across calls)."""
        self._last_cache = None  # drop the previous request's K/V before allocating new ones
        cache = self.pipeline.new_cache(self.model.config)
        self._last_cache = cache
        return cache

    def owns(self, cache: KVPatchCache) -> bool:
        """Whether `cache` was made by this handle's pipeline (for this model): a cache of another
        patched model, or of an earlier `apply` to this one, is refused."""
        return cache.owner is self.pipeline

    @property
    def last_cache(self) -> KVPatchCache | None:
        """The most recent cache kvpatch created or saw for this model.

        The handle keeps it alive so that `stats()` can report it after `generate` returns; it is
        dropped when the next request starts, or by `release_cache()`.
        """
        return self._last_cache

    def release_cache(self) -> None:
        """Free the most recent cache's K/V now instead of at the next request."""
        self._last_cache = None

    def _pre_forward(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        kwargs = as_keywords(self._forward_params, args, kwargs)
        cache = take_cache_argument(kwargs, self._cache_kwarg)
        cache = self._caches.resolve(cache, use_cache_flag(kwargs, self.model))
        if self._compiled:
            mark_growing_dims_dynamic(kwargs, cache)
        if cache is None:
            return (), kwargs
        kwargs[self._cache_kwarg] = cache
        if isinstance(cache, KVPatchCache):
            self._last_cache = cache
            if self.reuse is not None:
                kwargs = self.reuse.before_forward(kwargs, cache) or kwargs
        return (), kwargs

    def _post_forward(self, module: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        cache = kwargs.get(self._cache_kwarg)
        if self.reuse is not None and isinstance(cache, KVPatchCache):
            self.reuse.after_forward(cache)

    # -- reporting ------------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        """K/V bytes, tokens held, and each stage's counters. `kv_bytes_resident`: what attention
        reads; `kv_bytes_offloaded`: copies moved to host memory or files for restoring;
        `kv_bytes_total`: the two together, also per device in `kv_bytes`."""
        cache = self.last_cache
        kv_bytes = cache.kv_bytes() if cache is not None else {}
        resident = sum(cache.kv_bytes("resident").values()) if cache is not None else 0
        offloaded = sum(cache.kv_bytes("offloaded").values()) if cache is not None else 0
        return {
            "config": self.config.name,
            "family": self.family.family,
            "kv_bytes": kv_bytes,
            "kv_bytes_total": sum(kv_bytes.values()),
            "kv_bytes_resident": resident,
            "kv_bytes_offloaded": offloaded,
            "tokens": cache.get_seq_length() if cache is not None else 0,
            "batch_size": cache.batch_size() if cache is not None else 0,
            "layers": len(cache.layers) if cache is not None else 0,
            "stages": self.pipeline.stats(),
            **({"reuse": self.reuse.last.to_dict()} if self.reuse is not None else {}),
            **({"decode_graphs": self.decode_graphs.stats()} if self.decode_graphs is not None else {}),
        }

    def remove(self) -> None:
        """Undo `apply` (same as `kvpatch.unpatch(model)`)."""
        unpatch(self.model)

    def __repr__(self) -> str:
        return f"PatchHandle(config={self.config.name!r}, family={self.family.family!r})"

    def export_snapshot(self, path: Any, cache: KVPatchCache | None = None, *, token_ids: Any = None,
                        tokenizer: Any = None) -> Any:
        """Write `cache` (default: the last cache) to a snapshot file, atomically; returns its path.
        Pass the cached `token_ids` to continue with `generate` after import (kvpatch.snapshot)."""
        from ..snapshot import export_snapshot

        self._check_snapshots_allowed()
        cache = cache if cache is not None else self._last_cache
        if cache is None:
            raise PatchStateError("no cache to export: run the model first or pass cache=")
        return export_snapshot(path, cache, self.model, self.pipeline, token_ids=token_ids, tokenizer=tokenizer)

    def import_snapshot(self, path: Any, *, tokenizer: Any = None) -> KVPatchCache:
        """A new cache holding a snapshot's K/V, after checking it fits this model and config
        (SnapshotError otherwise); pass it as the cache argument to continue generation."""
        from ..snapshot import load_snapshot

        self._check_snapshots_allowed()
        self._last_cache = None  # drop the previous request's K/V before loading new ones
        self._last_cache = load_snapshot(path, self.model, self.pipeline, tokenizer=tokenizer)
        return self._last_cache

    def _check_snapshots_allowed(self) -> None:
        if self.family.refuses_snapshots is not None:
            raise UnsupportedModelError(
                f"kvpatch cannot snapshot a {self.family.family} cache: {self.family.refuses_snapshots}")


def _probe(model: torch.nn.Module) -> list[torch.nn.Module]:
    """Run two tokens through the model and return the modules that called kvpatch's attention."""
    config = model.config.get_text_config(decoder=True)
    device = next(model.parameters()).device
    input_ids = torch.tensor([[0, min(1, config.vocab_size - 1)]], device=device)
    with probe_attention_calls() as log, torch.no_grad():
        model(input_ids=input_ids, use_cache=False)
    expected = config.num_hidden_layers
    unique = list({id(m): m for m in log}.values())
    if len(unique) != expected:
        raise UnsupportedModelError(
            f"the kvpatch patch did not take effect on {type(model).__name__} "
            f"(model_type {model.config.model_type!r}): kvpatch's attention ran in {len(unique)} of "
            f"{expected} layers during a probe forward; refusing to leave the model partly unpatched"
        )
    return unique


def apply(model: torch.nn.Module, config: ConfigSource = "default") -> PatchHandle:
    """Patch `model` in place with the pipeline described by `config`; returns its handle.

    `config` is a YAML path, a bundled config name ("default"), a dict, or a PipelineConfig.
    """
    if getattr(model, HANDLE_ATTR, None) is not None:
        raise PatchStateError("model is already patched by kvpatch; call kvpatch.unpatch(model) first")
    pipeline_config = load_config(config)
    model_type = getattr(model.config, "model_type", None)
    family = family_spec(str(model_type))
    refusals = family.config_problems(pipeline_config)
    if refusals:
        raise ConfigError(f"kvpatch config {pipeline_config.name!r} does not fit the {family.family} family "
                          f"(model_type {model_type!r}): " + "; ".join(refusals))
    handle = PatchHandle(model, pipeline_config, family)
    handle.pipeline.validate_model(model.config)  # before anything changes: a refused model stays unpatched

    register_attention()
    try:
        model.set_attn_implementation(ATTENTION_NAME)
        handle._attention_modules = _probe(model)
    except Exception:
        model.set_attn_implementation(handle._original_attention)
        raise
    for module in handle._attention_modules:
        setattr(module, KERNEL_ATTR, pipeline_config.kernels.attention)
    if handle.pipeline.has_reuse:
        try:  # e.g. a hasher whose package is missing: leave the model as it was
            handle.reuse = ReuseController(model, handle.pipeline.stages, reuse_namespace(model))
        except Exception:
            for module in handle._attention_modules:
                delattr(module, KERNEL_ATTR)
            model.set_attn_implementation(handle._original_attention)
            raise
        handle._post_hook = model.register_forward_hook(handle._post_forward, with_kwargs=True)
    handle._hook = model.register_forward_pre_hook(handle._pre_forward, with_kwargs=True)
    if getattr(handle.pipeline.layer_builder, "needs_cache_events", False):
        handle._events = CacheEvents(model, handle._attention_modules, handle._cache_kwarg, lambda: handle.last_cache,
                                     pipeline_config.name)
    # last: its pre-hook runs first and its post-hook last, so threads sharing the model take turns
    # per top-level forward (the hooks above keep per-forward state; concurrency.py)
    handle._guard = ForwardGuard(model)
    if pipeline_config.compile.cuda_graphs:
        handle.decode_graphs = DecodeGraphs(model, handle._cache_kwarg)
    if pipeline_config.compile.enabled:
        options = pipeline_config.compile
        model.base_model.compile(mode=options.mode, dynamic=options.dynamic, fullgraph=options.fullgraph)
        handle._compiled = True
    setattr(model, HANDLE_ATTR, handle)
    if (family.attention.softcap or family.attention.sinks) and pipeline_config.kernels.attention == "sdpa":
        logger.info("kvpatch: %s soft-caps attention logits or adds attention sinks; those layers use the "
                    "torch kernel", family.family)
    return handle


def unpatch(model: torch.nn.Module) -> None:
    """Restore a patched model exactly as it was before `apply`."""
    handle: PatchHandle | None = getattr(model, HANDLE_ATTR, None)
    if handle is None:
        raise PatchStateError("model is not patched by kvpatch (nothing to unpatch)")
    if handle.decode_graphs is not None:
        handle.decode_graphs.remove()
    if handle._guard is not None:
        handle._guard.remove()
    if handle._hook is not None:
        handle._hook.remove()
    if handle._post_hook is not None:
        handle._post_hook.remove()
    if handle._events is not None:
        handle._events.remove()
    if handle._compiled:
        model.base_model._compiled_call_impl = None
    for module in handle._attention_modules:
        if hasattr(module, KERNEL_ATTR):
            delattr(module, KERNEL_ATTR)
    model.set_attn_implementation(handle._original_attention)
    delattr(model, HANDLE_ATTR)


def get_handle(model: torch.nn.Module) -> PatchHandle | None:
    """The handle of a patched model, or None."""
    return getattr(model, HANDLE_ATTR, None)
