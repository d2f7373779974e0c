"""A converted checkpoint's remote code loads and is exact on the transformers releases serving
stacks pin (5.16, 5.19: vLLM 0.32 pins transformers<5.20) and on the newest 5.x, each in a venv of
its own (:mod:`tests.serving.venvs`), against logits computed here with the converted model."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
import transformers
from packaging.version import Version

from tests.serving.models import FAMILIES, PROMPTS, VARIANTS, build
from tests.serving.venvs import clean_env, require_venv, venv_python

RUNNER = Path(__file__).with_name("hf_runner.py")
VERSIONS = ("transformers-5.16", "transformers-5.19", "transformers-latest")
IDS = [PROMPTS[0]]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Perturbed (llama, qwen2) x (static, dynamic, mHC) checkpoints -> their logits and hidden states here."""
    if not any(venv_python(v) for v in VERSIONS):
        require_venv(VERSIONS[0])  # skips, saying how to build the venvs
    root = tmp_path_factory.mktemp("versions")
    out = {}
    for family in FAMILIES:
        for variant in VARIANTS:
            case = build(family, variant, root, perturbed=True)
            model = transformers.AutoModelForCausalLM.from_pretrained(case.directory, trust_remote_code=True).eval()
            with torch.no_grad():
                ids = torch.tensor(IDS)
                out[str(case.directory)] = (model(ids).logits, model.model(ids).last_hidden_state)
    return out


@pytest.mark.parametrize("venv", VERSIONS)
def test_remote_code_is_exact_on_transformers(
    venv: str, checkpoints: dict[str, tuple[torch.Tensor, torch.Tensor]], tmp_path: Path
) -> None:
    python = require_venv(venv)
    jobs = [{"dir": directory, "ids": IDS} for directory in checkpoints]
    (tmp_path / "jobs.json").write_text(json.dumps(jobs))
    proc = subprocess.run(
        [str(python), str(RUNNER), str(tmp_path / "jobs.json")],
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, "\n".join((proc.stdout + proc.stderr).splitlines()[-30:])
    results = [json.loads(line[len("RESULT ") :]) for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert [r["dir"] for r in results] == list(checkpoints)
    versions = {Version(r["version"]) for r in results}
    if venv == "transformers-latest":
        assert min(versions) >= Version(transformers.__version__)  # the newest release, not older than ours
    else:
        assert {(v.major, v.minor) for v in versions} == {tuple(map(int, venv.split("-")[1].split(".")))}
    for result in results:
        logits, hidden = checkpoints[result["dir"]]
        assert result["hc_retrofit_modules"] == []  # the checkpoint's own code, not this package
        torch.testing.assert_close(torch.tensor(result["logits"]), logits, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(torch.tensor(result["hidden"]), hidden, rtol=1e-5, atol=1e-5)
