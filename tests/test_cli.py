"""The `kvpatch` command line: --help everywhere, exit codes, bench dispatch, eval, and snapshot
export / inspect / verify / import for request caches and chunk stores (in-process `main`)."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import kvpatch
import kvpatch.cli.listing
from kvpatch.cli import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, build_parser, main
from kvpatch.models import load_named
from kvpatch.reuse.disk_tier import SUBDIR
from kvpatch.testing import noisy_values_config

PROMPT = "The quick brown fox jumps over the lazy dog. " * 7  # > 2 chunks of 128 byte tokens


def run(capsys: pytest.CaptureFixture[str], *argv: object) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def command_paths(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every command and subcommand of the parser, as argv prefixes."""
    paths = [prefix]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                paths += command_paths(sub, (*prefix, name))
    return paths


COMMANDS = command_paths(build_parser())


def test_every_expected_command_exists() -> None:
    expected = {("configs",), ("validate",), ("run",), ("eval",), ("bench",), ("snapshot", "inspect"),
                ("snapshot", "verify"), ("snapshot", "gc"), ("snapshot", "export"), ("snapshot", "import")}
    assert expected <= set(COMMANDS)


@pytest.mark.parametrize("path", COMMANDS, ids=lambda p: " ".join(p) or "kvpatch")
def test_help_everywhere(path: tuple[str, ...], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([*path, "--help"])
    assert exit_info.value.code == 0
    assert "usage: kvpatch" in capsys.readouterr().out


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["no-such-command"])
    assert exit_info.value.code == EXIT_BAD_INPUT
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\nstages: [{kind: storage, impl: nope}]\n")
    code, _, err = run(capsys, "validate", "default", bad)
    assert code == EXIT_BAD_INPUT and "nope" in err
    code, _, err = run(capsys, "eval", "--config", "no_such_config")
    assert code == EXIT_BAD_INPUT and "no_such_config" in err
    assert run(capsys, "snapshot", "import", tmp_path / "missing.safetensors", "--model", "tiny-llama",
               "--config", "default")[0] == EXIT_BAD_INPUT


def test_interrupt_exits_130(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    def interrupted(args: argparse.Namespace) -> int:
        raise KeyboardInterrupt

    monkeypatch.setattr(kvpatch.cli.listing, "configs", interrupted)
    assert run(capsys, "configs")[0] == EXIT_INTERRUPTED


@pytest.mark.parametrize("argv", [["--help"], ["configs"], ["bench", "list"], ["snapshot", "--help"]],
                         ids=" ".join)
def test_quick_commands_import_neither_torch_nor_transformers(argv: list[str]) -> None:
    """Help and listings answer in about a second: the heavy imports belong to the
    commands that run a model."""
    script = ("import sys\nfrom kvpatch.cli import main\ntry:\n    code = main(sys.argv[1:])\n"
              "except SystemExit as done:\n    code = done.code\n"
              "heavy = sorted({'torch', 'transformers'} & set(sys.modules))\n"
              "print('HEAVY', heavy)\nsys.exit(code)")
    done = subprocess.run([sys.executable, "-c", script, *argv], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "HEAVY []" in done.stdout


def test_dtype_names_match_the_loader() -> None:
    from kvpatch.cli.parser import DTYPE_NAMES
    from kvpatch.models import DTYPES

    assert set(DTYPE_NAMES) == set(DTYPES)


def test_validate_counts_stages_in_words(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "validate", "default", "long_context")
    assert code == EXIT_OK and "(1 stage," in out and "stages," in out and "1 stages" not in out


def test_bench_summaries_are_whole_sentences(tmp_path: Path) -> None:
    script = tmp_path / "bench_x.py"
    script.write_text('"""Decode speed per config against the bandwidth\nfloor of the device. Details follow.\n\nMore."""\n')
    assert kvpatch.cli.listing.summary(script) == "Decode speed per config against the bandwidth floor of the device."
    script.write_text('"""Hit ratio of 1, 2, 4, ... processes. Details."""\n')
    assert kvpatch.cli.listing.summary(script) == "Hit ratio of 1, 2, 4, ... processes."
    for name, path in kvpatch.cli.parser.benchmarks().items():
        text = kvpatch.cli.listing.summary(path)
        assert text.endswith((".", "?", "!")) and "issue" not in text.lower(), (name, text)


def test_bench_lists_and_dispatches(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "bench", "list")
    assert code == EXIT_OK and {"hashing", "overhead", "compression"} <= {line.split()[0] for line in out.splitlines()}
    code, _, err = run(capsys, "bench", "no_such_bench")
    assert code == EXIT_BAD_INPUT and "hashing" in err
    done = subprocess.run([sys.executable, "-m", "kvpatch.cli", "bench", "hashing", "--help"],
                          capture_output=True, text=True)
    assert done.returncode == 0 and "usage: bench_hashing.py" in done.stdout  # the benchmark's own parser


def test_request_snapshot_import_continues_exactly(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = tmp_path / "req.safetensors"
    assert run(capsys, "snapshot", "export", "--model", "tiny-llama", "--config", "default", "--prompt", "hello there",
               "--out", path)[0] == EXIT_OK
    code, out, _ = run(capsys, "snapshot", "import", path, "--model", "tiny-llama", "--config", "default",
                       "--prompt", " and", "--max-new-tokens", "6")
    assert code == EXIT_OK
    model, tokenizer = load_named("tiny-llama", "cpu")  # unpatched, no snapshot: the reference
    ids = tokenizer("hello there", return_tensors="pt").input_ids
    ids = torch.cat([ids, torch.tensor([tokenizer(" and", add_special_tokens=False).input_ids])], 1)
    expected = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False)
    assert f"continuation: {tokenizer.decode(expected[0, ids.shape[1]:])!r}" in out
    assert run(capsys, "snapshot", "import", path, "--model", "tiny-llama", "--config", "fibquant")[0] == EXIT_FAILED


def test_chunk_store_snapshot_cli(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = tmp_path / "chunks.safetensors"
    code, out, _ = run(capsys, "snapshot", "export", "--chunk-store", "--model", "tiny-llama", "--config",
                       "prefix_reuse", "--prompt", PROMPT, "--out", path)
    assert code == EXIT_OK and "3 chunks" in out
    code, out, _ = run(capsys, "snapshot", "inspect", path)
    assert code == EXIT_OK and "(chunk_store)" in out and "chunks     3" in out
    code, out, _ = run(capsys, "snapshot", "inspect", tmp_path)
    assert code == EXIT_OK and "chunk_store" in out and "3 chunks" in out
    assert run(capsys, "snapshot", "verify", path, "--model", "tiny-llama", "--config", "prefix_reuse")[0] == EXIT_OK
    code, _, err = run(capsys, "snapshot", "verify", path, "--config", "default")
    assert code == EXIT_FAILED and "pipeline.digest" in err
    # a fresh store, warm from the file: the next prompt reuses the imported chunks
    code, out, err = run(capsys, "snapshot", "import", path, "--model", "tiny-llama", "--config", "prefix_reuse",
                         "--prompt", PROMPT + "and then")
    assert code == EXIT_OK and "imported 3 chunks" in out and "import chunks" in err  # progress bar on stderr
    ratio = float(out.split("kv_reuse_ratio ")[1].split(",")[0])
    assert ratio > 0.5
    data = bytearray(path.read_bytes())
    data[-10] ^= 0x01
    path.write_bytes(bytes(data))
    code, _, err = run(capsys, "snapshot", "import", path, "--model", "tiny-llama", "--config", "prefix_reuse")
    assert code == EXIT_FAILED and "content checksum mismatch" in err


def test_chunk_store_import_persists_into_the_disk_tier(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    config = kvpatch.load_config("prefix_reuse").model_dump()
    config["name"] = "disk_reuse"
    config["stages"][-1]["params"]["disk"] = {"path": str(tmp_path / "disk"), "budget_bytes": 10**9}
    config_path = tmp_path / "disk_reuse.yaml"
    config_path.write_text(yaml.safe_dump(config))
    path = tmp_path / "chunks.safetensors"
    common = ["--model", "tiny-llama", "--config", config_path]
    assert run(capsys, "snapshot", "export", "--chunk-store", *common, "--prompt", PROMPT, "--out", path)[0] == EXIT_OK
    assert not list((tmp_path / "disk" / SUBDIR).glob("*.safetensors"))  # everything fit in RAM
    code, out, _ = run(capsys, "snapshot", "import", path, *common)
    assert code == EXIT_OK and "3 written to the disk tier" in out
    assert len(list((tmp_path / "disk" / SUBDIR).glob("*.safetensors"))) == 3  # a later process starts warm from disk
    code, out, _ = run(capsys, "snapshot", "export", "--chunk-store", *common, "--out", tmp_path / "again.safetensors")
    assert code == EXIT_OK and "3 chunks" in out  # no prompt: what the disk tier holds
    code, _, err = run(capsys, "snapshot", "import", path, "--model", "tiny-llama", "--config", "prefix_reuse")
    assert code == EXIT_FAILED and "pipeline.digest" in err


def test_run_shows_a_memory_saving_row_and_names_each_continuation(capsys: pytest.CaptureFixture[str],
                                                                   tmp_path: Path) -> None:
    out_json = tmp_path / "run.json"
    code, out, _ = run(capsys, "run", "--config", "default", "--config", "kivi4", "--max-new-tokens", "4",
                       "--repeats", "2", "--json", out_json)
    assert code == EXIT_OK
    rows = {r["config"]: r for r in json.loads(out_json.read_text())}
    assert list(rows) == ["unpatched", "default", "kivi4"]
    assert rows["default"]["kv_bytes"] == rows["unpatched"]["kv_bytes"] and rows["default"]["token_agreement"] == 1.0
    assert 0 < rows["kivi4"]["kv_bytes"] < 0.6 * rows["unpatched"]["kv_bytes"]  # the prompt outgrows its window
    assert all(len(r["ttft_ms_runs"]) == 2 for r in rows.values())
    assert "continuation (unpatched" in out and "kivi4" in out.split("continuation (unpatched", 1)[1]


def test_run_stops_at_eos_and_compares_runs_of_different_length() -> None:
    from kvpatch.runner import agreement, greedy_run

    model, _ = load_named("tiny-llama")
    ids = torch.tensor([[5, 6, 7]])
    free = greedy_run(model, ids, 6)
    stopped = greedy_run(model, ids, 6, eos_token_id=free.tokens[1])
    assert stopped.tokens == free.tokens[:2]
    assert agreement(free.tokens, stopped.tokens) == pytest.approx(2 / 6)


def test_run_refuses_a_non_positive_token_count(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["run", "--max-new-tokens", "-3"])
    assert exit_info.value.code == EXIT_BAD_INPUT and "expected a positive integer, got -3" in capsys.readouterr().err


def test_run_exits_1_when_a_lossless_config_changes_the_output(capsys: pytest.CaptureFixture[str],
                                                              tmp_path: Path) -> None:
    path = tmp_path / "noisy.yaml"
    path.write_text(yaml.safe_dump(noisy_values_config(1.0)))  # claims lossless, perturbs every value
    code, _, err = run(capsys, "run", "--model", "tiny-llama", "--config", path, "--max-new-tokens", "8",
                       "--repeats", "1", "--prompt", "hello there, general kenobi")
    assert code == EXIT_FAILED and "lossless configs that changed the output: noisy-1" in err
