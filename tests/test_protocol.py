"""The long-context protocol: RULER-style tasks (exact lengths, depths where asked, answers right
by construction, seeded), their scoring (a wrong answer scores 0) and the harness preset."""

from __future__ import annotations

import argparse
import math
import random
import re
from types import SimpleNamespace

import pytest

from kvpatch.data.needle import ADJECTIVES, NEWLINE_SNAP_TOKENS, NOUNS, encode
from kvpatch.data.tasks import (
    TASKS,
    TaskExample,
    is_task_correct,
    make_task_batch,
    make_task_example,
    make_task_training_row,
)
from transformers import AutoTokenizer

from kvpatch.cli.evaluate import preset_settings
from kvpatch.errors import KVPatchError
from kvpatch.eval import battery
from kvpatch.eval.protocol import format_protocol_table, markdown_summary, plot_protocol, summary
from kvpatch.eval.settings import EvalSettings
from kvpatch.models import heldout_text, model_dir

KEY = rf"(?:{'|'.join(ADJECTIVES)})_(?:{'|'.join(NOUNS)})"


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(model_dir())


@pytest.fixture(scope="module")
def filler(tokenizer) -> list[int]:
    return encode(tokenizer, heldout_text())[:20_000]


def ground_truth(text: str) -> tuple[str, ...]:
    """The answer read off the decoded row alone: the definitions of the generated keys, the key
    the final query asks, and (for chains) the references followed to a number."""
    lines = text.split("\n")
    assigned = {m[1]: m[2] for line in lines if (m := re.fullmatch(rf"({KEY}) = (\d+|{KEY})", line))}
    appended = [m[2] for line in lines if (m := re.fullmatch(rf"({KEY})\.append\((\d+)\)", line))]
    asked = re.search(rf"# what (?:is|did) ({KEY})(?:\?| collect\?)\n\1 ==? \[?$", text)
    assert asked, text[-80:]
    if appended:
        return tuple(appended)
    value = assigned[asked[1]]
    while not value.isdigit():
        value = assigned[value]
    return (value,)


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("length", [256, 1000, 2048])
def test_rows_have_the_exact_length_and_the_answer_the_text_implies(task: str, length: int, tokenizer,
                                                                    filler) -> None:
    rng = random.Random(length)
    for depth in (0.05, 0.5, 0.95):
        ex = make_task_example(task, tokenizer, filler, length, depth, rng)
        assert len(ex.input_ids) == length and ex.input_ids[0] == tokenizer.bos_token_id
        assert ground_truth(tokenizer.decode(ex.input_ids, skip_special_tokens=True)) == ex.answers
        assert tokenizer.decode(ex.answer_ids) == ex.answer_text


@pytest.mark.parametrize("task", TASKS)
def test_the_placing_snippet_sits_at_the_requested_depth(task: str, tokenizer, filler) -> None:
    length, rng = 2048, random.Random(7)
    for depth in (0.05, 0.275, 0.5, 0.725, 0.95):
        ex = make_task_example(task, tokenizer, filler, length, depth, rng)
        lines = [encode(tokenizer, "\n" + tokenizer.decode(ex.input_ids[p + 1:]).split("\n")[0])
                 for p in ex.positions]
        planted = sum(map(len, lines))
        n_filler = length - 1 - planted - ex.query_length
        before = ex.positions[0] - 1 - sum(len(s) for s, p in zip(lines, ex.positions) if p < ex.positions[0])
        assert abs(before - depth * n_filler) <= NEWLINE_SNAP_TOKENS + 2, (depth, before, n_filler)
        snippet = tokenizer.decode(ex.input_ids[ex.positions[0]:ex.positions[0] + len(lines[0])])
        assert ex.answers[0] in snippet or task == "multivalue"


def test_rows_hold_their_distractors_and_multivalue_rows_every_value(tokenizer, filler) -> None:
    multikey = make_task_example("multikey", tokenizer, filler, 1024, 0.5, random.Random(1))
    text = tokenizer.decode(multikey.input_ids, skip_special_tokens=True)
    assert len(re.findall(rf"\n{KEY} = \d+\n", text)) == len(multikey.positions) == 4
    vartrack = make_task_example("vartrack", tokenizer, filler, 1024, 0.5, random.Random(1))
    text = tokenizer.decode(vartrack.input_ids, skip_special_tokens=True)
    numbers = re.findall(rf"\n{KEY} = (\d+)\n", text)  # the asked chain's value and the distractor's
    assert len(set(numbers)) == 2 and vartrack.answers[0] in numbers and len(vartrack.positions) == 8
    multivalue = make_task_example("multivalue", tokenizer, filler, 1024, 0.5, random.Random(1))
    assert len(multivalue.answers) == 3 and multivalue.answer_text == ", ".join(multivalue.answers) + "]"


@pytest.mark.parametrize("task", TASKS)
def test_a_seed_fixes_the_rows(task: str, tokenizer, filler) -> None:
    a = make_task_batch(task, tokenizer, filler, 512, 0.25, 3, seed=0)
    assert a == make_task_batch(task, tokenizer, filler, 512, 0.25, 3, seed=0)
    assert a != make_task_batch(task, tokenizer, filler, 512, 0.25, 3, seed=1)


def _example(answers: tuple[str, ...]) -> TaskExample:
    text = ", ".join(answers) + ("]" if len(answers) > 1 else "")
    return TaskExample("multivalue" if len(answers) > 1 else "multikey", [1, 2], [3], text, answers, 0.5, (1,), 1)


@pytest.mark.parametrize(("decoded", "answers", "correct"), [
    ("48213\n", ("48213",), True),
    (" 48213 # ok", ("48213",), True),
    ("48214\n", ("48213",), False),
    ("482130", ("48213",), False),
    ("4821", ("48213",), False),
    ("", ("48213",), False),
    ("11111, 22222, 33333]", ("11111", "22222", "33333"), True),
    ("33333, 11111, 22222]", ("11111", "22222", "33333"), True),
    ("11111, 22222]", ("11111", "22222", "33333"), False),
    ("11111, 22222, 33334]", ("11111", "22222", "33333"), False),
    ("11111, 22222, 33333, 44444]", ("11111", "22222", "33333"), False),
    ("11111, 11111, 22222]", ("11111", "22222", "33333"), False),
])
def test_scoring_needs_every_answer_exactly(decoded: str, answers: tuple[str, ...], correct: bool) -> None:
    assert is_task_correct(decoded, _example(answers)) is correct


@pytest.mark.parametrize("task", TASKS)
def test_training_rows_are_exact_and_mask_the_answers(task: str, tokenizer, filler) -> None:
    row = make_task_training_row(task, tokenizer, filler, 2048, random.Random(3))
    assert len(row.input_ids) == len(row.answer_mask) == 2048
    answer = tokenizer.decode([i for i, m in zip(row.input_ids, row.answer_mask) if m])
    assert answer and re.fullmatch(r"[\d, \]]+", answer)
    with pytest.raises(ValueError, match="unknown task 'needles'"):
        make_task_training_row("needles", tokenizer, filler, 2048, random.Random(3))


# -- the harness preset --------------------------------------------------------------------------


def test_the_preset_follows_the_trained_context() -> None:
    settings = EvalSettings.protocol(2048)
    assert settings.needle_lengths == (256, 512, 1024, 2048)
    assert len(settings.needle_depths) >= 5 and min(settings.needle_depths) == 0.05 and max(settings.needle_depths) == 0.95
    assert settings.tasks == TASKS and settings.ppl_window == 2048
    assert settings.decode_prompt_tokens + settings.decode_steps == 2048
    assert EvalSettings.protocol(512).needle_lengths == (256, 512)  # shorter rows would not hold the tasks
    assert EvalSettings.protocol(2048, lengths=[2048]).needle_lengths == (2048,)
    with pytest.raises(ValueError, match="at least 256"):
        EvalSettings.protocol(2048, lengths=[128])


def _args(**kw: object) -> argparse.Namespace:
    return argparse.Namespace(**{"preset": "protocol", "model": "m", "max_context": None, "per_cell": 3,
                                 "lengths": None, **kw})


def test_the_cli_preset_reads_max_position_embeddings() -> None:
    model = SimpleNamespace(config=SimpleNamespace(max_position_embeddings=4096))
    assert preset_settings(_args(), model).needle_lengths == (512, 1024, 2048, 4096)
    assert preset_settings(_args(max_context=1024), model).needle_lengths == (256, 512, 1024)
    assert preset_settings(_args(), model).needle_per_cell == 3
    with pytest.raises(KVPatchError, match="max_position_embeddings; pass --max-context"):
        preset_settings(_args(), SimpleNamespace(config=SimpleNamespace()))


@pytest.mark.parametrize("task", ["needle", *TASKS])
def test_grid_scores_right_answers_1_and_wrong_ones_0(task: str, tokenizer, filler,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    settings = EvalSettings(needle_lengths=(300,), needle_depths=(0.1, 0.9), needle_per_cell=2, tasks=TASKS)

    def oracle(model, tokenizer, examples, batch_size):
        return [ex.answer_text + "\n" for ex in examples]

    def off_by_one(model, tokenizer, examples, batch_size):
        return [str(int(ex.answer_text[:5]) + 1) + ex.answer_text[5:] for ex in examples]

    monkeypatch.setattr(battery, "needle_predictions", oracle)
    assert battery.task_grid_batched(None, tokenizer, filler, settings, task=task) == {"300": {"0.1": 1.0, "0.9": 1.0}}
    monkeypatch.setattr(battery, "needle_predictions", off_by_one)
    assert battery.task_grid_batched(None, tokenizer, filler, settings, task=task) == {"300": {"0.1": 0.0, "0.9": 0.0}}


def _result(config: str, full: float, patched: float) -> dict:
    grid = lambda acc: {"256": {"0.05": 1.0, "0.95": 1.0}, "2048": {"0.05": acc, "0.95": acc}}  # noqa: E731
    return {"config": config, "kv_fraction": 0.25, "ppl_ratio": 1.5, "needle_unpatched": grid(full), "needle_patched": grid(patched),
            "tasks_unpatched": {"vartrack": grid(0.0)}, "tasks_patched": {"vartrack": grid(0.0)}}


def test_the_report_puts_each_config_beside_the_full_cache(tmp_path) -> None:
    results = [_result("kivi4", 0.8, 0.4), _result("snapkv", 0.8, 0.8)]
    assert summary(results[0])["needle"] == {"full": 0.8, "config": 0.4, "relative": 0.5}
    assert math.isnan(summary(results[0])["vartrack"]["relative"])  # the full cache got none: no signal
    table = format_protocol_table(results)
    assert re.search(r"kivi4 +1\.00 +0\.40 \| +0\.40 +0\.40 \| +0\.50", table), table
    assert re.search(r"snapkv .*\| +1\.00\n", table) and "n/a" in table.split("vartrack")[1]
    markdown = markdown_summary(results).splitlines()
    assert markdown[2] == "| kivi4 | 0.250 | 1.500 | 0.80 / 0.40 (0.50) | 0.00 / 0.00 (n/a) |", markdown
    plot_protocol(results, tmp_path / "protocol.png")
    assert (tmp_path / "protocol.png").stat().st_size > 10_000


def test_long_context_ablation_variants_are_valid_and_change_one_thing() -> None:
    """tools/ablate_long_context.py: every variant is a config kvpatch accepts, and differs from
    configs/long_context.yaml in its name, description and the one stage it edits."""
    import importlib.util
    from pathlib import Path

    import yaml

    import kvpatch

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("ablate_long_context", root / "tools/ablate_long_context.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    base = yaml.safe_load((root / "configs/long_context.yaml").read_text())
    variants = module.variant_configs(base, list(module.VARIANTS))
    assert variants["lc_base"]["stages"] == base["stages"]
    for name, config in variants.items():
        assert kvpatch.load_config(config).name == name
        changed = [a["kind"] for a, b in zip(config["stages"], base["stages"]) if a != b]
        assert len(changed) == (0 if name == "lc_base" else 1), (name, changed)
