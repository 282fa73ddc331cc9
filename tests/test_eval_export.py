"""`kvpatch eval --format kvpress|lm-eval` (kvpatch.eval.export): the converters carry the harness's
numbers into each layout unchanged, compute the compression ratio from the K/V bytes, invent no
metric the harness did not measure, write files that parse where each project puts them; the CLI
refuses a non-default --format without --out before any model work."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import pytest
import yaml

from kvpatch.cli import EXIT_BAD_INPUT, EXIT_OK, main
from kvpatch.cli.parser import EVAL_FORMATS
from kvpatch.eval import EvalResult
from kvpatch.eval import export
from kvpatch.eval.export import RunInfo

EXPORT_PY = Path(export.__file__)
SETTINGS = {"ppl_window": 512, "ppl_stride": 256, "ppl_max_tokens": 1536, "ppl_chunk": 32,
            "needle_lengths": [512, 1024], "needle_depths": [0.25, 0.75], "needle_per_cell": 4,
            "decode_prompt_tokens": 384, "decode_steps": 4, "batch_tokens": 16384, "floor_backend": None,
            "seed": 0, "progress": False}
UNPATCHED_NEEDLE = {"512": {"0.25": 1.0, "0.75": 0.75}, "1024": {"0.25": 1.0, "0.75": 1.0}}


def eval_result(config: str, lossless: bool, kv_patched: int, ppl_patched: float,
                needle_patched: dict[str, dict[str, float]], steps: list[float],
                attn: list[float] | None, offloaded: int = 0) -> dict:
    """An EvalResult as the harness builds it (`harness.compare`), as a dict: every field the
    dataclass has, derived fields computed from the others the way `compare` does."""
    cells = [a for row in needle_patched.values() for a in row.values()]
    base_cells = [a for row in UNPATCHED_NEEDLE.values() for a in row.values()]
    return EvalResult(
        config=config, lossless=lossless, ppl_unpatched=7.153856101598413, ppl_patched=ppl_patched,
        ppl_ratio=ppl_patched / 7.153856101598413, needle_unpatched=UNPATCHED_NEEDLE, needle_patched=needle_patched,
        needle_acc_unpatched=sum(base_cells) / len(base_cells), needle_acc_patched=sum(cells) / len(cells),
        logit_cosine_per_step=steps, logit_cosine_min=min(steps), logit_cosine_mean=sum(steps) / len(steps),
        top1_agreement=0.9375 if not lossless else 1.0, attn_cosine_per_layer=attn,
        attn_cosine_min=min(attn) if attn else None, attn_skipped_reason=None if attn else "no `layers` attribute",
        kv_bytes_unpatched=2451456, kv_bytes_patched=kv_patched, kv_bytes_offloaded=offloaded,
        kv_fraction=kv_patched / 2451456, wall_s=4.2, floor_backend="eager",
        floor={"logit": 1e-12, "attention": 1.4e-12, "ppl": 8e-8, "top1": 0.0},
        lossless_allowance={"logit": 1e-8, "attention": 1e-8, "ppl": 1e-5, "top1": 0.0}, reference_wall_s=4.0,
        fidelity={"lossless": lossless, "min_logit_cosine": None if lossless else 0.99,
                  "min_top1_agreement": None if lossless else 0.9, "max_ppl_ratio": None if lossless else 1.01},
        settings=SETTINGS,
    ).to_dict()


@pytest.fixture
def results() -> list[dict]:
    return [
        eval_result("default", True, 2451456, 7.153856101598413, UNPATCHED_NEEDLE, [1.0, 1.0, 1.0, 1.0],
                    [1.0, 1.0, 1.0]),
        eval_result("kivi4", False, 1124352, 7.159922945178726, {"512": {"0.25": 1.0, "0.75": 0.5},
                                                                 "1024": {"0.25": 0.75, "0.75": 1.0}},
                    [1.0, 0.99999, 0.99993, 0.99998], [0.99998, 0.99890, 0.99988]),
        eval_result("fixed_budget", False, 2181888, 7.26, {"512": {"0.25": 0.25, "0.75": 0.75},
                                                           "1024": {"0.25": 0.5, "0.75": 0.0}},
                    [1.0, 0.9987, 0.9991, 0.9990], None, offloaded=193536),
    ]


@pytest.fixture
def run() -> RunInfo:
    return RunInfo(model="kvpatch-ref", dtype="float32", device="cpu", preset="quick", kvpatch_version="0.1.0",
                   transformers_version="5.24.0", torch_version="2.13.0+cpu",
                   config_digests={"default": "a" * 64, "kivi4": "b" * 64, "fixed_budget": "c" * 64},
                   violations={"default": [], "kivi4": [], "fixed_budget": ["ppl ratio 1.0149 > max_ppl_ratio 1.01"]},
                   ppl_tokens=1536, started=1_790_000_000.5, total_s=31.25)


def strict_json(text: str) -> object:
    """json.loads that refuses NaN / Infinity (not JSON; other tools' readers reject them)."""
    def refuse(name: str) -> None:
        raise ValueError(f"non-JSON constant {name}")

    return json.loads(text, parse_constant=refuse)


def cells(grid: dict[str, dict[str, float]]) -> dict[str, float]:
    return {f"len{length}_depth{depth}": acc for length, row in grid.items() for depth, acc in row.items()}


# -- shared -------------------------------------------------------------------------------------


def test_compression_ratio_is_the_share_of_full_cache_bytes_gone(results: list[dict]) -> None:
    for result in results:
        assert export.compression_ratio(result) == pytest.approx(
            1 - result["kv_bytes_patched"] / result["kv_bytes_unpatched"], abs=1e-15)
        assert export.compression_ratio(result) == pytest.approx(1 - result["kv_fraction"], abs=1e-15)
    assert export.compression_ratio(results[0]) == 0.0  # lossless: the whole cache is resident
    assert 0.5 < export.compression_ratio(results[1]) < 0.6
    assert math.isnan(export.compression_ratio({"kv_bytes_patched": 0, "kv_bytes_unpatched": 0}))


def test_format_names_agree() -> None:
    assert EVAL_FORMATS == export.FORMATS


def test_the_converters_import_neither_torch_nor_the_rest_of_kvpatch(tmp_path: Path, results: list[dict]) -> None:
    """The module loaded on its own (not through kvpatch.eval, whose harness needs torch) writes
    both layouts from the eval-<config>.json dicts."""
    data = tmp_path / "results.json"
    data.write_text(json.dumps(results))
    script = (
        "import importlib.util, json, sys\n"
        f"spec = importlib.util.spec_from_file_location('export', {str(EXPORT_PY)!r})\n"
        "export = sys.modules['export'] = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(export)\n"
        f"results = json.loads(open({str(data)!r}).read())\n"
        "run = export.RunInfo(model='kvpatch-ref', preset='quick')\n"
        f"export.write_kvpress(results, run, __import__('pathlib').Path({str(tmp_path / 'kvpress')!r}))\n"
        f"export.write_lm_eval(results, run, __import__('pathlib').Path({str(tmp_path / 'lm')!r}))\n"
        "print('HEAVY', sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'kvpatch')))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "HEAVY []" in done.stdout
    assert len(list((tmp_path / "kvpress").iterdir())) == len(results) + 1
    assert len(list((tmp_path / "lm" / "kvpatch-ref").glob("results_*.json"))) == 1


# -- kvpress ---------------------------------------------------------------------------------------


def test_kvpress_writes_one_folder_per_config_and_the_unpatched_baseline(tmp_path: Path, results: list[dict],
                                                                         run: RunInfo) -> None:
    folders = export.write_kvpress(results, run, tmp_path)
    expected = {f"kvpatch__quick__kvpatch-ref__{r['config']}__{1 - r['kv_bytes_patched'] / r['kv_bytes_unpatched']:.2f}"
                for r in results} | {"kvpatch__quick__kvpatch-ref__no_press__0.00"}
    assert {f.name for f in folders} == {p.name for p in tmp_path.iterdir()} == expected
    assert "kvpatch__quick__kvpatch-ref__kivi4__0.54" in expected  # 1 - 1124352 / 2451456 = 0.5414
    for folder in folders:
        assert sorted(p.name for p in folder.iterdir()) == ["config.yaml", "metrics.json"]  # no predictions.csv
        metrics = strict_json((folder / "metrics.json").read_text())
        assert all(isinstance(v, dict) and v for v in metrics.values())  # {task: {metric: value}}
        assert all(isinstance(x, (int, float)) for v in metrics.values() for x in v.values())


def test_kvpress_metrics_carry_the_harness_numbers(tmp_path: Path, results: list[dict], run: RunInfo) -> None:
    export.write_kvpress(results, run, tmp_path)
    for result in results:
        ratio = export.compression_ratio(result)
        folder = tmp_path / f"kvpatch__quick__kvpatch-ref__{result['config']}__{ratio:.2f}"
        metrics = strict_json((folder / "metrics.json").read_text())
        assert metrics["ppl"] == {"perplexity": result["ppl_patched"], "ppl_ratio": result["ppl_ratio"]}
        assert metrics["needle"] == {"accuracy": result["needle_acc_patched"]}
        assert {k.removeprefix("needle_"): v["accuracy"] for k, v in metrics.items()
                if k.startswith("needle_")} == cells(result["needle_patched"])
        decode = {"logit_cosine_min": result["logit_cosine_min"], "logit_cosine_mean": result["logit_cosine_mean"],
                  "top1_agreement": result["top1_agreement"]}
        if result["attn_cosine_min"] is not None:
            decode["attn_cosine_min"] = result["attn_cosine_min"]
        assert metrics["decode"] == decode  # no attention metric where the harness measured none
        assert metrics["kv"] == {"compression_ratio": ratio, "kv_fraction": result["kv_fraction"],
                                 "kv_bytes_resident": result["kv_bytes_patched"],
                                 "kv_bytes_full": result["kv_bytes_unpatched"],
                                 "kv_bytes_offloaded": result["kv_bytes_offloaded"]}
        config = yaml.safe_load((folder / "config.yaml").read_text())
        assert (config["dataset"], config["data_dir"], config["model"], config["press_name"]) == (
            "kvpatch", "quick", "kvpatch-ref", result["config"])
        assert config["compression_ratio"] == ratio and config["device"] == "cpu"
        assert config["model_kwargs"] == {"dtype": "float32"}
        assert config["kvpatch"]["config_digest"] == run.config_digests[result["config"]]
        assert config["kvpatch"]["violations"] == run.violations[result["config"]]
        assert config["kvpatch"]["fidelity"] == result["fidelity"]
        assert config["kvpatch"]["settings"] == result["settings"]

    baseline = strict_json((tmp_path / "kvpatch__quick__kvpatch-ref__no_press__0.00" / "metrics.json").read_text())
    reference = results[0]
    assert baseline["ppl"] == {"perplexity": reference["ppl_unpatched"]}
    assert baseline["needle"] == {"accuracy": reference["needle_acc_unpatched"]}
    assert {k.removeprefix("needle_"): v["accuracy"] for k, v in baseline.items()
            if k.startswith("needle_")} == cells(reference["needle_unpatched"])
    assert baseline["kv"] == {"compression_ratio": 0.0, "kv_bytes_resident": reference["kv_bytes_unpatched"]}
    assert "decode" not in baseline  # comparisons of the reference with itself are not measurements


def test_kvpress_leaves_out_what_was_not_measured(tmp_path: Path, results: list[dict], run: RunInfo) -> None:
    skipped = dict(results[1], needle_patched={}, needle_acc_patched=float("nan"), attn_cosine_min=None)
    metrics = export.kvpress_metrics(skipped)
    assert not any(k.startswith("needle") for k in metrics) and "attn_cosine_min" not in metrics["decode"]
    # results of different references (not one run) get no shared baseline folder
    other = dict(results[0], ppl_unpatched=results[0]["ppl_unpatched"] * 1.01)
    names = {f.name for f in export.write_kvpress([other, results[1]], run, tmp_path)}
    assert not any("no_press" in n for n in names) and len(names) == 2


def test_kvpress_model_names(tmp_path: Path) -> None:
    assert export.kvpress_model_name("meta-llama/Llama-3.1-8B") == "meta-llama--Llama-3.1-8B"
    (tmp_path / "my-model").mkdir()
    assert export.kvpress_model_name(str(tmp_path / "my-model") + "/") == "my-model"


# -- lm-eval ---------------------------------------------------------------------------------------


def test_lm_eval_file_goes_where_lm_eval_puts_it(tmp_path: Path, results: list[dict]) -> None:
    saved = datetime(2026, 5, 1, 12, 30, 45, 123456)
    run = RunInfo(model="org/model:v1", preset="quick")
    path = export.write_lm_eval(results, run, tmp_path, saved)
    assert path == tmp_path / "org__model__v1" / "results_2026-05-01T12-30-45.123456.json"
    document = strict_json(path.read_text())
    assert document["model_name"] == "org/model:v1" and document["model_name_sanitized"] == "org__model__v1"


def test_lm_eval_results_carry_the_harness_numbers(tmp_path: Path, results: list[dict], run: RunInfo) -> None:
    document = strict_json(export.write_lm_eval(results, run, tmp_path).read_text())
    tasks = {"kvpatch_ppl", "kvpatch_decode", "kvpatch_needle", "kvpatch_kv"}
    assert tasks == set(export.LM_EVAL_TASKS)
    expected_keys = ({f"{t}@{r['config']}" for t in tasks for r in results}
                     | {"kvpatch_ppl@unpatched", "kvpatch_needle@unpatched", "kvpatch_kv@unpatched"})
    entries = document["results"]
    assert set(entries) == expected_keys == set(document["versions"]) == set(document["higher_is_better"]) \
        == set(document["configs"]) == set(document["n-shot"])
    assert list(entries) == sorted(entries)  # each measurement's configs together
    for key, entry in entries.items():
        assert entry["name"] == entry["alias"] == key
        metrics = {k: v for k, v in entry.items() if "," in k}
        assert all(k.rpartition(",")[2] == "none" for k in metrics)  # metric,filter
        values = {k.partition(",")[0] for k in metrics if "_stderr," not in k}
        assert all(entry[f"{m}_stderr,none"] == "N/A" for m in values)  # not computed, as lm-eval marks it
        assert set(document["higher_is_better"][key]) == values
        assert document["versions"][key] == "0.1.0" and document["n-shot"][key] == 0

    def value(task: str, config: str, metric: str) -> object:
        return entries[f"{task}@{config}"][f"{metric},none"]

    for result in results:
        name = result["config"]
        assert value("kvpatch_ppl", name, "ppl_ratio") == result["ppl_ratio"]
        assert value("kvpatch_ppl", name, "token_perplexity") == result["ppl_patched"]
        assert value("kvpatch_decode", name, "logit_cosine_min") == result["logit_cosine_min"]
        assert value("kvpatch_decode", name, "logit_cosine_mean") == result["logit_cosine_mean"]
        assert value("kvpatch_decode", name, "top1_agreement") == result["top1_agreement"]
        assert ("attn_cosine_min,none" in entries[f"kvpatch_decode@{name}"]) == (result["attn_cosine_min"] is not None)
        assert value("kvpatch_needle", name, "acc") == result["needle_acc_patched"]
        needle = {k.partition(",")[0].removeprefix("acc_"): v for k, v in entries[f"kvpatch_needle@{name}"].items()
                  if k.startswith("acc_len") and "_stderr" not in k}
        assert needle == cells(result["needle_patched"])
        assert value("kvpatch_kv", name, "compression_ratio") == export.compression_ratio(result)
        assert value("kvpatch_kv", name, "kv_bytes_resident") == result["kv_bytes_patched"]
        assert value("kvpatch_kv", name, "kv_bytes_offloaded") == result["kv_bytes_offloaded"]
        metadata = document["configs"][f"kvpatch_ppl@{name}"]["metadata"]
        assert metadata["config_digest"] == run.config_digests[name] and metadata["settings"] == result["settings"]
        assert metadata["violations"] == run.violations[name]
        counts = document["n-samples"]
        assert counts[f"kvpatch_ppl@{name}"] == {"original": 1535, "effective": 1535}  # every token after the first
        assert counts[f"kvpatch_needle@{name}"]["effective"] == 4 * SETTINGS["needle_per_cell"]
        assert counts[f"kvpatch_decode@{name}"]["effective"] == len(result["logit_cosine_per_step"])
    assert document["higher_is_better"]["kvpatch_ppl@kivi4"]["ppl_ratio"] is False
    assert document["higher_is_better"]["kvpatch_decode@kivi4"]["top1_agreement"] is True
    assert value("kvpatch_ppl", "unpatched", "token_perplexity") == results[0]["ppl_unpatched"]
    assert value("kvpatch_needle", "unpatched", "acc") == results[0]["needle_acc_unpatched"]
    assert "kvpatch_decode@unpatched" not in entries
    assert document["config"] == {"model": "kvpatch-ref", "model_dtype": "float32", "device": "cpu", "random_seed": 0,
                                  "kvpatch_preset": "quick", "limit": None, "bootstrap_iters": 0}
    assert (document["kvpatch_version"], document["transformers_version"], document["date"]) == (
        "0.1.0", "5.24.0", run.started)
    assert document["total_evaluation_time_seconds"] == str(run.total_s) and document["model_source"] == "kvpatch"


# -- command line ----------------------------------------------------------------------------------


def test_format_without_out_is_refused_before_any_model_work(monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    import kvpatch.cli.evaluate

    def no_model(*args: object) -> None:
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(kvpatch.cli.evaluate, "load_named", no_model)
    for fmt in ("kvpress", "lm-eval"):
        assert main(["eval", "--config", "default", "--format", fmt]) == EXIT_BAD_INPUT
        err = capsys.readouterr().err
        assert f"--format {fmt}" in err and "--out" in err
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "--format", "csv", "--out", "x"])
    assert exit_info.value.code == EXIT_BAD_INPUT
    assert "--format" in capsys.readouterr().err


@pytest.mark.parametrize("fmt", ["kvpress", "lm-eval"])
def test_cli_writes_the_format_on_the_tiny_model(fmt: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["eval", "--model", "tiny-llama", "--config", "default", "--format", fmt, "--out", str(tmp_path)])
    assert code == EXIT_OK and "default" in capsys.readouterr().out
    assert not list(tmp_path.glob("eval-*.json")) and not list(tmp_path.glob("*.png"))  # only the chosen format
    if fmt == "kvpress":
        assert {p.name for p in tmp_path.iterdir()} == {"kvpatch__quick__tiny-llama__default__0.00",
                                                        "kvpatch__quick__tiny-llama__no_press__0.00"}
        metrics = strict_json((tmp_path / "kvpatch__quick__tiny-llama__default__0.00" / "metrics.json").read_text())
        assert metrics["decode"]["top1_agreement"] == 1.0 and metrics["kv"]["compression_ratio"] == 0.0
        config = yaml.safe_load((tmp_path / "kvpatch__quick__tiny-llama__default__0.00" / "config.yaml").read_text())
        assert len(config["kvpatch"]["config_digest"]) == 64 and config["kvpatch"]["violations"] == []
    else:
        (path,) = (tmp_path / "tiny-llama").glob("results_*.json")
        document = strict_json(path.read_text())
        assert document["results"]["kvpatch_decode@default"]["top1_agreement,none"] == 1.0
        assert document["config"]["model"] == "tiny-llama" and document["config"]["model_dtype"] == "float32"
        assert document["n-samples"]["kvpatch_ppl@default"]["effective"] == 1535
