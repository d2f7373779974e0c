"""Where the serving tests find their virtual environments (built by ``.ci/serving_venvs.sh``).

vLLM pins its own torch and transformers, and the remote-code matrix needs other transformers
releases than this environment's, so each runs in a venv of its own under
``$HC_RETROFIT_SERVING_VENVS`` (default ``${HC_RETROFIT_CACHE:-~/.cache/hc-retrofit}/venvs``). A
venv counts only once its build finished (its ``ok`` stamp); a missing one skips the test with a
printed one-line reason naming the command that builds it.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

VENVS_ENV = "HC_RETROFIT_SERVING_VENVS"
BUILD = ".ci/serving_venvs.sh"


def venvs_root() -> Path:
    """The directory that holds the serving venvs."""
    explicit = os.environ.get(VENVS_ENV)
    if explicit:
        return Path(explicit).expanduser()
    cache = os.environ.get("HC_RETROFIT_CACHE") or Path.home() / ".cache" / "hc-retrofit"
    return Path(cache).expanduser() / "venvs"


def venv_python(name: str) -> Path | None:
    """The python of the built venv ``name`` (``vllm``, ``transformers-5.16.*`` ...), or ``None``."""
    venv = venvs_root() / name
    python = venv / "bin" / "python"
    return python if (venv / "ok").is_file() and python.is_file() else None


def require_venv(name: str) -> Path:
    """The python of venv ``name``, or skip the test with one printed line saying how to build it."""
    python = venv_python(name)
    if python is None:
        reason = f"serving venv {name!r} is not built in {venvs_root()} (bash {BUILD} {name} builds it)"
        pytest.skip(reason)
    return python


def clean_env(**extra: str) -> dict[str, str]:
    """The environment for a venv's python: no ``PYTHONPATH`` (the checkpoint's own code must be enough,
    hc_retrofit is not importable there), offline, quiet."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **extra})
    return env
