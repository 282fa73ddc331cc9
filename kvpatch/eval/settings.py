"""How much work one evaluation does (`EvalSettings`), shared by the battery and the harness."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EvalSettings:
    """How much work one evaluation does; `quick()` for tests and CI, `full()` for reports."""

    ppl_window: int = 1024
    ppl_stride: int = 512
    ppl_max_tokens: int | None = None  # None: the whole held-out text
    #: Scored tokens go through the cache this many at a time (see `sliding_window_nll`);
    #: None scores each window with one forward.
    ppl_chunk: int | None = 64
    needle_lengths: tuple[int, ...] = (256, 512, 1024, 2048)
    needle_depths: tuple[float, ...] = (0.05, 0.25, 0.5, 0.75, 0.95)
    needle_per_cell: int = 20
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

    def rows_per_batch(self, length: int) -> int:
        """Rows of `length` tokens that fit one batch of `batch_tokens`."""
        return max(1, self.batch_tokens // length)
