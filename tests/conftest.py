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


def prompt_ids(batch: int = 2, length: int = 20, seed: int = 1) -> torch.Tensor:
    """Random token ids that avoid the special ids (pad/bos/eos live at 256..258)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, 250, (batch, length), generator=generator)


@pytest.fixture
def tiny(model_type: str) -> torch.nn.Module:
    return tiny_model(model_type)
