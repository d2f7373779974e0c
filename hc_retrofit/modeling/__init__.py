"""The code that travels with a converted checkpoint.

Every module in this subpackage is copied byte for byte beside the weights of a converted
checkpoint as its ``trust_remote_code`` modeling code (see :mod:`hc_retrofit.remote_code`), so a
user of the checkpoint runs exactly this code without installing hc-retrofit. The rules that
follow from it: these modules import only ``torch``, ``transformers`` and each other, relatively
(``from .site import HyperConnection``); nothing here imports the rest of hc-retrofit (the tool:
checkpoint I/O, verify, hub, train, CLI), which imports from here.

- :mod:`.formulas`: the papers' equations, plainly; the reference for every fast path.
- :mod:`.kernels`, :mod:`.projection`, :mod:`.sinkhorn_knopp`, :mod:`.stream_ops`,
  :mod:`.site_cache`, :mod:`.no_grad`: fast paths.
- :mod:`.site`: :class:`~.site.HyperConnection`, one site's parameters and per-site API;
  :mod:`.initial`: its initial coefficients.
- :mod:`.families`: model structure as data; :mod:`.patch`: the surgery that applies it (and
  removes it, from :mod:`.surgery`'s record).
- :mod:`.converted_layer`: how a converted decoder layer runs (its ``forward``, its site hooks);
  :mod:`.stream_placement`: whether its streams stay beside it.
- :mod:`.remote_model`: the classes a checkpoint's ``auto_map`` builds.
- :mod:`.config`, :mod:`.errors`: settings and errors.
"""
