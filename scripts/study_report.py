"""Regenerate docs/study.md's tables and plot from the `hc-retrofit compare` output dirs.

The study is several ``compare`` runs (one ``--out`` each: the main LR x HC-multiplier grid, then
one per arm that changes an HC setting: n, variant, HC-only warm-up, the HC init). Hours of CPU,
so it is not rerun here: this script reads their finished run dirs
(:func:`hc_retrofit.compare.report.read_comparison`, the same selection and gains as ``compare``
prints) and rewrites every block of docs/study.md between

    <!-- study-report KIND ARGS... -->
    ...
    <!-- /study-report -->

KIND is ``grid DIR`` (every setting tried on the tuning seeds), ``arms DIR...`` (each arm at its
best setting, held-out loss and gain over plain per seed) or ``plot PNG DIR...`` (held-out loss
against tokens and training seconds, drawn by ``compare``'s own
:func:`~hc_retrofit.compare.report.plot_compare`; the block's text is kept, the PNG rewritten).
PNG is relative to the page; DIRs are relative to ``--runs`` (the page's commands write ``runs/study``, ``runs/study-n8``, ...).

    python scripts/study_report.py --runs runs            # rewrite docs/study.md and the plot(s)
    python scripts/study_report.py --runs runs --check    # exit 1 if docs/study.md is not up to date
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from hc_retrofit.compare.report import plot_compare, read_comparison, summarise  # noqa: E402
from hc_retrofit.compare.spec import HC_ONLY, Arm, CompareSpec  # noqa: E402

OPEN = re.compile(r"^<!-- study-report (grid|arms|plot) (.+?) -->\s*$")
CLOSE = "<!-- /study-report -->"
VARIANT_NAMES = {"mhc": "mHC", "dynamic": "dynamic HC", "static": "static HC"}
SETTING_NAMES = {
    "hc_warmup_steps": "HC-only warm-up {:g} steps",
    "width_init_main": "a main {:g}",
    "residual_init_main": "R diagonal {:g}",
}


def load(out: Path) -> tuple[CompareSpec, list, object]:
    """(spec, outcomes, summary) of the comparison in ``out``; exit naming it if it is not finished."""
    if not (out / "compare.json").is_file():
        raise SystemExit(f"{out} holds no comparison (compare.json): run its compare command first")
    spec, outcomes = read_comparison(out)
    ran = {(o.trial.arm, o.trial.setting, o.trial.seed) for o in outcomes}
    missing = [(arm, s, seed) for arm in spec.arms for s in spec.settings(arm) for seed in spec.tuning_seeds]
    missing = [m for m in missing if m not in ran]
    if not missing:
        result = summarise(spec, outcomes)
        missing = [
            (arm, (a.lr, a.hc_lr_multiplier), seed)
            for arm, a in zip(spec.arms, result.arms, strict=True)
            for seed in spec.seeds
            if seed not in a.heldout_by_seed
        ]
    if missing:
        raise SystemExit(f"{out} is not finished ({len(missing)} run(s) missing): rerun its compare command")
    return spec, outcomes, result


def arm_label(spec: CompareSpec, arm: Arm) -> str:
    """``mHC n=4``, plus the HC-only settings of the comparison (``, HC-only warm-up 50 steps``)."""
    if not arm.hc:
        return "plain"
    extras = [
        SETTING_NAMES[name].format(float(spec.train[name]))
        for name in HC_ONLY
        if spec.train.get(name) not in (None, 0, "0")
    ]
    return ", ".join([f"{VARIANT_NAMES.get(arm.variant, arm.variant)} n={arm.streams}", *extras])


def _num(value: float) -> str:
    """``1e-3``, ``3e-4``, ``10``: learning rates as the study commands write them."""
    if value >= 1 or value == 0:
        return f"{value:g}"
    mantissa, exponent = f"{value:.6e}".split("e")
    return f"{float(mantissa):g}e{int(exponent)}"


def _loss(value: float) -> str:
    return "diverged" if value == float("inf") else f"{value:.4f}"


def grid_table(out: Path) -> list[str]:
    """Every setting of every arm on the tuning seeds (mean over them); the chosen one in bold."""
    spec, outcomes, result = load(out)
    best = {a.arm: (a.lr, a.hc_lr_multiplier) for a in result.arms}
    seeds = ", ".join(map(str, spec.tuning_seeds))
    rows = [
        f"| arm | base LR | HC LR x | validation (seed {seeds}) | held-out (seed {seeds}) | |",
        "|---|---|---|---|---|---|",
    ]
    for arm in spec.arms:
        for lr in spec.lr_grid:
            settings = [s for s in spec.settings(arm) if s[0] == lr]
            cells: dict[str, list[str]] = {"mult": [], "val": [], "held": []}
            chosen = None
            for setting in settings:
                runs = [o for o in outcomes if o.trial.arm == arm and o.trial.setting == setting]
                runs = [o for o in runs if o.trial.seed in spec.tuning_seeds]
                if not runs:
                    continue
                val = statistics.fmean(o.validation_loss for o in runs)
                held = statistics.fmean(o.heldout_loss for o in runs)
                bold = "**" if best[arm.name] == setting else ""
                if bold:
                    chosen = "x" + _num(setting[1]) if setting[1] is not None else "LR " + _num(lr)
                cells["mult"].append("-" if setting[1] is None else bold + _num(setting[1]) + bold)
                cells["val"].append(bold + _loss(val) + bold)
                cells["held"].append(bold + ("-" if val == float("inf") else _loss(held)) + bold)
            if cells["val"]:
                mark = f"**chosen: {chosen}**" if chosen else ""
                rows.append(
                    f"| {arm_label(spec, arm)} | {_num(lr)} | {' / '.join(cells['mult'])} | "
                    f"{' / '.join(cells['val'])} | {' / '.join(cells['held'])} | {mark} |"
                )
    return rows


def _grid_tried(spec: CompareSpec, arm: Arm) -> str:
    lrs = ", ".join(_num(v) for v in spec.lr_grid)
    if not arm.hc:
        return lrs
    return f"{lrs} x {', '.join(_num(v) for v in spec.hc_lr_multiplier_grid)}"


def arms_table(dirs: list[Path]) -> list[str]:
    """Each arm at its best setting over all seeds, one row per arm of every comparison (plain once)."""
    rows: list[str] = []
    plains: list[tuple] = []
    seeds_header = None
    for out in dirs:
        spec, _, result = load(out)
        seeds = " / ".join(map(str, spec.seeds))
        if seeds_header is None:
            seeds_header = seeds
            rows += [
                f"| arm | settings tried (LR x HC LR x) | best setting | held-out, seeds {seeds} | mean | "
                "gain per seed | gain mean ± sd | tok/s | train s / run |",
                "|---|---|---|---|---|---|---|---|---|",
            ]
        elif seeds != seeds_header:
            raise SystemExit(f"{out} ran seeds {seeds}, the first comparison {seeds_header}: one table needs one set")
        for arm, summary in zip(spec.arms, result.arms, strict=True):
            if not arm.hc:
                key = (summary.lr, tuple(summary.heldout_by_seed.items()))
                if key in plains:
                    continue  # the same plain runs as an earlier comparison's
                plains.append(key)
            setting = f"LR {_num(summary.lr)}" + (
                "" if summary.hc_lr_multiplier is None else f", x{_num(summary.hc_lr_multiplier)}"
            )
            held = " / ".join(_loss(v) for v in summary.heldout_by_seed.values())
            if summary.gain_by_seed is None:
                gains = spread = "-"
            else:
                gains = " / ".join(f"{v:+.4f}" for v in summary.gain_by_seed.values())
                spread = f"{summary.gain_mean:+.4f} ± {summary.gain_std:.4f}"
            rows.append(
                f"| {arm_label(spec, arm)} | {_grid_tried(spec, arm)} | {setting} | {held} | "
                f"{_loss(summary.heldout_loss)} | {gains} | {spread} | {summary.tokens_per_s:,.0f} | "
                f"{summary.train_seconds:,.0f} |"
            )
    return rows


def draw(png: Path, dirs: list[Path]) -> Path:
    """Each arm of every comparison at its best setting (plain once) on ``compare``'s plot."""
    curves: dict[str, list] = {}
    for out in dirs:
        spec, outcomes, result = load(out)
        for arm, summary in zip(spec.arms, result.arms, strict=True):
            label = arm_label(spec, arm)
            if label in curves:
                continue
            setting = (summary.lr, summary.hc_lr_multiplier)
            curves[label] = [o for o in outcomes if o.trial.arm == arm and o.trial.setting == setting]
    return plot_compare(curves, png)


def render(readme: str, runs: Path, root: Path) -> str:
    """``readme`` with every study-report block regenerated (plots written under ``root``)."""
    lines = readme.split("\n")
    out: list[str] = []
    i = 0
    while i < len(lines):
        match = OPEN.match(lines[i])
        out.append(lines[i])
        i += 1
        if not match:
            continue
        end = next((j for j in range(i, len(lines)) if lines[j].strip() == CLOSE), None)
        if end is None:
            raise SystemExit(f"line {i}: {match.group(0).strip()} has no {CLOSE}")
        kind, args = match.group(1), match.group(2).split()
        if kind == "grid":
            out += grid_table(runs / args[0])
        elif kind == "arms":
            out += arms_table([runs / a for a in args])
        else:
            draw(root / args[0], [runs / a for a in args[1:]])
            out += lines[i:end]
        i = end
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=Path, default=Path("runs"), help="where the compare dirs are")
    parser.add_argument("--page", "--readme", dest="page", type=Path, default=REPO / "docs" / "study.md")
    parser.add_argument("--check", action="store_true", help="only report whether the page is up to date")
    args = parser.parse_args(argv)
    old = args.page.read_text()
    new = render(old, args.runs, args.page.parent)
    if args.check:
        print(f"{args.page}: study blocks are " + ("up to date" if new == old else "out of date"))
        return 0 if new == old else 1
    args.page.write_text(new)
    print(f"{args.page}: study blocks {'unchanged' if new == old else 'rewritten'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
