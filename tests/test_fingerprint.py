"""The weights fingerprint stays true: a snapshot exported before the weights changed in place is
refused afterwards, however they were changed (issue 25), while unchanged weights are not re-hashed."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import pytest
import torch

import kvpatch
from kvpatch.compat import cache_kwarg
from kvpatch.errors import SnapshotMismatchError
from kvpatch.snapshot import fingerprint
from kvpatch.testing import prompt_ids, tiny_model


def _add_through_parameter(p: torch.Tensor) -> None:
    p[0, 0] += 1.0  # bumps the version counter


def _add_through_data(p: torch.Tensor) -> None:
    p.data[0, 0] += 1.0  # `.data` has its own version counter: the parameter's does not move


def _swap_rows_through_data(p: torch.Tensor) -> None:
    p.data[[0, 1]] = p.data[[1, 0]].clone()  # same values, other places


def _swap_within_a_row_through_data(p: torch.Tensor) -> None:
    p.data[0, [0, 1]] = p.data[0, [1, 0]].clone()


@pytest.fixture
def exported(tmp_path: Path) -> tuple[torch.nn.Module, kvpatch.PatchHandle, Path]:
    model = tiny_model("llama")
    handle = kvpatch.apply(model, "default")
    cache = handle.new_cache()
    with torch.no_grad():
        model(input_ids=prompt_ids(batch=1, length=12), **{cache_kwarg(model): cache})
    return model, handle, handle.export_snapshot(tmp_path / "s.safetensors", cache)


@pytest.mark.parametrize("change", [_add_through_parameter, _add_through_data, _swap_rows_through_data,
                                    _swap_within_a_row_through_data])
def test_snapshot_is_refused_after_weights_change_in_place(exported, change: Callable[[torch.Tensor], None]) -> None:
    model, handle, path = exported
    handle.import_snapshot(path)  # accepted while the weights are those it was made with
    weight = model.model.layers[0].self_attn.q_proj.weight
    with torch.no_grad():
        change(weight)
    with pytest.raises(SnapshotMismatchError) as info:
        handle.import_snapshot(path)
    assert info.value.field == "model.weights" and "different weights" in str(info.value)


def test_unchanged_weights_are_not_hashed_again(exported, monkeypatch: pytest.MonkeyPatch) -> None:
    model, handle, path = exported
    hashed: list[str] = []
    original = fingerprint.update_digest
    monkeypatch.setattr(fingerprint, "update_digest", lambda digest, name, t: (hashed.append(name), original(digest, name, t)))
    handle.import_snapshot(path)
    assert hashed == []
    with torch.no_grad():
        model.lm_head.weight.data[0, 0] += 1.0
    fingerprint.weights_digest(model)
    assert len(hashed) == len(list(model.parameters()))


def test_checksum_sees_every_word_and_its_place() -> None:
    x = torch.randn(3, 4097)  # not a multiple of the grid width, plus a 2-byte tail below
    base = fingerprint.parameter_checksum(x)
    assert fingerprint.parameter_checksum(x.clone()) == base
    for i in (0, 4096, 3 * 4097 - 1):
        y = x.clone()
        y.view(-1)[i] += 1.0
        assert fingerprint.parameter_checksum(y) != base
    half = torch.randn(5, dtype=torch.bfloat16)
    changed = half.clone()
    changed[-1] += 1.0
    assert fingerprint.parameter_checksum(changed) != fingerprint.parameter_checksum(half)
