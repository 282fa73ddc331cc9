"""`Engine`: a model, its tokenizer and a reuse pipeline behind text-in, text-out calls.

    engine = kvpatch.Engine.from_pretrained("kvpatch-ref", config="prefix_reuse")
    engine.warm(system_prompt)
    result = engine.generate(system_prompt + question, max_new_tokens=64)
    result.ttft_ms, result.kv_reuse_ratio

A prompt may be a list of segments (system prompt, documents, question): each segment starts a
new chunk, so a document warmed on its own (`engine.warm(doc)`) is found again wherever it
appears (approximate reuse, with a config whose matcher is `approximate`, e.g. `rag_reuse`).
The tokenizer's leading special tokens (BOS) form a chunk of their own for the same reason.
`generate_batch(prompts)` sends several prompts as one left-padded batch, as a server would;
each row reuses its own prefix and gets its own result.

One Engine may be shared by threads: it runs one request at a time (the others wait).
"""

from __future__ import annotations

import functools
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Concatenate, Literal, ParamSpec, TypeVar

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from .concurrency import RequestLock
from .config import ConfigSource
from .data.needle import newline_ids
from .errors import ConfigError
from .patch import KVPatchCache, PatchHandle, apply
from .patch.reuse_controller import ReuseController

Prompt = str | Sequence[str]
P = ParamSpec("P")
R = TypeVar("R")


def _one_request_at_a_time(method: Callable[Concatenate[Engine, P], R]) -> Callable[Concatenate[Engine, P], R]:
    """Run an Engine method under the Engine's request lock (other threads wait)."""

    @functools.wraps(method)
    def locked(engine: Engine, *args: P.args, **kwargs: P.kwargs) -> R:
        with engine._lock.held(method.__name__):
            return method(engine, *args, **kwargs)

    return locked


@dataclass
class GenerationResult:
    output_text: str
    tokens: list[int]
    prompt_tokens: int
    ttft_ms: float
    total_ms: float
    kv_reuse_ratio: float
    approximate_ratio: float
    recomputed_tokens: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class WarmResult:
    tokens: int
    chunks_written: int
    ms: float


@dataclass
class PromptCheck:
    prompt_tokens: int
    kv_reuse_ratio: float
    token_agreement: float
    first_logit_cosine: float
    first_kl: float


@dataclass
class CorrectnessReport:
    """Reuse against no reuse on the same prompts (greedy)."""

    prompts: list[PromptCheck]

    @property
    def token_agreement(self) -> float:
        return min((p.token_agreement for p in self.prompts), default=1.0)

    @property
    def min_logit_cosine(self) -> float:
        return min((p.first_logit_cosine for p in self.prompts), default=1.0)

    @property
    def max_kl(self) -> float:
        return max((p.first_kl for p in self.prompts), default=0.0)

    @property
    def identical(self) -> bool:
        return self.token_agreement == 1.0

    def to_dict(self) -> dict[str, Any]:
        return {"token_agreement": self.token_agreement, "min_logit_cosine": self.min_logit_cosine,
                "max_kl": self.max_kl, "prompts": [asdict(p) for p in self.prompts]}


def _stop_ids(eos: int | Sequence[int] | None) -> set[int]:
    return set() if eos is None else {eos} if isinstance(eos, int) else set(eos)


def _until_stop(tokens: list[int], stop: set[int]) -> list[int]:
    """A row's new tokens up to and including its first stop token (a batch pads rows that
    stopped early until the longest one ends)."""
    ends = [i for i, token in enumerate(tokens) if token in stop]
    return tokens[: ends[0] + 1] if ends else tokens


class _FirstTokenClock:
    """A generate streamer that notes when the first new token exists (TTFT)."""

    def __init__(self, start: float) -> None:
        self.start, self.first_token_at, self._calls = start, None, 0

    def put(self, value: torch.Tensor) -> None:
        self._calls += 1
        if self._calls == 2 and self.first_token_at is None:
            value.tolist()  # waits for the device
            self.first_token_at = time.perf_counter()

    def end(self) -> None:
        pass


class _StopWhenSet(StoppingCriteria):
    """Ends a `generate` at the next token once `event` is set (a stream closed early)."""

    def __init__(self, event: threading.Event) -> None:
        self.event = event

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


class Engine:
    """Text generation over a kvpatch-patched model with chunk reuse across calls.

    Requests are serialised: the reuse controller keeps one request's segment starts and plan
    between tokenizing and prefill, so concurrent requests would mix them up.
    """

    def __init__(self, model: torch.nn.Module, tokenizer: Any, config: ConfigSource = "prefix_reuse") -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.handle: PatchHandle = apply(model, config)
        if self.handle.reuse is None:
            raise ConfigError(f"config {self.handle.config.name!r} has no chunk reuse stages (chunker, matcher, store)")
        self.reuse: ReuseController = self.handle.reuse
        add_boundary_tokens = getattr(self.reuse.chunker, "add_boundary_tokens", None)  # optional for a chunker
        if add_boundary_tokens is not None:
            add_boundary_tokens(set(newline_ids(tokenizer)))
        self._lock = RequestLock("Engine")

    @classmethod
    def from_pretrained(cls, path_or_model: str | torch.nn.Module, config: ConfigSource = "prefix_reuse",
                        device: str | None = None, dtype: torch.dtype | None = None, tokenizer: Any = None) -> Engine:
        """From a shipped model name ("kvpatch-ref"), a local model directory, or a loaded model
        (then pass its `tokenizer`)."""
        if isinstance(path_or_model, torch.nn.Module):
            if tokenizer is None:
                raise ConfigError("Engine.from_pretrained(model): pass tokenizer= along with a loaded model")
            model = path_or_model
            if device is not None or dtype is not None:
                model = model.to(device=device, dtype=dtype)
            return cls(model.eval(), tokenizer, config)
        from .models import load

        model, loaded_tokenizer = load(path_or_model, device=device, dtype=dtype)
        return cls(model, tokenizer or loaded_tokenizer, config)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # -- requests ---------------------------------------------------------------------------------
    @_one_request_at_a_time
    def prepare(self, prompt: Prompt) -> torch.Tensor:
        """Token ids of `prompt` on the model's device, with the reuse controller told where the
        segments start and given the host copy of the ids (no device-to-host copy to hash them).
        The next forward of the model consumes that state: run it before another request."""
        return self._prepare(prompt)

    def _prepare(self, prompt: Prompt) -> torch.Tensor:
        ids, starts = self.encode(prompt)
        self.reuse.set_segment_starts(starts)
        self.reuse.set_host_ids(ids)
        return ids.to(self.device)

    def _prepare_batch(self, prompts: Sequence[Prompt]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids `[B, L]` of several prompts, left-padded to the longest, and their attention
        mask, on the model's device (the reuse controller told each row's segment starts)."""
        if not prompts:
            raise ValueError("no prompts: pass a non-empty list of prompts")
        encoded = [self.encode(prompt) for prompt in prompts]
        length = max(ids.shape[1] for ids, _ in encoded)
        ids = torch.full((len(encoded), length), self._pad_id(), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, (row_ids, _) in enumerate(encoded):
            ids[row, length - row_ids.shape[1]:] = row_ids[0]
            mask[row, length - row_ids.shape[1]:] = 1
        self.reuse.set_segment_starts([starts for _, starts in encoded])
        self.reuse.set_host_ids(ids)
        return ids.to(self.device), mask.to(self.device)

    def _pad_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return int(pad if pad is not None else self.tokenizer.eos_token_id)

    def encode(self, prompt: Prompt) -> tuple[torch.Tensor, list[int]]:
        """Token ids `[1, L]` (on the CPU) of a prompt and where its segments start.

        Each segment is tokenized alone, without special tokens; the tokenizer's leading special
        tokens (BOS) come first, as a segment of their own, so that a segment's chunks are the same
        whether it opens a prompt or follows other text (the same tokens, hashed alike)."""
        segments = [prompt] if isinstance(prompt, str) else list(prompt)
        if not segments:
            raise ValueError("prompt is empty: pass a string or a non-empty list of segments")
        pieces = [self.tokenizer(segment, add_special_tokens=False).input_ids for segment in segments]
        ids = self._leading_special_tokens(segments[0], pieces[0])
        if ids is None:  # the special tokens are not a plain prefix: keep the tokenizer's own first segment
            ids, pieces[0] = self.tokenizer(segments[0]).input_ids, []
        starts = []
        for piece in pieces:
            starts.append(len(ids))
            ids = ids + piece
        if not ids:
            raise ValueError("prompt tokenizes to no tokens")
        return torch.tensor([ids]), starts

    def _leading_special_tokens(self, text: str, plain: list[int]) -> list[int] | None:
        """What the tokenizer puts before `text`'s own tokens (`plain`) when it adds special
        tokens (`[bos]`, often none), or None if it changes them otherwise (e.g. appends EOS)."""
        full = self.tokenizer(text).input_ids
        extra = len(full) - len(plain)
        return list(full[:extra]) if extra >= 0 and list(full[extra:]) == list(plain) else None

    @_one_request_at_a_time
    def warm(self, text: Prompt) -> WarmResult:
        """Compute and store the chunks of `text` (already stored chunks are reused). A document
        warmed alone is reusable as a segment of any later prompt (with an approximate matcher)."""
        return self._warm(text)

    def _warm(self, text: Prompt) -> WarmResult:
        start = time.perf_counter()
        ids = self._prepare(text)
        with torch.no_grad():
            self.model(input_ids=ids, logits_to_keep=1)
        self.reuse.writer.flush()
        return WarmResult(ids.shape[1], self.reuse.last.written_chunks, (time.perf_counter() - start) * 1e3)

    @_one_request_at_a_time
    def generate(self, prompt: Prompt, max_new_tokens: int = 64, **gen_kwargs: Any) -> GenerationResult:
        """Greedy by default; any `generate` keyword (do_sample, temperature, ...) passes through."""
        start = time.perf_counter()
        ids = self._prepare(prompt)
        return self._generate(ids, torch.ones_like(ids), start, max_new_tokens, gen_kwargs)[0]

    @_one_request_at_a_time
    def generate_batch(self, prompts: Sequence[Prompt], max_new_tokens: int = 64,
                       **gen_kwargs: Any) -> list[GenerationResult]:
        """Several prompts (each a string or a list of segments) in one left-padded batch, as a
        server batches requests; one result per prompt, with that row's own reuse figures (rows
        reuse different amounts; docs/reuse.md#batches). TTFT and total time are the batch's."""
        start = time.perf_counter()
        ids, mask = self._prepare_batch(prompts)
        return self._generate(ids, mask, start, max_new_tokens, gen_kwargs)

    def _generate(self, ids: torch.Tensor, mask: torch.Tensor, start: float, max_new_tokens: int,
                  gen_kwargs: dict[str, Any]) -> list[GenerationResult]:
        gen_kwargs.setdefault("do_sample", False)
        clock = _FirstTokenClock(start)
        with torch.no_grad():
            out = self.model.generate(ids, attention_mask=mask, max_new_tokens=max_new_tokens, streamer=clock,
                                      pad_token_id=self._pad_id(), **gen_kwargs)
        total = (time.perf_counter() - start) * 1e3
        self.reuse.writer.flush()  # the new chunks are in the store before the next request
        first = clock.first_token_at
        ttft = (first - start) * 1e3 if first is not None else total
        stop = _stop_ids(gen_kwargs.get("eos_token_id", self.model.generation_config.eos_token_id))
        results = []
        for row, stats in zip(out[:, ids.shape[1]:].tolist(), self.reuse.last.rows):
            tokens = _until_stop(row, stop)
            results.append(GenerationResult(
                output_text=self.tokenizer.decode(tokens, skip_special_tokens=True), tokens=tokens,
                prompt_tokens=stats.prompt_tokens, ttft_ms=ttft, total_ms=total,
                kv_reuse_ratio=stats.kv_reuse_ratio, approximate_ratio=stats.approximate_ratio,
                recomputed_tokens=stats.recomputed_tokens))
        return results

    def stream(self, prompt: Prompt, max_new_tokens: int = 64, **gen_kwargs: Any) -> Iterator[str]:
        """Yield the output text piece by piece as it is generated.

        The Engine is held from the first `next()` until the generator is exhausted or closed
        (closing it early stops the generation at the next token); other threads wait meanwhile,
        and the same thread's other Engine calls are refused until then."""
        from transformers import TextIteratorStreamer

        with self._lock.held("stream"):
            ids = self._prepare(prompt)
            streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
            gen_kwargs.setdefault("do_sample", False)
            closed = threading.Event()
            stopping = StoppingCriteriaList(gen_kwargs.pop("stopping_criteria", None) or [])
            stopping.append(_StopWhenSet(closed))
            errors: list[BaseException] = []

            def run() -> None:
                try:
                    with torch.no_grad():
                        self.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                            streamer=streamer, stopping_criteria=stopping, **gen_kwargs)
                except BaseException as err:  # noqa: BLE001  (re-raised in the caller's thread)
                    errors.append(err)
                    streamer.end()

            worker = threading.Thread(target=run, daemon=True)
            worker.start()
            try:
                yield from streamer
            finally:
                closed.set()
                worker.join()
            self.reuse.writer.flush()  # the new chunks are in the store before the next request
            if errors:
                raise errors[0]

    @_one_request_at_a_time
    def verify_correctness(self, prompts: Sequence[Prompt], max_new_tokens: int = 32,
                           warm: bool = True) -> CorrectnessReport:
        """Each prompt with reuse against no reuse: greedy token agreement and the first step's
        logit cosine and KL(no reuse || reuse). With `warm` each prompt is warmed first (so it
        hits); without, it reuses what the store already holds (e.g. documents warmed alone)."""
        checks = []
        for prompt in prompts:
            if warm:
                self._warm(prompt)
            with self.reuse.paused():
                reference = self._greedy(self._prepare(prompt), max_new_tokens)
            ids = self._prepare(prompt)
            reused = self._greedy(ids, max_new_tokens)
            ratio = self.reuse.last.kv_reuse_ratio
            ref_tokens, new_tokens = reference[0], reused[0]
            same = sum(a == b for a, b in zip(ref_tokens, new_tokens))
            p, q = reference[1].float(), reused[1].float()
            cosine = torch.nn.functional.cosine_similarity(p, q, dim=-1).item()
            kl = torch.nn.functional.kl_div(q.log_softmax(-1), p.log_softmax(-1), log_target=True, reduction="sum").item()
            checks.append(PromptCheck(ids.shape[1], ratio, same / max(len(ref_tokens), 1), cosine, max(kl, 0.0)))
        return CorrectnessReport(checks)

    def _greedy(self, ids: torch.Tensor, max_new_tokens: int) -> tuple[list[int], torch.Tensor]:
        with torch.no_grad():
            out = self.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                      do_sample=False, output_logits=True, return_dict_in_generate=True,
                                      pad_token_id=self.tokenizer.eos_token_id)
        return out.sequences[0, ids.shape[1]:].tolist(), out.logits[0][0]

    # -- persistence ------------------------------------------------------------------------------
    @_one_request_at_a_time
    def export_snapshot(self, path: str | os.PathLike[str], kind: Literal["chunk_store", "request"] = "chunk_store") -> Path:
        """Write every stored chunk (default) or the last request's cache (`kind="request"`) to a
        verified safetensors snapshot, atomically (docs/snapshot-format.md); returns its path."""
        from .snapshot import export_store

        self.reuse.writer.flush()
        if kind == "request":
            return self.handle.export_snapshot(path, tokenizer=self.tokenizer)
        return export_store(path, self.reuse.store, self.model, self.handle.config, tokenizer=self.tokenizer)

    @_one_request_at_a_time
    def import_snapshot(self, path: str | os.PathLike[str]) -> int | KVPatchCache:
        """Load a snapshot after checking it fits this model, config and tokenizer: a chunk-store
        snapshot fills the store (returns how many chunks), a request snapshot returns a cache to
        continue from (pass it as `cache=` to generate)."""
        from .snapshot import import_store, read_metadata

        if read_metadata(path).kind == "request":
            return self.handle.import_snapshot(path, tokenizer=self.tokenizer)
        return import_store(path, self.reuse.store, self.model, self.handle.config, tokenizer=self.tokenizer)

    @_one_request_at_a_time
    def stats(self) -> dict[str, Any]:
        return {"last_request": self.reuse.last.to_dict(), **self.handle.stats()}
