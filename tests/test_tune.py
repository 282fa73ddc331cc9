"""`kvpatch tune`: the space comes from the declarations, successive halving keeps the best, the
chosen config meets the floor it was given when evaluated again, and bad input is refused."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import kvpatch
from kvpatch.cli import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_OK, main
from kvpatch.cli.parser import TUNE_FAMILIES
from kvpatch.eval.harness import evaluate
from kvpatch.eval.settings import EvalSettings
from kvpatch.models import load_named
from kvpatch.stage_specs.evictor import BudgetParams
from kvpatch.stage_specs.quantizer_kivi import KiviParams
from kvpatch.tune import FAMILIES, Candidate, Floor, Knob, MemoryTarget, parse_memory, sample
from kvpatch.tune.frontier import front, pareto_ranks
from kvpatch.tune.outputs import write_outputs
from kvpatch.tune.search import NoConfigMeetsTarget, SearchResult, Trial, choose, rank, rung_settings, tune
from kvpatch.tune.space import knob_values

#: A last rung small enough for the tiny random model to run the whole search in seconds.
TINY_TOP = EvalSettings(ppl_window=64, ppl_stride=32, ppl_max_tokens=192, ppl_chunk=32, needle_lengths=(96,),
                        needle_depths=(0.5,), needle_per_cell=2, decode_prompt_tokens=64, decode_steps=6,
                        progress=False)
TARGET = MemoryTarget(fraction=0.6)
FLOOR = Floor(max_ppl_ratio=1.5, min_logit_cosine=0.5)
META = {"command": "kvpatch tune (test)", "started": "test", "model": "tiny-llama", "dtype": "float32",
        "device": "cpu", "data": "the shipped held-out text", "families": ["dense", "evict"], "space_size": 0,
        "kvpatch_version": kvpatch.__version__, "eta": 2}


# -- objectives ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "expected"), [
    ("0.3", MemoryTarget(fraction=0.3)), ("30%", MemoryTarget(fraction=0.3)), ("1", MemoryTarget(fraction=1.0)),
    ("3000000", MemoryTarget(bytes=3_000_000)), ("3MB", MemoryTarget(bytes=3_000_000)),
    ("2.5 MiB", MemoryTarget(bytes=int(2.5 * 2**20))), ("64kib", MemoryTarget(bytes=65536)),
])
def test_memory_targets_parse(text: str, expected: MemoryTarget) -> None:
    assert parse_memory(text) == expected


@pytest.mark.parametrize("text", ["0", "-1", "150%", "3 parsecs", "", "abc", "1e3"])
def test_bad_memory_targets_are_refused_with_the_accepted_forms(text: str) -> None:
    with pytest.raises(ValueError, match="memory target .* is not a fraction"):
        parse_memory(text)


def test_floor_names_each_violation_and_nan_never_passes() -> None:
    floor = Floor(max_ppl_ratio=1.02, min_needle=0.9, min_logit_cosine=0.95)
    good = {"ppl_ratio": 1.01, "needle_acc_patched": 1.0, "logit_cosine_min": 0.99}
    assert floor.violations(good) == [] and floor.shortfall(good) == 0
    bad = {"ppl_ratio": 1.1, "needle_acc_patched": 0.5, "logit_cosine_min": float("nan")}
    messages = floor.violations(bad)
    assert [m.split()[0] for m in messages] == ["ppl", "needle", "logit"]
    assert floor.shortfall(bad) == float("inf")
    assert floor.fidelity(lossless=False) == {"lossless": False, "min_logit_cosine": 0.95, "max_ppl_ratio": 1.02}
    with pytest.raises(ValueError, match="max_ppl_ratio must be"):
        Floor(max_ppl_ratio=0.9)


# -- space -----------------------------------------------------------------------------------------


def test_knob_values_follow_the_declared_params() -> None:
    assert knob_values(KiviParams, Knob("bits"), {}) == (2, 4, 8)  # the Literal's choices
    assert knob_values(KiviParams, Knob("group_size"), {}) == (8, 16, 32, 64)  # default 32 x 1/4 .. 2
    # A ladder is filtered through the model: ratio is a fraction in (0, 1].
    assert knob_values(BudgetParams, Knob("ratio", (0.0, 0.5, 1.5)), {}) == (0.5,)
    with pytest.raises(ValueError, match="has no param 'bitz'"):
        knob_values(KiviParams, Knob("bitz"), {})
    with pytest.raises(ValueError, match="no value .* is valid"):
        knob_values(BudgetParams, Knob("ratio", (0.0, 2.0)), {})


def test_sampling_is_seeded_and_spreads_over_families() -> None:
    families = list(FAMILIES.values())
    first = sample(families, 8, seed=0)
    assert [c.label for c in first] == [c.label for c in sample(families, 8, seed=0)]
    assert {c.family for c in first} == set(FAMILIES)
    assert [c.label for c in first] != [c.label for c in sample(families, 8, seed=1)]
    assert len({c.label for c in first}) == 8
    for candidate in first:
        kvpatch.load_config(candidate.config("probe"))  # every sampled point is a valid config


def test_parser_families_are_the_space_families() -> None:
    assert set(TUNE_FAMILIES) == set(FAMILIES)


# -- search pieces ---------------------------------------------------------------------------------


def test_pareto_ranks() -> None:
    assert pareto_ranks([(0.2, 1.1), (0.5, 1.0), (0.5, 1.2), (0.9, 1.3), (float("nan"), 1.0)]) == [0, 0, 1, 2, 3]


def test_rung_budgets_grow_to_the_top() -> None:
    rungs = rung_settings(EvalSettings.quick(), rungs=3, eta=3)
    assert rungs[-1].ppl_max_tokens == EvalSettings.quick().ppl_max_tokens
    assert [r.needle_per_cell for r in rungs] == [1, 1, 4]
    assert rungs[0].ppl_max_tokens == EvalSettings.quick().ppl_window  # at least one window
    assert len({(r.decode_prompt_tokens, r.decode_steps) for r in rungs}) == 1  # memory measured alike


def _trial(ratio: float, kv: float, ppl: float, cosine: float = 1.0) -> Trial:
    candidate = Candidate("evict", (("evictor", "budget", json.dumps({"ratio": ratio})),))
    return Trial(candidate, 0, {"kv_fraction": kv, "kv_bytes_patched": int(kv * 1000), "ppl_ratio": ppl,
                                "needle_acc_patched": 1.0, "logit_cosine_min": cosine})


def test_rank_puts_the_floor_then_the_front_first() -> None:
    floor = Floor(min_logit_cosine=0.9)
    trials = [_trial(0.1, 0.9, 1.00), _trial(0.2, 0.2, 1.05), _trial(0.3, 0.25, 1.08),
              _trial(0.4, 0.1, 1.01, cosine=0.5), _trial(0.5, 0.5, 1.03)]
    order = [t.row["kv_fraction"] for t in rank(trials, MemoryTarget(fraction=0.3), floor)]
    # the floor-meeting front is 0.2, 0.9, 0.5 (0.2 is in the target, then by ppl); 0.25 is behind 0.2;
    # the floor violator comes last however small it is
    assert order == [0.2, 0.9, 0.5, 0.25, 0.1]


def test_choose_refuses_when_nothing_meets_target_and_floor() -> None:
    search = SearchResult([TINY_TOP], [[_trial(0.1, 0.2, 1.2), _trial(0.2, 0.8, 1.0)]])
    assert choose(search, MemoryTarget(fraction=0.9), Floor(max_ppl_ratio=1.1)).row["kv_fraction"] == 0.8
    with pytest.raises(NoConfigMeetsTarget, match="no searched config meets") as err:
        choose(search, MemoryTarget(fraction=0.5), Floor(max_ppl_ratio=1.1))
    assert "ppl ratio 1.2000 > 1.1" in str(err.value) and "memory 0.8 > 0.5" in str(err.value)


# -- a whole search on the tiny model ---------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny() -> tuple[object, object]:
    return load_named("tiny-llama")


@pytest.fixture(scope="module")
def search(tiny) -> SearchResult:
    model, tokenizer = tiny
    families = [FAMILIES["dense"], FAMILIES["evict"]]
    return tune(model, tokenizer, families, TARGET, FLOOR, candidates=5, eta=2, rungs=2, top=TINY_TOP,
                progress=False)


@pytest.mark.slow  # a whole search: 101 s measured on the shared, overloaded 2-core CPU
def test_successive_halving_keeps_half_and_ends_at_the_top_budget(search: SearchResult) -> None:
    assert [len(rung) for rung in search.trials] == [5, 3]
    assert search.rungs[-1] == TINY_TOP
    first = {t.candidate for t in search.trials[0]}
    assert {t.candidate for t in search.trials[1]} <= first


@pytest.mark.slow
def test_chosen_config_meets_its_floor_when_evaluated_again(tiny, search: SearchResult, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    model, tokenizer = tiny
    chosen = choose(search, TARGET, FLOOR)
    paths = write_outputs(tmp_path, search, chosen, TARGET, FLOOR, META)
    assert main(["validate", str(paths["yaml"])]) == EXIT_OK
    text = paths["yaml"].read_text()
    assert text.startswith("# Chosen by `kvpatch tune`") and "quality floor: ppl ratio <= 1.5" in text
    assert yaml.safe_load(text)["fidelity"] == {"lossless": False, "min_logit_cosine": 0.5, "max_ppl_ratio": 1.5}
    again = evaluate(model, tokenizer, paths["yaml"], settings=TINY_TOP).to_dict()
    assert FLOOR.violations(again) == [] and TARGET.met(again)
    assert again["kv_bytes_patched"] == chosen.row["kv_bytes_patched"]
    assert again["ppl_ratio"] == pytest.approx(chosen.row["ppl_ratio"], rel=1e-6)
    document = json.loads(paths["json"].read_text())
    assert document["chosen"]["label"] == chosen.candidate.label
    assert set(document["frontier"]) == {p["label"] for p in front(document["points"])}
    assert paths["plot"].read_bytes().startswith(b"\x89PNG")


@pytest.mark.slow  # 33 s measured on the shared 2-core CPU
def test_cli_with_an_unsatisfiable_floor_exits_1_and_names_the_closest(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr("kvpatch.cli.tune.top_settings", lambda context: TINY_TOP)
    code = main(["tune", "--model", "tiny-llama", "--memory", "0.5", "--min-needle", "1.0", "--families", "evict",
                 "--candidates", "2", "--rungs", "1", "--out", str(tmp_path)])
    out, err = capsys.readouterr()
    assert code == EXIT_FAILED
    assert "no searched config meets resident K/V <= 0.5 of the full cache and the floor (needle >= 1)" in err
    assert "needle 0.00 < 1" in err  # a random model finds no needle
    assert (tmp_path / "tune.json").is_file() and not (tmp_path / "chosen.yaml").exists()
    assert "| config |" in out


@pytest.mark.parametrize(("argv", "message"), [
    (["--memory", "lots"], "memory target 'lots' is not a fraction"),
    (["--memory", "0.3", "--eta", "1"], "expected an integer >= 2"),
    (["--memory", "0.3", "--max-ppl-ratio", "0.9"], "max_ppl_ratio must be a finite number >= 1.0"),
    (["--memory", "0.3", "--min-needle", "2"], "min_needle must be in [0, 1]"),
    (["--memory", "0.3", "--families", "quantised"], "unknown --families quantised: expected some of dense"),
    (["--memory", "0.3", "--text", "/nonexistent/corpus.txt"], "No such file"),
])
def test_bad_arguments_exit_2_with_the_reason(argv: list[str], message: str, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    try:
        code = main(["tune", "--model", "tiny-llama", "--out", str(tmp_path), *argv])
    except SystemExit as done:  # argparse's own refusals
        code = done.code
    assert code == EXIT_BAD_INPUT
    assert message in capsys.readouterr().err


def test_bad_or_short_data_files_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "def f(x):"}\n[1, 2]\n')
    common = ["tune", "--model", "tiny-llama", "--memory", "0.3", "--out", str(tmp_path / "out")]
    assert main([*common, "--prompts", str(prompts)]) == EXIT_BAD_INPUT
    assert 'line 2: expected an object with a "prompt" or "text" string' in capsys.readouterr().err
    short = tmp_path / "short.txt"
    short.write_text("too short")
    assert main([*common, "--text", str(short)]) == EXIT_BAD_INPUT
    assert "has 9 tokens; the search needs at least 513" in capsys.readouterr().err


def test_tune_help_imports_neither_torch_nor_transformers() -> None:
    script = ("import sys\nfrom kvpatch.cli import main\ntry:\n    main(['tune', '--help'])\n"
              "except SystemExit:\n    pass\nprint('HEAVY', sorted({'torch', 'transformers'} & set(sys.modules)))")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert "HEAVY []" in done.stdout, done.stderr
