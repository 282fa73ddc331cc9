"""Report saved long-context protocol results (`kvpatch eval --preset protocol --out DIR`): the
per-task table, a Markdown summary at the longest length, and the heatmap, from DIR's
eval-<config>.json files alone, so a run stopped part-way still reports what it finished.

    python tools/protocol_report.py results/eval-protocol-cpu --plot docs/protocol-cpu.png
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from kvpatch.eval.protocol import format_protocol_table, markdown_summary, plot_protocol


def load_results(folder: Path, order: list[str] | None) -> list[dict]:
    """The eval-<config>.json files of `folder` that hold protocol tasks, in `order` if given."""
    files = sorted(folder.glob("eval-*.json"))
    results = [json.loads(f.read_text()) for f in files]
    results = [r for r in results if r.get("tasks_patched")]
    if not results:
        raise SystemExit(f"{folder}: no eval-<config>.json with protocol tasks (run kvpatch eval --preset protocol)")
    if order:
        rank = {name: i for i, name in enumerate(order)}
        results.sort(key=lambda r: rank.get(r["config"], len(rank)))
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--plot", type=Path, default=None, help="write the heatmap here")
    parser.add_argument("--order", nargs="+", default=None, help="config order of the tables")
    args = parser.parse_args(argv)
    results = load_results(args.folder, args.order)
    print(format_protocol_table(results))
    print()
    print(markdown_summary(results))
    if args.plot is not None:
        plot_protocol(results, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
