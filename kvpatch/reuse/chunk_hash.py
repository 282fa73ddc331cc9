"""Chunk keys: a prefix-chained hash (exact reuse) and a content-only hash (approximate reuse).

Keys must agree across processes and machines (a disk tier or Redis outlives the process), so
they hash explicit little-endian int64 token bytes with a named algorithm: never Python's
`hash()`, never a per-process salt. Every key starts from a namespace (the model fingerprint and
the chunk codec), so two models, or two dtypes of one model, never share an entry.

The same hashes bind a stored chunk to its key: a chunk records its namespace and its parent's
key, so `binding_problem` can recompute its key and content hash from its own token ids. A reader
that asks for key K and gets a chunk whose tokens hash to K (from the parent it names) holds the
K/V of exactly the tokens and history it asked for (collision resistance of the hash).

Every key names its algorithm: SHA-256 keys (the default) are bare lowercase hex, as they always
were; every other algorithm's namespace, prefix and content keys start with its tag (`blake2b:`,
`blake3:`, `xxh3:`), so keys of two algorithms can never be equal and a chunk hashed one way is
foreign (another namespace) to a store bound to another. xxhash (XXH3-128) is fast but not
collision resistant against chosen inputs: its keys are only for chunks that stay in this
process's RAM (`shareable` is False; a disk or Redis tier, or a chunk-store snapshot, refuses it).
"""

from __future__ import annotations

import hashlib
import importlib
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..errors import ConfigError
from ..stage_specs.reuse import SHAREABLE_ALGORITHMS, HashAlgorithm, unshareable_problem
from .chunk import StoredChunk
from .chunker import Span


#: The prefix of every key (namespace, prefix hash, content hash) per algorithm: SHA-256 keys
#: stay bare hex (as before tags existed: stored chunks keep their keys), the others name their algorithm.
KEY_TAGS: dict[str, str] = {"sha256": "", "blake2b": "blake2b:", "blake3": "blake3:", "xxhash": "xxh3:"}


def _optional(module: str, algorithm: str, extra: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ConfigError(f"hasher algorithm {algorithm!r} needs the {module} package: pip install {module} "
                          f"(or pip install 'kvpatch[{extra}]'), or use algorithm sha256 (the default)") from None


def _hasher_factory(algorithm: HashAlgorithm) -> Callable[[bytes], str]:
    """The digest of `algorithm` as lowercase hex, after the algorithm's key tag."""
    if algorithm not in KEY_TAGS:
        raise ConfigError(f"hasher algorithm: expected one of {', '.join(KEY_TAGS)}, got {algorithm!r}")
    tag = KEY_TAGS[algorithm]
    if algorithm == "sha256":
        return lambda data: hashlib.sha256(data).hexdigest()
    if algorithm == "blake2b":
        return lambda data: tag + hashlib.blake2b(data, digest_size=32).hexdigest()
    if algorithm == "blake3":
        blake3 = _optional("blake3", "blake3", "fast-hash").blake3
        return lambda data: tag + blake3(data).hexdigest()
    xxh3_128_hexdigest = _optional("xxhash", "xxhash", "fast-hash").xxh3_128_hexdigest
    return lambda data: tag + xxh3_128_hexdigest(data)


def token_bytes(token_ids: Sequence[int] | torch.Tensor) -> bytes:
    """Little-endian int64 bytes of the token ids (the same on every machine)."""
    tensor = torch.as_tensor(token_ids, dtype=torch.int64).cpu().contiguous()
    return tensor.numpy().astype("<i8", copy=False).tobytes()


class ChunkHasher:
    """Prefix and content hashes of a prompt's chunks under one namespace."""

    def __init__(self, namespace: str, algorithm: HashAlgorithm = "sha256") -> None:
        self.algorithm = algorithm
        self._digest = _hasher_factory(algorithm)
        self.namespace = self._digest(b"kvpatch-chunk-namespace\0" + namespace.encode())

    @property
    def shareable(self) -> bool:
        """Whether keys of this algorithm may leave the process (disk, Redis, snapshots): only
        collision-resistant ones, where a chunk whose tokens hash to its key is that key's chunk."""
        return self.algorithm in SHAREABLE_ALGORITHMS

    def require_shareable(self, where: str) -> None:
        """ConfigError unless `shareable`: `where` (a disk tier, ...) would persist or share keys."""
        if not self.shareable:
            raise ConfigError(unshareable_problem(self.algorithm, where))

    def content_hash(self, tokens: bytes) -> str:
        return self._digest(b"content\0" + self.namespace.encode() + b"\0" + tokens)

    def prefix_hash(self, parent: str, tokens: bytes) -> str:
        """The key of a chunk of `tokens` after the chunk keyed `parent` (the namespace: first)."""
        return self._digest(b"prefix\0" + parent.encode() + b"\0" + tokens)

    def binding_problem(self, chunk: StoredChunk) -> str | None:
        """Why `chunk` is not what its keys say under this hasher (None: it is): another
        namespace, or token ids that do not hash to its prefix and content hashes."""
        if chunk.namespace != self.namespace:
            return f"model namespace {chunk.namespace[:16]!r} is not this store's {self.namespace[:16]!r}"
        if chunk.token_ids.dim() != 1 or chunk.token_ids.dtype != torch.int64:
            return "token_ids are not a 1-d int64 tensor"
        tokens = token_bytes(chunk.token_ids)
        if self.prefix_hash(chunk.parent_hash, tokens) != chunk.prefix_hash:
            return "its token ids and parent key do not hash to its key"
        if self.content_hash(tokens) != chunk.content_hash:
            return "its token ids do not hash to its content hash"
        return None

    def hashes(self, token_ids: Sequence[int] | torch.Tensor | bytes, spans: Sequence[Span],
               content: bool = True) -> tuple[list[str], list[str]]:
        """(prefix hashes, content hashes) of the chunks at `spans`; token ids may be given as
        `token_bytes` already (a prompt is converted once). With `content=False` the content
        hashes are "" (the exact-reuse lookup does not need them: it is on the TTFT path)."""
        data = token_ids if isinstance(token_ids, bytes) else token_bytes(token_ids)
        parent, prefixes, contents = self.namespace, [], []
        for start, end in spans:
            tokens = data[8 * start : 8 * end]
            parent = self.prefix_hash(parent, tokens)
            prefixes.append(parent)
            contents.append(self.content_hash(tokens) if content else "")
        return prefixes, contents

    def prefix_hashes(self, token_ids: Sequence[int] | torch.Tensor, spans: Sequence[Span]) -> list[str]:
        """Hash of each chunk chained with its parent's (the first chains from the namespace)."""
        return self.hashes(token_ids, spans)[0]

    def content_hashes(self, token_ids: Sequence[int] | torch.Tensor, spans: Sequence[Span]) -> list[str]:
        return self.hashes(token_ids, spans)[1]
