"""Chunk-store snapshots: every chunk of a store in one verified file, so a later process starts warm.

    export_store("run/chunks.safetensors", store, model, config)   # atomic; returns the path
    import_store("run/chunks.safetensors", store, model, config)   # checked, or SnapshotError

Same file format, atomic write and integrity checks as a request snapshot (`kind:
"chunk_store"`, docs/snapshot-format.md): chunk K/V only mean something for the weights that
computed them, so the model fingerprint, pipeline digest and tokenizer are recorded and checked.
Chunks are stored as their store keeps them (dense or int8/int4 codes), never decoded, with
their model namespace and parent key (format version 2): a store bound to a model (`bind`)
admits on import only the chunks whose token ids hash to their keys under its namespace, and
counts the others as foreign (`import_store` returns how many were admitted).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol

import torch
from tqdm.auto import tqdm

from ..config import PipelineConfig
from ..model_shapes import ModelShapes
from ..errors import SnapshotCorruptError, SnapshotMismatchError
from ..cache import layer_layouts
from ..reuse.chunk import ChunkFormatError, StoredChunk
from ..reuse.codecs import kv_shape
from . import checks
from .api import kvpatch_version, read_checked
from .fingerprint import model_fingerprint, tokenizer_digest
from .format import (
    CHUNK_STORE_FORMAT_VERSION, ChunkRecord, ChunkStoreMetadata, PipelineFingerprint, TensorRecord, chunk_tensor_name,
    encode_metadata,
)
from ..files.safetensors_io import content_sha256, dtype_name, write_atomic

KIND = "chunk_store"


class ExportableStore(Protocol):
    """What a store needs for snapshots (`TieredChunkStore` and the `store/memory` stage)."""

    def iter_chunks(self) -> Iterator[StoredChunk]: ...
    def put(self, chunk: StoredChunk) -> bool | None: ...


def export_store(path: str | os.PathLike[str], store: ExportableStore, model: torch.nn.Module,
                 config: PipelineConfig, *, tokenizer: Any | None = None, progress: bool = False) -> Path:
    """Write every chunk of `store` (RAM and disk tier) to `path` atomically; returns the path.

    `model` and `config` are what computed the chunks (their fingerprints go into the file)."""
    _require_shareable_keys(store, "a chunk-store snapshot")
    return write_chunks(path, store.iter_chunks(), model, config, tokenizer=tokenizer, progress=progress)


def write_chunks(path: str | os.PathLike[str], chunks: Iterable[StoredChunk], model: torch.nn.Module,
                 config: PipelineConfig, *, tokenizer: Any | None = None, progress: bool = False) -> Path:
    """`export_store` for any iterable of chunks."""
    records, tensors = [], {}
    for i, chunk in enumerate(tqdm(chunks, desc="export chunks", unit="chunk", disable=not progress)):
        kv_shape(chunk)
        named = {f"payload.{k}": v for k, v in chunk.tensors.items()}
        named["token_ids"] = chunk.token_ids.to(torch.int64)
        tensors.update({chunk_tensor_name(i, name): t for name, t in named.items()})
        records.append(ChunkRecord(
            prefix_hash=chunk.prefix_hash, content_hash=chunk.content_hash, start=chunk.start,
            tokens=chunk.num_tokens, codec=chunk.codec, meta=chunk.meta, namespace=chunk.namespace,
            parent_hash=chunk.parent_hash,
            tensors={n: TensorRecord(dtype=dtype_name(t.dtype), shape=list(t.shape)) for n, t in named.items()},
        ))
    metadata = ChunkStoreMetadata(
        format_version=CHUNK_STORE_FORMAT_VERSION, kind=KIND, kvpatch_version=kvpatch_version(),
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"), model=model_fingerprint(model),
        pipeline=PipelineFingerprint(name=config.name, digest=config.digest()),
        tokenizer=tokenizer_digest(tokenizer) if tokenizer is not None else None,
        chunks=records, content_sha256=content_sha256(tensors),
    )
    return write_atomic(path, tensors, encode_metadata(metadata))


def read_store_snapshot(path: str | os.PathLike[str], model: torch.nn.Module | None = None,
                        config: PipelineConfig | None = None, *,
                        tokenizer: Any | None = None) -> tuple[ChunkStoreMetadata, list[StoredChunk]]:
    """The chunks of a chunk-store snapshot after every check that applies: integrity always
    (structure, metadata, content checksum, each chunk well-formed); with `model` its
    fingerprint, tokenizer and each chunk's shape; with `config` the pipeline digest."""
    target = Path(path)
    metadata, tensors = read_checked(target, KIND)
    assert isinstance(metadata, ChunkStoreMetadata)
    chunks = [_chunk(target, i, record, tensors) for i, record in enumerate(metadata.chunks)]
    if model is not None:
        checks.check_fingerprint(target, metadata.model, model)
        checks.check_tokenizer(target, metadata, tokenizer)
        _check_shapes(target, chunks, model)
    if config is not None:
        checks.check_pipeline(target, metadata, config)
    return metadata, chunks


def import_store(path: str | os.PathLike[str], store: ExportableStore, model: torch.nn.Module | None = None,
                 config: PipelineConfig | None = None, *, tokenizer: Any | None = None,
                 progress: bool = False) -> int:
    """Put every chunk of a snapshot into `store` after `read_store_snapshot`'s checks (nothing is
    put if any fails); returns how many the store admitted (a bound store refuses, and counts,
    chunks that are not its model's). The store's budget applies (overflow spills or drops)."""
    _require_shareable_keys(store, "a chunk-store snapshot")
    _, chunks = read_store_snapshot(path, model, config, tokenizer=tokenizer)
    admitted = 0
    for chunk in tqdm(chunks, desc="import chunks", unit="chunk", disable=not progress):
        admitted += store.put(chunk) is not False
    return admitted


def _require_shareable_keys(store: ExportableStore, where: str) -> None:
    """ConfigError if `store` is bound to a hasher whose keys must stay in RAM (xxhash)."""
    hasher = getattr(store, "hasher", None)
    if hasher is not None:
        hasher.require_shareable(where)


def _chunk(path: Path, i: int, record: ChunkRecord, tensors: dict[str, torch.Tensor]) -> StoredChunk:
    prefix = chunk_tensor_name(i, "")
    payload = {name.removeprefix("payload."): tensors[prefix + name] for name in record.tensors
               if name.startswith("payload.")}
    if "token_ids" not in record.tensors:
        raise SnapshotCorruptError(f"snapshot {path}: chunks.{i} has no token_ids")
    chunk = StoredChunk(record.prefix_hash, record.content_hash, tensors[prefix + "token_ids"], record.start,
                        payload, record.codec, dict(record.meta), record.namespace, record.parent_hash)
    try:
        _, _, tokens, _ = kv_shape(chunk)
    except ChunkFormatError as err:
        raise SnapshotCorruptError(f"snapshot {path}: chunks.{i}: {err}") from None
    if chunk.token_ids.dim() != 1 or chunk.token_ids.dtype != torch.int64 or tokens != record.tokens:
        raise SnapshotCorruptError(f"snapshot {path}: chunks.{i}: token_ids do not match its {record.tokens} tokens")
    return chunk


def _check_shapes(path: Path, chunks: list[StoredChunk], model: torch.nn.Module) -> None:
    """Every chunk has one K/V per layer of this model, with its kv_heads and head_dim, and token
    ids in its vocabulary."""
    layout = checks.KVLayout.of(model.config, 1)
    expected = (len(layer_layouts(model.config)), layout.heads, layout.head_dim)
    vocab_size = ModelShapes.of(model.config).vocab_size
    for i, chunk in enumerate(chunks):
        layers, heads, _, dim = kv_shape(chunk)
        if (layers, heads, dim) != expected:
            raise SnapshotMismatchError(path, f"chunks.{i} (layers, kv_heads, head_dim)", expected, (layers, heads, dim))
        checks.check_token_ids(path, f"chunks.{i}.token_ids", chunk.token_ids, vocab_size)
