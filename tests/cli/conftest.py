"""Fixtures for the CLI tests: offline Hub, a CLI runner, tiny base and converted checkpoints."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from typer.testing import CliRunner

import hc_retrofit.cli.commands  # noqa: F401  (registers the commands)
from hc_retrofit.cli.app import app
from tests.checkpoints import HUB_OFFLINE_ENV, save_base


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    for key, value in HUB_OFFLINE_ENV.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("MPLBACKEND", "Agg")


@pytest.fixture
def cli() -> Callable[..., object]:
    """``cli("convert", ...)`` runs the app like the console script and returns the click Result."""
    runner = CliRunner()

    def run(*args: str) -> object:
        return runner.invoke(app, [str(a) for a in args], prog_name="hc-retrofit")

    return run


@pytest.fixture(scope="session")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A plain tiny llama checkpoint with a word-level tokenizer."""
    return save_base("llama-gqa-untied", tmp_path_factory.mktemp("base") / "tiny-llama")


@pytest.fixture(scope="session")
def converted_dir(tmp_path_factory: pytest.TempPathFactory, base_dir: Path) -> Path:
    """``base_dir`` converted (mHC, 4 streams) through the Python API the CLI uses."""
    from hc_retrofit.conversion import convert_checkpoint
    from hc_retrofit.modeling.config import HCConfig

    out = tmp_path_factory.mktemp("converted") / "tiny-llama-mhc"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        convert_checkpoint(str(base_dir), out, HCConfig(num_streams=4, variant="mhc"))
    return out


@pytest.fixture(scope="session")
def trained_dir(tmp_path_factory: pytest.TempPathFactory, converted_dir: Path) -> Path:
    """``converted_dir`` after a few optimiser steps, saved with a training summary beside it."""
    import json

    from hc_retrofit import outputs
    from hc_retrofit.loading import load_converted
    from hc_retrofit.saving import save_converted
    from tests.checkpoints import train_a_few_steps

    run = tmp_path_factory.mktemp("run")
    outputs.write_marker(run, "run")  # a run dir as `train` writes it
    model = train_a_few_steps(load_converted(converted_dir), steps=20, lr=3e-2)
    out = save_converted(model, run / "final", extra_metadata={"training": {"lr": 3e-2, "steps": 20}})
    (run / "summary.json").write_text(json.dumps({"steps": 20, "initial_eval_loss": 4.6, "final_eval_loss": 3.9}))
    (run / "metrics.jsonl").write_text('{"step": 10, "loss": 4.1}\n{"step": 20, "loss": 3.9}\n')
    return out
