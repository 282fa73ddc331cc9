"""Successive halving over harness budgets: every candidate is measured cheaply, the most
promising third (1/eta) again with more perplexity tokens and needle rows, and so on; the last
rung runs the full budget, and the chosen config comes from it.

Each rung has its own unpatched reference (`reference_run` at that rung's settings), so every
ratio compares like with like. The decode check, where the harness measures resident K/V, is the
same on every rung: a candidate's memory is known exactly after the first one.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from ..config import load_config
from ..errors import KVPatchError
from ..eval.harness import evaluate, reference_run
from ..eval.settings import EvalSettings
from ..pipeline import Pipeline
from .frontier import pareto_ranks
from .objectives import Floor, MemoryTarget
from .space import Candidate, Family, sample


def top_settings(context: int | None = None) -> EvalSettings:
    """The last rung's budget: the harness's quick preset with twice the perplexity tokens and
    three depths of six needle rows; `context` sets the decode prompt (where memory is measured)
    and the needle rows' length."""
    base = dataclasses.replace(EvalSettings.quick(), ppl_max_tokens=3072, needle_depths=(0.1, 0.5, 0.9),
                               needle_per_cell=6, progress=False)
    if context is None:
        return base
    return dataclasses.replace(base, decode_prompt_tokens=context, needle_lengths=(context,))


def rung_settings(top: EvalSettings, rungs: int, eta: int) -> list[EvalSettings]:
    """Rung i gets eta^-(rungs-1-i) of the top's perplexity tokens (at least one window) and
    needle rows per cell (at least one); the decode check is the same on every rung."""
    settings = []
    for i in range(rungs):
        share = float(eta) ** -(rungs - 1 - i)
        ppl = top.ppl_max_tokens if top.ppl_max_tokens is not None else top.ppl_window * 4
        settings.append(dataclasses.replace(
            top, ppl_max_tokens=max(top.ppl_window, round(ppl * share)),
            needle_per_cell=max(1, round(top.needle_per_cell * share))))
    return settings


def describe_budget(settings: EvalSettings) -> str:
    rows = len(settings.needle_lengths) * len(settings.needle_depths) * settings.needle_per_cell
    return (f"ppl {settings.ppl_max_tokens} tokens, needle {rows} rows, decode {settings.decode_prompt_tokens}"
            f"+{settings.decode_steps}")


@dataclass
class Trial:
    """One candidate measured at one rung: the harness result as a dict, or why it failed."""

    candidate: Candidate
    rung: int
    result: dict[str, Any] | None = None
    error: str | None = None

    @property
    def row(self) -> dict[str, Any]:
        """The result of a measured trial."""
        if self.result is None:
            raise ValueError(f"{self.candidate.label} was not measured: {self.error}")
        return self.result

    def to_dict(self) -> dict[str, Any]:
        return {"label": self.candidate.label, "family": self.candidate.family, "rung": self.rung,
                "config": self.candidate.config("candidate"), "error": self.error, "result": self.result}


@dataclass
class SearchResult:
    rungs: list[EvalSettings]
    trials: list[list[Trial]] = field(default_factory=list)  # per rung
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (label, why) of candidates that do not fit
    wall_s: float = 0.0

    def deepest(self) -> list[Trial]:
        """Each candidate's trial at the highest rung it reached (measured ones only)."""
        latest: dict[Candidate, Trial] = {}
        for rung in self.trials:
            for trial in rung:
                if trial.result is not None:
                    latest[trial.candidate] = trial
        return list(latest.values())

    @property
    def final(self) -> list[Trial]:
        return [t for t in self.trials[-1] if t.result is not None] if self.trials else []


class FitsModel:
    """A `sample` filter: the candidate's stages accept this model's shapes (the check `apply`
    makes first), so that a group size that does not divide head_dim never takes a slot; the
    refused ones are kept in `skipped` with the reason."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model_config = model.config
        self.skipped: list[tuple[str, str]] = []

    def __call__(self, candidate: Candidate) -> bool:
        try:
            Pipeline(load_config(candidate.config("candidate"))).validate_model(self.model_config)
        except KVPatchError as err:
            self.skipped.append((candidate.label, str(err)))
            return False
        return True


def rank(trials: Sequence[Trial], target: MemoryTarget, floor: Floor) -> list[Trial]:
    """Most promising first: floor met, then Pareto rank on (memory, ppl ratio) among those
    meeting the floor (then among the rest), then memory target met, then ppl ratio. The best
    config under the target is always on the first front, so it is never cut while the front fits."""
    measured = [t for t in trials if t.result is not None]
    ok = [t for t in measured if not floor.violations(t.row)]
    rest = [t for t in measured if floor.violations(t.row)]
    order: list[Trial] = []
    for group in (ok, rest):
        ranks = pareto_ranks([(target.used(t.row), t.row["ppl_ratio"]) for t in group])
        order += [t for _, t in sorted(zip(ranks, group, strict=True), key=lambda rt: (
            rt[0], not target.met(rt[1].row), rt[1].row["ppl_ratio"], target.used(rt[1].row)))]
    return order


def survivors(ranked: Sequence[Trial], eta: int) -> list[Candidate]:
    return [t.candidate for t in ranked[: max(1, math.ceil(len(ranked) / eta))]]


def successive_halving(
    model: torch.nn.Module, tokenizer: Any, candidates: Sequence[Candidate], rungs: Sequence[EvalSettings],
    target: MemoryTarget, floor: Floor, eta: int, text: str | None = None, progress: bool = True,
) -> SearchResult:
    """Measure `candidates` rung by rung, keeping the best 1/eta (`rank`) for the next."""
    start = time.perf_counter()
    search = SearchResult(list(rungs))
    alive = list(candidates)
    for index, settings in enumerate(rungs):
        reference = reference_run(model, tokenizer, settings, text)
        trials = []
        desc = f"rung {index + 1}/{len(rungs)} ({describe_budget(settings)})"
        with tqdm(alive, desc=desc, unit="config", disable=not progress) as bar:
            for candidate in bar:
                trial = Trial(candidate, index)
                try:
                    trial.result = evaluate(model, tokenizer, candidate.config(f"tune-{candidate.family}"),
                                            reference=reference).to_dict()
                except KVPatchError as err:
                    trial.error = str(err)
                trials.append(trial)
                best = _best_feasible(trials, target, floor)
                if best is not None:
                    bar.set_postfix_str(f"best ppl {best.row['ppl_ratio']:.4f} at {target.used(best.row):.3g}")
        search.trials.append(trials)
        if index + 1 < len(rungs):
            alive = survivors(rank(trials, target, floor), eta)
    search.wall_s = time.perf_counter() - start
    return search


def _best_feasible(trials: Sequence[Trial], target: MemoryTarget, floor: Floor) -> Trial | None:
    feasible = [t for t in trials if t.result is not None and target.met(t.row) and not floor.violations(t.row)]
    return min(feasible, key=lambda t: (t.row["ppl_ratio"], target.used(t.row)), default=None)


class NoConfigMeetsTarget(KVPatchError):
    """No candidate of the last rung meets both the memory target and the floor."""

    def __init__(self, target: MemoryTarget, floor: Floor, closest: Sequence[Trial]) -> None:
        self.closest = list(closest)
        lines = [f"no searched config meets {target.describe()} and the floor ({floor.describe()}); closest:"]
        for trial in closest:
            misses = [f"memory {target.used(trial.row):.3g} > {target.limit:g}"] if not target.met(trial.row) else []
            lines.append(f"  {trial.candidate.label}: " + "; ".join(misses + floor.violations(trial.row)))
        lines.append("loosen the floor or the memory target, or search more (--candidates, --families)")
        super().__init__("\n".join(lines))


def choose(search: SearchResult, target: MemoryTarget, floor: Floor, closest: int = 3) -> Trial:
    """The best-quality (lowest ppl ratio, then least memory) config of the last rung that meets
    the target and the floor; `NoConfigMeetsTarget` lists the nearest misses otherwise."""
    best = _best_feasible(search.final, target, floor)
    if best is not None:
        return best
    nearest = sorted(search.deepest(), key=lambda t: (
        (not target.met(t.row)) + len(floor.violations(t.row)), target.excess(t.row) + floor.shortfall(t.row)))
    raise NoConfigMeetsTarget(target, floor, nearest[:closest])


def tune(
    model: torch.nn.Module, tokenizer: Any, families: Sequence[Family], target: MemoryTarget, floor: Floor, *,
    candidates: int = 36, eta: int = 3, rungs: int = 3, seed: int = 0, top: EvalSettings | None = None,
    text: str | None = None, progress: bool = True,
) -> SearchResult:
    """Sample `candidates` configs that fit `model` from `families` and run successive halving
    over `rungs` budgets ending at `top` (default `top_settings()`)."""
    if eta < 2 or rungs < 1 or candidates < 1:
        raise ValueError(f"need eta >= 2, rungs >= 1, candidates >= 1; got eta {eta}, rungs {rungs}, "
                         f"candidates {candidates}")
    accept = FitsModel(model)
    picked = sample(families, candidates, seed, accept)
    if not picked:
        raise KVPatchError("no candidate of the chosen families fits this model: "
                           + "; ".join(f"{label}: {why}" for label, why in accept.skipped[:3]))
    search = successive_halving(model, tokenizer, picked, rung_settings(top or top_settings(), rungs, eta),
                                target, floor, eta, text, progress)
    search.skipped = list(accept.skipped)
    return search
