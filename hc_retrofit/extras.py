"""Which optional extra provides which third-party module, and the one-line hint when one is missing.

The core (``convert``, ``save_converted``, ``load_converted``, ``verify``) needs torch, transformers,
huggingface_hub and safetensors only. Training, plots and the command line are extras::

    pip install "hc-retrofit[train]"   # accelerate, datasets, pyyaml, rich: hc_retrofit.train
    pip install "hc-retrofit[plot]"    # matplotlib: loss.png, inspect --plot
    pip install "hc-retrofit[cli]"     # typer, rich: the hc-retrofit command
    pip install "hc-retrofit[all]"     # all of the above
"""

from __future__ import annotations

# top-level import name -> the extra that installs it
EXTRA_OF_MODULE = {
    "accelerate": "train",
    "datasets": "train",
    "yaml": "train",
    "rich": "cli",
    "typer": "cli",
    "matplotlib": "plot",
}


def missing_extra_hint(err: BaseException) -> str | None:
    """For an import of a module an extra provides, the message naming the extra; else ``None``."""
    name = getattr(err, "name", None)
    if not isinstance(err, ImportError) or not name:
        return None
    root = name.split(".")[0]
    extra = EXTRA_OF_MODULE.get(root)
    if extra is None:
        return None
    return f'{root} is not installed, and this needs it: pip install "hc-retrofit[{extra}]" (or "hc-retrofit[all]")'
