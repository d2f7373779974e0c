from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not (SHARED / "models" / "stories260K").is_dir():
        pytest.skip(f"../shared is absent ({SHARED}); the real-checkpoint tests need it")
    return SHARED


def pytest_configure(config):
    # Tiny models: thread start-up costs more than it saves, and CI machines are shared.
    import torch

    torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    """``@pytest.mark.cuda`` tests run where a CUDA device is (``bench/gpu_check.sh``), else skip saying why."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="no CUDA device: bash bench/gpu_check.sh runs this on a GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def fake_hub(monkeypatch: pytest.MonkeyPatch):
    """A running fake Hub (tests/hub_server.py); the process talks to it (and only to it), online, with its token."""
    import huggingface_hub.constants

    from tests.hub_server import FakeHub

    with FakeHub() as server:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", server.url)
        monkeypatch.setenv("HF_TOKEN", server.token)
        yield server
