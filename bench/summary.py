"""One table of the ratios in a directory of benchmark results (``bench/gpu_check.sh`` prints it).

    python bench/summary.py bench/results/gpu_check

Reads the JSON files the scripts wrote (``layer``, ``train_step``, ``decode``, ``work``) and
prints, per file and row, the variant and its ratio against the original: time ratios (converted /
original, lower is better) for ``layer`` and ``train_step``, tokens/s ratios (converted /
original, higher is better) for ``decode``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import _common as C

RATIO = {"layer": ("time", "time, lower is better"), "train_step": ("time", "time, lower is better")}
RATIO |= {"decode": ("ratio", "tok/s, higher is better"), "work": ("x_min", "elements moved / minimum")}


def rows_of(path: Path) -> list[dict]:
    """The summary rows of one result file (empty if it is not a known benchmark)."""
    payload = json.loads(path.read_text())
    kind = next((k for k in RATIO if path.stem.startswith(k)), None)
    if kind is None:
        return []
    key, meaning = RATIO[kind]
    rows = []
    for row in payload.get("rows", []):
        where = f"width {row['width']}" if "width" in row else f"n={row.get('n', '')}"
        rows.append({"bench": path.stem, "variant": row["variant"], "where": where, "ratio": row[key], "of": meaning})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", type=Path, help="directory of benchmark JSON files")
    args = parser.parse_args()
    rows = [r for path in sorted(args.results.glob("*.json")) for r in rows_of(path)]
    if not rows:
        raise SystemExit(f"error: no benchmark results in {args.results}")
    C.print_table(rows, ["bench", "variant", "where", "ratio", "of"])


if __name__ == "__main__":
    main()
