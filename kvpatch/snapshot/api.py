"""Export a request's cache to a snapshot file, and read, verify and load one.

    export_snapshot(path, cache, model, pipeline, token_ids=ids)  # atomic
    cache = load_snapshot(path, model, pipeline)                  # verified, or SnapshotError
    metadata = verify_snapshot(path)                              # integrity only
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata as package_metadata
from pathlib import Path
from typing import Any

import torch

from ..config import PipelineConfig
from ..model_shapes import ModelShapes
from ..errors import SnapshotError
from ..cache import KVPatchCache
from ..pipeline import Pipeline
from . import checks
from .cache_codec import encode_cache, restore_cache
from .fingerprint import model_fingerprint, tokenizer_digest
from .format import (
    FORMAT_VERSION, AnyMetadata, PipelineFingerprint, SnapshotMetadata, TensorRecord, decode_metadata, encode_metadata,
    state_tensor_name,
)
from ..files.safetensors_io import content_sha256, dtype_name, read_header, read_tensors, write_atomic
from .stage_state import collect_stage_state, restore_stage_state

TokenIds = torch.Tensor | list[int] | list[list[int]]


@dataclass
class Snapshot:
    """A snapshot file that passed its integrity checks (not yet checked against a model)."""

    path: Path
    metadata: SnapshotMetadata
    tensors: dict[str, torch.Tensor]

    def stage_state(self) -> dict[str, dict[str, torch.Tensor]]:
        return {
            key: {name: self.tensors[state_tensor_name(key, name)] for name in records}
            for key, records in self.metadata.stage_state.items()
        }


def kvpatch_version() -> str:
    import kvpatch

    return getattr(kvpatch, "__version__", None) or package_metadata.version("kvpatch")


def export_snapshot(path: str | os.PathLike[str], cache: KVPatchCache, model: torch.nn.Module, pipeline: Pipeline, *,
                    token_ids: TokenIds | None = None, tokenizer: Any | None = None) -> Path:
    """Write `cache` (built by `pipeline` for `model`) to `path` atomically; returns the path.

    `token_ids` (`[batch, tokens]` or one row) are the cached sequence, needed to continue
    generation with `generate`; `tokenizer` adds its digest so a load can check it."""
    records, tensors = encode_cache(cache)
    state = collect_stage_state(pipeline)
    for key, named in state.items():
        tensors.update({state_tensor_name(key, name): t for name, t in named.items()})
    metadata = SnapshotMetadata(
        format_version=FORMAT_VERSION,
        kvpatch_version=kvpatch_version(),
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        model=model_fingerprint(model),
        pipeline=PipelineFingerprint(name=pipeline.config.name, digest=pipeline.config.digest()),
        tokenizer=tokenizer_digest(tokenizer) if tokenizer is not None else None,
        batch_size=cache.batch_size(),
        token_count=cache.get_seq_length(),
        token_ids=_rows(token_ids),
        layers=records,
        stage_state={
            key: {n: TensorRecord(dtype=dtype_name(t.dtype), shape=list(t.shape)) for n, t in named.items()}
            for key, named in state.items()
        },
        content_sha256=content_sha256(tensors),
    )
    target = Path(path)
    checks.check_consistency(target, metadata)
    return write_atomic(target, tensors, encode_metadata(metadata))


def _rows(token_ids: TokenIds | None) -> list[list[int]] | None:
    if token_ids is None:
        return None
    ids = torch.as_tensor(token_ids)
    if ids.dim() not in (1, 2):
        raise SnapshotError(f"token_ids must be [tokens] or [batch, tokens], got shape {list(ids.shape)}")
    return (ids.unsqueeze(0) if ids.dim() == 1 else ids).tolist()


def read_metadata(path: str | os.PathLike[str], kind: str | None = None) -> AnyMetadata:
    """The metadata of a snapshot of any kind, or of `kind` (its own checksum, version and schema
    checked); tensors unread."""
    target = Path(path)
    header, _ = read_header(target)
    return decode_metadata(target, header, kind)


def read_checked(path: Path, kind: str) -> tuple[AnyMetadata, dict[str, torch.Tensor]]:
    """Metadata and tensors of a snapshot of `kind` that passed the integrity checks (structure,
    metadata, tensors as listed, content checksum)."""
    for _ in range(3):
        before = _inode(path)
        header, _ = read_header(path)
        metadata = decode_metadata(path, header, kind)  # before any tensor is read: a foreign file costs nothing
        tensors = read_tensors(path)
        if _inode(path) == before:
            break  # both reads saw the same file, not one each side of a concurrent replace
    checks.check_integrity(path, metadata, tensors)
    return metadata, tensors


def read_snapshot(path: str | os.PathLike[str]) -> Snapshot:
    """Read a snapshot and check its integrity: structure, metadata, tensors, content checksum."""
    target = Path(path)
    metadata, tensors = read_checked(target, "request")
    assert isinstance(metadata, SnapshotMetadata)
    checks.check_consistency(target, metadata)
    return Snapshot(target, metadata, tensors)


def _inode(path: Path) -> tuple[int, int] | None:
    try:
        stat = path.stat()
    except OSError:
        return None
    return stat.st_dev, stat.st_ino


def verify_snapshot(path: str | os.PathLike[str], model: torch.nn.Module | None = None,
                    config: PipelineConfig | None = None, tokenizer: Any | None = None) -> SnapshotMetadata:
    """Every check that applies to what is given: integrity always; fingerprint and shapes with a
    model; config digest and layer kinds with a config too. Raises SnapshotError."""
    snapshot = read_snapshot(path)
    if model is not None:
        _check_compatible(snapshot, model, Pipeline(config) if config is not None else None, tokenizer)
    elif config is not None:
        checks.check_pipeline(snapshot.path, snapshot.metadata, config)
    return snapshot.metadata


def _check_compatible(snapshot: Snapshot, model: torch.nn.Module, pipeline: Pipeline | None,
                      tokenizer: Any | None) -> KVPatchCache | None:
    """Run the model (and pipeline) checks; returns the empty cache the pipeline built for them."""
    path, metadata = snapshot.path, snapshot.metadata
    checks.check_model(path, metadata, model)
    checks.check_tokenizer(path, metadata, tokenizer)
    if metadata.token_ids is not None:
        checks.check_token_ids(path, "token_ids", metadata.token_ids, ModelShapes.of(model.config).vocab_size)
    if pipeline is None:
        return None
    checks.check_pipeline(path, metadata, pipeline.config)
    cache = pipeline.new_cache(model.config)
    checks.check_cache_fits(path, metadata, cache)
    return cache


def load_snapshot(path: str | os.PathLike[str], model: torch.nn.Module, pipeline: Pipeline, *,
                  tokenizer: Any | None = None) -> KVPatchCache:
    """A new cache from `pipeline`, holding the snapshot's K/V on the model's device, after every
    check passed; stage state (e.g. codebooks) is loaded into `pipeline` last."""
    snapshot = read_snapshot(path)
    cache = _check_compatible(snapshot, model, pipeline, tokenizer)
    device = next(model.parameters()).device
    restore_cache(cache, snapshot.metadata.layers, snapshot.tensors, device)
    restore_stage_state(snapshot.path, pipeline, snapshot.stage_state())
    return cache
