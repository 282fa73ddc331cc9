"""How a forward call hands kvpatch a cache, and what kvpatch does with each way (the cache contract).

transformers lets a caller pass the cache positionally or by keyword, under `cache=` (5.2x) or
`past_key_values=` (older 5.x, and a deprecated alias on 5.2x), build it themselves (DynamicCache,
StaticCache, a subclass) or let the model or `generate` make one. A patching library that reads
only one of these ways answers the others with a different computation and no error. So every
way is decided here, once, before the model runs:

| what the call passes                              | kvpatch does                                    |
| ------------------------------------------------- | ----------------------------------------------- |
| nothing (`use_cache` on)                          | a new kvpatch cache for this call               |
| nothing, `use_cache=False`                        | nothing (no cache, as unpatched)                |
| a kvpatch cache of this handle                    | uses it                                         |
| a kvpatch cache of another patched model/handle   | CacheContractError (it holds another model's K/V) |
| an empty plain `DynamicCache` (generate's default, or the caller's own) | adopts it: a kvpatch cache takes its place and the caller's object becomes a view of the same layers, so it fills in place as the caller expects |
| any other cache (filled DynamicCache, StaticCache, subclasses, offloading caches) | lossless configs: runs on it unchanged (exact; the pipeline's stages do not apply to it, said once in the log); lossy configs: CacheContractError |
| both `cache=` and `past_key_values=`, different objects | CacheContractError                       |
"""

from __future__ import annotations

import inspect
import logging
import weakref
from collections.abc import Callable
from typing import Any

import torch
from transformers import DynamicCache

from ..errors import CacheContractError
from ..cache import KVPatchCache

logger = logging.getLogger("kvpatch")

#: Every name transformers 5.x takes a cache by; the model's own name is the one it reads.
CACHE_ARGUMENT_NAMES = ("cache", "past_key_values")


def positional_names(forward: Callable[..., Any]) -> list[str]:
    """The names of `forward`'s parameters that a positional argument may bind to, in order."""
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return [p.name for p in inspect.signature(forward).parameters.values() if p.kind in kinds]


def as_keywords(names: list[str], args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
    """`args` bound to their parameter names and merged into `kwargs` (so that a cache or
    `input_ids` passed positionally is seen like one passed by name)."""
    if not args:
        return kwargs
    if len(args) > len(names):
        raise TypeError(f"forward() takes {len(names)} positional arguments but {len(args)} were given")
    merged = dict(kwargs)
    for name, value in zip(names, args):
        if name in merged:
            raise TypeError(f"forward() got multiple values for argument {name!r}")
        merged[name] = value
    return merged


def take_cache_argument(kwargs: dict[str, Any], model_name: str) -> Any:
    """The cache passed under any accepted name, moved to `model_name` in `kwargs` (aliases
    removed); raises CacheContractError if two different caches were passed."""
    given = {name: kwargs.pop(name) for name in CACHE_ARGUMENT_NAMES if name in kwargs}
    caches = [c for c in given.values() if c is not None]
    if len(caches) == 2 and caches[0] is not caches[1]:
        raise CacheContractError(
            "both `cache=` and `past_key_values=` were passed, with different caches; pass one "
            f"(this transformers version reads `{model_name}=`)"
        )
    cache = caches[0] if caches else None
    if model_name in given or cache is not None:
        kwargs[model_name] = cache
    return cache


def is_adoptable(cache: Any) -> bool:
    """An empty plain DynamicCache without options kvpatch would drop (offloading)."""
    return (
        type(cache) is DynamicCache
        and cache.get_seq_length() == 0
        and not getattr(cache, "offloading", False)
    )


class CacheResolver:
    """Decides, per forward call, which cache the model runs with (see the module docstring).

    `owner_of(cache)` names the handle a kvpatch cache belongs to; `new_cache()` makes one for
    this handle; `lossless` says whether a foreign cache may be used unchanged.
    """

    def __init__(self, new_cache: Callable[[], KVPatchCache], owns: Callable[[KVPatchCache], bool],
                 lossless: bool, config_name: str) -> None:
        self._new_cache = new_cache
        self._owns = owns
        self._lossless = lossless
        self._config_name = config_name
        #: Caller DynamicCaches this handle adopted -> the kvpatch cache behind each.
        self._adopted: weakref.WeakKeyDictionary[Any, KVPatchCache] = weakref.WeakKeyDictionary()
        self._warned_foreign: set[str] = set()

    def resolve(self, cache: Any, use_cache: bool) -> KVPatchCache | Any | None:
        """The cache to run with: a kvpatch cache, the caller's foreign cache, or None."""
        if cache is None:
            return self._new_cache() if use_cache else None
        if isinstance(cache, KVPatchCache):
            if not self._owns(cache):
                raise CacheContractError(
                    "this kvpatch cache was created by another patched model or an earlier "
                    "kvpatch.apply; it holds that model's K/V. Create caches with this model's "
                    "handle.new_cache() (or pass none)"
                )
            return cache
        adopted = self._adopted.get(cache)
        if adopted is not None:
            return adopted
        if is_adoptable(cache):
            return self._adopt(cache)
        return self._foreign(cache)

    def _adopt(self, cache: DynamicCache) -> KVPatchCache:
        ours = self._new_cache()
        if any(getattr(layer, "record_past", False) for layer in cache.layers):
            ours.activate_past_recording()  # assisted decoding asked to keep what `crop` may need
        cache.layers = ours.layers  # the caller's object now reads (and fills) kvpatch's layers
        self._adopted[cache] = ours
        return ours

    def _foreign(self, cache: Any) -> Any:
        kind = type(cache).__name__
        if not self._lossless:
            raise CacheContractError(
                f"config {self._config_name!r} keeps K/V in its own cache layers, but this call passes "
                f"a {kind} (filled or with options kvpatch cannot take over); running on it would "
                "silently skip the config. Pass no cache, an empty DynamicCache, or handle.new_cache()"
            )
        if kind not in self._warned_foreign:
            self._warned_foreign.add(kind)
            logger.warning(
                "kvpatch: running on the %s passed by the caller (exact: config %r is lossless, but its "
                "stages do not apply to a cache kvpatch did not create)", kind, self._config_name,
            )
        return cache


def use_cache_flag(kwargs: dict[str, Any], model: torch.nn.Module) -> bool:
    """`use_cache` as the model will read it: the call's value, else the model config's."""
    use_cache = kwargs.get("use_cache")
    if use_cache is None:
        use_cache = getattr(model.config, "use_cache", True)
    return bool(use_cache)
