"""Synthetic key-value retrieval ("needle in a haystack") rows over real text.

A definition line `amber_falcon = 48213` is planted at a chosen relative depth of filler text
(real source code), and the row ends with a query that the model completes with the digits:

    <bos>...filler...
    amber_falcon = 48213
    ...filler...
    # what is amber_falcon?
    amber_falcon =              <- ends with a space; the model continues with 48213

Scoring greedy-decodes a few tokens and compares the leading digits with the answer, so it does
not depend on how a tokenizer happens to split numbers. Compression methods (quantization,
eviction, reuse) are scored by needle accuracy per context length and depth; the reference model
is trained on a share of such rows so that its uncompressed accuracy is high to begin with.

Rows are built at the token level (filler ids + needle ids + filler ids + query ids), so every
example has exactly `context_tokens` input tokens and examples of one length batch without
padding. Everything is driven by a `random.Random`, so a seed fixes the examples.
"""

from __future__ import annotations

import math
import random
import weakref
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..compat import cache_kwarg, output_cache

# Keys are adjective_noun pairs: 1024 of them, none an identifier real code is likely to hold.
ADJECTIVES = tuple(
    "amber brisk cobalt dusty eager fuzzy gentle hollow ivory jolly keen lunar mellow "
    "nimble olive plucky quiet rustic silver tidy umber vivid woolly young zesty bold "
    "calm crimson frosty golden misty sunny".split()
)
NOUNS = tuple(
    "falcon otter badger heron walrus lynx marmot gecko beetle puffin bison ferret ibis "
    "jackal koala lemur newt ocelot panda quail raven salmon tapir urchin viper wombat "
    "yak zebra cobra dingo egret finch".split()
)
VALUE_DIGITS = 5
NEWLINE_SNAP_TOKENS = 24  # how far the needle may move to sit at a line end


@dataclass(frozen=True)
class NeedleExample:
    """One retrieval row. `input_ids` has exactly `context_tokens` ids, ending with the query."""

    input_ids: list[int]
    answer_ids: list[int]
    answer_text: str
    key: str
    depth: float  # requested depth: fraction of the filler placed before the needle
    needle_index: int  # position in input_ids of the needle's first token
    needle_length: int
    query_length: int  # the row's last `query_length` ids are the question

    @property
    def context_tokens(self) -> int:
        return len(self.input_ids)

    @property
    def actual_depth(self) -> float:
        """Where the needle landed, as a fraction of the input length."""
        return self.needle_index / len(self.input_ids)


def needle_strings(key: str, value: str) -> tuple[str, str]:
    """The definition line and the query that asks for it (the one format, used everywhere).
    The definition opens its own line; the filler's next newline closes it."""
    return f"\n{key} = {value}", f"\n# what is {key}?\n{key} = "


def random_key_value(rng: random.Random) -> tuple[str, str]:
    key = f"{rng.choice(ADJECTIVES)}_{rng.choice(NOUNS)}"
    value = str(rng.randrange(10 ** (VALUE_DIGITS - 1), 10**VALUE_DIGITS))
    return key, value


def encode(tokenizer: Any, text: str) -> list[int]:
    """Token ids of `text` with no special tokens added (straight through the Rust tokenizer
    when there is one: faster, and no warning about texts longer than the model)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return list(backend.encode(text, add_special_tokens=False).ids)
    return list(tokenizer.encode(text, add_special_tokens=False))


def _bos(tokenizer: Any) -> list[int]:
    bos = getattr(tokenizer, "bos_token_id", None)
    return [] if bos is None else [int(bos)]


_CACHE: weakref.WeakKeyDictionary[Any, dict[str, Any]] = weakref.WeakKeyDictionary()


def _cached(tokenizer: Any, name: str, compute: Callable[[Any], Any]) -> Any:
    """Per-tokenizer memo of a derived table (recomputed if the tokenizer is not weak-keyable)."""
    try:
        table = _CACHE.setdefault(tokenizer, {})
    except TypeError:
        return compute(tokenizer)
    if name not in table:
        table[name] = compute(tokenizer)
    return table[name]


def newline_ids(tokenizer: Any) -> frozenset[int]:
    """Ids of the tokens whose text holds a newline. Byte-level BPE keeps whitespace runs apart
    from code, so these are newline(+indentation) tokens."""

    def compute(tok: Any) -> frozenset[int]:
        texts = tok.batch_decode([[i] for i in range(len(tok))])
        return frozenset(i for i, t in enumerate(texts) if "\n" in t)

    return _cached(tokenizer, "newline_ids", compute)


def _snap_to_line_end(filler: list[int], target: int, newline_ids: frozenset[int]) -> int | None:
    """Index of the newline token nearest to `target` (the needle goes right before it, so it
    becomes a line of its own), or None if none is close."""
    for delta in range(NEWLINE_SNAP_TOKENS + 1):
        for cand in (target - delta, target + delta):
            if 0 <= cand < len(filler) and filler[cand] in newline_ids:
                return cand
    return None


def _filler_window(filler_ids: Sequence[int], n: int, rng: random.Random) -> list[int]:
    """`n` consecutive filler ids from a random offset (the filler is repeated if too short)."""
    total = len(filler_ids)
    if total == 0:
        raise ValueError("filler text is empty")
    if total < n:
        reps = -(-n // total)
        return [int(t) for t in list(filler_ids) * reps][:n]
    start = rng.randrange(0, total - n + 1)
    window = filler_ids[start : start + n]
    return window.tolist() if hasattr(window, "tolist") else [int(t) for t in window]


def make_needle_example(
    tokenizer: Any,
    filler: str | Sequence[int],
    context_tokens: int,
    depth: float,
    rng: random.Random,
) -> NeedleExample:
    """One needle row of exactly `context_tokens` ids with the definition at `depth` of the filler.

    `filler` is text or already-encoded ids (encode once when making many examples). The needle
    is moved by up to a few tokens to a line end of the filler, so that it is a line of its own,
    as a real definition would be.
    """
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    filler_ids = encode(tokenizer, filler) if isinstance(filler, str) else filler
    key, value = random_key_value(rng)
    definition, query = needle_strings(key, value)
    bos, query_ids = _bos(tokenizer), encode(tokenizer, query)
    needle_ids = encode(tokenizer, definition)
    n_filler = context_tokens - len(bos) - len(needle_ids) - len(query_ids)
    if n_filler < 4:
        raise ValueError(f"context_tokens={context_tokens} is too short for a needle row")
    window = _filler_window(filler_ids, n_filler, rng)
    cut = _snap_to_line_end(window, round(depth * n_filler), newline_ids(tokenizer))
    if cut is None:  # no line end nearby: close the definition's line itself, at the exact depth
        cut = round(depth * n_filler)
        line_ids = encode(tokenizer, definition + "\n")
        extra = len(line_ids) - len(needle_ids)
        needle_ids, window = line_ids, window[: max(0, n_filler - extra)]
        cut = min(cut, len(window))
    input_ids = bos + window[:cut] + needle_ids + window[cut:] + query_ids
    return NeedleExample(
        input_ids=input_ids,
        answer_ids=encode(tokenizer, value),
        answer_text=value,
        key=key,
        depth=depth,
        needle_index=len(bos) + cut,
        needle_length=len(needle_ids),
        query_length=len(query_ids),
    )


def make_needle_batch(
    tokenizer: Any,
    filler: str | Sequence[int],
    context_tokens: int,
    depth: float,
    n: int,
    seed: int,
) -> list[NeedleExample]:
    """`n` examples of one (length, depth) cell; the same seed gives the same examples."""
    filler_ids = encode(tokenizer, filler) if isinstance(filler, str) else filler
    rng = random.Random(f"needle:{seed}:{context_tokens}:{depth!r}")
    return [
        make_needle_example(tokenizer, filler_ids, context_tokens, depth, rng) for _ in range(n)
    ]


def _row_overhead(tokenizer: Any) -> int:
    """Most tokens a needle row spends besides filler, over all keys (so a context length of
    this plus a few tokens always leaves room for filler)."""

    def compute(tok: Any) -> int:
        value = "9" * VALUE_DIGITS
        sizes = (
            len(encode(tok, definition + "\n")) + len(encode(tok, query))
            for a in ADJECTIVES
            for n in NOUNS
            for definition, query in [needle_strings(f"{a}_{n}", value)]
        )
        return len(_bos(tok)) + max(sizes)

    return _cached(tokenizer, "row_overhead", compute)


@dataclass(frozen=True)
class TrainingRow:
    """A packed training row and which of its ids are answer digits (for an extra loss term)."""

    input_ids: list[int]
    answer_mask: list[bool]


def make_training_row(
    tokenizer: Any,
    filler_ids: Sequence[int],
    length: int,
    rng: random.Random,
    min_context: int | None = None,
) -> TrainingRow:
    """A packed training row of exactly `length` ids: needle examples, each followed by its
    answer and <eos>, with random depths and log-uniform context lengths (short rows teach the
    task fast, long ones make it hold at length); leftover room is plain filler."""
    # Short contexts are where retrieval is learned first (measured: a small model learns it in
    # a few hundred steps at 10-20 filler tokens, not at all in 1500 steps at 10-60).
    min_context = max(min_context or 0, _row_overhead(tokenizer) + 8)

    def example(ctx: int, depth: float, rng: random.Random) -> NeedleExample:
        return make_needle_example(tokenizer, filler_ids, ctx, depth, rng)

    return pack_training_row(example, tokenizer, filler_ids, length, rng, min_context, VALUE_DIGITS + 8)


def pack_training_row(
    example: Callable[[int, float, random.Random], Any],
    tokenizer: Any,
    filler_ids: Sequence[int],
    length: int,
    rng: random.Random,
    min_context: int,
    answer_room: int,
) -> TrainingRow:
    """Pack rows `example(context_tokens, depth, rng)` (anything with `input_ids` and
    `answer_ids`), each followed by its answer and <eos>, into exactly `length` ids, at random
    depths and log-uniform context lengths from `min_context`; `answer_room` must hold an answer
    and <eos>. Leftover room is plain filler. Shared by the needle and the other tasks."""
    eos = getattr(tokenizer, "eos_token_id", None)
    tail = [] if eos is None else [int(eos)]
    ids: list[int] = []
    mask: list[bool] = []
    while True:
        room = length - len(ids)
        if room < min_context + answer_room:
            break
        top = room - answer_room
        ctx = min(top, round(math.exp(rng.uniform(math.log(min_context), math.log(top)))))
        ex = example(ctx, rng.random(), rng)
        ids.extend(ex.input_ids + ex.answer_ids + tail)
        mask.extend([False] * len(ex.input_ids) + [True] * len(ex.answer_ids) + [False] * len(tail))
    if len(ids) < length:
        ids.extend(_filler_window(filler_ids, length - len(ids), rng))
        mask.extend([False] * (length - len(mask)))
    return TrainingRow(ids[:length], mask[:length])


def _model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def greedy_continue(model: Any, input_ids: torch.Tensor, max_new_tokens: int, query_tokens: int = 0) -> torch.Tensor:
    """Greedy continuation of equal-length rows with the model's KV cache; returns new ids.

    With `query_tokens`, the context is prefilled first and the last `query_tokens` ids (the
    question) go through the cache in a second forward, as a served request would: a cache
    stage that compresses or evicts after prefill then answers from what it kept, rather
    than from a prefill that still saw everything in full precision.
    Written as a plain forward loop (not `generate`) so that it behaves the same across
    transformers versions and under kvpatch's cache patches.
    """
    kwarg = cache_kwarg(model)
    if 0 < query_tokens < input_ids.shape[1]:
        context = model(input_ids=input_ids[:, :-query_tokens], use_cache=True)
        out = model(input_ids=input_ids[:, -query_tokens:], use_cache=True, **{kwarg: output_cache(context)})
    else:
        out = model(input_ids=input_ids, use_cache=True)
    next_ids = out.logits[:, -1].argmax(dim=-1)
    produced = [next_ids]
    for _ in range(max_new_tokens - 1):
        past = output_cache(out)
        out = model(input_ids=next_ids[:, None], use_cache=True, **{kwarg: past})
        next_ids = out.logits[:, -1].argmax(dim=-1)
        produced.append(next_ids)
    return torch.stack(produced, dim=1)


def leading_digits(text: str) -> str:
    text = text.lstrip(" ")
    end = 0
    while end < len(text) and text[end].isdigit():
        end += 1
    return text[:end]


def is_correct(decoded: str, example: NeedleExample) -> bool:
    """Exact digit match: the continuation must start with the answer and no further digit."""
    return leading_digits(decoded) == example.answer_text


def needle_predictions(
    model: Any,
    tokenizer: Any,
    examples: Sequence[NeedleExample],
    batch_size: int = 8,
    generate: Callable[[Any, torch.Tensor, int, int], torch.Tensor] = greedy_continue,
) -> list[str]:
    """Decoded greedy continuations, one per example (examples of one length batch together)."""
    device = _model_device(model)
    preds: list[str | None] = [None] * len(examples)
    by_len: dict[int, list[int]] = {}
    for i, ex in enumerate(examples):
        by_len.setdefault(ex.context_tokens, []).append(i)
    for idxs in by_len.values():
        for start in range(0, len(idxs), batch_size):
            chunk = idxs[start : start + batch_size]
            ids = torch.tensor([examples[i].input_ids for i in chunk], device=device)
            max_new = max(len(examples[i].answer_ids) for i in chunk) + 2
            query = min(examples[i].query_length for i in chunk)
            new = generate(model, ids, max_new, query).tolist()
            for i, row in zip(chunk, new, strict=True):
                preds[i] = tokenizer.decode(row, skip_special_tokens=True)
    return [p or "" for p in preds]


def needle_accuracy(
    model: Any,
    tokenizer: Any,
    examples: Sequence[NeedleExample],
    batch_size: int = 8,
    generate: Callable[[Any, torch.Tensor, int, int], torch.Tensor] = greedy_continue,
) -> float:
    """Fraction of examples whose greedy answer digits are exactly right."""
    if not examples:
        raise ValueError("no needle examples to score")
    preds = needle_predictions(model, tokenizer, examples, batch_size, generate)
    return sum(is_correct(p, ex) for p, ex in zip(preds, examples, strict=True)) / len(examples)


def needle_grid(
    model: Any,
    tokenizer: Any,
    filler: str | Sequence[int],
    lengths: Iterable[int],
    depths: Iterable[float],
    n_per_cell: int,
    seed: int = 0,
    batch_size: int = 8,
) -> dict[str, dict[str, float]]:
    """Accuracy per context length and depth: {"1024": {"0.05": 0.95, ...}, ...}."""
    filler_ids = encode(tokenizer, filler) if isinstance(filler, str) else filler
    depths = list(depths)
    grid: dict[str, dict[str, float]] = {}
    for length in lengths:
        row = grid.setdefault(str(length), {})
        for depth in depths:
            batch = make_needle_batch(tokenizer, filler_ids, length, depth, n_per_cell, seed)
            row[f"{depth:g}"] = needle_accuracy(model, tokenizer, batch, batch_size)
    return grid
