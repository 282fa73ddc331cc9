"""`kvpatch eval --format kvpress|lm-eval`: the harness's results in the layouts of NVIDIA kvpress's
evaluation and of EleutherAI's lm-evaluation-harness, so kvpatch's numbers can sit in their tables.

The converters take `EvalResult.to_dict()` dicts (or the eval-<config>.json files `kvpatch eval
--out` writes) and a `RunInfo` of what the command knew about the run. They carry the harness's
own measurements over under the other projects' field names and invent none: a metric kvpatch did
not measure is absent, not zero. docs/fidelity.md ("Results in kvpress and lm-eval layouts") says
which field means what and what is not comparable.

Nothing here imports torch (nor anything of kvpatch): only the standard library and PyYAML.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

#: `kvpatch eval --format` choices; `kvpatch` is the harness's own eval-<config>.json and plot.
FORMATS = ("kvpatch", "kvpress", "lm-eval")

#: The kvpress "dataset" of every folder: kvpatch's harness, not one of kvpress's benchmarks.
KVPRESS_DATASET = "kvpatch"
#: The kvpress press name of the unpatched reference (kvpress's own name for "no compression").
KVPRESS_BASELINE = "no_press"
#: lm-eval's filter slot: the harness applies no answer filter.
LM_EVAL_FILTER = "none"
#: The text `kvpatch eval` measures on (perplexity, decode prompt, needle filler).
DEFAULT_TEXT = "kvpatch-ref held-out text (kvpatch/models/kvpatch-ref/heldout.txt)"


@dataclass(frozen=True)
class RunInfo:
    """What the command knows about the run beyond each result: the model as named on the
    command line, its dtype and device, the preset, versions, and per config its digest and
    bound violations. None: not known (the field is then left out of what is written)."""

    model: str
    dtype: str | None = None
    device: str | None = None
    preset: str | None = None
    kvpatch_version: str | None = None
    transformers_version: str | None = None
    torch_version: str | None = None
    config_digests: Mapping[str, str] = field(default_factory=dict)
    violations: Mapping[str, list[str]] = field(default_factory=dict)
    #: tokens of the perplexity text (the reference's `ppl_ids`); every one after the first is scored.
    ppl_tokens: int | None = None
    #: UNIX time the run started, and its whole wall time (model load and reference included).
    started: float | None = None
    total_s: float | None = None
    text: str = DEFAULT_TEXT


# -- what both formats share --------------------------------------------------------------------


def compression_ratio(result: Mapping[str, Any]) -> float:
    """1 - resident K/V bytes / full-cache K/V bytes (kvpress's sense: the share of the cache
    that is gone; 0.0 for a lossless config). NaN when the full cache held no bytes."""
    full = result["kv_bytes_unpatched"]
    return 1.0 - result["kv_bytes_patched"] / full if full else math.nan


def needle_cells(grid: Mapping[str, Mapping[str, float]]) -> list[tuple[str, str, float]]:
    """(length, depth, accuracy) of each cell of a needle grid, in the harness's order."""
    return [(length, depth, acc) for length, row in grid.items() for depth, acc in row.items()]


def _drop_none(values: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in values.items() if v is not None}


def _same_reference(results: list[Mapping[str, Any]]) -> bool:
    """Whether every result was compared with the same unpatched side (one `kvpatch eval` run)."""
    keys = ("ppl_unpatched", "needle_unpatched", "kv_bytes_unpatched", "settings")
    return all(all(r[k] == results[0][k] for k in keys) for r in results)


# -- kvpress --------------------------------------------------------------------------------------


def kvpress_model_name(model: str) -> str:
    """The model part of a kvpress folder name: a hub-style id with "/" as "--", as kvpress
    writes it; a local folder by its last part (its full path would make a long, private name)."""
    path = Path(model)
    if path.is_dir():
        return path.resolve().name or "model"
    return model.replace("/", "--")


def kvpress_dir_name(press: str, ratio: float, run: RunInfo) -> str:
    """`<dataset>__<data_dir>__<model>__<press>__<ratio:.2f>`: the layout of kvpress's results
    folders (dataset kvpatch, data_dir the preset)."""
    parts = [KVPRESS_DATASET, run.preset or "", kvpress_model_name(run.model), press, f"{ratio:.2f}"]
    return "__".join(p for p in parts if p)


def kvpress_metrics(result: Mapping[str, Any]) -> dict[str, dict[str, float]]:
    """metrics.json of one config: `{task: {metric: value}}`, the shape of kvpress's per-task
    scores, holding the patched side and its comparison with the unpatched model."""
    metrics: dict[str, dict[str, float]] = {
        "ppl": {"perplexity": result["ppl_patched"], "ppl_ratio": result["ppl_ratio"]},
    }
    if result["needle_patched"]:
        metrics["needle"] = {"accuracy": result["needle_acc_patched"]}
        for length, depth, acc in needle_cells(result["needle_patched"]):
            metrics[f"needle_len{length}_depth{depth}"] = {"accuracy": acc}
    metrics["decode"] = _drop_none({
        "logit_cosine_min": result["logit_cosine_min"],
        "logit_cosine_mean": result["logit_cosine_mean"],
        "top1_agreement": result["top1_agreement"],
        "attn_cosine_min": result.get("attn_cosine_min"),
    })
    metrics["kv"] = _drop_none({
        "compression_ratio": compression_ratio(result),
        "kv_fraction": result["kv_fraction"],
        "kv_bytes_resident": result["kv_bytes_patched"],
        "kv_bytes_full": result["kv_bytes_unpatched"],
        "kv_bytes_offloaded": result.get("kv_bytes_offloaded"),
    })
    return metrics


def kvpress_baseline_metrics(result: Mapping[str, Any]) -> dict[str, dict[str, float]]:
    """metrics.json of the unpatched reference (`no_press`): what it measured on its own. The
    comparisons (ratios, cosines, agreement) are 1 by definition there and are left out."""
    metrics: dict[str, dict[str, float]] = {"ppl": {"perplexity": result["ppl_unpatched"]}}
    if result["needle_unpatched"]:
        metrics["needle"] = {"accuracy": result["needle_acc_unpatched"]}
        for length, depth, acc in needle_cells(result["needle_unpatched"]):
            metrics[f"needle_len{length}_depth{depth}"] = {"accuracy": acc}
    metrics["kv"] = {"compression_ratio": 0.0, "kv_bytes_resident": result["kv_bytes_unpatched"]}
    return metrics


def kvpress_config(press: str, ratio: float, run: RunInfo, out: Path, result: Mapping[str, Any],
                   baseline: bool = False) -> dict[str, Any]:
    """config.yaml of one folder: kvpress's field names where they apply, kvpatch's under `kvpatch`.
    `baseline`: the folder of the unpatched reference `result` was compared with."""
    digest = None if baseline else run.config_digests.get(press)
    command = None if baseline else f"kvpatch config {press}" + (f" (sha256 {digest})" if digest else "")
    config: dict[str, Any] = _drop_none({
        "dataset": KVPRESS_DATASET,
        "data_dir": run.preset,
        "model": run.model,
        "device": run.device,
        "press_name": press,
        "compression_ratio": ratio,
        "output_dir": str(out),
        "model_kwargs": _drop_none({"dtype": run.dtype}),
        "press_init_command": command,
    })
    config["kvpatch"] = _drop_none({
        "version": run.kvpatch_version,
        "transformers": run.transformers_version,
        "torch": run.torch_version,
        "preset": run.preset,
        "text": run.text,
        "config": None if baseline else press,
        "config_digest": digest,
        "lossless": None if baseline else result.get("lossless"),
        "fidelity": None if baseline else result.get("fidelity"),
        "violations": None if baseline else run.violations.get(press),
        "settings": result.get("settings"),
    })
    return config


def write_kvpress(results: Iterable[Mapping[str, Any]], run: RunInfo, out: Path) -> list[Path]:
    """One folder per config under `out` (and one `no_press` folder for the unpatched reference
    when every result shares it), each with metrics.json and config.yaml; the folders' paths.
    No predictions.csv: the harness keeps no per-row answers. Existing files are replaced."""
    import yaml

    results = list(results)
    folders = [(r["config"], compression_ratio(r), r, False) for r in results]
    if results and _same_reference(results) and all(r["config"] != KVPRESS_BASELINE for r in results):
        folders.insert(0, (KVPRESS_BASELINE, 0.0, results[0], True))
    written = []
    for press, ratio, result, baseline in folders:
        folder = out / kvpress_dir_name(press, ratio, run)
        folder.mkdir(parents=True, exist_ok=True)
        metrics = kvpress_baseline_metrics(result) if baseline else kvpress_metrics(result)
        (folder / "metrics.json").write_text(json.dumps(metrics, indent=4) + "\n")
        config = json.loads(json.dumps(kvpress_config(press, ratio, run, out, result, baseline)))  # plain types
        (folder / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False, default_flow_style=False))
        written.append(folder)
    return written


# -- lm-evaluation-harness ------------------------------------------------------------------------


#: lm-eval task names of the harness's measurements.
LM_EVAL_TASKS = ("kvpatch_decode", "kvpatch_kv", "kvpatch_needle", "kvpatch_ppl")
#: The config part of the unpatched reference's task names (`kvpatch_ppl@unpatched`).
LM_EVAL_BASELINE = "unpatched"


def lm_eval_task_key(task: str, config: str) -> str:
    """One results entry per config x measurement: `kvpatch_ppl@kivi4`. Sorted, as lm-eval's
    table prints ungrouped tasks, each measurement's configs stand together."""
    return f"{task}@{config}"


def lm_eval_sanitize_model_name(model: str) -> str:
    """The folder lm-eval writes a model's results under: characters that are not safe in a
    path (quotes, brackets, slashes, ...) become "__"."""
    return re.sub(r"[\"<>:/|\\?*\[\]]+", "__", model)


Metrics = dict[str, tuple[Any, bool | None]]  # {metric: (value, higher_is_better)}


def _needle_metrics(accuracy: float, grid: Mapping[str, Mapping[str, float]]) -> Metrics:
    metrics: Metrics = {"acc": (accuracy, True)}
    for length, depth, acc in needle_cells(grid):
        metrics[f"acc_len{length}_depth{depth}"] = (acc, True)
    return metrics


def _needle_rows(result: Mapping[str, Any], grid: Mapping[str, Mapping[str, float]]) -> int | None:
    per_cell = result.get("settings", {}).get("needle_per_cell")
    return len(needle_cells(grid)) * per_cell if per_cell else None


def _lm_eval_tasks(result: Mapping[str, Any], run: RunInfo) -> dict[str, tuple[Metrics, int | None]]:
    """{task: (metrics, samples)} of one config; samples None where a count does not apply."""
    scored = run.ppl_tokens - 1 if run.ppl_tokens else None
    decode: Metrics = {"logit_cosine_min": (result["logit_cosine_min"], True),
                       "logit_cosine_mean": (result["logit_cosine_mean"], True),
                       "top1_agreement": (result["top1_agreement"], True)}
    if result.get("attn_cosine_min") is not None:
        decode["attn_cosine_min"] = (result["attn_cosine_min"], True)
    kv: Metrics = {"compression_ratio": (compression_ratio(result), True),
                   "kv_fraction": (result["kv_fraction"], False),
                   "kv_bytes_resident": (result["kv_bytes_patched"], False),
                   "kv_bytes_full": (result["kv_bytes_unpatched"], None)}
    if "kv_bytes_offloaded" in result:
        kv["kv_bytes_offloaded"] = (result["kv_bytes_offloaded"], None)
    tasks = {
        "kvpatch_ppl": ({"ppl_ratio": (result["ppl_ratio"], False),
                         "token_perplexity": (result["ppl_patched"], False)}, scored),
        "kvpatch_decode": (decode, len(result["logit_cosine_per_step"])),
        "kvpatch_kv": (kv, None),
    }
    if result["needle_patched"]:
        tasks["kvpatch_needle"] = (_needle_metrics(result["needle_acc_patched"], result["needle_patched"]),
                                   _needle_rows(result, result["needle_patched"]))
    return tasks


def _lm_eval_baseline_tasks(result: Mapping[str, Any], run: RunInfo) -> dict[str, tuple[Metrics, int | None]]:
    """The unpatched reference's own measurements (no comparisons: they are 1 by definition)."""
    tasks = {
        "kvpatch_ppl": ({"token_perplexity": (result["ppl_unpatched"], False)},
                        run.ppl_tokens - 1 if run.ppl_tokens else None),
        "kvpatch_kv": ({"compression_ratio": (0.0, True), "kv_bytes_resident": (result["kv_bytes_unpatched"], False)},
                       None),
    }
    if result["needle_unpatched"]:
        tasks["kvpatch_needle"] = (_needle_metrics(result["needle_acc_unpatched"], result["needle_unpatched"]),
                                   _needle_rows(result, result["needle_unpatched"]))
    return tasks


def lm_eval_results(results: Iterable[Mapping[str, Any]], run: RunInfo) -> dict[str, Any]:
    """The aggregated results JSON lm-eval writes (results_<date>.json), for these configs."""
    entries: dict[str, dict[str, Any]] = {}
    configs: dict[str, dict[str, Any]] = {}
    higher: dict[str, dict[str, bool | None]] = {}
    samples: dict[str, dict[str, int]] = {}
    results = list(results)
    settings = results[0].get("settings", {}) if results else {}
    variants = [(r["config"], r, _lm_eval_tasks(r, run)) for r in results]
    if results and _same_reference(results) and all(r["config"] != LM_EVAL_BASELINE for r in results):
        variants.append((LM_EVAL_BASELINE, results[0], _lm_eval_baseline_tasks(results[0], run)))
    for name, result, tasks in variants:
        baseline = name == LM_EVAL_BASELINE
        for task, (metrics, count) in tasks.items():
            key = lm_eval_task_key(task, name)
            entry: dict[str, Any] = {"name": key, "alias": key}
            if count is not None:
                entry["sample_len"] = count
                samples[key] = {"original": count, "effective": count}
            for metric, (value, _) in metrics.items():
                entry[f"{metric},{LM_EVAL_FILTER}"] = value
                entry[f"{metric}_stderr,{LM_EVAL_FILTER}"] = "N/A"  # lm-eval's mark for "not computed"
            entries[key] = entry
            higher[key] = {metric: hib for metric, (_, hib) in metrics.items()}
            configs[key] = {
                "task": key,
                "tag": ["kvpatch", name],
                "num_fewshot": 0,
                "metric_list": [{"metric": m, "higher_is_better": hib}
                                for m, (_, hib) in metrics.items()],
                "metadata": _drop_none({
                    "version": run.kvpatch_version,
                    "kvpatch_config": None if baseline else name,
                    "config_digest": None if baseline else run.config_digests.get(name),
                    "lossless": None if baseline else result.get("lossless"),
                    "fidelity": None if baseline else result.get("fidelity"),
                    "violations": None if baseline else run.violations.get(name),
                    "preset": run.preset,
                    "text": run.text,
                    "settings": result.get("settings"),
                }),
            }
    keys = sorted(entries)
    document: dict[str, Any] = {
        "results": {k: entries[k] for k in keys},
        "group_subtasks": {},
        "configs": {k: configs[k] for k in keys},
        "versions": {k: run.kvpatch_version for k in keys},
        "n-shot": {k: 0 for k in keys},
        "higher_is_better": {k: higher[k] for k in keys},
        "n-samples": {k: samples[k] for k in keys if k in samples},
        "config": _drop_none({
            "model": run.model,
            "model_dtype": run.dtype,
            "device": run.device,
            "random_seed": settings.get("seed"),
            "kvpatch_preset": run.preset,
        }) | {"limit": None, "bootstrap_iters": 0},  # every row of the preset; no stderr computed
        "date": run.started,
        "transformers_version": run.transformers_version,
        "kvpatch_version": run.kvpatch_version,
        "torch_version": run.torch_version,
        "task_hashes": {},
        "model_source": "kvpatch",
        "model_name": run.model,
        "model_name_sanitized": lm_eval_sanitize_model_name(run.model),
        "total_evaluation_time_seconds": None if run.total_s is None else str(run.total_s),
    }
    return {k: v for k, v in document.items() if v is not None}


def lm_eval_path(out: Path, run: RunInfo, saved: datetime) -> Path:
    """`<out>/<model_name_sanitized>/results_<ISO time, ":" as "-">.json`, where lm-eval puts it."""
    return out / lm_eval_sanitize_model_name(run.model) / f"results_{saved.isoformat().replace(':', '-')}.json"


def write_lm_eval(results: Iterable[Mapping[str, Any]], run: RunInfo, out: Path,
                  saved: datetime | None = None) -> Path:
    """Write `lm_eval_results` where lm-eval would (`lm_eval_path`); the file's path."""
    path = lm_eval_path(out, run, saved or datetime.now())
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(lm_eval_results(results, run), indent=2, ensure_ascii=False) + "\n")
    return path
