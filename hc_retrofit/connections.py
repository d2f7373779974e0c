"""The hyper-connection maths in one import: static HC, dynamic HC and mHC. Knows nothing of transformers.

Where each piece lives (one job per module):

* :mod:`hc_retrofit.modeling.formulas` -- the papers' equations, plainly (notation and references there).
* :mod:`hc_retrofit.modeling.kernels`, :mod:`hc_retrofit.modeling.sinkhorn_knopp` -- fast autograd Functions, gradchecked
  against the formulas.
* :mod:`hc_retrofit.modeling.stream_ops` -- expand/reduce and the stream operations, each choosing the
  formula (``torch.compile``), a kernel (autograd) or plain ops (no grad).
* :mod:`hc_retrofit.modeling.site` -- :class:`HyperConnection`: parameters, init, and the per-site API
  ``x, ctx = site.width_connection(H)``, ``H' = site.depth_connection(ctx, y)``;
  :mod:`hc_retrofit.modeling.site_cache` its no-grad coefficient cache.

Standalone use over any branch (the role of lucidrains' ``hyper-connections``)::

    hc = HyperConnection(dim=512, config=HCConfig(num_streams=4, variant="mhc"), site_index=i)
    H = expand_streams(h, 4)               # before the first block
    H = hc(H, lambda x: attn(norm(x)))     # per block: branch runs once, on x (batch B)
    h = reduce_streams(H)                  # after the last block
"""

from __future__ import annotations

from hc_retrofit.modeling.sinkhorn_knopp import sinkhorn
from hc_retrofit.modeling.site import Coefficients, HyperConnection, SiteContext, initial_residual_logits, initial_width
from hc_retrofit.modeling.stream_ops import (
    depth_connection,
    expand_streams,
    outer_streams,
    reduce_streams,
    rms_project,
    stream_mix,
    width_connection,
)

__all__ = [
    "Coefficients",
    "HyperConnection",
    "SiteContext",
    "depth_connection",
    "expand_streams",
    "initial_residual_logits",
    "initial_width",
    "outer_streams",
    "reduce_streams",
    "rms_project",
    "sinkhorn",
    "stream_mix",
    "width_connection",
]
