"""What a user of a converted checkpoint will run, checked before ``verify`` vouches for it or ``push`` publishes it.

``from_pretrained(dir, trust_remote_code=True)`` imports the module that ``config.json``'s
``auto_map`` names, and with it every sibling module it imports. So a checkpoint is only what
hc-retrofit wrote when:

* every ``auto_map`` entry (of ``config.json`` and of any other JSON config beside it) names a
  class defined in our generated ``modeling_hc_retrofit.py``, nothing in another module or repo;
* every ``.py`` file in the folder is one we ship (the generated modeling file and the copies of
  ``hc_retrofit/modeling/*.py``), byte for byte as this hc-retrofit writes it;
* nothing else in it is executable: no compiled modules, scripts, files with an execute bit,
  or pickles (``torch.load`` of a pickle can run code).

:func:`code_problems` lists every way a folder fails that, one line each.
"""

from __future__ import annotations

import ast
import difflib
import json
import os
import re
import stat
from pathlib import Path
from typing import Any

from hc_retrofit.checkpoint_format import BASE_ARCH_KEY, BASE_TYPE_KEY
from hc_retrofit.remote_code import MODELING_FILE, modeling_source_for, package_module_closure

COMPILED_SUFFIXES = (".pyc", ".pyo", ".so", ".pyd", ".dll", ".dylib", ".sh", ".bat", ".cmd", ".exe", ".ps1")
"""Files that are programs whatever their mode."""
PICKLE_SUFFIXES = (".pkl", ".pickle", ".pt", ".pth", ".bin", ".ckpt", ".joblib")
"""Files that are (usually) pickles: loading one with ``torch.load``/``pickle`` can run code."""
_OUR_REFERENCE = re.compile(re.escape(MODELING_FILE.removesuffix(".py")) + r"\.([A-Za-z_]\w*)")


def expected_code(config: dict[str, Any]) -> dict[str, str | None]:
    """``{file name: source}`` that this hc-retrofit writes for a checkpoint with ``config`` (its config.json).

    The generated modeling file is ``None`` when this transformers has no public class of the
    recorded base architecture (then it cannot be checked, which is itself reported).
    """
    import transformers
    from transformers import CONFIG_MAPPING

    files: dict[str, str | None] = dict(package_module_closure())
    base_type, base_arch = config.get(BASE_TYPE_KEY), config.get(BASE_ARCH_KEY)
    try:
        config_cls = CONFIG_MAPPING[base_type]
        model_cls = getattr(transformers, str(base_arch))
    except (KeyError, AttributeError, TypeError):
        files[MODELING_FILE] = None
    else:
        files[MODELING_FILE] = modeling_source_for(config_cls, model_cls, str(base_type))
    return files


def _defined_classes(source: str | None) -> set[str]:
    if not source:
        return set()
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return set()
    return {node.name for node in tree.body if isinstance(node, ast.ClassDef)}


def _auto_map_problems(directory: Path, ours: set[str]) -> list[str]:
    """Every ``auto_map`` entry must name a class of our modeling file (config.json) and nothing else."""
    problems = []
    for file in sorted(directory.glob("*.json")):
        try:
            data = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        auto_map = data.get("auto_map") if isinstance(data, dict) else None
        if auto_map is None:
            continue
        if file.name != "config.json" or not isinstance(auto_map, dict):
            problems.append(
                f"{file.name} has an auto_map ({json.dumps(auto_map)[:60]}): code hc-retrofit does not ship"
            )
            continue
        for auto, target in auto_map.items():
            for ref in target if isinstance(target, (list, tuple)) else [target]:
                if ref is None:
                    continue
                match = _OUR_REFERENCE.fullmatch(str(ref))
                if not match or match.group(1) not in ours:
                    problems.append(
                        f"config.json auto_map {auto} -> {ref}: not a class of {MODELING_FILE}, so loading with "
                        "trust_remote_code would run other code"
                    )
    return problems


def _diff_size(expected: str, found: str) -> str:
    added = removed = 0
    for line in difflib.unified_diff(expected.splitlines(), found.splitlines(), lineterm="", n=0):
        if line.startswith("+") and not line.startswith("+++"):
            added += 1
        elif line.startswith("-") and not line.startswith("---"):
            removed += 1
    return f"+{added} -{removed} lines"


def code_problems(directory: str | os.PathLike, expected: dict[str, str | None] | None = None) -> list[str]:
    """Every way the code a ``trust_remote_code`` user of ``directory`` would run differs from ours.

    ``expected``: ``{file name: source}`` to compare with (default: :func:`expected_code` of its
    config.json). An empty list means: the folder ships exactly our modeling code and nothing else
    that runs.
    """
    from hc_retrofit.version import __version__

    root = Path(directory)
    try:
        config = json.loads((root / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        config = {}
    expected = expected if expected is not None else expected_code(config)
    problems = _auto_map_problems(root, _defined_classes(expected.get(MODELING_FILE)))
    seen = set()
    for folder, dirs, names in os.walk(root, followlinks=False):
        dirs.sort()
        for name in sorted([*names, *(d for d in dirs if d == "__pycache__")]):
            path = Path(folder) / name
            rel = path.relative_to(root).as_posix()
            if rel.startswith(".hc-retrofit-output"):
                continue  # the manifest: data, never run
            if name == "__pycache__":
                problems.append(f"{rel}/ holds compiled Python: not code hc-retrofit ships")
                continue
            suffix = path.suffix.lower()
            if suffix == ".py":
                seen.add(rel)
                if rel not in expected:
                    problems.append(f"{rel} is not modeling code hc-retrofit ships: trust_remote_code could import it")
                    continue
                want = expected[rel]
                found = path.read_text(encoding="utf-8", errors="replace")
                if want is None:
                    problems.append(
                        f"{rel} cannot be checked: this transformers has no class {config.get(BASE_ARCH_KEY)}"
                    )
                elif found != want:
                    problems.append(
                        f"{rel} differs from what hc-retrofit {__version__} writes ({_diff_size(want, found)})"
                    )
            elif suffix in COMPILED_SUFFIXES:
                problems.append(f"{rel} is compiled code or a script: not something hc-retrofit ships")
            elif suffix in PICKLE_SUFFIXES:
                problems.append(
                    f"{rel} is a pickle-format file: loading it can run code (hc-retrofit writes safetensors)"
                )
            elif (
                not path.is_symlink()
                and path.is_file()
                and path.stat().st_mode & (stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
            ):
                problems.append(
                    f"{rel} is executable (mode {stat.filemode(path.stat().st_mode)}): not something hc-retrofit ships"
                )
    for name in sorted(set(expected) - seen):
        problems.append(f"{name} is missing: trust_remote_code loading will fail")
    return problems
