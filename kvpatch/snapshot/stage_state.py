"""Stage state that a cache's codes depend on, e.g. a quantizer's calibrated codebooks.

A stage opts in by defining `state_tensors() -> dict[str, Tensor]` and
`load_state_tensors(dict)`. Without its state, codes decode to something else, so a snapshot
carries it and loading restores it into the importing pipeline's stage of the same kind/impl.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import SnapshotError, SnapshotMismatchError
from ..pipeline import Pipeline
from ..registry import Stage


def stage_key(stage: Stage) -> str:
    return f"{stage.kind}/{stage.name}"


def collect_stage_state(pipeline: Pipeline) -> dict[str, dict[str, torch.Tensor]]:
    """Contiguous CPU copies of every stateful stage's state, by "kind/impl"."""
    state: dict[str, dict[str, torch.Tensor]] = {}
    for stage in pipeline.stages:
        tensors = stage.state_tensors() if hasattr(stage, "state_tensors") else {}
        if not tensors:
            continue
        if any(key.split("/")[0] == stage.kind for key in state):
            raise SnapshotError(f"cannot snapshot two stateful {stage.kind} stages (their state tensors would share names)")
        state[stage_key(stage)] = {n: t.detach().to("cpu", copy=True).contiguous() for n, t in tensors.items()}
    return state


def restore_stage_state(path: Path, pipeline: Pipeline, state: dict[str, dict[str, torch.Tensor]]) -> None:
    """Hand each saved state to the pipeline's stage of the same kind/impl."""
    stages = {stage_key(stage): stage for stage in pipeline.stages}
    for key, tensors in state.items():
        stage = stages.get(key)
        if stage is None or not hasattr(stage, "load_state_tensors"):
            raise SnapshotMismatchError(path, f"stage_state.{key}", "a pipeline stage that loads state", None)
        try:
            stage.load_state_tensors(tensors)
        except ValueError as err:
            raise SnapshotError(f"snapshot {path}: stage {key} refused its saved state: {err}") from None
