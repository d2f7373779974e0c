"""``import hc_retrofit.train`` without the [train] extra: one line naming it, not a bare ModuleNotFoundError."""

from __future__ import annotations

import subprocess
import sys

CODE = """
import sys
for hidden in ("accelerate", "datasets"):  # pyyaml comes with huggingface_hub, a core dependency
    for name in [k for k in sys.modules if k.startswith("hc_retrofit.train")]:
        del sys.modules[name]
    sys.modules[hidden] = None
    try:
        import hc_retrofit.train
    except ImportError as err:
        print(type(err).__name__, err)
    else:
        print("imported without", hidden)
    del sys.modules[hidden]
"""


def test_importing_train_without_its_extra_names_the_extra() -> None:
    done = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.splitlines() == [
        f'ImportError {name} is not installed, and this needs it: pip install "hc-retrofit[train]" '
        '(or "hc-retrofit[all]")'
        for name in ("accelerate", "datasets")
    ]
