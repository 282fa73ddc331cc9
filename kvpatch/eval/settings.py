"""How much work one evaluation does (`EvalSettings`), shared by the battery and the harness."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ..data.tasks import TASKS

#: The protocol's depths: both ends of the context and evenly between (issue 17).
PROTOCOL_DEPTHS = (0.05, 0.275, 0.5, 0.725, 0.95)
#: The protocol's lengths: the model's trained context divided by these.
PROTOCOL_DIVISORS = (8, 4, 2, 1)
#: Shorter rows leave the tasks' four definitions and query too little filler to hide in.
PROTOCOL_MIN_LENGTH = 256


@dataclass(frozen=True)
class EvalSettings:
    """How much work one evaluation does; `quick()` for tests and CI, `full()` for reports,
    `protocol(max_context)` for a long-context claim."""

    ppl_window: int = 1024
    ppl_stride: int = 512
    ppl_max_tokens: int | None = None  # None: the whole held-out text
    #: Scored tokens go through the cache this many at a time (see `sliding_window_nll`);
    #: None scores each window with one forward.
    ppl_chunk: int | None = 64
    needle_lengths: tuple[int, ...] = (256, 512, 1024, 2048)
    needle_depths: tuple[float, ...] = (0.05, 0.25, 0.5, 0.75, 0.95)
    needle_per_cell: int = 20
    #: Further tasks scored on the needle's lengths and depths (`kvpatch.data.tasks.TASKS`).
    tasks: tuple[str, ...] = ()
    decode_prompt_tokens: int = 512
    decode_steps: int = 64
    #: Perplexity windows and needle rows of one length go through the model together, as many
    #: as fit this many tokens (equal lengths per batch: no padding, same numbers as one by one).
    batch_tokens: int = 16384
    #: The attention backend of the noise-floor run (unpatched, like the reference); None:
    #: "eager", or "sdpa" when the model already runs eager.
    floor_backend: str | None = None
    seed: int = 0
    progress: bool = True

    @classmethod
    def quick(cls) -> "EvalSettings":
        """Seconds on a small CPU with the reference model: enough to catch a broken cache."""
        return cls(
            ppl_window=512,
            ppl_stride=256,
            ppl_max_tokens=1536,
            ppl_chunk=32,
            needle_lengths=(512,),
            needle_depths=(0.25, 0.75),
            needle_per_cell=4,
            decode_prompt_tokens=384,
            decode_steps=16,
        )

    @classmethod
    def full(cls) -> "EvalSettings":
        """The reference model's training-report protocol (needle grid, 1024-token windows)."""
        return cls()

    @classmethod
    def protocol(cls, max_context: int, per_cell: int = 10, lengths: Sequence[int] | None = None) -> "EvalSettings":
        """The long-context protocol (docs/long-context.md): the needle and every task of
        `kvpatch.data.tasks` at 1/8, 1/4, 1/2 and all of the model's trained context
        `max_context` (those of at least 256 tokens, or the given `lengths`), depths 0.05-0.95, perplexity in full-context
        windows (stride half of one) and the decode check right before the end of the context,
        so that nothing a lossy cache does at full length is left out."""
        if max_context < PROTOCOL_MIN_LENGTH:
            raise ValueError(f"max_context must be at least {PROTOCOL_MIN_LENGTH} tokens, got {max_context}")
        if per_cell < 1:
            raise ValueError(f"per_cell must be at least 1, got {per_cell}")
        derived = (n for n in (max_context // d for d in PROTOCOL_DIVISORS) if n >= PROTOCOL_MIN_LENGTH)
        chosen = tuple(lengths) if lengths else tuple(derived)
        if any(n < PROTOCOL_MIN_LENGTH for n in chosen):
            raise ValueError(f"protocol lengths must be at least {PROTOCOL_MIN_LENGTH} tokens, got {list(chosen)}")
        decode_steps = 64
        return cls(
            ppl_window=max_context,
            ppl_stride=max_context // 2,
            ppl_max_tokens=4 * max_context,
            ppl_chunk=64,
            needle_lengths=chosen,
            needle_depths=PROTOCOL_DEPTHS,
            needle_per_cell=per_cell,
            tasks=TASKS,
            decode_prompt_tokens=max_context - decode_steps,
            decode_steps=decode_steps,
        )

    def rows_per_batch(self, length: int) -> int:
        """Rows of `length` tokens that fit one batch of `batch_tokens`."""
        return max(1, self.batch_tokens // length)
