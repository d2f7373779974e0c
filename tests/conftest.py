import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

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
