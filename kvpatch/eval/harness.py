"""The fidelity harness: one config's patched model against the same model unpatched.

`evaluate` runs an identical battery twice on one model object (unpatched, then patched with
`kvpatch.apply`, then unpatched again) so that the only difference between the two sides is
kvpatch. The battery: sliding-window perplexity, needle retrieval per (length, depth), a
teacher-forced decode through the cache (logits and per-layer attention outputs per step), and
the K/V bytes each side holds afterwards.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from tqdm.auto import tqdm

from ..compat import cache_kwarg, output_cache
from ..config import ConfigSource, FidelityConfig, PipelineConfig, bundled_configs, load_config
from ..data.needle import encode, needle_grid
from ..errors import PatchStateError
from ..models import load_named
from ..patch import apply, get_handle, unpatch
from .metrics import (
    dynamic_cache_bytes,
    logit_agreement,
    perplexity_from_nll,
    row_cosine,
    sliding_window_nll,
    window_spans,
)

#: What "lossless" must mean in numbers (float32 kernels may reorder sums, nothing more).
LOSSLESS_MIN_COSINE = 0.99999
LOSSLESS_MAX_PPL_DRIFT = 1e-4


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
    needle_batch_size: int = 8
    decode_prompt_tokens: int = 512
    decode_steps: int = 64
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


@dataclass
class SideResult:
    """Everything measured on one side (unpatched or patched)."""

    perplexity: float
    needle: dict[str, dict[str, float]]
    logits: torch.Tensor  # [steps, vocab], float32 on CPU
    attention: list[torch.Tensor] | None  # per layer [steps, hidden]; None when not captured
    kv_bytes: int

    @property
    def needle_mean(self) -> float:
        cells = [acc for row in self.needle.values() for acc in row.values()]
        return sum(cells) / len(cells) if cells else float("nan")


@dataclass
class EvalResult:
    """The comparison of one config with the unpatched model (JSON-friendly fields only)."""

    config: str
    lossless: bool
    ppl_unpatched: float
    ppl_patched: float
    ppl_ratio: float
    needle_unpatched: dict[str, dict[str, float]]
    needle_patched: dict[str, dict[str, float]]
    needle_acc_unpatched: float
    needle_acc_patched: float
    logit_cosine_per_step: list[float]
    logit_cosine_min: float
    logit_cosine_mean: float
    top1_agreement: float
    attn_cosine_per_layer: list[float] | None
    attn_cosine_min: float | None
    attn_skipped_reason: str | None
    kv_bytes_unpatched: int
    kv_bytes_patched: int
    kv_fraction: float
    wall_s: float
    fidelity: dict[str, Any] = field(default_factory=dict)  # the config's declared bounds
    settings: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def check_bounds(self, fidelity: FidelityConfig) -> list[str]:
        """Human-readable violations of `fidelity` (empty when every bound holds)."""
        checks: list[tuple[bool, str]] = []
        if fidelity.lossless:
            checks += [
                (self.top1_agreement == 1.0, f"lossless: top1 agreement {self.top1_agreement:.4f} < 1.0"),
                (self.logit_cosine_min >= LOSSLESS_MIN_COSINE,
                 f"lossless: logit cosine {self.logit_cosine_min:.6f} < {LOSSLESS_MIN_COSINE}"),
                (abs(self.ppl_ratio - 1.0) <= LOSSLESS_MAX_PPL_DRIFT,
                 f"lossless: ppl ratio {self.ppl_ratio:.6f} differs from 1 by more than {LOSSLESS_MAX_PPL_DRIFT}"),
            ]
            if self.attn_cosine_min is not None:
                checks.append((self.attn_cosine_min >= LOSSLESS_MIN_COSINE,
                               f"lossless: attention-output cosine {self.attn_cosine_min:.6f} < {LOSSLESS_MIN_COSINE}"))
        if fidelity.min_logit_cosine is not None:
            checks.append((self.logit_cosine_min >= fidelity.min_logit_cosine,
                           f"logit cosine {self.logit_cosine_min:.6f} < min_logit_cosine {fidelity.min_logit_cosine}"))
        if fidelity.min_top1_agreement is not None:
            checks.append((self.top1_agreement >= fidelity.min_top1_agreement,
                           f"top1 agreement {self.top1_agreement:.4f} "
                           f"< min_top1_agreement {fidelity.min_top1_agreement}"))
        if fidelity.max_ppl_ratio is not None:
            checks.append((self.ppl_ratio <= fidelity.max_ppl_ratio,
                           f"ppl ratio {self.ppl_ratio:.6f} > max_ppl_ratio {fidelity.max_ppl_ratio}"))
        # NaN compares False everywhere, so a NaN metric is reported as a violation too.
        return [message for ok, message in checks if not ok]

    def violations(self) -> list[str]:
        """`check_bounds` against the bounds the evaluated config declared."""
        return self.check_bounds(FidelityConfig.model_validate(self.fidelity))


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


# -- one side ---------------------------------------------------------------------------------------


@torch.no_grad()
def teacher_forced_decode(
    model: torch.nn.Module, prompt: torch.Tensor, continuation: torch.Tensor, recorder: AttentionRecorder | None,
    on_step: Callable[[], None] | None = None,
) -> tuple[torch.Tensor, Any]:
    """Logits of each decode step (one token at a time through the cache, fed the given
    continuation rather than the model's own picks, so both sides see identical inputs).
    Returns ([steps, vocab] logits, the final cache)."""
    kwarg = cache_kwarg(model)
    out = model(input_ids=prompt[None], use_cache=True)
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
                on_step()
    finally:
        if recorder is not None:
            recorder.recording = False
    return torch.stack(steps), cache


def _decode_ids(ids: torch.Tensor, settings: EvalSettings) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompt and continuation from the start of the text (the same for both sides)."""
    need = settings.decode_prompt_tokens + settings.decode_steps
    if ids.numel() < need:
        raise ValueError(f"evaluation text has {ids.numel()} tokens; decoding needs {need}")
    return ids[: settings.decode_prompt_tokens], ids[settings.decode_prompt_tokens : need]


def _measure_side(
    model: torch.nn.Module, tokenizer: Any, ids: torch.Tensor, settings: EvalSettings, desc: str,
    kv_bytes: Callable[[Any], int],
) -> SideResult:
    """Run the whole battery on `model` as it is now (patched or not)."""
    device = next(model.parameters()).device
    ppl_ids = ids if settings.ppl_max_tokens is None else ids[: settings.ppl_max_tokens]
    n_windows = sum(1 for _ in window_spans(ppl_ids.numel(), settings.ppl_window, settings.ppl_stride))
    prompt, continuation = (t.to(device) for t in _decode_ids(ids, settings))
    total = n_windows + 1 + settings.decode_steps - 1
    with tqdm(total=total, desc=desc, disable=not settings.progress, leave=False) as bar:
        nll, count = sliding_window_nll(model, ppl_ids, settings.ppl_window, settings.ppl_stride, lambda: bar.update(1),
                                        chunk=settings.ppl_chunk)
        bar.set_postfix_str("needle")
        needle = needle_grid(model, tokenizer, ids.tolist(), settings.needle_lengths, settings.needle_depths,
                             settings.needle_per_cell, seed=settings.seed, batch_size=settings.needle_batch_size)
        bar.update(1)
        bar.set_postfix_str("decode")
        modules, _ = attention_modules(model)
        recorder = AttentionRecorder(modules) if modules is not None else None
        try:
            logits, cache = teacher_forced_decode(model, prompt, continuation, recorder, lambda: bar.update(1))
        finally:
            if recorder is not None:
                recorder.remove()
        attention = recorder.stacked() if recorder is not None else None
        return SideResult(perplexity_from_nll(nll, count), needle, logits, attention, kv_bytes(cache))


def _patched_kv_bytes(model: torch.nn.Module) -> Callable[[Any], int]:
    """K/V bytes as kvpatch itself reports them (the handle sees the decode's cache last)."""
    return lambda cache: int(get_handle(model).stats()["kv_bytes_total"])  # type: ignore[union-attr]


# -- comparison -------------------------------------------------------------------------------------


def _attention_cosines(base: SideResult, patched: SideResult) -> list[float] | None:
    """Worst decode-step cosine of each layer's attention output."""
    if base.attention is None or patched.attention is None:
        return None
    return [row_cosine(a, b).min().item() for a, b in zip(base.attention, patched.attention, strict=True)]


def compare(
    config: PipelineConfig, base: SideResult, patched: SideResult, skipped: str | None, wall_s: float,
    settings: EvalSettings,
) -> EvalResult:
    """Fold the two sides into one EvalResult."""
    cosine, top1 = logit_agreement(base.logits, patched.logits)
    attn = _attention_cosines(base, patched)
    return EvalResult(
        config=config.name,
        lossless=config.fidelity.lossless,
        ppl_unpatched=base.perplexity,
        ppl_patched=patched.perplexity,
        ppl_ratio=patched.perplexity / base.perplexity,
        needle_unpatched=base.needle,
        needle_patched=patched.needle,
        needle_acc_unpatched=base.needle_mean,
        needle_acc_patched=patched.needle_mean,
        logit_cosine_per_step=cosine.tolist(),
        logit_cosine_min=cosine.min().item(),
        logit_cosine_mean=cosine.mean().item(),
        top1_agreement=top1.double().mean().item(),
        attn_cosine_per_layer=attn,
        attn_cosine_min=min(attn) if attn else None,
        attn_skipped_reason=skipped,
        kv_bytes_unpatched=base.kv_bytes,
        kv_bytes_patched=patched.kv_bytes,
        kv_fraction=patched.kv_bytes / base.kv_bytes if base.kv_bytes else float("nan"),
        wall_s=wall_s,
        fidelity=config.fidelity.model_dump(),
        settings=asdict(settings),
    )


@contextmanager
def patched(model: torch.nn.Module, config: ConfigSource) -> Iterator[None]:
    """`apply` for the duration of a block; the model is unpatched again even on errors."""
    apply(model, config)
    try:
        yield
    finally:
        unpatch(model)


def default_text() -> str:
    """The reference model's shipped held-out text (same bytes on every machine)."""
    from ..models import heldout_text

    return heldout_text()


def evaluate(
    model: torch.nn.Module, tokenizer: Any, config: ConfigSource, *, settings: EvalSettings, text: str | None = None,
) -> EvalResult:
    """Compare `model` patched with `config` against itself unpatched on `text` (default: the
    reference model's held-out text, also used as needle filler). `model` must be unpatched."""
    if get_handle(model) is not None:
        raise PatchStateError("evaluate needs an unpatched model: it patches and unpatches it itself")
    pipeline_config = load_config(config)
    ids = torch.tensor(encode(tokenizer, text if text is not None else default_text()), dtype=torch.long)
    _, skipped = attention_modules(model)
    start = time.perf_counter()
    base = _measure_side(model, tokenizer, ids, settings, "unpatched", dynamic_cache_bytes)
    with patched(model, pipeline_config):
        side = _measure_side(model, tokenizer, ids, settings, pipeline_config.name, _patched_kv_bytes(model))
    wall_s = time.perf_counter() - start
    return compare(pipeline_config, base, side, skipped, wall_s, settings)


# -- command line -----------------------------------------------------------------------------------


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `kvpatch eval`."""
    parser.add_argument("--model", default="kvpatch-ref", help="kvpatch-ref (default), tiny-llama, or a model dir")
    parser.add_argument("--config", action="append",
                        help="config path or bundled name (repeatable; default: every bundled config)")
    parser.add_argument("--preset", choices=("quick", "full"), default="quick")
    parser.add_argument("--out", type=Path, default=None, help="write eval-<config>.json and fidelity.png here")
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: cpu)")


#: (header, width, cell) of each table column.
_COLUMNS: tuple[tuple[str, int, Callable[[EvalResult], str]], ...] = (
    ("config", -14, lambda r: r.config),
    ("ppl ratio", 10, lambda r: f"{r.ppl_ratio:.6f}"),
    ("logit cos", 10, lambda r: f"{r.logit_cosine_min:.6f}"),
    ("top1", 6, lambda r: f"{r.top1_agreement:.3f}"),
    ("attn cos", 10, lambda r: "n/a" if r.attn_cosine_min is None else f"{r.attn_cosine_min:.6f}"),
    ("needle u/p", 11, lambda r: f"{r.needle_acc_unpatched:.2f}/{r.needle_acc_patched:.2f}"),
    ("kv frac", 8, lambda r: f"{r.kv_fraction:.3f}"),
    ("wall s", 7, lambda r: f"{r.wall_s:.1f}"),
    ("bounds", -8, lambda r: "VIOLATED" if r.violations() else "ok"),
)


def format_table(results: list[EvalResult]) -> str:
    """A short fixed-width summary, one row per config (u/p: unpatched/patched)."""

    def line(cells: list[str]) -> str:
        return " ".join(f"{c:<{-w}}" if w < 0 else f"{c:>{w}}" for c, (_, w, _) in zip(cells, _COLUMNS)).rstrip()

    rows = [line([name for name, _, _ in _COLUMNS])]
    rows += [line([cell(r) for _, _, cell in _COLUMNS]) for r in results]
    return "\n".join(rows)


def run_eval_cli(args: argparse.Namespace) -> int:
    """`kvpatch eval`: evaluate each config, print the table, write JSON and the plot; exit 1 if
    any config breaks its declared bounds."""
    settings = EvalSettings.full() if args.preset == "full" else EvalSettings.quick()
    sources = args.config or list(bundled_configs())
    configs = [load_config(s) for s in sources]  # fail on a bad config before any model work
    model, tokenizer = load_named(args.model, args.device)
    results, failed = [], False
    for config in configs:
        result = evaluate(model, tokenizer, config, settings=settings)
        violations = result.violations()
        failed |= bool(violations)
        for message in violations:
            print(f"{config.name}: {message}", file=sys.stderr)
        results.append(result)
    print(f"model {args.model}, preset {args.preset}")
    print(format_table(results))
    if args.out is not None:
        _write_outputs(results, args.out)
    return 1 if failed else 0


def _write_outputs(results: list[EvalResult], out: Path) -> None:
    from .plot import plot_fidelity_vs_memory

    out.mkdir(parents=True, exist_ok=True)
    for result in results:
        (out / f"eval-{result.config}.json").write_text(result.to_json())
    plot_fidelity_vs_memory([r.to_dict() for r in results], out / "fidelity.png")
