"""Cache snapshots: one request's KV cache as a single verified safetensors file.

    path = handle.export_snapshot("run/req-1.safetensors", token_ids=ids)   # atomic
    cache = handle.import_snapshot("run/req-1.safetensors")                  # checked, or SnapshotError

A chunk store (prefix reuse) is exported and imported whole with `export_store` / `import_store`.
The format is documented in docs/snapshot-format.md (format_version 1).
"""

from .api import Snapshot, export_snapshot, load_snapshot, read_metadata, read_snapshot, verify_snapshot
from .cache_codec import encode_cache, restore_cache
from .chunk_store import export_store, import_store, read_store_snapshot
from ..files.folders import GcReport, gc, list_snapshots, list_temp_files
from .fingerprint import architecture_digest, model_fingerprint, tokenizer_digest, weights_digest
from .format import FORMAT_VERSION, ChunkStoreMetadata, LayerRecord, SnapshotMetadata

__all__ = [
    "ChunkStoreMetadata",
    "FORMAT_VERSION",
    "GcReport",
    "LayerRecord",
    "Snapshot",
    "SnapshotMetadata",
    "architecture_digest",
    "encode_cache",
    "export_snapshot",
    "export_store",
    "gc",
    "import_store",
    "list_snapshots",
    "list_temp_files",
    "load_snapshot",
    "model_fingerprint",
    "read_metadata",
    "read_snapshot",
    "read_store_snapshot",
    "restore_cache",
    "tokenizer_digest",
    "verify_snapshot",
    "weights_digest",
]
