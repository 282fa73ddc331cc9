"""The battery the harness runs on one side (unpatched, patched, or the noise-floor backend):
batched sliding-window perplexity, batched needle retrieval (and the protocol's other tasks,
`kvpatch.data.tasks`), and a teacher-forced decode with
per-layer attention outputs. Everything here measures the model as it is now; comparing two
sides is `harness.compare`'s job.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..compat import cache_kwarg, output_cache
from ..data.needle import is_correct, make_needle_batch, needle_predictions
from ..data.tasks import is_task_correct, make_task_batch
from .settings import EvalSettings
from .metrics import last_logits_only, perplexity_from_nll, sliding_window_nll, window_spans

#: (resident, offloaded) K/V bytes of the cache a side's decode ended with.
KVBytes = Callable[[Any], tuple[int, int]]


@dataclass
class SideResult:
    """Everything measured on one side."""

    perplexity: float
    needle: dict[str, dict[str, float]]  # {} when the side skipped the needle grid
    tasks: dict[str, dict[str, dict[str, float]]]  # the same grid per further task ({} when none)
    logits: torch.Tensor  # [steps, vocab], float32 on CPU
    attention: list[torch.Tensor] | None  # per layer [steps, hidden]; None when not captured
    kv_bytes_resident: int
    kv_bytes_offloaded: int

    @property
    def needle_mean(self) -> float:
        cells = [acc for row in self.needle.values() for acc in row.values()]
        return sum(cells) / len(cells) if cells else float("nan")


# -- attention capture ----------------------------------------------------------------------------


def attention_modules(model: torch.nn.Module) -> tuple[list[torch.nn.Module] | None, str | None]:
    """The decoder layers' `self_attn` modules, or (None, why not) for layouts we do not know."""
    layers = getattr(model.base_model, "layers", None)
    if layers is None:
        return None, f"{type(model.base_model).__name__} has no `layers` attribute"
    modules = [getattr(layer, "self_attn", None) for layer in layers]
    if not modules or any(m is None for m in modules):
        return None, "not every decoder layer has a `self_attn` module"
    return modules, None


class AttentionRecorder:
    """Forward hooks that keep each attention module's output while `recording` is on (decode
    steps only: the prefill's outputs differ in length from step to step and are covered by
    perplexity)."""

    def __init__(self, modules: list[torch.nn.Module]) -> None:
        self.recording = False
        self.outputs: list[list[torch.Tensor]] = [[] for _ in modules]
        self._hooks = [m.register_forward_hook(self._hook(i)) for i, m in enumerate(modules)]

    def _hook(self, index: int) -> Callable[..., None]:
        def keep(module: torch.nn.Module, args: Any, output: Any) -> None:
            if self.recording:
                tensor = output[0] if isinstance(output, tuple) else output
                self.outputs[index].append(tensor[:, -1].detach().float().cpu().flatten())

        return keep

    def stacked(self) -> list[torch.Tensor]:
        return [torch.stack(steps) for steps in self.outputs]

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()


# -- the parts of the battery ---------------------------------------------------------------------


@torch.no_grad()
def teacher_forced_decode(
    model: torch.nn.Module, prompt: torch.Tensor, continuation: torch.Tensor, recorder: AttentionRecorder | None,
    on_step: Callable[[int], None] | None = None,
) -> tuple[torch.Tensor, Any]:
    """Logits of each decode step (one token at a time through the cache, fed the given
    continuation rather than the model's own picks, so both sides see identical inputs).
    Returns ([steps, vocab] logits, the final cache)."""
    kwarg = cache_kwarg(model)
    out = model(input_ids=prompt[None], use_cache=True, **last_logits_only(model))
    cache = output_cache(out)
    steps = [out.logits[0, -1].float().cpu()]
    if recorder is not None:
        recorder.recording = True
    try:
        for token in continuation[:-1]:
            out = model(input_ids=token.view(1, 1), use_cache=True, **{kwarg: cache})
            cache = output_cache(out)
            steps.append(out.logits[0, -1].float().cpu())
            if on_step is not None:
                on_step(1)
    finally:
        if recorder is not None:
            recorder.recording = False
    return torch.stack(steps), cache


#: (make a cell's rows, score one) per task: the needle's own, or a `kvpatch.data.tasks` task.
RowTools = tuple[Callable[[Any, Sequence[int], int, float, int, int], list[Any]], Callable[[str, Any], bool]]


def _row_tools(task: str) -> RowTools:
    if task == "needle":
        return make_needle_batch, is_correct

    def make(tokenizer: Any, filler_ids: Sequence[int], length: int, depth: float, n: int, seed: int) -> list[Any]:
        return make_task_batch(task, tokenizer, filler_ids, length, depth, n, seed)

    return make, is_task_correct


def task_grid_batched(
    model: torch.nn.Module, tokenizer: Any, filler_ids: Sequence[int], settings: EvalSettings,
    on_rows: Callable[[int], None] | None = None, task: str = "needle",
) -> dict[str, dict[str, float]]:
    """Accuracy of `task` ("needle" or one of `kvpatch.data.tasks.TASKS`) per context length and
    depth, {"1024": {"0.05": 0.95, ...}}: every depth of one length goes through the model
    together, `settings.rows_per_batch(length)` rows at a time (rows of one length have equal
    token counts, so no padding)."""
    make, correct = _row_tools(task)
    grid: dict[str, dict[str, float]] = {}
    for length in settings.needle_lengths:
        cells = [make(tokenizer, filler_ids, length, d, settings.needle_per_cell, settings.seed)
                 for d in settings.needle_depths]
        examples = [ex for cell in cells for ex in cell]
        predictions = needle_predictions(model, tokenizer, examples, settings.rows_per_batch(length))
        row, start = grid.setdefault(str(length), {}), 0
        for depth, cell in zip(settings.needle_depths, cells, strict=True):
            answers = predictions[start : start + len(cell)]
            row[f"{depth:g}"] = sum(correct(p, ex) for p, ex in zip(answers, cell, strict=True)) / len(cell)
            start += len(cell)
        if on_rows is not None:
            on_rows(len(examples))
    return grid


def decode_ids(ids: torch.Tensor, settings: EvalSettings) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompt and continuation from the start of the text (the same for every side)."""
    need = settings.decode_prompt_tokens + settings.decode_steps
    if ids.numel() < need:
        raise ValueError(f"evaluation text has {ids.numel()} tokens; decoding needs {need}")
    return ids[: settings.decode_prompt_tokens], ids[settings.decode_prompt_tokens : need]


def battery_units(settings: EvalSettings, ppl_tokens: int, needle: bool) -> int:
    """Progress units of one side: perplexity windows, needle rows and decode steps."""
    windows = sum(1 for _ in window_spans(ppl_tokens, settings.ppl_window, settings.ppl_stride))
    grids = 1 + len(settings.tasks) if needle else 0
    rows = grids * len(settings.needle_lengths) * len(settings.needle_depths) * settings.needle_per_cell
    return windows + rows + settings.decode_steps - 1


def measure_side(
    model: torch.nn.Module, tokenizer: Any, ppl_ids: torch.Tensor, ids: torch.Tensor, settings: EvalSettings,
    kv_bytes: KVBytes, progress: Callable[[int], None], needle: bool = True,
) -> SideResult:
    """Run the battery on `model` as it is now (patched or not); `progress(n)` after each part.
    `needle=False` skips the needle and task grids (the noise-floor side: its bounds do not use them)."""
    device = next(model.parameters()).device
    nll, count = sliding_window_nll(model, ppl_ids, settings.ppl_window, settings.ppl_stride, progress,
                                    chunk=settings.ppl_chunk, batch_rows=settings.rows_per_batch(settings.ppl_window))
    filler = ids.tolist()
    grid = task_grid_batched(model, tokenizer, filler, settings, progress) if needle else {}
    tasks = {task: task_grid_batched(model, tokenizer, filler, settings, progress, task)
             for task in (settings.tasks if needle else ())}
    prompt, continuation = (t.to(device) for t in decode_ids(ids, settings))
    modules, _ = attention_modules(model)
    recorder = AttentionRecorder(modules) if modules is not None else None
    try:
        logits, cache = teacher_forced_decode(model, prompt, continuation, recorder, progress)
    finally:
        if recorder is not None:
            recorder.remove()
    attention = recorder.stacked() if recorder is not None else None
    resident, offloaded = kv_bytes(cache)
    return SideResult(perplexity_from_nll(nll, count), grid, tasks, logits, attention, resident, offloaded)
