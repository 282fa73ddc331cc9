"""The cache contract: every way a caller hands transformers a cache, on every family and config.

Each way in WAYS runs twice on copies of one tiny model: unpatched (the reference, with the cache
argument under the model's own name and a DynamicCache wherever the patched run uses a kvpatch
cache) and patched. Lossless configs must reproduce the reference (logits within float tolerance,
identical tokens); lossy configs must give, through every way they accept, exactly what their
canonical path gives (the way a cache is passed never changes the computation), and stay inside
their declared fidelity bounds. Ways kvpatch cannot honour exactly must raise CacheContractError.
See kvpatch/patch/cache_args.py for the table this tests.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache, StaticCache

import kvpatch
from kvpatch.compat import cache_kwarg, output_cache
from kvpatch.config import bundled_configs
from kvpatch.errors import CacheContractError
from kvpatch.cache import KVPatchCache
from kvpatch.patch.cache_args import CACHE_ARGUMENT_NAMES
from kvpatch.testing import TINY_CONFIGS, prompt_ids, tiny_model

FAMILIES = sorted(kvpatch.supported_families())
LOSSLESS = [c for c in sorted(bundled_configs()) if kvpatch.load_config(c).fidelity.lossless and not kvpatch.load_config(c).compile.enabled]
LOSSY = [c for c in sorted(bundled_configs()) if not kvpatch.load_config(c).fidelity.lossless]
#: Every supported family with every lossless config it accepts (the ones its patch spec refuses
#: are checked to be refused in tests/test_family_refusals.py).
LOSSLESS_PAIRS = [(family, config) for family in FAMILIES for config in LOSSLESS
                  if not kvpatch.supported_families()[family].config_problems(kvpatch.load_config(config))]
PREFILL, STEPS = 10, 4
PROMPT = prompt_ids(batch=2, length=PREFILL + STEPS)  # longer than the tiny sliding window (8)
GEN = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False)


@dataclass
class Run:
    """What a way needs to know about the run it is part of."""

    model: torch.nn.Module
    handle: kvpatch.PatchHandle | None  # None: the unpatched reference
    name: str  # the cache keyword under test
    assistant: torch.nn.Module  # an unpatched model for assisted generation
    literal: bool = False  # the reference too passes the cache under `name`
    prompt: torch.Tensor = PROMPT
    prefill: int = PREFILL  # prompt tokens in the first forward of a loop

    @property
    def keyword(self) -> str:
        """The keyword to pass the cache by: the one under test when patched (or `literal`), else
        the model's own (what the caller means)."""
        return self.name if self.handle is not None or self.literal else cache_kwarg(self.model)

    def new_cache(self) -> Any:
        return self.handle.new_cache() if self.handle is not None else DynamicCache()


Way = Callable[[Run], torch.Tensor]
WAYS: dict[str, Way] = {}


def way(fn: Way) -> Way:
    WAYS[fn.__name__] = fn
    return fn


def _loop(run: Run, first_cache: Any, pass_back: Callable[[Any, Any], Any], **extra: Any) -> torch.Tensor:
    """Logits of a prefill and STEPS teacher-forced one-token steps, the cache passed as told."""
    out = run.model(input_ids=run.prompt[:, :run.prefill], use_cache=True, **{run.keyword: first_cache}, **extra)
    logits, cache = [out.logits[:, -1]], first_cache
    for i in range(run.prefill, run.prefill + STEPS):
        cache = pass_back(cache, out)
        out = run.model(input_ids=run.prompt[:, i : i + 1], use_cache=True, **{run.keyword: cache})
        logits.append(out.logits[:, -1])
    return torch.stack(logits, 1)


def _same_object(cache: Any, out: Any) -> Any:
    return cache


def _returned(cache: Any, out: Any) -> Any:
    return output_cache(out)


@way
def loop_new_cache_in_place(run: Run) -> torch.Tensor:
    return _loop(run, run.new_cache(), _same_object)


@way
def loop_empty_dynamic_in_place(run: Run) -> torch.Tensor:
    return _loop(run, DynamicCache(), _same_object)


@way
def loop_dynamic_with_config_in_place(run: Run) -> torch.Tensor:
    return _loop(run, DynamicCache(config=run.model.config), _same_object)


@way
def loop_returned_cache(run: Run) -> torch.Tensor:
    return _loop(run, None, _returned)


@way
def loop_explicit_position_ids(run: Run) -> torch.Tensor:
    cache = run.new_cache()
    positions = torch.arange(run.prefill + STEPS).expand(run.prompt.shape[0], -1)
    out = run.model(input_ids=run.prompt[:, :run.prefill], position_ids=positions[:, :run.prefill], **{run.keyword: cache})
    logits = [out.logits[:, -1]]
    for i in range(run.prefill, run.prefill + STEPS):
        out = run.model(input_ids=run.prompt[:, i : i + 1], position_ids=positions[:, i : i + 1], **{run.keyword: cache})
        logits.append(out.logits[:, -1])
    return torch.stack(logits, 1)


@way
def forward_positional_twice(run: Run) -> torch.Tensor:
    """`model(ids)` twice: two independent calls must not share state."""
    first = run.model(run.prompt).logits
    second = run.model(run.prompt).logits
    torch.testing.assert_close(second, first, atol=0, rtol=0)
    return first


@way
def forward_use_cache_false(run: Run) -> torch.Tensor:
    out = run.model(input_ids=run.prompt, use_cache=False)
    assert output_cache(out) is None
    return out.logits


@way
def forward_tuples(run: Run) -> torch.Tensor:
    """`return_dict=False`: the cache comes back inside the tuple and goes back in."""
    logits, cache = run.model(input_ids=run.prompt[:, :run.prefill], return_dict=False)[:2]
    steps = [logits[:, -1]]
    for i in range(run.prefill, run.prefill + STEPS):
        logits, cache = run.model(input_ids=run.prompt[:, i : i + 1], return_dict=False, **{run.keyword: cache})[:2]
        steps.append(logits[:, -1])
    return torch.stack(steps, 1)


@way
def generate_default(run: Run) -> torch.Tensor:
    return run.model.generate(run.prompt, attention_mask=torch.ones_like(run.prompt), **GEN)


@way
def generate_with_new_cache(run: Run) -> torch.Tensor:
    return run.model.generate(run.prompt, attention_mask=torch.ones_like(run.prompt), **{run.keyword: run.new_cache()}, **GEN)


@way
def generate_with_user_dynamic_cache(run: Run) -> torch.Tensor:
    cache = DynamicCache()
    tokens = run.model.generate(run.prompt, attention_mask=torch.ones_like(run.prompt), **{run.keyword: cache}, **GEN)
    assert cache.get_seq_length() == tokens.shape[1] - 1, "the caller's cache was not filled in place"
    return tokens


@way
def generate_continued_from_returned_cache(run: Run) -> torch.Tensor:
    first = run.model.generate(run.prompt, attention_mask=torch.ones_like(run.prompt), return_dict_in_generate=True, **GEN)
    more = torch.cat([first.sequences, run.prompt[:, :3]], dim=1)
    return run.model.generate(more, attention_mask=torch.ones_like(more), **{run.keyword: output_cache(first)}, **GEN)


@way
def generate_under_inference_mode(run: Run) -> torch.Tensor:
    with torch.inference_mode():
        return run.model.generate(run.prompt, attention_mask=torch.ones_like(run.prompt), **GEN)


@way
def generate_prompt_lookup(run: Run) -> torch.Tensor:
    """Candidate-token (assisted) decoding: rejected candidates are cropped from the cache."""
    ids = torch.cat([run.prompt[:1, :7], run.prompt[:1, :7]], dim=1)  # repeats, so lookups propose candidates
    return run.model.generate(ids, attention_mask=torch.ones_like(ids), prompt_lookup_num_tokens=3, **GEN)


@way
def generate_with_assistant_model(run: Run) -> torch.Tensor:
    """Assisted decoding with a separate (unpatched) draft model: the main model's cache is
    cropped to the accepted tokens after every round."""
    ids = run.prompt[:1]
    return run.model.generate(ids, attention_mask=torch.ones_like(ids), assistant_model=run.assistant, **GEN)


def _filled_dynamic_cache(run: Run, reference: torch.nn.Module) -> DynamicCache:
    """A DynamicCache the unpatched reference filled with the prompt's prefill."""
    cache = DynamicCache(config=reference.config)
    with torch.no_grad():
        reference(input_ids=run.prompt[:, :run.prefill], **{cache_kwarg(reference): cache})
    return cache


def _continue_foreign(run: Run, cache: Any) -> torch.Tensor:
    logits = []
    for i in range(run.prefill, run.prefill + STEPS):
        out = run.model(input_ids=run.prompt[:, i : i + 1], **{run.keyword: cache})
        logits.append(out.logits[:, -1])
    return torch.stack(logits, 1)


#: Ways that hand kvpatch a cache it did not make and cannot take over: exact under lossless
#: configs, CacheContractError under lossy ones.
FOREIGN: dict[str, Callable[[Run, torch.nn.Module], torch.Tensor]] = {
    "loop_static_cache": lambda run, ref: _loop(run, StaticCache(config=run.model.config, max_cache_len=32), _same_object),
    "continue_filled_dynamic_cache": lambda run, ref: _continue_foreign(run, _filled_dynamic_cache(run, ref)),
    "generate_static_cache": lambda run, ref: run.model.generate(
        run.prompt, attention_mask=torch.ones_like(run.prompt), **GEN,
        **{run.keyword: StaticCache(config=run.model.config, max_cache_len=32)}),
}


#: Lossy configs run on a tiny Llama with head_dim 64, which every bundled quantizer's group fits,
#: with a prompt longer than their residual windows (128) and eviction budgets.
WIDE, WIDE_HEAD_DIM = "llama-head-dim-64", 64
LONG_PREFILL = 200
LONG_PROMPT = prompt_ids(batch=2, length=LONG_PREFILL + STEPS, seed=2)


def _wide_llama() -> torch.nn.Module:
    config = TINY_CONFIGS["llama"]()
    config.head_dim = WIDE_HEAD_DIM
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.fixture(scope="module")
def pairs() -> Callable[[str, str], tuple[torch.nn.Module, torch.nn.Module, kvpatch.PatchHandle]]:
    """(reference, patched copy, handle) per (family, config), built once per module."""
    built: dict[tuple[str, str], tuple[torch.nn.Module, torch.nn.Module, kvpatch.PatchHandle]] = {}

    def get(family: str, config: str) -> tuple[torch.nn.Module, torch.nn.Module, kvpatch.PatchHandle]:
        if (family, config) not in built:
            reference = _wide_llama() if family == WIDE else tiny_model(family)
            patched = copy.deepcopy(reference)
            built[(family, config)] = (reference, patched, kvpatch.apply(patched, config))
        return built[(family, config)]

    return get


_ASSISTANTS: dict[str, torch.nn.Module] = {}


def _assistant(model: torch.nn.Module) -> torch.nn.Module:
    """A differently seeded unpatched model of the same family, as a draft model."""
    family = model.config.model_type
    if family not in _ASSISTANTS:
        _ASSISTANTS[family] = tiny_model(family, seed=3)
    return _ASSISTANTS[family]


def _run(fn: Callable[[Run], torch.Tensor], model: torch.nn.Module, handle: kvpatch.PatchHandle | None,
         name: str, literal: bool = False) -> torch.Tensor:
    long = getattr(model.config, "head_dim", None) == WIDE_HEAD_DIM  # lossy configs: past residual windows and budgets
    prompt, prefill = (LONG_PROMPT, LONG_PREFILL) if long else (PROMPT, PREFILL)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # transformers' notice for the deprecated name
        return fn(Run(model, handle, name, assistant=_assistant(model), literal=literal, prompt=prompt, prefill=prefill))


def _assert_exact_or_refused_alike(fn: Callable[[Run], torch.Tensor], reference: torch.nn.Module,
                                   patched: torch.nn.Module, handle: kvpatch.PatchHandle, name: str, what: str) -> None:
    """The patched run equals the reference's intended computation; where transformers itself
    refuses the way (this keyword on this version, or the call on this family), so does kvpatch."""
    for literal in (True, False):
        try:
            _run(fn, reference, None, name, literal=literal)
        except Exception as refused:
            with pytest.raises(type(refused)):
                _run(fn, patched, handle, name)
            return
    _assert_same(_run(fn, patched, handle, name), _run(fn, reference, None, name), what)


def _assert_same(got: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    if got.is_floating_point():
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0, msg=lambda m: f"{what}: {m}")
    else:
        assert torch.equal(got, expected), f"{what}: tokens differ"


@pytest.mark.parametrize("name", CACHE_ARGUMENT_NAMES)
@pytest.mark.parametrize("way_name", sorted(WAYS))
@pytest.mark.parametrize(("family", "config"), LOSSLESS_PAIRS)
def test_lossless_config_is_exact_through_every_way(pairs: Any, family: str, config: str, way_name: str, name: str) -> None:
    reference, patched, handle = pairs(family, config)
    _assert_exact_or_refused_alike(WAYS[way_name], reference, patched, handle, name, f"{family}/{config}/{way_name} via {name}=")


@pytest.mark.parametrize("name", CACHE_ARGUMENT_NAMES)
@pytest.mark.parametrize("way_name", sorted(FOREIGN))
@pytest.mark.parametrize(("family", "config"), LOSSLESS_PAIRS)
def test_lossless_config_runs_exactly_on_a_foreign_cache(pairs: Any, family: str, config: str, way_name: str, name: str) -> None:
    reference, patched, handle = pairs(family, config)
    _assert_exact_or_refused_alike(lambda run: FOREIGN[way_name](run, reference), reference, patched, handle, name,
                                   f"{family}/{config}/{way_name} via {name}=")


#: Lossy configs whose loss needs more than LONG_PROMPT: fixed_budget keeps 512 tokens, and
#: rag_reuse is lossy only when a later request reuses a document approximately.
EXACT_ON_LONG_PROMPT = {"fixed_budget", "rag_reuse"}

#: The ways a lossy config accepts, and the canonical way each must equal exactly.
_LOSSY_EQUIVALENT = {
    "loop_empty_dynamic_in_place": "loop_new_cache_in_place",
    "loop_dynamic_with_config_in_place": "loop_new_cache_in_place",
    "loop_returned_cache": "loop_new_cache_in_place",
    "loop_explicit_position_ids": "loop_new_cache_in_place",
    "forward_tuples": "loop_new_cache_in_place",
    "generate_with_new_cache": "generate_default",
    "generate_with_user_dynamic_cache": "generate_default",
    "generate_under_inference_mode": "generate_default",
}


@pytest.mark.parametrize("name", CACHE_ARGUMENT_NAMES)
@pytest.mark.parametrize("config", LOSSY)
def test_lossy_config_computes_the_same_through_every_way(pairs: Any, config: str, name: str) -> None:
    reference, patched, handle = pairs(WIDE, config)
    canonical = {w: _run(WAYS[w], patched, handle, cache_kwarg(patched)) for w in set(_LOSSY_EQUIVALENT.values())}
    for way_name, same_as in _LOSSY_EQUIVALENT.items():
        try:
            _run(WAYS[way_name], reference, None, name, literal=True)
        except Exception as refused:  # this transformers version does not take the keyword here
            with pytest.raises(type(refused)):
                _run(WAYS[way_name], patched, handle, name)
            continue
        _assert_same(_run(WAYS[way_name], patched, handle, name), canonical[same_as], f"{config}/{way_name} via {name}=")
    fidelity = handle.config.fidelity
    expected = _run(WAYS["loop_new_cache_in_place"], reference, None, name)
    lossy_here = config not in EXACT_ON_LONG_PROMPT
    assert torch.equal(canonical["loop_new_cache_in_place"], expected) != lossy_here, "lossy path reached or not as expected"
    cosine = torch.nn.functional.cosine_similarity(canonical["loop_new_cache_in_place"], expected, dim=-1)
    if fidelity.min_logit_cosine is not None:
        assert cosine.min().item() >= fidelity.min_logit_cosine


@pytest.mark.parametrize("way_name", sorted(FOREIGN))
@pytest.mark.parametrize("config", LOSSY)
def test_lossy_config_refuses_a_foreign_cache(pairs: Any, config: str, way_name: str) -> None:
    reference, patched, handle = pairs(WIDE, config)
    with pytest.raises(CacheContractError, match=config):
        _run(lambda run: FOREIGN[way_name](run, reference), patched, handle, cache_kwarg(patched))


def test_two_different_caches_under_both_names_are_refused(pairs: Any) -> None:
    _, patched, handle = pairs("llama", "default")
    with pytest.raises(CacheContractError, match="both"):
        patched(input_ids=PROMPT, cache=handle.new_cache(), past_key_values=handle.new_cache())


def test_a_cache_of_another_patched_model_is_refused(pairs: Any) -> None:
    _, patched, _ = pairs("llama", "default")
    _, other, other_handle = pairs("mistral", "default")
    foreign = other_handle.new_cache()
    with torch.no_grad():
        other(input_ids=PROMPT[:, :PREFILL], **{cache_kwarg(other): foreign})
    with pytest.raises(CacheContractError, match="another patched model"):
        patched(input_ids=PROMPT[:, PREFILL:], **{cache_kwarg(patched): foreign})


def test_a_cache_from_before_reapplying_is_refused() -> None:
    model = tiny_model("llama")
    old = kvpatch.apply(model, "default").new_cache()
    kvpatch.unpatch(model)
    kvpatch.apply(model, "default")
    with pytest.raises(CacheContractError):
        model(input_ids=PROMPT, **{cache_kwarg(model): old})


def test_an_adopted_dynamic_cache_is_a_view_of_the_kvpatch_cache(pairs: Any) -> None:
    _, patched, handle = pairs("llama", "default")
    cache = DynamicCache()
    with torch.no_grad():
        patched(input_ids=PROMPT, **{cache_kwarg(patched): cache})
    assert isinstance(handle.last_cache, KVPatchCache)
    assert cache.layers is handle.last_cache.layers
    assert cache.get_seq_length() == PROMPT.shape[1]
