"""tools/train_reference_lm.py's shapes, row mixing and resuming on CPU: the `ref-large` shape
(built on the meta device, never trained here), task / long-needle rows in a tiny run's batches,
and a tiny run split into a call and a resumed call, against the same run in one call."""

from __future__ import annotations

import functools
import importlib.util
import json
import re
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch

from kvpatch.data import needle, tasks

ROOT = Path(__file__).resolve().parents[1]
SHIPPED_REPORT = ROOT / "results/reference-training-report.json"
KEY = re.compile(rf"(?:{'|'.join(needle.ADJECTIVES)})_(?:{'|'.join(needle.NOUNS)})")
TINY_TASK_ARGS = ["--tiny", "--device", "cpu", "--task-share", "0.5", "--seq-len", "512"]


@functools.cache
def _trainer():
    path = ROOT / "tools/train_reference_lm.py"
    spec = importlib.util.spec_from_file_location("train_reference_lm", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("train_reference_lm", module)
    spec.loader.exec_module(module)
    return module


def test_large_shape_is_4x_ref_with_an_8k_context():
    trainer = _trainer()
    args = trainer.parse_args(["--shape", "ref-large", "--out", "unused", "--device", "cpu"])
    ref_params, ref_config = trainer.shape_parameters(trainer.SHAPES["ref"], 2048)
    large_params, config = trainer.shape_parameters(trainer.SHAPES["ref-large"], args.seq_len)
    assert large_params >= 4 * ref_params
    assert args.seq_len >= 8192 and config.max_position_embeddings >= 8192
    assert max(args.needle_lengths) == args.seq_len  # accuracy measured at the full context
    assert config.head_dim == 64 and config.num_key_value_heads < config.num_attention_heads
    assert config.hidden_size == config.num_attention_heads * config.head_dim
    assert config.rope_parameters["rope_theta"] > ref_config.rope_parameters["rope_theta"]
    assert args.task_share > 0 and args.batch_size * args.seq_len == 65536


def test_ref_shape_and_recipe_are_the_shipped_ones():
    trainer, shipped = _trainer(), json.loads(SHIPPED_REPORT.read_text())
    args = trainer.parse_args(["--out", "unused", "--device", "cpu"])
    params, config = trainer.shape_parameters(trainer.SHAPES[args.shape], args.seq_len)
    assert args.shape == "ref" and params == shipped["parameters"]
    shape = {k: v for k, v in asdict(trainer.SHAPES["ref"]).items() if k != "rope_theta"}
    assert shape == shipped["model_shape"] and config.rope_parameters["rope_theta"] == 10000.0
    for key in ("seq_len", "batch_size", "needle_share", "needle_boost_share", "needle_boost_frac"):
        assert getattr(args, key) == shipped[key], key
    assert args.lr == shipped["peak_lr"] and args.task_share == 0 and args.long_needle_share == 0
    assert args.needle_lengths == shipped["needle_protocol"]["lengths"]


def test_tiny_refuses_another_shape():
    with pytest.raises(SystemExit):
        _trainer().parse_args(["--tiny", "--shape", "ref-large", "--out", "unused"])


@pytest.fixture(scope="module")
def tiny_task_run(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("ref") / "tiny-tasks"
    argv = [*TINY_TASK_ARGS, "--out", str(out), "--steps", "6", "--needle-lengths", "128",
            "--needle-per-cell", "1", "--eval-tokens", "2048"]
    return out, _trainer().main(argv)


def test_tiny_run_mixes_task_rows_at_the_requested_share(tiny_task_run):
    _, report = tiny_task_run
    rows = report["rows_seen"]
    assert report["task_share"] == 0.5 and report["steps"] == 6
    assert rows["task"] == 6 * 4  # half of each batch of 8
    assert rows["corpus"] + rows["needle"] + rows["task"] == 6 * 8
    by_task = report["task_rows_seen"]
    assert set(by_task) == set(tasks.TASKS) and all(by_task.values())
    assert sum(by_task.values()) == rows["task"]


def _answer_runs(mask_row: torch.Tensor) -> int:
    padded = torch.cat([torch.zeros(1, dtype=torch.bool), mask_row])
    return int((padded[1:] & ~padded[:-1]).sum())


def _batches(out: Path, extra: list[str]):
    from transformers import AutoTokenizer

    trainer = _trainer()
    tok = AutoTokenizer.from_pretrained(out, local_files_only=True)
    stream = np.asarray(needle.encode(tok, (out / "heldout.txt").read_text()), dtype=np.int32)
    args = trainer.parse_args([*TINY_TASK_ARGS, "--out", str(out), *extra])
    return tok, trainer.BatchMaker(stream, tok, args, torch.device("cpu"))


def test_task_rows_hold_task_examples_with_answer_masks(tiny_task_run):
    tok, batches = _batches(tiny_task_run[0], [])
    x, y, mask = batches(0.5)  # after the boost: 2 corpus, 2 needle, 4 task rows
    rows = torch.cat([x[:, :1], y], dim=1)
    assert rows.shape == (8, 513)
    assert not mask[:2].any()
    for i in range(2, 8):
        examples = _answer_runs(mask[i])
        mentions = len(KEY.findall(tok.decode(rows[i].tolist(), skip_special_tokens=True)))
        assert examples >= 1, i
        if i < 4:  # a needle example names its key 3 times (definition, question, prompt)
            assert mentions == 3 * examples, i
        else:  # every task example plants several keys or several lines of its key
            assert mentions >= 5 * examples, i
    assert batches.rows_seen == {"corpus": 2, "needle": 2, "long_needle": 0, "task": 4}


def test_long_needle_rows_hold_one_example_of_half_the_row(tiny_task_run):
    _, batches = _batches(tiny_task_run[0], ["--long-needle-share", "1", "--task-share", "0"])
    _, _, mask = batches(0.5)
    needle_rows = mask[mask.any(dim=1)]
    assert len(needle_rows) == 2
    for row in needle_rows:
        assert _answer_runs(row) == 1
        assert int(row.nonzero()[0]) >= 512 // 2
    assert batches.rows_seen["long_needle"] == 2


def test_rows_too_short_for_a_task_are_refused(tiny_task_run):
    with pytest.raises(ValueError, match="too short"):
        _batches(tiny_task_run[0], ["--seq-len", "128"])


# ----------------------------------------------------------------------------- resume

RESUME_ARGS = ["--tiny", "--device", "cpu", "--needle-lengths", "64", "--needle-per-cell", "1",
               "--eval-tokens", "2048"]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


@pytest.fixture(scope="module")
def resumed_runs(tmp_path_factory) -> dict:
    """A 4-step call of an 8-step run, the call resuming it for 4 more, and one 8-step run,
    with the (step, learning rate) of every step of each recorded."""
    trainer = _trainer()
    root = tmp_path_factory.mktemp("resume")
    lrs: dict[str, list[tuple[int, float]]] = {"first": [], "resumed": [], "whole": []}
    real_lr_at = trainer.lr_at

    def recording(into: list) -> object:
        def lr_at(step, progress, peak, warmup, *rest):
            lr = real_lr_at(step, progress, peak, warmup, *rest)
            into.append((step, lr))
            return lr

        return lr_at

    runs: dict = {"dir": root / "split", "lrs": lrs}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(trainer, "lr_at", recording(lrs["first"]))
        runs["first"] = trainer.main([*RESUME_ARGS, "--out", str(runs["dir"]), "--steps", "4",
                                      "--total-steps", "8", "--skip-eval"])
        runs["tokenizer"] = {n: (runs["dir"] / n).read_bytes() for n in TOKENIZER_FILES}
        mp.setattr(trainer, "lr_at", recording(lrs["resumed"]))
        runs["resumed"] = trainer.main([*RESUME_ARGS, "--resume", str(runs["dir"]), "--steps", "4"])
        mp.setattr(trainer, "lr_at", recording(lrs["whole"]))
        runs["whole"] = trainer.main([*RESUME_ARGS, "--out", str(root / "whole"), "--steps", "8",
                                      "--skip-eval"])
    return runs


def test_resumed_call_continues_the_run(resumed_runs):
    first, resumed = resumed_runs["first"], resumed_runs["resumed"]
    assert first["steps"] == 4 and not first["evaluated"] and "val_perplexity" not in first
    assert resumed["steps"] == 8 and resumed["call_steps"] == 4
    assert resumed["tokens_seen"] == 2 * first["tokens_seen"]
    assert [c["start_step"] for c in resumed["calls"]] == [0, 4]
    assert [c["steps"] for c in resumed["calls"]] == [4, 4]
    assert resumed["evaluated"] and resumed["val_perplexity"] > 0  # the last call evaluates
    assert resumed["total_steps"] == 8  # the run's plan, kept from the first call
    for name, content in resumed_runs["tokenizer"].items():  # loaded, not retrained
        assert (resumed_runs["dir"] / name).read_bytes() == content, name


def test_resumed_schedule_is_the_single_runs(resumed_runs):
    lrs = resumed_runs["lrs"]
    assert [s for s, _ in lrs["resumed"]] == [4, 5, 6, 7]  # the run's steps: no new warmup
    assert lrs["resumed"][0][1] < lrs["first"][-1][1]  # the cosine goes on decaying
    split = lrs["first"] + lrs["resumed"]
    assert [s for s, _ in split] == [s for s, _ in lrs["whole"]] == list(range(8))
    assert [lr for _, lr in split] == pytest.approx([lr for _, lr in lrs["whole"]], rel=1e-12)


def test_resumed_training_equals_the_single_run(resumed_runs):
    """Weights, optimizer moments and data stream all carry over: 4 + 4 steps train exactly
    what 8 steps do (float32 master weights, not the bf16 ones of model.safetensors)."""
    from safetensors.torch import load_file

    resumed, whole = resumed_runs["resumed"], resumed_runs["whole"]
    assert resumed["rows_seen"] == whole["rows_seen"]
    assert resumed["final_train_loss"] == whole["final_train_loss"]
    a = load_file(resumed_runs["dir"] / "model.safetensors")
    b = load_file(resumed_runs["dir"].parent / "whole" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not (resumed_runs["dir"].parent / "whole" / "trainer_state.json").exists()  # no plan


def test_resume_without_trainer_state_names_the_file(resumed_runs, tmp_path, capsys):
    for name in ("config.json", "model.safetensors", *TOKENIZER_FILES):  # a model, no state
        (tmp_path / name).write_bytes((resumed_runs["dir"] / name).read_bytes())
    with pytest.raises(SystemExit):
        _trainer().parse_args([*RESUME_ARGS, "--resume", str(tmp_path)])
    assert str(tmp_path / "trainer_state.json") in capsys.readouterr().err


def test_resume_refuses_another_recipe(resumed_runs, capsys):
    with pytest.raises(SystemExit):
        _trainer().parse_args([*RESUME_ARGS, "--resume", str(resumed_runs["dir"]),
                               "--seq-len", "256"])
    assert "seq_len 256 (run: 128)" in capsys.readouterr().err


def test_time_schedule_spans_the_calls():
    schedule = _trainer().Schedule
    single = schedule(None, 100.0)
    assert single.progress(0, 0.0, 0.0) == 0.0
    assert single.progress(10, 50.0, 10.0) == pytest.approx(40 / 90)  # first step not counted
    # the next call starts where the first (10 s first step, 50 s in all) stopped...
    resumed = schedule(None, 100.0, done_steps=10, done_train_s=50.0, done_first_steps_s=10.0)
    assert resumed.progress(0, 0.0, 0.0) == pytest.approx(40 / 90)
    # ...and discounts its own first step too: 40 + 20 s of 100 - 10 - 10
    assert resumed.progress(5, 30.0, 10.0) == pytest.approx(60 / 80)
    assert schedule(8, None, done_steps=4).progress(2, 0.0, 0.0) == 6 / 8
