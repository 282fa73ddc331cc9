"""The fidelity harness: one config's patched model against the same model unpatched.

`evaluate` runs an identical battery (`battery.py`) on one model object unpatched and then
patched with `kvpatch.apply` (and unpatches it again), so that the only difference between the
two sides is kvpatch. The unpatched side is measured once with a second attention backend as
well: that noise floor sets what a lossless config may deviate (`bounds.py`). `reference_run`
measures both once, to share across configs (`kvpatch eval` does).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from ..config import ConfigSource, FidelityConfig, PipelineConfig, load_config
from ..data.needle import encode
from ..errors import PatchStateError
from ..patch import apply, get_handle, unpatch
from ..cache import cache_kv_bytes
from .battery import SideResult, attention_modules, battery_units, measure_side
from .bounds import Deviation, lossless_allowance, lossless_violations
from .metrics import logit_agreement, row_cosine
from .settings import EvalSettings

__all__ = ["EvalResult", "EvalSettings", "Reference", "evaluate", "reference_run"]


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
    kv_bytes_patched: int  # resident: what attention reads
    kv_bytes_offloaded: int  # the patched side's copies in host memory or files
    kv_fraction: float  # kv_bytes_patched / kv_bytes_unpatched
    wall_s: float  # the patched side only (the reference is `reference_wall_s`)
    floor_backend: str
    floor: dict[str, float | None]  # Deviation of the unpatched model on `floor_backend`
    lossless_allowance: dict[str, float | None]  # what a lossless config may deviate (bounds.py)
    reference_wall_s: float
    fidelity: dict[str, Any] = field(default_factory=dict)  # the config's declared bounds
    settings: dict[str, Any] = field(default_factory=dict)
    #: The protocol's further tasks, {task: {length: {depth: accuracy}}} ({} when none were run).
    tasks_unpatched: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    tasks_patched: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @property
    def deviation(self) -> Deviation:
        """How far the patched side is from the unpatched one, on the lossless metrics."""
        return Deviation.of(self.logit_cosine_min, self.attn_cosine_min, self.ppl_ratio, self.top1_agreement)

    def check_bounds(self, fidelity: FidelityConfig) -> list[str]:
        """Human-readable violations of `fidelity` (empty when every bound holds)."""
        messages = []
        if fidelity.lossless:
            messages += lossless_violations(self.deviation, Deviation.from_dict(self.lossless_allowance))
        checks: list[tuple[bool, str]] = []
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
        return messages + [message for ok, message in checks if not ok]

    def violations(self) -> list[str]:
        """`check_bounds` against the bounds the evaluated config declared."""
        return self.check_bounds(FidelityConfig.model_validate(self.fidelity))


# -- one side, the reference --------------------------------------------------------------------


def _progress_bar(total: int, desc: str, settings: EvalSettings) -> tqdm:
    return tqdm(total=total, desc=desc, disable=not settings.progress, leave=False, unit="row")


def _unpatched_kv_bytes(cache: Any) -> tuple[int, int]:
    return sum(cache_kv_bytes(cache, "resident").values()), 0


def _patched_kv_bytes(model: torch.nn.Module) -> Callable[[Any], tuple[int, int]]:
    """K/V bytes as kvpatch itself reports them (the handle sees the decode's cache last)."""
    def read(cache: Any) -> tuple[int, int]:
        stats = get_handle(model).stats()  # type: ignore[union-attr]
        return int(stats["kv_bytes_resident"]), int(stats["kv_bytes_offloaded"])

    return read


def _agreement(base: SideResult, other: SideResult) -> tuple[torch.Tensor, torch.Tensor, list[float] | None]:
    """Per-step logit cosine, per-step top-1 match, and each layer's worst attention cosine."""
    cosine, top1 = logit_agreement(base.logits, other.logits)
    if base.attention is None or other.attention is None:
        return cosine, top1, None
    attn = [row_cosine(a, b).min().item() for a, b in zip(base.attention, other.attention, strict=True)]
    return cosine, top1, attn


def _deviation(base: SideResult, other: SideResult) -> Deviation:
    cosine, top1, attn = _agreement(base, other)
    return Deviation.of(cosine.min().item(), min(attn) if attn else None, other.perplexity / base.perplexity,
                        top1.double().mean().item())


@dataclass
class Reference:
    """The unpatched side and the noise floor, measured once for one model, settings and text;
    every config evaluated against them is compared with the same numbers."""

    base: SideResult
    floor: Deviation
    floor_backend: str
    ids: torch.Tensor
    settings: EvalSettings
    wall_s: float

    @property
    def ppl_ids(self) -> torch.Tensor:
        limit = self.settings.ppl_max_tokens
        return self.ids if limit is None else self.ids[:limit]


def floor_backend(model: torch.nn.Module, settings: EvalSettings) -> str:
    """The attention backend the noise floor runs on: another one than the model's own."""
    if settings.floor_backend is not None:
        return settings.floor_backend
    return "sdpa" if model.config._attn_implementation == "eager" else "eager"


def default_text() -> str:
    """The reference model's shipped held-out text (same bytes on every machine)."""
    from ..models import heldout_text

    return heldout_text()


def reference_run(model: torch.nn.Module, tokenizer: Any, settings: EvalSettings, text: str | None = None) -> Reference:
    """Measure the unpatched model (the full battery) and its noise floor (perplexity and decode
    again on `floor_backend`) on `text` (default: the reference model's held-out text)."""
    if get_handle(model) is not None:
        raise PatchStateError("the reference run needs an unpatched model")
    ids = torch.tensor(encode(tokenizer, text if text is not None else default_text()), dtype=torch.long)
    ppl_ids = ids if settings.ppl_max_tokens is None else ids[: settings.ppl_max_tokens]
    backend, original = floor_backend(model, settings), model.config._attn_implementation
    total = battery_units(settings, ppl_ids.numel(), needle=True) + battery_units(settings, ppl_ids.numel(), needle=False)
    start = time.perf_counter()
    with _progress_bar(total, f"unpatched + floor ({backend})", settings) as bar:
        base = measure_side(model, tokenizer, ppl_ids, ids, settings, _unpatched_kv_bytes, bar.update)
        model.set_attn_implementation(backend)
        try:
            floor = measure_side(model, tokenizer, ppl_ids, ids, settings, _unpatched_kv_bytes, bar.update, needle=False)
        finally:
            model.set_attn_implementation(original)
    return Reference(base, _deviation(base, floor), backend, ids, settings, time.perf_counter() - start)


# -- comparison -------------------------------------------------------------------------------------


def compare(config: PipelineConfig, reference: Reference, patched_side: SideResult, skipped: str | None,
            wall_s: float) -> EvalResult:
    """Fold the reference and the patched side into one EvalResult."""
    base = reference.base
    cosine, top1, attn = _agreement(base, patched_side)
    return EvalResult(
        config=config.name,
        lossless=config.fidelity.lossless,
        ppl_unpatched=base.perplexity,
        ppl_patched=patched_side.perplexity,
        ppl_ratio=patched_side.perplexity / base.perplexity,
        needle_unpatched=base.needle,
        needle_patched=patched_side.needle,
        needle_acc_unpatched=base.needle_mean,
        needle_acc_patched=patched_side.needle_mean,
        logit_cosine_per_step=cosine.tolist(),
        logit_cosine_min=cosine.min().item(),
        logit_cosine_mean=cosine.mean().item(),
        top1_agreement=top1.double().mean().item(),
        attn_cosine_per_layer=attn,
        attn_cosine_min=min(attn) if attn else None,
        attn_skipped_reason=skipped,
        kv_bytes_unpatched=base.kv_bytes_resident,
        kv_bytes_patched=patched_side.kv_bytes_resident,
        kv_bytes_offloaded=patched_side.kv_bytes_offloaded,
        kv_fraction=patched_side.kv_bytes_resident / base.kv_bytes_resident if base.kv_bytes_resident else float("nan"),
        wall_s=wall_s,
        floor_backend=reference.floor_backend,
        floor=reference.floor.to_dict(),
        lossless_allowance=lossless_allowance(reference.floor).to_dict(),
        reference_wall_s=reference.wall_s,
        fidelity=config.fidelity.model_dump(),
        settings=asdict(reference.settings),
        tasks_unpatched=base.tasks,
        tasks_patched=patched_side.tasks,
    )


@contextmanager
def patched(model: torch.nn.Module, config: ConfigSource) -> Iterator[None]:
    """`apply` for the duration of a block; the model is unpatched again even on errors."""
    apply(model, config)
    try:
        yield
    finally:
        unpatch(model)


def evaluate(
    model: torch.nn.Module, tokenizer: Any, config: ConfigSource, *, settings: EvalSettings | None = None,
    text: str | None = None, reference: Reference | None = None,
) -> EvalResult:
    """Compare `model` patched with `config` against itself unpatched, on `text` (default: the
    reference model's held-out text, also the needle filler). `model` must be unpatched. Pass a
    `reference` from `reference_run` to share the unpatched side across configs (then its
    settings and text are used); otherwise one is measured first."""
    if get_handle(model) is not None:
        raise PatchStateError("evaluate needs an unpatched model: it patches and unpatches it itself")
    if reference is None:
        if settings is None:
            raise ValueError("evaluate needs settings= or a reference= from reference_run")
        reference = reference_run(model, tokenizer, settings, text)
    settings = reference.settings
    pipeline_config = load_config(config)
    _, skipped = attention_modules(model)
    start = time.perf_counter()
    with _progress_bar(battery_units(settings, reference.ppl_ids.numel(), needle=True), pipeline_config.name,
                       settings) as bar, patched(model, pipeline_config):
        side = measure_side(model, tokenizer, reference.ppl_ids, reference.ids, settings, _patched_kv_bytes(model),
                            bar.update)
    return compare(pipeline_config, reference, side, skipped, time.perf_counter() - start)


# -- command line -----------------------------------------------------------------------------------


#: (header, width, cell) of each table column.
_COLUMNS: tuple[tuple[str, int, Callable[[EvalResult], str]], ...] = (
    ("config", -14, lambda r: r.config),
    ("ppl ratio", 10, lambda r: f"{r.ppl_ratio:.6f}"),
    ("logit cos*", 10, lambda r: f"{r.logit_cosine_min:.6f}"),
    ("top1", 6, lambda r: f"{r.top1_agreement:.3f}"),
    ("attn cos*", 10, lambda r: "n/a" if r.attn_cosine_min is None else f"{r.attn_cosine_min:.6f}"),
    ("needle u/p", 11, lambda r: f"{r.needle_acc_unpatched:.2f}/{r.needle_acc_patched:.2f}"),
    ("kv frac", 8, lambda r: f"{r.kv_fraction:.3f}"),
    ("offloaded", 10, lambda r: f"{r.kv_bytes_offloaded:,}"),
    ("wall s", 7, lambda r: f"{r.wall_s:.1f}"),
    ("bounds", -8, lambda r: "VIOLATED" if r.violations() else "ok"),
)
_LEGEND = ("* worst decode step (logits) / worst layer and step (attention). u/p: unpatched/patched. "
           "kv frac: resident K/V bytes (what attention reads) / unpatched; offloaded: bytes in host memory or files.")


def format_table(results: list[EvalResult]) -> str:
    """A short fixed-width summary, one row per config, and a legend."""

    def line(cells: list[str]) -> str:
        return " ".join(f"{c:<{-w}}" if w < 0 else f"{c:>{w}}" for c, (_, w, _) in zip(cells, _COLUMNS)).rstrip()

    rows = [line([name for name, _, _ in _COLUMNS])]
    rows += [line([cell(r) for _, _, cell in _COLUMNS]) for r in results]
    return "\n".join([*rows, _LEGEND])
