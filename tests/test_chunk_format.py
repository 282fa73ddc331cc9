"""The chunk format of docs/serving.md is the one kvpatch writes: chunks that a real prefix-reuse
run put in its disk tier are decoded and checked here with safetensors, hashlib and hmac only,
following that page (seal, HMAC, key chain from the token ids, tensor layout)."""

from __future__ import annotations

import hashlib
import hmac
import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load as load_safetensors

import kvpatch
from kvpatch.patch.reuse_controller import reuse_namespace
from kvpatch.testing import tiny_model

SECRET = b"format-test-secret-0123456789"
CHUNK = 8


def H(data: bytes) -> str:  # noqa: N802  (the page's notation)
    return hashlib.sha256(data).hexdigest()


def decode_as_documented(data: bytes) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """Metadata and tensors of a value, after checking its seal and HMAC as the page says."""
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    metadata = dict(header.pop("__metadata__"))
    seal, mac = metadata.pop("kvpatch.chunk.sha256"), metadata.pop("kvpatch.chunk.hmac")
    canonical = json.dumps({"__metadata__": metadata, **header}, sort_keys=True, separators=(",", ":")).encode()
    digest = hashlib.sha256(canonical + b"\0" + data[8 + length :]).hexdigest()
    assert digest == seal
    message = b"kvpatch-chunk-hmac\0" + metadata["prefix_hash"].encode() + b"\0" + digest.encode()
    assert hmac.compare_digest(mac, hmac.new(SECRET, message, hashlib.sha256).hexdigest())
    return metadata, load_safetensors(data)


def test_stored_chunks_follow_the_documented_format(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KVPATCH_CHUNK_SECRET", SECRET.decode())
    model = tiny_model("llama")
    config = {"name": "format", "stages": [
        {"kind": "chunker", "impl": "fixed", "params": {"size": CHUNK}}, {"kind": "matcher", "impl": "exact"},
        {"kind": "store", "impl": "memory", "params": {"budget_bytes": 1, "disk": {"path": str(tmp_path)}}}]}
    kvpatch.apply(model, config)  # a RAM budget of 1 byte: every chunk goes to the disk tier
    ids = torch.randint(5, 300, (1, 3 * CHUNK + 3), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        model(input_ids=ids, logits_to_keep=1)
    files = sorted((tmp_path / "kvpatch-chunks-v2").glob("*.safetensors"))
    spans = [(start, min(start + CHUNK, ids.shape[1])) for start in range(0, ids.shape[1], CHUNK)]
    assert len(files) == len(spans) == 4  # three full chunks and the 3-token tail

    namespace = H(b"kvpatch-chunk-namespace\0" + reuse_namespace(model).encode())
    tokens = b"".join(int(t).to_bytes(8, "little", signed=True) for t in ids[0].tolist())
    parent, expected = namespace, {}
    for start, end in spans:
        piece = tokens[8 * start : 8 * end]
        key = H(b"prefix\0" + parent.encode() + b"\0" + piece)
        expected[key] = (start, end, parent, H(b"content\0" + namespace.encode() + b"\0" + piece))
        parent = key
    config_ = model.config
    heads, dim = config_.num_key_value_heads, config_.hidden_size // config_.num_attention_heads
    for path in files:
        metadata, tensors = decode_as_documented(path.read_bytes())
        start, end, parent_hash, content = expected[metadata["prefix_hash"]]
        assert path.name == metadata["prefix_hash"] + ".safetensors"
        assert (metadata["format"], metadata["version"], metadata["codec"]) == ("kvpatch-chunk", "2", "dense")
        assert metadata["namespace"] == namespace and metadata["parent_hash"] == parent_hash
        assert metadata["content_hash"] == content and int(metadata["start"]) == start
        assert torch.equal(tensors["token_ids"], ids[0, start:end])
        assert tensors["payload.kv"].shape == (config_.num_hidden_layers, 2, heads, end - start, dim)
