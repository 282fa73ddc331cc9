"""The snapshot metadata schema and its encoding in the safetensors header.

Format versions are per kind: `request` is version 1; `chunk_store` is version 2 (each chunk
records its model namespace and parent key, so a reader can prove it is the chunk of its key;
version 1 chunk-store files lack that and are refused: export them again).

The metadata is one canonical JSON document stored under `METADATA_KEY` in the safetensors
`__metadata__`, next to its SHA-256 under `METADATA_SHA_KEY`: the tensors are covered by
`content_sha256`, the JSON by its own hash, so no byte of a snapshot can change unnoticed.
Two kinds share the encoding: `request` (one request's cache, `SnapshotMetadata`) and
`chunk_store` (every chunk of a chunk store, `ChunkStoreMetadata`).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt, ValidationError

from ..errors import SnapshotCorruptError, SnapshotMismatchError, echo

#: Format version of request snapshots (`FORMAT_VERSIONS` has every kind's).
FORMAT_VERSION = 1
CHUNK_STORE_FORMAT_VERSION = 2
FORMAT_VERSIONS: dict[str, int] = {"request": FORMAT_VERSION, "chunk_store": CHUNK_STORE_FORMAT_VERSION}
METADATA_KEY = "kvpatch.snapshot"
METADATA_SHA_KEY = "kvpatch.snapshot.sha256"

LayerKind = Literal["dense", "sliding", "quantized"]


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TensorRecord(_Record):
    dtype: str
    shape: list[NonNegativeInt]


class CodesRecord(_Record):
    """How to rebuild a `kvpatch.quant.Codes` from its tensors."""

    block_tokens: int = Field(ge=1)
    dim: int = Field(ge=1)
    names: list[str]


class LayerRecord(_Record):
    """One cache layer: its kind, token counts, and its tensors (stored as `layers.{i}.{name}`).

    Dense and sliding layers hold `keys`/`values`; quantized layers hold the full-precision
    residual in `keys`/`values`, attention sinks in `sink.keys`/`sink.values` and codes in
    `codes.key.{name}`/`codes.value.{name}`. A layer that never saw a token has no tensors."""

    kind: LayerKind
    sliding_window: int | None = None
    #: Tokens the layer has seen (`get_seq_length()`): for sliding layers more than it holds.
    seq_length: int = Field(ge=0)
    sink_tokens: int = Field(default=0, ge=0)
    quantized_tokens: int = Field(default=0, ge=0)
    residual_tokens: int = Field(ge=0)
    key_codes: CodesRecord | None = None
    value_codes: CodesRecord | None = None
    tensors: dict[str, TensorRecord]


class ModelFingerprint(_Record):
    model_type: str
    dtype: str
    #: SHA-256 of the text config without volatile keys (see `fingerprint.architecture_digest`).
    architecture: str
    #: SHA-256 of every parameter's name, shape, dtype and bytes.
    weights: str


class PipelineFingerprint(_Record):
    name: str
    digest: str


class SnapshotMetadata(_Record):
    format_version: Literal[1]
    #: What the file holds: the cache of one request (a chunk store is `ChunkStoreMetadata`).
    kind: Literal["request"] = "request"
    kvpatch_version: str
    created: str
    model: ModelFingerprint
    pipeline: PipelineFingerprint
    tokenizer: str | None = None
    batch_size: int = Field(ge=0)
    token_count: int = Field(ge=0)
    #: The cached sequence's token ids `[batch][token]`, when the exporter knew them.
    token_ids: list[list[int]] | None = None
    layers: list[LayerRecord]
    #: Stage state (e.g. calibrated codebooks) by "kind/impl", stored as `{kind}.{name}`.
    stage_state: dict[str, dict[str, TensorRecord]] = Field(default_factory=dict)
    content_sha256: str

    def tensor_records(self) -> dict[str, TensorRecord]:
        """Every tensor the file must hold, by its name in the file."""
        records = {
            layer_tensor_name(i, name): record
            for i, layer in enumerate(self.layers)
            for name, record in layer.tensors.items()
        }
        for stage, tensors in self.stage_state.items():
            records.update({state_tensor_name(stage, name): record for name, record in tensors.items()})
        return records


class ChunkRecord(_Record):
    """One chunk of a chunk-store snapshot (`kvpatch.reuse.StoredChunk` minus its tensors, which
    are stored as `chunks.{i}.{name}`: `payload.{codec tensor}` and `token_ids`)."""

    prefix_hash: str
    content_hash: str
    start: int = Field(ge=0)
    tokens: int = Field(ge=0)
    codec: str
    meta: dict[str, Any] = Field(default_factory=dict)
    #: The chunk's model namespace and its parent's key ("" for chunks built outside a model's
    #: store): what `ChunkHasher.binding_problem` checks.
    namespace: str
    parent_hash: str
    tensors: dict[str, TensorRecord]


class ChunkStoreMetadata(_Record):
    """A whole chunk store: every chunk, tied to the model and pipeline that computed them."""

    format_version: Literal[2]
    kind: Literal["chunk_store"]
    kvpatch_version: str
    created: str
    model: ModelFingerprint
    pipeline: PipelineFingerprint
    tokenizer: str | None = None
    chunks: list[ChunkRecord]
    content_sha256: str

    def tensor_records(self) -> dict[str, TensorRecord]:
        return {chunk_tensor_name(i, name): record for i, chunk in enumerate(self.chunks)
                for name, record in chunk.tensors.items()}


AnyMetadata = SnapshotMetadata | ChunkStoreMetadata
#: The schema of each snapshot `kind`.
SCHEMAS: dict[str, type[AnyMetadata]] = {"request": SnapshotMetadata, "chunk_store": ChunkStoreMetadata}


def chunk_tensor_name(index: int, name: str) -> str:
    return f"chunks.{index}.{name}"


def layer_tensor_name(index: int, name: str) -> str:
    return f"layers.{index}.{name}"


def state_tensor_name(stage: str, name: str) -> str:
    """`quantizer.codebook.key.64` for state `codebook.key.64` of stage `quantizer/fibquant`."""
    return f"{stage.split('/')[0]}.{name}"


def encode_metadata(metadata: AnyMetadata) -> dict[str, str]:
    """The safetensors `__metadata__` for `metadata`: canonical JSON plus its SHA-256."""
    text = json.dumps(metadata.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return {METADATA_KEY: text, METADATA_SHA_KEY: _sha256(text)}


def decode_metadata(path: Path, header: dict[str, str], kind: str | None = None) -> AnyMetadata:
    """Check the metadata hash, then the format version, then the kind (`kind`, if given, is the
    one the caller can use), then that kind's schema."""
    text = header.get(METADATA_KEY)
    if text is None:
        raise SnapshotCorruptError(f"{path} is not a kvpatch snapshot: no {METADATA_KEY!r} in the safetensors metadata")
    if header.get(METADATA_SHA_KEY) != _sha256(text):
        raise SnapshotCorruptError(f"snapshot {path}: metadata checksum mismatch (the header was modified or damaged)")
    try:
        data: Any = json.loads(text)
    except ValueError as err:
        raise SnapshotCorruptError(f"snapshot {path}: metadata is not valid JSON ({err})") from None
    except RecursionError:
        raise SnapshotCorruptError(f"snapshot {path}: metadata is nested too deeply to be kvpatch's") from None
    if not isinstance(data, dict):
        raise SnapshotCorruptError(f"snapshot {path}: metadata is not a JSON object")
    found = data.get("kind", "request")
    schema = SCHEMAS.get(found) if isinstance(found, str) else None
    if schema is None:
        raise SnapshotCorruptError(f"snapshot {path}: unknown kind {echo(found)}; known: {', '.join(SCHEMAS)}")
    version, expected = data.get("format_version"), FORMAT_VERSIONS[found]
    if version != expected:
        raise SnapshotMismatchError(path, "format_version", expected, version,
                                    f"this kvpatch reads {found} snapshots of format version {expected} only"
                                    + (_OLD_HINTS.get(found, "") if isinstance(version, int) and version < expected else ""))
    if kind is not None and found != kind:
        raise SnapshotMismatchError(path, "kind", kind, found, _KIND_HINTS.get(found, ""))
    try:
        return schema.model_validate(data)
    except ValidationError as err:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or '<top level>'}: "
            f"{'required field is missing' if e['type'] == 'missing' else e['msg']}"
            for e in err.errors()
        )
        raise SnapshotCorruptError(f"snapshot {path}: invalid metadata: {problems}") from None


_OLD_HINTS = {"chunk_store": " (older files do not bind chunks to their keys: export the store again)"}

_KIND_HINTS = {
    "request": "a request's cache: load it with kvpatch.snapshot.load_snapshot (handle.import_snapshot)",
    "chunk_store": "a chunk store: load it with kvpatch.snapshot.import_store",
}


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()
