"""The reference model pipeline on CPU: corpus, needle rows, tiny training run, loader."""

from __future__ import annotations

import functools
import importlib.util
import json
import math
import random
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from kvpatch import models
from kvpatch.data import corpus as corpus_lib
from kvpatch.data import needle

ROOT = Path(__file__).resolve().parents[1]
REPORT_KEYS = {
    "steps",
    "tokens_seen",
    "tokens_per_s",
    "train_wall_s",
    "wall_time_s",
    "final_train_loss",
    "val_perplexity",
    "heldout_perplexity",
    "needle_accuracy",
    "needle_accuracy_mean",
    "hardware",
    "versions",
    "seed",
    "command_line",
    "model_file_bytes",
    "parameters",
    "corpus",
}


@functools.cache
def _load_trainer():
    spec = importlib.util.spec_from_file_location(
        "train_reference_lm", ROOT / "tools/train_reference_lm.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("train_reference_lm", module)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("ref") / "tiny"
    report = _load_trainer().main(["--tiny", "--out", str(out), "--device", "cpu", "--seed", "3"])
    return out, report


@pytest.fixture(scope="module")
def tiny_tokenizer(tiny_run):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_run[0], local_files_only=True)


# ----------------------------------------------------------------------------- training + loader


def test_tiny_training_writes_model_and_report(tiny_run):
    out, report = tiny_run
    for name in (
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
        "heldout.txt",
        "training_report.json",
    ):
        assert (out / name).is_file(), name
    on_disk = json.loads((out / "training_report.json").read_text())
    assert on_disk.keys() >= REPORT_KEYS, REPORT_KEYS - on_disk.keys()
    assert on_disk == report
    assert on_disk["steps"] == 12
    assert on_disk["tokens_seen"] == 12 * 8 * 128
    assert on_disk["seed"] == 3
    assert math.isfinite(on_disk["final_train_loss"]) and on_disk["final_train_loss"] < math.log(
        512
    )
    assert 1.0 < on_disk["val_perplexity"] < 512 * 4
    assert set(on_disk["needle_accuracy"]) == {"64", "128"}
    for row in on_disk["needle_accuracy"].values():
        assert set(row) == {"0.05", "0.25", "0.5", "0.75", "0.95"}
        assert all(0.0 <= acc <= 1.0 for acc in row.values())
    assert on_disk["model_file_bytes"] == (out / "model.safetensors").stat().st_size
    assert 0 < len((out / "heldout.txt").read_text()) <= 160 * 1024


def test_batches_mix_needle_rows_with_an_early_boost(tiny_run, tiny_tokenizer):
    trainer, tok, out = _load_trainer(), tiny_tokenizer, tiny_run[0]
    stream = np.asarray(needle.encode(tok, (out / "heldout.txt").read_text()), dtype=np.int32)
    args = trainer.parse_args(["--tiny", "--out", str(out), "--device", "cpu"])
    batches = trainer.BatchMaker(stream, tok, args, torch.device("cpu"))
    for progress, expected in ((0.0, 6), (0.5, 2)):  # boost 0.75 then 0.2 of 8 rows
        x, y, mask = batches(progress)
        assert x.shape == y.shape == mask.shape == (8, 128)
        assert torch.equal(x[:, 1:], y[:, :-1])
        assert int(mask.any(dim=1).sum()) == expected
        assert tok.decode(y[mask][: needle.VALUE_DIGITS].tolist()).isdigit()


def test_loader_loads_trained_directory(tiny_run):
    out, report = tiny_run
    model, tokenizer = models.load(out)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert not model.training
    assert next(model.parameters()).dtype == torch.float32
    cfg = model.config
    assert cfg.num_key_value_heads < cfg.num_attention_heads  # GQA
    assert cfg.tie_word_embeddings
    assert tokenizer.bos_token == "<bos>" and tokenizer.eos_token == "<eos>"
    assert tokenizer.pad_token == "<pad>"
    ids = tokenizer("def f(x):\n    return x\n", return_tensors="pt")["input_ids"]
    assert ids[0, 0].item() == tokenizer.bos_token_id
    assert model(input_ids=ids).logits.shape == (1, ids.shape[1], cfg.vocab_size)
    # The shipped protocol reproduces the report's number from the saved files alone.
    ppl = models.heldout_perplexity(
        model, tokenizer, out, seq_len=report["heldout_perplexity_seq_len"]
    )
    assert ppl == pytest.approx(report["heldout_perplexity"], rel=1e-3)


def test_loader_explains_missing_files(tmp_path):
    with pytest.raises(models.ReferenceModelMissingError, match="train_reference_lm.py"):
        models.load(tmp_path)
    with pytest.raises(FileNotFoundError):
        models.load("no-such-reference-model")


def test_available_lists_only_complete_models():
    for name in models.available():
        assert (models.model_dir(name) / "model.safetensors").is_file()


def test_shipped_reference_model_loads_and_has_report():
    model, tokenizer = models.load()
    assert model.config.model_type == "llama"
    report = models.training_report()
    assert report["val_perplexity"] > 1.0
    assert report["needle_accuracy"] and "needle_accuracy_mean" in report
    assert (models.model_dir() / "model.safetensors").stat().st_size <= 25 * 2**20
    assert len(models.heldout_text()) > 50_000


# ----------------------------------------------------------------------------- needle rows


def test_needle_examples_are_deterministic(tiny_tokenizer, tiny_run):
    filler = (tiny_run[0] / "heldout.txt").read_text()
    a = needle.make_needle_batch(tiny_tokenizer, filler, 120, 0.5, n=4, seed=7)
    b = needle.make_needle_batch(tiny_tokenizer, filler, 120, 0.5, n=4, seed=7)
    c = needle.make_needle_batch(tiny_tokenizer, filler, 120, 0.5, n=4, seed=8)
    assert a == b
    assert [e.input_ids for e in a] != [e.input_ids for e in c]


@pytest.mark.parametrize("depth", [0.0, 0.05, 0.5, 0.95, 1.0])
def test_needle_is_planted_at_requested_depth(tiny_tokenizer, tiny_run, depth):
    tok = tiny_tokenizer
    filler_ids = needle.encode(tok, (tiny_run[0] / "heldout.txt").read_text())
    rng = random.Random(0)
    for _ in range(5):
        ex = needle.make_needle_example(tok, filler_ids, 400, depth, rng)
        assert len(ex.input_ids) == ex.context_tokens == 400
        assert ex.input_ids[0] == tok.bos_token_id
        n_filler = (
            400
            - 1
            - ex.needle_length
            - len(needle.encode(tok, needle.needle_strings(ex.key, "0")[1]))
        )
        assert abs((ex.needle_index - 1) - depth * n_filler) <= needle.NEWLINE_SNAP_TOKENS + 1
        planted = tok.decode(ex.input_ids[ex.needle_index : ex.needle_index + ex.needle_length])
        assert planted.strip() == f"{ex.key} = {ex.answer_text}"
        before = tok.decode(ex.input_ids[1 : ex.needle_index + ex.needle_length])
        line_start = before[: before.rindex(f"{ex.key} = ")].rsplit("\n", 1)
        assert len(line_start) == 2 and not line_start[1].strip(), "needle must start a line"
        assert tok.decode(ex.input_ids).endswith(f"\n# what is {ex.key}?\n{ex.key} = ")
        assert tok.decode(ex.answer_ids) == ex.answer_text and len(ex.answer_text) == 5


def test_needle_rejects_bad_arguments(tiny_tokenizer):
    with pytest.raises(ValueError):
        needle.make_needle_example(tiny_tokenizer, "x = 1\n" * 50, 128, 1.5, random.Random(0))
    with pytest.raises(ValueError):
        needle.make_needle_example(tiny_tokenizer, "x = 1\n" * 50, 8, 0.5, random.Random(0))


def test_training_row_is_packed_to_length(tiny_tokenizer, tiny_run):
    filler_ids = needle.encode(tiny_tokenizer, (tiny_run[0] / "heldout.txt").read_text())
    row = needle.make_training_row(tiny_tokenizer, filler_ids, 513, random.Random(1))
    assert len(row.input_ids) == len(row.answer_mask) == 513
    assert row.input_ids.count(tiny_tokenizer.eos_token_id) >= 1
    assert "# what is " in tiny_tokenizer.decode(row.input_ids)
    # The masked ids are exactly the answer digits, each right after its query.
    answers = [i for i, m in enumerate(row.answer_mask) if m]
    assert answers and len(answers) % needle.VALUE_DIGITS == 0
    for start in answers[:: needle.VALUE_DIGITS]:
        digits = tiny_tokenizer.decode(row.input_ids[start : start + needle.VALUE_DIGITS])
        before = tiny_tokenizer.decode(row.input_ids[:start])
        key = before.rsplit("# what is ", 1)[1].split("?")[0]
        assert digits.isdigit() and f"\n{key} = {digits}" in before


class _Oracle(torch.nn.Module):
    """Fake causal LM that 'answers' every row with `answers[row]`, one token per call;
    it goes through the real KV-cache plumbing of `greedy_continue`."""

    def __init__(self, answers: list[list[int]], vocab: int) -> None:
        super().__init__()
        self.answers, self.vocab = answers, vocab
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, use_cache=True, past_key_values=None):
        # The "cache" counts single-token calls: multi-token calls (context, then question) give
        # the first answer token, each decode step the next.
        step = 0 if past_key_values is None or input_ids.shape[1] > 1 else past_key_values + 1
        logits = torch.zeros(input_ids.shape[0], input_ids.shape[1], self.vocab)
        for row, ans in enumerate(self.answers):
            logits[row, -1, ans[step] if step < len(ans) else 0] = 1.0
        return SimpleNamespace(logits=logits, past_key_values=step)


def test_needle_accuracy_scores_exact_digits(tiny_tokenizer, tiny_run):
    tok = tiny_tokenizer
    filler = (tiny_run[0] / "heldout.txt").read_text()
    examples = needle.make_needle_batch(tok, filler, 96, 0.25, n=3, seed=0)
    newline = needle.encode(tok, "\n")
    right = [ex.answer_ids + newline for ex in examples]
    assert needle.needle_accuracy(_Oracle(right, len(tok)), tok, examples) == 1.0
    wrong = [ex.answer_ids[:-1] + needle.encode(tok, "7\n") for ex in examples]
    wrong[0] = right[0]
    assert needle.needle_accuracy(_Oracle(wrong, len(tok)), tok, examples) == pytest.approx(1 / 3)
    longer = [ex.answer_ids + needle.encode(tok, "1") for ex in examples]
    assert needle.needle_accuracy(_Oracle(longer, len(tok)), tok, examples) == 0.0


def test_cache_argument_name_matches_installed_transformers(tiny_run):
    model, _ = models.load(tiny_run[0])
    name = needle.cache_kwarg(model)
    assert name in ("cache", "past_key_values")
    ids = torch.tensor([[1, 50, 60, 70]])
    out = model(input_ids=ids, use_cache=True)
    cached = model(input_ids=ids[:, -1:], use_cache=True, **{name: needle.output_cache(out)})
    full = model(input_ids=torch.cat([ids, ids[:, -1:]], dim=1)).logits[:, -1]
    torch.testing.assert_close(cached.logits[:, -1], full, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- corpus


def _fake_tree(root: Path) -> None:
    files = {
        "b.py": "b = 1\n" * 40,
        "a.py": "a = 1\n" * 40,
        "pkg/mod.py": "def f():\n    pass\n" * 20,
        "pkg/tests/test_x.py": "assert True\n",
        "test/test_y.py": "assert True\n",
        "__pycache__/a.py": "junk\n",
        "notes.txt": "not python\n",
        "bad.py": None,
    }
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if text is None:
            path.write_bytes(b"\xff\xfe\x00bad utf-8")
        else:
            path.write_text(text)


def test_corpus_lists_sorted_python_files_and_skips_tests(tmp_path):
    _fake_tree(tmp_path)
    roots = [("stdlib", tmp_path)]
    files = corpus_lib.list_sources(roots=roots)
    assert [f.relpath for f in files] == [
        "stdlib/a.py",
        "stdlib/b.py",
        "stdlib/bad.py",
        "stdlib/pkg/mod.py",
    ]
    capped = corpus_lib.list_sources(roots=roots, max_bytes=files[0].size + files[1].size)
    assert [f.relpath for f in capped] == ["stdlib/a.py", "stdlib/b.py"]
    built = corpus_lib.build_corpus(roots=roots, val_fraction=0.0)
    assert [f.relpath for f in built.files] == ["stdlib/a.py", "stdlib/b.py", "stdlib/pkg/mod.py"]
    assert built.train[0].startswith("a = 1") and built.validation == []
    assert (
        built.fingerprint() == corpus_lib.build_corpus(roots=roots, val_fraction=0.0).fingerprint()
    )


def test_corpus_split_is_deterministic_and_hash_based():
    paths = [f"stdlib/pkg{i}/mod{i}.py" for i in range(4000)]
    first = [corpus_lib.split_of(p, 0.05) for p in paths]
    assert first == [corpus_lib.split_of(p, 0.05) for p in paths]
    share = first.count("validation") / len(first)
    assert 0.035 < share < 0.065
    # Pinned values: a change here means every trained model's split silently changed.
    assert corpus_lib.split_of("stdlib/os.py", 0.05) == "train"
    assert [corpus_lib.split_of(p, 0.05) for p in paths[:200]].count("validation") == 15


def test_real_stdlib_corpus_is_stable():
    a = corpus_lib.list_sources(max_bytes=2_000_000)
    b = corpus_lib.list_sources(max_bytes=2_000_000)
    assert a == b and len(a) > 10
    assert [f.relpath for f in a] == sorted(f.relpath for f in a)
    assert sum(f.size for f in a) <= 2_000_000
    assert not any("/test/" in f.relpath or "site-packages" in f.relpath for f in a)


def test_heldout_text_respects_size_cap():
    texts = ["line one\nline two\n" * 200, "x = 1\n" * 1000]
    held = corpus_lib.heldout_text(texts, max_bytes=5000)
    assert 0 < len(held.encode()) <= 5000
    assert held.startswith("line one") and held.endswith("\n")
    assert corpus_lib.heldout_text(texts, max_bytes=5000) == held
