"""A :class:`~hc_retrofit.compare.spec.CompareSpec` from ``hc-retrofit compare``'s options.

The grids arrive as comma-separated text and extra train settings as ``KEY=VALUE``
(:mod:`hc_retrofit.option_lists` parses both, with one line naming the flag when the text is not
what it takes); the train settings given are passed to every trial, the others keep the recipe's.
"""

from __future__ import annotations

from typing import Any

from hc_retrofit.compare.spec import CompareSpec
from hc_retrofit.option_lists import parse_list, parse_settings

#: the grid options (comma-separated text) and the type of their values
GRIDS = {
    "variants": str,
    "streams": int,
    "seeds": int,
    "lr_grid": float,
    "hc_lr_multiplier_grid": float,
}
#: the train settings compare passes through to every trial when given
TRAIN_OPTIONS = ("max_steps", "batch_size", "block_size", "warmup_steps", "eval_every", "save_every", "cache_dir")


def spec_from_options(
    model: str,
    data: str,
    out: str,
    *,
    recipe: str | None = None,
    settings: list[str] | None = None,
    compile: bool = False,
    threads: int | None = None,
    **options: Any,
) -> CompareSpec:
    """The comparison the command's options describe.

    ``options``: the grids of :data:`GRIDS` as text, the train settings of :data:`TRAIN_OPTIONS`
    (``None``: not given), ``tune_seeds``, ``validation_fraction`` and ``heldout_fraction``.
    ``settings``: ``--set KEY=VALUE`` texts. ``threads`` given nowhere: this process's share of the
    cores, as for ``hc-retrofit train``; ``compile`` only switches on.
    """
    from hc_retrofit.train.threads import default_threads

    train = {k: options.pop(k) for k in TRAIN_OPTIONS if options.get(k) is not None}
    options = {k: v for k, v in options.items() if k not in TRAIN_OPTIONS}
    train["threads"] = threads or default_threads()
    if compile:
        train["compile"] = True
    train.update(parse_settings(settings or []))
    grids = {name: parse_list(options.pop(name), kind, f"--{name.replace('_', '-')}") for name, kind in GRIDS.items()}
    return CompareSpec(model=model, data=data, out=out, recipe=recipe, train=train, **grids, **options)
