"""Every check a snapshot passes before it is used; each failure names the field it is about.

Integrity (the file is what its writer wrote) is separate from compatibility (it fits this
model, pipeline and tokenizer), so `kvpatch snapshot verify` can run the first without a model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..config import PipelineConfig
from ..errors import SnapshotCorruptError, SnapshotMismatchError
from ..cache import KVPatchCache, layer_layouts
from .cache_codec import ROLES, codes_tensor_name, layer_kind
from .fingerprint import model_fingerprint, tokenizer_digest
from .format import AnyMetadata, LayerRecord, ModelFingerprint, SnapshotMetadata
from ..files.safetensors_io import content_sha256, dtype_name


def check_integrity(path: Path, metadata: AnyMetadata, tensors: dict[str, torch.Tensor]) -> None:
    """The file holds exactly the tensors the metadata lists, as listed, with the right checksum."""
    expected = metadata.tensor_records()
    if expected.keys() != tensors.keys():
        missing, extra = sorted(expected.keys() - tensors.keys()), sorted(tensors.keys() - expected.keys())
        raise SnapshotCorruptError(f"snapshot {path}: tensors differ from the metadata (missing {missing}, unexpected {extra})")
    for name, record in expected.items():
        t = tensors[name]
        if record.dtype != dtype_name(t.dtype) or record.shape != list(t.shape):
            raise SnapshotCorruptError(
                f"snapshot {path}: tensor {name} is {dtype_name(t.dtype)} {list(t.shape)} in the file but "
                f"{record.dtype} {record.shape} in the metadata"
            )
    found = content_sha256(tensors)
    if found != metadata.content_sha256:
        raise SnapshotCorruptError(
            f"snapshot {path}: content checksum mismatch (expected {metadata.content_sha256}, found {found}): "
            "tensor data was modified or damaged"
        )


def _expect(path: Path, field: str, expected: Any, found: Any, hint: str = "") -> None:
    if expected != found:
        raise SnapshotMismatchError(path, field, expected, found, hint)


@dataclass(frozen=True)
class KVLayout:
    """What every full-precision K/V tensor of a model looks like: [batch, heads, tokens, head_dim]."""

    batch: int
    heads: int
    head_dim: int

    @classmethod
    def of(cls, model_config: Any, batch: int) -> "KVLayout":
        config = model_config.get_text_config(decoder=True)
        heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return cls(batch, int(heads), int(head_dim))


def check_fingerprint(path: Path, recorded: ModelFingerprint, model: torch.nn.Module) -> None:
    """Same model type, dtype, architecture and weights (in that order)."""
    ours = model_fingerprint(model)
    for field in ("model_type", "dtype", "architecture", "weights"):
        hint = "the snapshot was made with different weights" if field == "weights" else ""
        _expect(path, f"model.{field}", getattr(ours, field), getattr(recorded, field), hint)


def check_model(path: Path, metadata: SnapshotMetadata, model: torch.nn.Module) -> None:
    """The model's fingerprint; layers shaped for this model."""
    check_fingerprint(path, metadata.model, model)
    _expect(path, "layers (count)", len(layer_layouts(model.config)), len(metadata.layers))
    layout = KVLayout.of(model.config, metadata.batch_size)
    for i, record in enumerate(metadata.layers):
        _check_layer_shapes(path, f"layers.{i}", record, layout)


def _check_layer_shapes(path: Path, where: str, record: LayerRecord, layout: KVLayout) -> None:
    """Token counts add up, and every tensor is shaped for `layout`."""
    if not record.tensors:
        _expect(path, f"{where}.seq_length", 0, record.seq_length, "a layer without tensors holds no tokens")
        return
    counted = record.sink_tokens + record.quantized_tokens + record.residual_tokens
    if record.kind == "sliding":
        limit = min(record.seq_length, record.sliding_window or 0)
        if record.residual_tokens > limit:
            raise SnapshotMismatchError(path, f"{where}.residual_tokens", f"<= {limit}", record.residual_tokens,
                                        "a sliding layer holds at most its window of the tokens it saw")
    else:
        _expect(path, f"{where}.seq_length", counted, record.seq_length)
    full = {"keys": record.residual_tokens, "values": record.residual_tokens}
    if record.sink_tokens:
        full.update({"sink.keys": record.sink_tokens, "sink.values": record.sink_tokens})
    codes = {}
    for role, codes_record in zip(ROLES, (record.key_codes, record.value_codes)):
        _expect(path, f"{where}.{role}_codes (present)", record.quantized_tokens > 0, codes_record is not None)
        if codes_record is None:
            continue
        _expect(path, f"{where}.{role}_codes.dim", layout.head_dim, codes_record.dim)
        blocks, partial = divmod(record.quantized_tokens, codes_record.block_tokens)
        _expect(path, f"{where}.quantized_tokens % {role}_codes.block_tokens", 0, partial)
        codes.update({codes_tensor_name(role, n): blocks for n in codes_record.names})
    _expect(path, f"{where}.tensors", sorted([*full, *codes]), sorted(record.tensors))
    for name, tokens in full.items():
        shape = [layout.batch, layout.heads, tokens, layout.head_dim]
        _expect(path, f"{where}.{name}.shape", shape, record.tensors[name].shape)
    _expect(path, f"{where} full-precision dtypes", {record.tensors["keys"].dtype},
            {record.tensors[name].dtype for name in full})
    for name, blocks in codes.items():
        _expect(path, f"{where}.{name}.shape[:3]", [layout.batch, layout.heads, blocks], record.tensors[name].shape[:3])


def check_pipeline(path: Path, metadata: AnyMetadata, config: PipelineConfig) -> None:
    _expect(path, "pipeline.digest", config.digest(), metadata.pipeline.digest,
            f"the snapshot was made with config {metadata.pipeline.name!r}, this pipeline is {config.name!r}")


def check_tokenizer(path: Path, metadata: AnyMetadata, tokenizer: Any | None) -> None:
    """Only when both sides know their tokenizer: token ids mean nothing under another vocabulary."""
    if tokenizer is not None and metadata.tokenizer is not None:
        _expect(path, "tokenizer", tokenizer_digest(tokenizer), metadata.tokenizer)


def check_cache_fits(path: Path, metadata: SnapshotMetadata, cache: KVPatchCache) -> None:
    """Each record matches the layer the pipeline built for it: kind, window, quantizer layout."""
    _expect(path, "layers (count)", len(cache.layers), len(metadata.layers))
    for i, (layer, record) in enumerate(zip(cache.layers, metadata.layers)):
        where = f"layers.{i}"
        _expect(path, f"{where}.kind", layer_kind(layer), record.kind)
        _expect(path, f"{where}.sliding_window", getattr(layer, "sliding_window", None), record.sliding_window)
        if record.kind != "quantized" or not record.tensors:
            continue
        _expect(path, f"{where}.sink_tokens", min(layer.sink_tokens, record.seq_length), record.sink_tokens)
        for role, codes_record in zip(ROLES, (record.key_codes, record.value_codes)):
            if codes_record is not None:
                _expect(path, f"{where}.{role}_codes.block_tokens", layer.quantizer.block_tokens(role),
                        codes_record.block_tokens)


def check_token_ids(path: Path, field: str, ids: torch.Tensor | list[list[int]], vocab_size: int) -> None:
    """Every token id of `field` is one the model can read: 0 <= id < vocab_size (an id outside
    would index past the embedding, or silently mean another token after a vocabulary change)."""
    values = torch.as_tensor(ids, dtype=torch.int64).flatten() if not isinstance(ids, torch.Tensor) else ids.flatten()
    if values.numel() == 0:
        return
    low, high = int(values.min()), int(values.max())
    if low < 0 or high >= vocab_size:
        bad = low if low < 0 else high
        raise SnapshotMismatchError(path, f"{field} (token id range)", f"ids in [0, {vocab_size})", bad,
                                    "the snapshot holds token ids this model's vocabulary does not have")


def check_consistency(path: Path, metadata: SnapshotMetadata) -> None:
    """Every layer saw `token_count` tokens, and the token ids (if any) cover them in every row."""
    for i, record in enumerate(metadata.layers):
        if record.tensors:
            _expect(path, f"layers.{i}.seq_length", metadata.token_count, record.seq_length)
    if metadata.token_ids is not None:
        found = [len(metadata.token_ids), *sorted({len(row) for row in metadata.token_ids})]
        _expect(path, "token_ids (shape)", [metadata.batch_size, metadata.token_count], found)
