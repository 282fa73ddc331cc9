"""Shared fixtures: tiny models of every supported family, patched and unpatched."""

from __future__ import annotations

import pytest
import torch

import kvpatch
from kvpatch.testing import tiny_model

FAMILIES = sorted(kvpatch.supported_families())


@pytest.fixture(autouse=True)
def _deterministic() -> None:
    torch.manual_seed(0)


@pytest.fixture(params=FAMILIES)
def model_type(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def tiny(model_type: str) -> torch.nn.Module:
    return tiny_model(model_type)
