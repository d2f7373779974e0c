"""Regenerate the output blocks of docs/cli.md by running the commands they show.

Every fenced block preceded by the line ``<!-- readme-numbers -->`` is generated:

* a ``console`` / ``text`` block whose lines start with ``$ `` : each command runs (bash, in the
  scratch checkout below) and its output (stdout and stderr, as on a terminal) replaces the lines
  after it;
* a ``text`` block right after a ``python`` block: the python block runs and what it prints
  (stdout; library progress bars and warnings go to stderr) fills it.

Blocks run in page order in one scratch directory, so later blocks see what earlier ones wrote
(``convert`` makes ``runs/stories-mhc``, which ``verify`` reads). The scratch directory is laid out
like the page assumes: ``WORKDIR`` is the "repository root", with ``recipes/`` and ``hc_retrofit/``
(the bundled model and text in ``hc_retrofit/data``) linked in and ``runs/`` written. Outputs are
copied verbatim except that trailing spaces are stripped; absolute paths are the scratch directory's.

    python scripts/readme_numbers.py               # all generated blocks of docs/cli.md
    python scripts/readme_numbers.py --skip demo   # all but blocks running "demo"
    python scripts/readme_numbers.py --list        # what would run

The code that runs is this checkout's (``PYTHONPATH`` is set to it). Exit code 1 if a command's
exit code differs from the one the block expects (0, or nonzero where the block shows ``error:``).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MARKER = "<!-- readme-numbers -->"
OWNED = ".readme-numbers-scratch"  # the scratch directory is ours to replace only if this file is in it
FENCE = re.compile(r"^(`{3,})(\w*)\s*$")  # 4 backticks where the output holds ``` lines (a model card)


@dataclass
class Block:
    """A generated block: lines ``start`` (opening fence) to ``end`` (closing fence) of the page."""

    start: int
    end: int
    kind: str  # "commands" or "python"
    source: list[str]  # the commands, or the python code


def find_blocks(lines: list[str]) -> list[Block]:
    """The generated blocks of a markdown page, in order."""
    blocks = []
    for i, line in enumerate(lines):
        if line.strip() != MARKER:
            continue
        start = i + 1
        fence = FENCE.match(lines[start]) if start < len(lines) else None
        if fence is None:
            raise SystemExit(f"line {i + 1}: {MARKER} must be followed by a fenced block")
        end = next(j for j in range(start + 1, len(lines)) if lines[j].strip() == fence.group(1))
        body = lines[start + 1 : end]
        commands = [ln[2:] for ln in body if ln.startswith("$ ")]
        if commands:
            blocks.append(Block(start, end, "commands", commands))
            continue
        # a text block right after a python block: its output
        close = i - 1
        if not lines[close].startswith("```"):
            raise SystemExit(f"line {start + 1}: a generated block without $ commands must follow a python block")
        open_ = max(j for j in range(close) if lines[j].startswith("```python"))
        blocks.append(Block(start, end, "python", lines[open_ + 1 : close]))
    return blocks


def prepare(workdir: Path) -> None:
    """A fresh scratch checkout: WORKDIR/recipes and WORKDIR/hc_retrofit link to the repository's."""
    if workdir.exists():
        if not (workdir / OWNED).exists():
            raise SystemExit(f"{workdir} exists and was not made by this script: pass another --workdir")
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    (workdir / OWNED).write_text("made by scripts/readme_numbers.py; replaced on every run\n")
    (workdir / "recipes").symlink_to(REPO / "recipes")
    (workdir / "hc_retrofit").symlink_to(REPO / "hc_retrofit")


def run(command: str, workdir: Path, env: dict[str, str], *, stderr: bool = True) -> tuple[list[str], int, float]:
    """Run one shell command as a user would; its output lines (stdout, and stderr if ``stderr``), exit code, time."""
    start = time.perf_counter()
    done = subprocess.run(
        ["bash", "-c", command],
        cwd=workdir,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT if stderr else subprocess.DEVNULL,
        text=True,
    )
    lines = [_as_user_sees(ln.rstrip(), workdir) for ln in done.stdout.splitlines()]
    return lines, done.returncode, time.perf_counter() - start


SHOWN_CHECKOUT = "~/hc-retrofit"  # where the page's reader has cloned the repository


def _as_user_sees(line: str, workdir: Path) -> str:
    """``line`` with this machine's paths (the repository, the scratch checkout) shown as the
    reader's checkout: the page must not name the machine it was generated on."""
    return line.replace(str(REPO), SHOWN_CHECKOUT).replace(str(workdir), SHOWN_CHECKOUT)


def environment() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.update(COLUMNS="100", TERM="dumb", NO_COLOR="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    env.pop("FORCE_COLOR", None)
    return env


def regenerate(block: Block, workdir: Path, env: dict[str, str], old: list[str]) -> tuple[list[str], bool]:
    """The new body of ``block`` and whether every exit code was the expected one."""
    ok = True
    if block.kind == "python":
        script = workdir / "readme_block.py"
        script.write_text("\n".join(block.source) + "\n")
        lines, code, seconds = run(f"{sys.executable} readme_block.py", workdir, env, stderr=False)
        script.unlink()
        print(f"  python block: exit {code}, {seconds:.1f} s", file=sys.stderr)
        return lines, code == 0
    body: list[str] = []
    for command in block.source:
        expects_error = _shows_error(old, command)
        lines, code, seconds = run(command, workdir, env)
        print(f"  $ {command}\n    exit {code}, {seconds:.1f} s", file=sys.stderr)
        if (code != 0) != expects_error:
            print("    UNEXPECTED exit code; output:\n      " + "\n      ".join(lines[-15:]), file=sys.stderr)
            ok = False
        body += [f"$ {command}", *lines]
    return body, ok


def _shows_error(old: list[str], command: str) -> bool:
    """Whether the page shows this command failing (a line of its output starts with ``error:``)."""
    try:
        i = old.index(f"$ {command}")
    except ValueError:
        return False
    following = old[i + 1 :]
    end = next((k for k, line in enumerate(following) if line.startswith("$ ")), len(following))
    return any(line.startswith("error:") for line in following[:end])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--page", type=Path, default=REPO / "docs" / "cli.md", help="the markdown page to regenerate")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/hc-retrofit-readme/hc-retrofit"))
    parser.add_argument("--skip", action="append", default=[], help="skip blocks whose commands contain this")
    parser.add_argument("--only", action="append", default=[], help="run only blocks whose commands contain this")
    parser.add_argument(
        "--reuse", action="store_true", help="keep the scratch directory of the last run (with --only: rerun a block)"
    )
    parser.add_argument("--list", action="store_true", help="print the blocks and commands, run nothing")
    args = parser.parse_args(argv)

    lines = args.page.read_text().splitlines()
    blocks = find_blocks(lines)
    if args.list:
        for b in blocks:
            print(f"lines {b.start + 1}-{b.end + 1} ({b.kind}):")
            for s in b.source if b.kind == "commands" else ["<python block>"]:
                print(f"  {s}")
        return 0
    if not (args.reuse and (args.workdir / OWNED).exists()):
        prepare(args.workdir)
    env = environment()
    ok = True
    new_lines = list(lines)
    offset = 0
    for block in blocks:
        old = lines[block.start + 1 : block.end]
        text = " ".join(block.source)
        skip = any(s in text for s in args.skip) or bool(args.only and not any(s in text for s in args.only))
        print(f"lines {block.start + 1}-{block.end + 1}: {'skipped' if skip else 'running'}", file=sys.stderr)
        if skip:
            continue
        body, good = regenerate(block, args.workdir, env, old)
        ok &= good
        a, b = block.start + 1 + offset, block.end + offset
        new_lines[a:b] = body
        offset += len(body) - len(old)
    args.page.write_text("\n".join(new_lines) + "\n")
    print(f"wrote {args.page}" + ("" if ok else " (some exit codes were unexpected: see above)"), file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
