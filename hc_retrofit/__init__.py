"""hc-retrofit: turn a transformers causal LM into a hyper-connection model that starts exact.

Public API::

    import hc_retrofit
    model = hc_retrofit.convert(model, hc_retrofit.HCConfig(num_streams=4, variant="mhc"))
"""

from hc_retrofit.config import HCConfig
from hc_retrofit.connections import (
    HyperConnection,
    depth_connection,
    expand_streams,
    reduce_streams,
    sinkhorn,
    stream_mix,
    width_connection,
)
from hc_retrofit.errors import (
    AlreadyConvertedError,
    ConfigError,
    HCRetrofitError,
    NotConvertedError,
    UnsupportedArchitectureError,
)
from hc_retrofit.families import FAMILIES, Block, Family, Site, register_family, supported_model_types
from hc_retrofit.patch import convert, hyper_connection_sites, is_converted
from hc_retrofit.persist import load_converted, save_converted

__version__ = "0.1.0"

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
    "convert",
    "depth_connection",
    "expand_streams",
    "hyper_connection_sites",
    "is_converted",
    "load_converted",
    "reduce_streams",
    "register_family",
    "save_converted",
    "sinkhorn",
    "stream_mix",
    "supported_model_types",
    "width_connection",
]
