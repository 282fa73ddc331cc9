"""Long-context retrieval tasks in the spirit of RULER, beyond the single needle: synthetic,
generated offline over real-code filler, seeded, at exact token lengths.

- `multikey`: `MULTIKEY_KEYS` definitions `key = value` at spread depths, the distractor keys
  sharing a word with the queried one half the time; the query asks one (its depth is the row's).
- `multivalue`: one key collects `MULTIVALUE_VALUES` values (`key.append(value)` lines, one at
  the row's depth, the others spread); the answer lists all of them and scores only if complete.
- `vartrack`: a chain `k0 = 48213`, `k1 = k0`, ... `kN = kN-1` of `VARTRACK_HOPS` hops and a
  distractor chain of as many hops with its own value (without it, "copy the only number
  assigned in the row" would answer every row: measured, the single-needle reference model
  scored 1.00 so); the asked value's definition sits at the row's depth, every other statement
  at a random depth in random text order (forward references included, so no end of the
  context is easy); the query asks `kN`.

Every row ends with a query the model completes, as `needle.py`'s rows do, and is scored by
`is_task_correct` on the greedy continuation's digits. `make_task_training_row` packs rows of a
task into training rows (the same `TrainingRow` as the needle's).
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from .needle import (
    ADJECTIVES,
    NOUNS,
    VALUE_DIGITS,
    TrainingRow,
    _bos,
    _cached,
    encode,
    leading_digits,
    needle_strings,
    pack_training_row,
)
from .planting import plant

TASKS = ("multikey", "multivalue", "vartrack")
MULTIKEY_KEYS = 4  # the queried key and three distractors
MULTIVALUE_VALUES = 3
VARTRACK_HOPS = 3  # assignments after the value's own definition
_SPREAD = (0.02, 0.98)  # where the other snippets of a row may land (relative depth)


@dataclass(frozen=True)
class TaskExample:
    """One task row. `input_ids` has exactly `context_tokens` ids and ends with the query; the
    right continuation is `answer_text` (`answers` are the values it must hold, in order)."""

    task: str
    input_ids: list[int]
    answer_ids: list[int]
    answer_text: str
    answers: tuple[str, ...]
    depth: float  # requested depth of the snippet the row is placed by
    positions: tuple[int, ...]  # first token of every planted snippet; [0] is the one at `depth`
    query_length: int

    @property
    def context_tokens(self) -> int:
        return len(self.input_ids)

    @property
    def actual_depth(self) -> float:
        """Where the snippet at `depth` landed, as a fraction of the input length."""
        return self.positions[0] / len(self.input_ids)


def _value(rng: random.Random) -> str:
    return str(rng.randrange(10 ** (VALUE_DIGITS - 1), 10**VALUE_DIGITS))


def _distinct_keys(rng: random.Random, n: int, related: bool = False) -> list[str]:
    """`n` different adjective_noun keys; with `related`, each after the first shares its
    adjective or its noun with the first half the time (a near-miss distractor)."""
    first = (rng.choice(ADJECTIVES), rng.choice(NOUNS))
    keys = {f"{first[0]}_{first[1]}"}
    out = [f"{first[0]}_{first[1]}"]
    while len(out) < n:
        adj, noun = rng.choice(ADJECTIVES), rng.choice(NOUNS)
        if related and rng.random() < 0.5:
            adj, noun = (first[0], noun) if rng.random() < 0.5 else (adj, first[1])
        key = f"{adj}_{noun}"
        if key not in keys:
            keys.add(key)
            out.append(key)
    return out


def _spread(rng: random.Random, n: int) -> list[float]:
    return [rng.uniform(*_SPREAD) for _ in range(n)]


#: A task's row content: (snippets, depths, query, answers, answer text); snippet 0 goes at `depth`.
Content = tuple[list[str], list[float], str, tuple[str, ...], str]


def _multikey(depth: float, rng: random.Random) -> Content:
    keys = _distinct_keys(rng, MULTIKEY_KEYS, related=True)
    values = [_value(rng) for _ in keys]
    snippets = [needle_strings(k, v)[0] for k, v in zip(keys, values, strict=True)]
    return snippets, [depth, *_spread(rng, len(keys) - 1)], needle_strings(keys[0], values[0])[1], (values[0],), values[0]


def _multivalue(depth: float, rng: random.Random) -> Content:
    key = _distinct_keys(rng, 1)[0]
    values = [_value(rng) for _ in range(MULTIVALUE_VALUES)]
    depths = [depth, *_spread(rng, len(values) - 1)]
    in_text_order = tuple(v for _, v in sorted(zip(depths, values, strict=True)))
    snippets = [f"\n{key}.append({v})" for v in values]
    query = f"\n# what did {key} collect?\n{key} == ["
    return snippets, depths, query, in_text_order, ", ".join(in_text_order) + "]"


def _chain(keys: list[str], value: str) -> list[str]:
    """`keys[0] = value`, then each key assigned the one before it."""
    return [f"\n{keys[0]} = {value}"] + [f"\n{b} = {a}" for a, b in zip(keys, keys[1:])]


def _vartrack(depth: float, rng: random.Random) -> Content:
    keys = _distinct_keys(rng, 2 * (VARTRACK_HOPS + 1))
    value, other = _value(rng), _value(rng)
    asked, distractor = keys[: VARTRACK_HOPS + 1], keys[VARTRACK_HOPS + 1 :]
    snippets = _chain(asked, value) + _chain(distractor, other)
    depths = [depth, *_spread(rng, len(snippets) - 1)]
    return snippets, depths, needle_strings(asked[-1], value)[1], (value,), value


_CONTENT: dict[str, Callable[[float, random.Random], Content]] = {
    "multikey": _multikey, "multivalue": _multivalue, "vartrack": _vartrack,
}


def _content_maker(task: str) -> Callable[[float, random.Random], Content]:
    if task not in _CONTENT:
        raise ValueError(f"unknown task {task!r}: expected one of {', '.join(TASKS)}")
    return _CONTENT[task]


def make_task_example(
    task: str, tokenizer: Any, filler: str | Sequence[int], context_tokens: int, depth: float, rng: random.Random,
) -> TaskExample:
    """One `task` row of exactly `context_tokens` ids, its placing snippet at `depth` of the filler."""
    make = _content_maker(task)
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    filler_ids = encode(tokenizer, filler) if isinstance(filler, str) else filler
    snippets, depths, query, answers, answer_text = make(depth, rng)
    row = plant(tokenizer, filler_ids, context_tokens, snippets, depths, query, rng)
    return TaskExample(task, row.input_ids, encode(tokenizer, answer_text), answer_text, answers, depth,
                       row.positions, row.query_length)


def make_task_batch(
    task: str, tokenizer: Any, filler: str | Sequence[int], context_tokens: int, depth: float, n: int, seed: int,
) -> list[TaskExample]:
    """`n` rows of one (task, length, depth) cell; the same seed gives the same rows."""
    filler_ids = encode(tokenizer, filler) if isinstance(filler, str) else filler
    rng = random.Random(f"{task}:{seed}:{context_tokens}:{depth!r}")
    return [make_task_example(task, tokenizer, filler_ids, context_tokens, depth, rng) for _ in range(n)]


_NUMBER = re.compile(r"\d+")


def is_task_correct(decoded: str, example: TaskExample) -> bool:
    """Whether a greedy continuation answers `example`. One answer: the leading digits are exactly
    it (as `needle.is_correct`). Several (`multivalue`): the numbers before the first character
    that is neither a digit, a comma nor a space are exactly the answers, in any order, all of them."""
    if len(example.answers) == 1:
        return leading_digits(decoded) == example.answers[0]
    head = re.match(r"[\d, ]*", decoded.lstrip(" ")).group(0)  # type: ignore[union-attr]
    return sorted(_NUMBER.findall(head)) == sorted(example.answers)


def task_overhead(task: str, tokenizer: Any) -> tuple[int, int]:
    """Upper bounds on the tokens a `task` row spends besides filler and on its answer + <eos>
    (the longest key in every slot, a newline added to every snippet), so longer rows always fit."""

    def compute(tok: Any) -> tuple[int, int]:
        longest = max((f"{a}_{n}" for a in ADJECTIVES for n in NOUNS), key=lambda k: len(encode(tok, k)))
        snippets, _, query, _, answer = _content_maker(task)(0.5, random.Random(0))
        spent = len(_bos(tok)) + 4 * len(snippets)  # + plant()'s least filler
        for text in [*snippets, query]:
            spent += len(encode(tok, re.sub(r"[a-z]+_[a-z]+", longest, text) + "\n")) + 2
        return spent, len(encode(tok, answer)) + 8

    return _cached(tokenizer, f"overhead:{task}", compute)


def make_task_training_row(task: str, tokenizer: Any, filler_ids: Sequence[int], length: int,
                           rng: random.Random) -> TrainingRow:
    """A packed training row of exactly `length` ids: `task` rows, each followed by its answer and
    <eos>, at random depths and log-uniform context lengths (packed as `needle.make_training_row`
    packs needles); leftover room is plain filler; `answer_mask` marks the answer ids."""
    min_context, answer_room = task_overhead(task, tokenizer)

    def example(ctx: int, depth: float, rng: random.Random) -> TaskExample:
        return make_task_example(task, tokenizer, filler_ids, ctx, depth, rng)

    return pack_training_row(example, tokenizer, filler_ids, length, rng, min_context + 8, answer_room)
