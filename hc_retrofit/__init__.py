"""hc-retrofit: turn a transformers model into a hyper-connection model that computes the same function.

Public API::

    import hc_retrofit
    model = hc_retrofit.convert(model, hc_retrofit.HCConfig(num_streams=4, variant="mhc"))
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from hc_retrofit.version import __version__

if TYPE_CHECKING:  # the names below load on first use (PEP 562), so `import hc_retrofit` stays light
    from hc_retrofit.connections import (
        HyperConnection,
        depth_connection,
        expand_streams,
        reduce_streams,
        sinkhorn,
        stream_mix,
        width_connection,
    )
    from hc_retrofit.loading import load_converted
    from hc_retrofit.modeling.config import HCConfig
    from hc_retrofit.modeling.errors import (
        AlreadyConvertedError,
        ConfigError,
        HCRetrofitError,
        NotConvertedError,
        UnsupportedArchitectureError,
    )
    from hc_retrofit.modeling.families import FAMILIES, Block, Family, Site, register_family, supported_model_types
    from hc_retrofit.modeling.patch import hyper_connection_sites, is_converted, remove_hyper_connections
    from hc_retrofit.proof import convert
    from hc_retrofit.saving import save_converted

# public name -> the module that defines it. Importing torch and transformers takes seconds, so the
# package imports them only when one of these names is used: `hc-retrofit --help` and the light
# modules (errors, config, families) never pay for them.
_LAZY = {
    "HCConfig": "modeling.config",
    **dict.fromkeys(
        (
            "HyperConnection",
            "depth_connection",
            "expand_streams",
            "reduce_streams",
            "sinkhorn",
            "stream_mix",
            "width_connection",
        ),
        "connections",
    ),
    **dict.fromkeys(
        (
            "AlreadyConvertedError",
            "ConfigError",
            "HCRetrofitError",
            "NotConvertedError",
            "UnsupportedArchitectureError",
        ),
        "modeling.errors",
    ),
    **dict.fromkeys(
        ("FAMILIES", "Block", "Family", "Site", "register_family", "supported_model_types"), "modeling.families"
    ),
    **dict.fromkeys(("hyper_connection_sites", "is_converted", "remove_hyper_connections"), "modeling.patch"),
    "convert": "proof",
    "load_converted": "loading",
    "save_converted": "saving",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'hc_retrofit' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"hc_retrofit.{module}"), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "FAMILIES",
    "AlreadyConvertedError",
    "Block",
    "ConfigError",
    "Family",
    "HCConfig",
    "HCRetrofitError",
    "HyperConnection",
    "NotConvertedError",
    "Site",
    "UnsupportedArchitectureError",
    "__version__",
    "convert",
    "depth_connection",
    "expand_streams",
    "hyper_connection_sites",
    "is_converted",
    "load_converted",
    "reduce_streams",
    "register_family",
    "remove_hyper_connections",
    "save_converted",
    "sinkhorn",
    "stream_mix",
    "supported_model_types",
    "width_connection",
]
