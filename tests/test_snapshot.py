"""Cache snapshots (kvpatch.snapshot): exact round trips across processes, refusal of every kind
of damaged or mismatched file, crash safety of writes, and the `kvpatch snapshot` CLI."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

import kvpatch
from kvpatch.cli import main
from kvpatch.compat import cache_kwarg
from kvpatch.errors import SnapshotCorruptError, SnapshotError, SnapshotMismatchError
from kvpatch.cache import layer_kv_tensors
from kvpatch.snapshot import (
    export_snapshot, list_snapshots, list_temp_files, load_snapshot, read_metadata, read_snapshot, verify_snapshot,
)
from kvpatch.snapshot.format import METADATA_KEY, METADATA_SHA_KEY
from kvpatch.files.safetensors_io import content_sha256, read_header, read_tensors
from kvpatch.testing import TINY_CONFIGS, prompt_ids, tiny_model, tiny_tokenizer

PROMPT_LEN = 30


def small_quantized(name: str) -> dict[str, Any]:
    """A bundled quantized config with a residual window and groups small enough that a 30-token
    prompt already has codes (the bundled 128-token window would keep it all in full precision)."""
    config = kvpatch.load_config(name).model_dump()
    quantizer, storage = config["stages"]
    quantizer["params"]["group_size"] = 8
    storage["params"].update(residual_length=8, sink_tokens=2)
    return config


CONFIGS: dict[str, Any] = {"default": "default", "kivi4": small_quantized("kivi4"), "kivi2": small_quantized("kivi2"),
                           "fp8": small_quantized("fp8")}


def patched(family: str, config: str = "default", dtype: torch.dtype = torch.float32, seed: int = 0):
    model = tiny_model(family, seed=seed).to(dtype)
    return model, kvpatch.apply(model, CONFIGS[config])


def prefill(model: torch.nn.Module, handle: kvpatch.PatchHandle, ids: torch.Tensor) -> kvpatch.KVPatchCache:
    cache = handle.new_cache()
    with torch.no_grad():
        model(input_ids=ids, **{cache_kwarg(model): cache})
    return cache


def kv_state(cache: kvpatch.KVPatchCache) -> list[torch.Tensor | None]:
    """Every tensor each layer holds (codes, sinks, residual), cloned."""
    return [t.clone() if t is not None else None for layer in cache.layers for t in layer_kv_tensors(layer)]


def assert_same_state(expected: list[torch.Tensor | None], found: list[torch.Tensor | None]) -> None:
    assert len(expected) == len(found)
    for a, b in zip(expected, found):
        assert (a is None) == (b is None)
        if a is not None:
            assert a.dtype == b.dtype and torch.equal(a, b)


def greedy(model: torch.nn.Module, ids: torch.Tensor, cache: kvpatch.KVPatchCache) -> torch.Tensor:
    return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                          **{cache_kwarg(model): cache})


# -- round trip in a new process ----------------------------------------------------------------

CASES = [
    (family, config, dtype)
    for family in ("llama", "gemma2", "qwen2")
    for config, dtype in (("default", "float32"), ("default", "bfloat16"), ("kivi4", "float32"), ("kivi2", "bfloat16"),
                          ("fp8", "bfloat16"))
]

CHILD = r"""
import json, sys, torch
from safetensors.torch import save_file
import kvpatch
from kvpatch.compat import cache_kwarg
from kvpatch.cache import layer_kv_tensors
from kvpatch.snapshot import read_metadata
from kvpatch.testing import tiny_model

manifest = json.load(open(sys.argv[1]))
out = {}
for case in manifest["cases"]:
    model = tiny_model(case["family"]).to(getattr(torch, case["dtype"]))
    handle = kvpatch.apply(model, case["config"])
    cache = handle.import_snapshot(case["path"])
    kv = [t for layer in cache.layers for t in layer_kv_tensors(layer)]
    out.update({f"{case['key']}.kv.{i}": t.contiguous() for i, t in enumerate(kv) if t is not None})
    out[f"{case['key']}.seen"] = torch.tensor([layer.get_seq_length() for layer in cache.layers])
    next_ids = torch.tensor([[case["next_token"]]])
    with torch.no_grad():
        out[f"{case['key']}.logits"] = model(input_ids=next_ids, **{cache_kwarg(model): cache}).logits.contiguous()
    full = torch.cat([torch.tensor(read_metadata(case["path"]).token_ids), next_ids], dim=1)
    out[f"{case['key']}.tokens"] = model.generate(full, attention_mask=torch.ones_like(full), max_new_tokens=6,
                                                  do_sample=False, **{cache_kwarg(model): handle.import_snapshot(case["path"])})
    kvpatch.unpatch(model)
save_file(out, manifest["out"])
"""


def test_round_trip_in_a_new_process_is_bit_identical(tmp_path: Path) -> None:
    """K/V bit-identical, next-step logits identical and the same greedy continuation after a
    load in a fresh interpreter: fp32 and bf16 dense, int4 and int2 codes, sliding layers."""
    ids = prompt_ids(1, PROMPT_LEN)
    manifest: dict[str, Any] = {"cases": [], "out": str(tmp_path / "child.safetensors")}
    expected: dict[str, dict[str, Any]] = {}
    for family, config, dtype in CASES:
        key = f"{family}-{config}-{dtype}"
        model, handle = patched(family, config, getattr(torch, dtype))
        cache = prefill(model, handle, ids[:, :-1])
        path = handle.export_snapshot(tmp_path / f"{key}.safetensors", token_ids=ids[:, :-1])
        state = kv_state(cache)
        seen = [layer.get_seq_length() for layer in cache.layers]
        with torch.no_grad():
            logits = model(input_ids=ids[:, -1:], **{cache_kwarg(model): cache}).logits
        tokens = greedy(model, ids, prefill(model, handle, ids[:, :-1]))
        expected[key] = {"state": state, "seen": seen, "logits": logits, "tokens": tokens}
        manifest["cases"].append({"key": key, "family": family, "dtype": dtype, "config": CONFIGS[config],
                                  "path": str(path), "next_token": int(ids[0, -1])})
        kvpatch.unpatch(model)
    quantized = [e["state"] for k, e in expected.items() if "kivi" in k]
    assert all(any(t is not None and t.dtype == torch.uint8 for t in s) for s in quantized), "no codes were stored"

    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    run = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path / "manifest.json")], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    with safe_open(manifest["out"], framework="pt") as child:
        for key, e in expected.items():
            present = [t for t in e["state"] if t is not None]
            assert_same_state(present, [child.get_tensor(f"{key}.kv.{i}") for i in range(len(present))])
            assert child.get_tensor(f"{key}.seen").tolist() == e["seen"], key
            assert torch.equal(child.get_tensor(f"{key}.logits"), e["logits"]), key
            assert torch.equal(child.get_tensor(f"{key}.tokens"), e["tokens"]), key


# -- refusals -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def llama() -> tuple[torch.nn.Module, kvpatch.PatchHandle]:
    return patched("llama")


@pytest.fixture(scope="module")
def snapshot_file(llama, tmp_path_factory: pytest.TempPathFactory) -> Path:
    model, handle = llama
    ids = prompt_ids(1, 12)
    prefill(model, handle, ids)
    return handle.export_snapshot(tmp_path_factory.mktemp("snap") / "ref.safetensors", token_ids=ids,
                                  tokenizer=tiny_tokenizer())


def copy_to(src: Path, tmp_path: Path, edit: Callable[[bytearray], None] = lambda data: None) -> Path:
    data = bytearray(src.read_bytes())
    edit(data)
    path = tmp_path / "edited.safetensors"
    path.write_bytes(bytes(data))
    return path


def resign(src: Path, tmp_path: Path, edit: Callable[[dict, dict], None]) -> Path:
    """A copy whose metadata and tensors were changed by `edit` and whose checksums were then
    recomputed: a well-formed file that only the semantic checks can refuse."""
    header, _ = read_header(src)
    metadata, tensors = json.loads(header[METADATA_KEY]), read_tensors(src)
    edit(metadata, tensors)
    if "content_sha256" in metadata:
        metadata["content_sha256"] = content_sha256(tensors)
    text = json.dumps(metadata, sort_keys=True, separators=(",", ":"))
    path = tmp_path / "resigned.safetensors"
    save_file(tensors, str(path), metadata={METADATA_KEY: text, METADATA_SHA_KEY: hashlib.sha256(text.encode()).hexdigest()})
    return path


def refusal(path: Path, model: torch.nn.Module, handle: kvpatch.PatchHandle, kind: type[SnapshotError] = SnapshotError,
            **kwargs: Any) -> SnapshotError:
    with pytest.raises(kind) as info:
        load_snapshot(path, model, handle.pipeline, **kwargs)
    return info.value


def test_intact_snapshot_loads(snapshot_file: Path, llama) -> None:
    model, handle = llama
    metadata = verify_snapshot(snapshot_file, model, handle.config, tiny_tokenizer())
    assert metadata.token_ids == prompt_ids(1, 12).tolist() and metadata.token_count == 12
    assert load_snapshot(snapshot_file, model, handle.pipeline).get_seq_length() == 12


@pytest.mark.parametrize("keep", [0, 5, 8, 60, -200, -1])
def test_truncated_file_is_refused(snapshot_file: Path, llama, tmp_path: Path, keep: int) -> None:
    model, handle = llama
    path = copy_to(snapshot_file, tmp_path, lambda data: data.__delitem__(slice(keep, None)))
    error = refusal(path, model, handle, SnapshotCorruptError)
    assert "truncated" in str(error)


def test_flipped_byte_in_metadata_is_refused(snapshot_file: Path, llama, tmp_path: Path) -> None:
    model, handle = llama
    position = snapshot_file.read_bytes().index(b'token_count\\":12') + len(b'token_count\\":1')
    path = copy_to(snapshot_file, tmp_path, lambda data: data.__setitem__(position, ord("3")))
    assert "metadata checksum mismatch" in str(refusal(path, model, handle, SnapshotCorruptError))


def test_flipped_byte_in_tensor_data_is_refused(snapshot_file: Path, llama, tmp_path: Path) -> None:
    model, handle = llama
    path = copy_to(snapshot_file, tmp_path, lambda data: data.__setitem__(-3, data[-3] ^ 0x10))
    assert "content checksum mismatch" in str(refusal(path, model, handle, SnapshotCorruptError))


def test_different_weights_same_architecture_are_refused(snapshot_file: Path) -> None:
    other, handle = patched("llama", seed=1)
    error = refusal(snapshot_file, other, handle, SnapshotMismatchError)
    assert error.field == "model.weights" and "different weights" in str(error)


def test_different_architecture_is_refused(snapshot_file: Path) -> None:
    config = TINY_CONFIGS["llama"]()
    config.intermediate_size = 96
    torch.manual_seed(0)
    wider = AutoModelForCausalLM.from_config(config).eval()
    assert refusal(snapshot_file, wider, kvpatch.apply(wider, "default"), SnapshotMismatchError).field == "model.architecture"
    mistral, handle = patched("mistral")
    assert refusal(snapshot_file, mistral, handle, SnapshotMismatchError).field == "model.model_type"
    bf16, handle = patched("llama", dtype=torch.bfloat16)
    assert refusal(snapshot_file, bf16, handle, SnapshotMismatchError).field == "model.dtype"


def test_different_config_is_refused(snapshot_file: Path) -> None:
    model, handle = patched("llama", "kivi4")
    error = refusal(snapshot_file, model, handle, SnapshotMismatchError)
    assert error.field == "pipeline.digest" and "'default'" in str(error)


def test_different_tokenizer_is_refused(snapshot_file: Path, llama) -> None:
    tokenizer = tiny_tokenizer()
    tokenizer.add_tokens(["<extra>"])
    assert refusal(snapshot_file, *llama, SnapshotMismatchError, tokenizer=tokenizer).field == "tokenizer"


def test_other_format_version_is_refused(snapshot_file: Path, llama, tmp_path: Path) -> None:
    path = resign(snapshot_file, tmp_path, lambda meta, tensors: meta.update(format_version=2))
    error = refusal(path, *llama, SnapshotMismatchError)
    assert error.field == "format_version" and (error.expected, error.found) == (1, 2)


@pytest.mark.parametrize("key", ["model", "content_sha256", "layers"])
def test_missing_metadata_key_is_refused(snapshot_file: Path, llama, tmp_path: Path, key: str) -> None:
    path = resign(snapshot_file, tmp_path, lambda meta, tensors: meta.pop(key))
    assert f"{key}: required field is missing" in str(refusal(path, *llama, SnapshotCorruptError))


def test_plain_safetensors_file_is_refused(llama, tmp_path: Path) -> None:
    path = tmp_path / "plain.safetensors"
    save_file({"layers.0.keys": torch.zeros(1, 2, 3, 16)}, str(path))
    assert "not a kvpatch snapshot" in str(refusal(path, *llama, SnapshotCorruptError))


def test_shapes_that_do_not_fit_the_model_are_refused(snapshot_file: Path, llama, tmp_path: Path) -> None:
    def three_heads(meta: dict, tensors: dict) -> None:
        for name in ("keys", "values"):
            tensors[f"layers.0.{name}"] = torch.zeros(1, 3, 12, 16)
            meta["layers"][0]["tensors"][name]["shape"] = [1, 3, 12, 16]

    error = refusal(resign(snapshot_file, tmp_path, three_heads), *llama, SnapshotMismatchError)
    assert error.field == "layers.0.keys.shape" and error.found == [1, 3, 12, 16]


@pytest.mark.parametrize("bad_id", [-1, "vocab"])
def test_token_ids_outside_the_vocabulary_are_refused(snapshot_file: Path, llama, tmp_path: Path, bad_id) -> None:
    model, _ = llama
    vocab = model.config.vocab_size
    value = vocab if bad_id == "vocab" else bad_id

    def out_of_vocab(meta: dict, tensors: dict) -> None:
        meta["token_ids"][0][3] = value

    error = refusal(resign(snapshot_file, tmp_path, out_of_vocab), *llama, SnapshotMismatchError)
    assert error.field == "token_ids (token id range)" and error.found == value


def test_tensors_missing_from_the_metadata_are_refused(snapshot_file: Path, llama, tmp_path: Path) -> None:
    path = resign(snapshot_file, tmp_path, lambda meta, tensors: tensors.update(extra=torch.zeros(2)))
    assert "unexpected ['extra']" in str(refusal(path, *llama, SnapshotCorruptError))


def test_random_corruption_never_loads_silently(snapshot_file: Path, llama, tmp_path: Path) -> None:
    """200 random flips, truncations, insertions and overwrites: each is refused with a
    SnapshotError or (a change inside the header's padding) loads exactly the original."""
    model, handle = llama
    original = snapshot_file.read_bytes()
    header_end = 8 + int.from_bytes(original[:8], "little")
    reference_metadata = read_metadata(snapshot_file)
    reference_state = kv_state(load_snapshot(snapshot_file, model, handle.pipeline))
    rng = random.Random(0)
    refused = 0
    for trial in range(200):
        data = bytearray(original)
        position = rng.randrange(header_end if trial % 2 else len(data))  # half of them in the header
        operation = trial % 4
        if operation == 0:
            data[position] ^= 1 << rng.randrange(8)
        elif operation == 1:
            del data[position:]
        elif operation == 2:
            data[position:position] = rng.randbytes(rng.randint(1, 8))
        else:
            data[position:position + 4] = rng.randbytes(4)
        path = tmp_path / f"fuzz-{trial}.safetensors"
        path.write_bytes(bytes(data))
        try:
            cache = load_snapshot(path, model, handle.pipeline)
            metadata = read_metadata(path)
        except SnapshotError:
            refused += 1
            continue
        finally:
            path.unlink()
        assert metadata == reference_metadata
        assert_same_state(reference_state, kv_state(cache))
    assert refused >= 190


# -- stage state --------------------------------------------------------------------------------

def test_quantizer_state_is_saved_and_restored(tmp_path: Path) -> None:
    model, handle = patched("llama", "kivi4")
    quantizer = handle.pipeline.stages[0]
    book = torch.randn(16, 8)
    quantizer.state_tensors = lambda: {"codebook.key.16": book}
    prefill(model, handle, prompt_ids(1, PROMPT_LEN))
    path = handle.export_snapshot(tmp_path / "state.safetensors")
    assert "quantizer.codebook.key.16" in read_tensors(path)
    assert list(read_metadata(path).stage_state) == ["quantizer/kivi"]

    other, other_handle = patched("llama", "kivi4")
    received: dict[str, torch.Tensor] = {}
    with pytest.raises(SnapshotMismatchError) as info:
        other_handle.import_snapshot(path)  # its quantizer cannot load state
    assert info.value.field == "stage_state.quantizer/kivi"
    other_handle.pipeline.stages[0].load_state_tensors = received.update
    other_handle.import_snapshot(path)
    assert torch.equal(received["codebook.key.16"], book)


def test_calibrated_fibquant_codebooks_travel_with_the_snapshot(tmp_path: Path) -> None:
    config = {"name": "fib", "fidelity": {"lossless": False}, "stages": [
        {"kind": "quantizer", "impl": "fibquant",
         "params": {"code_bits": 6, "block_dim": 4, "lloyd_iters": 2, "calibration": "first_encode"}},
        {"kind": "storage", "impl": "quantized", "params": {"residual_length": 8}},
    ]}
    ids = prompt_ids(1, 300)
    model = tiny_model("llama")
    handle = kvpatch.apply(model, config)
    cache = prefill(model, handle, ids[:, :-1])
    path = handle.export_snapshot(tmp_path / "fib.safetensors", token_ids=ids[:, :-1])
    assert read_metadata(path).stage_state, "the calibrated codebooks were not saved"
    decoded = [layer.decoded() for layer in cache.layers]
    expected = greedy(model, ids, cache)
    kvpatch.unpatch(model)

    fresh = tiny_model("llama")
    fresh_handle = kvpatch.apply(fresh, config)
    restored = fresh_handle.import_snapshot(path)
    for (keys, values), layer in zip(decoded, restored.layers):
        assert torch.equal(keys, layer.decoded()[0]) and torch.equal(values, layer.decoded()[1])
    assert torch.equal(greedy(fresh, ids, restored), expected)


# -- crash safety -------------------------------------------------------------------------------

def _export_forever(path: Path, caches: list[kvpatch.KVPatchCache], model: torch.nn.Module,
                    pipeline: Any, ids: list[torch.Tensor]) -> None:
    torch.set_num_threads(1)  # a forked child must not use the parent's thread pool
    for i in range(10**9):
        export_snapshot(path, caches[i % 2], model, pipeline, token_ids=ids[i % 2])


def _export_n(path: Path, cache: kvpatch.KVPatchCache, model: torch.nn.Module, pipeline: Any, n: int) -> None:
    torch.set_num_threads(1)
    for _ in range(n):
        export_snapshot(path, cache, model, pipeline)


@pytest.fixture(scope="module")
def two_large_caches():
    """Two caches of ~4 MiB each (batch 16 x 512 tokens), so a write takes a while to kill."""
    model, handle = patched("llama")
    ids = [prompt_ids(16, 512, seed=s) for s in (1, 2)]
    return model, handle, [prefill(model, handle, i) for i in ids], ids


def test_kill_during_export_never_leaves_a_torn_snapshot(two_large_caches, tmp_path: Path) -> None:
    model, handle, caches, ids = two_large_caches
    path = tmp_path / "live.safetensors"
    export_snapshot(path, caches[0], model, handle.pipeline, token_ids=ids[0])
    valid = {content_sha256(read_snapshot(path).tensors)}
    export_snapshot(path, caches[1], model, handle.pipeline, token_ids=ids[1])
    valid.add(content_sha256(read_snapshot(path).tensors))
    start = time.perf_counter()
    export_snapshot(path, caches[0], model, handle.pipeline, token_ids=ids[0])
    write_s = time.perf_counter() - start

    context = multiprocessing.get_context("fork")
    rng = random.Random(1)
    leaked: set[Path] = set()  # temp files of writes that a kill interrupted
    for _ in range(20):
        child = context.Process(target=_export_forever, args=(path, caches, model, handle.pipeline, ids))
        child.start()
        time.sleep(rng.uniform(0.0, 4 * write_s))
        os.kill(child.pid, signal.SIGKILL)
        child.join()
        assert child.exitcode == -signal.SIGKILL
        snapshot = read_snapshot(path)  # raises if torn
        assert snapshot.metadata.content_sha256 in valid
        leaked.update(list_temp_files(tmp_path))
    assert leaked, "no kill landed mid-write; the test did not exercise anything"
    assert load_snapshot(path, model, handle.pipeline).get_seq_length() == 512
    assert list_snapshots(tmp_path) == [path]
    report = kvpatch.snapshot.gc(tmp_path)
    assert report.removed_temp_files and not report.removed_snapshots
    assert list_temp_files(tmp_path) == [] and sorted(tmp_path.iterdir()) == [path]


def test_concurrent_writers_to_one_path(two_large_caches, tmp_path: Path) -> None:
    model, handle, caches, _ = two_large_caches
    path = tmp_path / "shared.safetensors"
    context = multiprocessing.get_context("fork")
    writers = [context.Process(target=_export_n, args=(path, cache, model, handle.pipeline, 4)) for cache in caches]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join()
        assert writer.exitcode == 0
    assert read_snapshot(path).metadata.batch_size == 16
    assert sorted(tmp_path.iterdir()) == [path]


# -- command line -------------------------------------------------------------------------------

def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    try:
        code = main(["snapshot", *map(str, argv)])
    except SystemExit as exit:  # argparse: --help and usage errors
        code = exit.code
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def test_cli_export_inspect_verify(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = tmp_path / "cli.safetensors"
    code, out = cli(capsys, "export", "--model", "tiny-llama", "--config", "default", "--prompt", "hello there", "--out", path)
    assert code == 0 and path.is_file(), out
    code, out = cli(capsys, "inspect", path)
    assert code == 0 and "pipeline   default" in out and "token ids stored" in out
    code, out = cli(capsys, "inspect", path, "--json")
    assert code == 0 and json.loads(out)["token_count"] == 11
    code, out = cli(capsys, "inspect", tmp_path)
    assert code == 0 and "cli.safetensors" in out
    code, out = cli(capsys, "verify", path, "--model", "tiny-llama", "--config", "default")
    assert code == 0 and "checked integrity, model, shapes, tokenizer, config" in out
    code, out = cli(capsys, "verify", path, "--config", "kivi4")
    assert code == 1 and "pipeline.digest mismatch" in out

    damaged = copy_to(path, tmp_path, lambda data: data.__setitem__(-1, data[-1] ^ 1))
    assert cli(capsys, "verify", damaged)[0] == 1
    assert cli(capsys, "inspect", damaged)[0] == 0  # metadata intact; only verify reads the tensors
    header_damaged = copy_to(path, tmp_path, lambda data: data.__setitem__(40, data[40] ^ 1))
    assert cli(capsys, "inspect", header_damaged)[0] == 1
    assert cli(capsys, "inspect", tmp_path)[0] == 1
    assert cli(capsys, "verify", tmp_path / "missing.safetensors")[0] == 2
    assert cli(capsys, "verify", path, "--model", "no-such-model")[0] == 2


def test_cli_gc_and_usage_errors(capsys: pytest.CaptureFixture[str], snapshot_file: Path, tmp_path: Path) -> None:
    for i in range(3):
        shutil.copy(snapshot_file, tmp_path / f"s{i}.safetensors")
        os.utime(tmp_path / f"s{i}.safetensors", (1000.0 + i, 1000.0 + i))
    dead = tmp_path / f".s0.safetensors.{socket.gethostname()}-99999999-abc.tmp"
    dead.write_bytes(b"partial")
    live = tmp_path / f".s0.safetensors.{socket.gethostname()}-{os.getpid()}-abc.tmp"
    live.write_bytes(b"partial")
    code, out = cli(capsys, "inspect", tmp_path)
    assert code == 0 and out.count(".safetensors ") == 3 and "2 temp files" in out

    code, out = cli(capsys, "gc", tmp_path, "--keep", "1")
    assert code == 0 and "2 snapshots and 1 temp files removed" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == [live.name, "s2.safetensors"]
    code, out = cli(capsys, "gc", tmp_path, "--older-than", "1")
    assert code == 0 and list_snapshots(tmp_path) == []

    assert cli(capsys, "gc", tmp_path, "--keep", "1", "--older-than", "2")[0] == 2
    assert cli(capsys, "gc", tmp_path, "--keep", "-1")[0] == 2
    assert cli(capsys, "gc", tmp_path / "nowhere")[0] == 2
    assert cli(capsys)[0] == 2
    code, out = cli(capsys, "--help")
    assert code == 0 and all(word in out for word in ("inspect", "verify", "gc", "export"))
