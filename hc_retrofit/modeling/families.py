"""Per-family adapters, as data: where the hyper-connection sites sit in each decoder block.

A *site* is one residual branch ``h + f(h)``. It is described by the submodules that mark its two
ends inside the decoder layer:

* ``entries``: the modules that first read the residual stream for this branch (usually the
  pre-norm). Their input is replaced by the width connection ``x = a . H``. Several entries mean
  several modules read the same stream (parallel blocks with one norm per branch).
* ``exits``: the modules whose output is the branch output ``y`` as the layer adds it to the
  residual (after any sandwich norm or dropout module). Several exits mean a parallel block,
  ``f = f_attn + f_mlp``.

Block kinds:

* ``sequential`` -- ``h + attn(ln1 h)``, then ``h + mlp(ln2 h)`` (llama, gpt2, ...).
* ``parallel``   -- ``h + attn(ln h) + mlp(ln' h)``: one site with two exits (gpt-neox, phi, gpt-j).
* ``sandwich``   -- ``h + post_ln(attn(pre_ln h))`` (gemma2/3): the exit is the post norm.
* ``post_norm``  -- ``h + post_ln(attn(h))`` (olmo2): the entry is the branch itself.
* ``layer``      -- the whole layer is one branch, ``F(h) = layer(h) - h``. Used where the residual
  add is not reachable from submodules, e.g. post-LN blocks (OPT), whose norm follows the add.

A family may choose its block by config (``use_parallel_residual``, ...). ``residual_multiplier``
names a config attribute that scales each branch before the add (Granite).
To support a new family, add one :class:`Family` here (or call :func:`register_family`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .errors import ConfigError, UnsupportedArchitectureError

BLOCK_KINDS = ("sequential", "parallel", "sandwich", "post_norm", "layer")


@dataclass(frozen=True)
class Site:
    """One residual branch: the modules whose input is ``x`` and whose output is ``y``."""

    entries: tuple[str, ...]
    exits: tuple[str, ...]


@dataclass(frozen=True)
class Block:
    """The structure of a decoder layer: its kind and its sites, in the order the layer runs them."""

    kind: str
    sites: tuple[Site, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in BLOCK_KINDS:
            raise ValueError(f"unknown block kind {self.kind!r}")
        if (self.kind == "layer") != (not self.sites):
            raise ValueError("a 'layer' block has no sites; every other kind needs at least one")

    def module_names(self) -> tuple[str, ...]:
        """Every submodule name the block hooks (entries and exits of all sites), in order."""
        return tuple(dict.fromkeys(name for site in self.sites for name in site.entries + site.exits))

    def describe(self) -> str:
        """One line, e.g. ``sequential [input_layernorm -> self_attn; post_attention_layernorm -> mlp]``."""
        if self.kind == "layer":
            return "layer [F(h) = layer(h) - h]"
        sites = "; ".join(f"{'+'.join(s.entries)} -> {'+'.join(s.exits)}" for s in self.sites)
        return f"{self.kind} [{sites}]"

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "sites": [{"entries": list(s.entries), "exits": list(s.exits)} for s in self.sites]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Block:
        sites = tuple(Site(tuple(s["entries"]), tuple(s["exits"])) for s in data.get("sites", ()))
        return cls(str(data["kind"]), sites)


@dataclass(frozen=True)
class Family:
    """How to retrofit one ``model_type``.

    Attributes:
        model_types: the ``config.model_type`` values this adapter covers.
        layers: dotted path from the ``*ForCausalLM`` model to the decoder-layer ``ModuleList``.
        block: the block structure, or a function of the config choosing one.
        residual_multiplier: config attribute that scales branch outputs (Granite), if any.
        layer_blocks: one block per layer, for stacks that mix layer types (hybrid attention /
            state-space models); when set it overrides ``block``.
    """

    model_types: tuple[str, ...]
    layers: str
    block: Block | Callable[[Any], Block]
    residual_multiplier: str | None = None
    layer_blocks: tuple[Block, ...] | None = None

    def block_for(self, config: Any) -> Block:
        return self.block(config) if callable(self.block) else self.block

    def blocks_for(self, config: Any, num_layers: int) -> list[Block]:
        """The block of each of the ``num_layers`` layers."""
        if self.layer_blocks is None:
            return [self.block_for(config)] * num_layers
        if len(self.layer_blocks) != num_layers:
            raise UnsupportedArchitectureError(
                f"the adapter describes {len(self.layer_blocks)} layers but the model has {num_layers}"
            )
        return list(self.layer_blocks)

    def multiplier_for(self, config: Any) -> float:
        return float(getattr(config, self.residual_multiplier)) if self.residual_multiplier else 1.0

    def describe(self, config: Any) -> str:
        """One line naming the layer list and the block(s), for messages and reports."""
        if self.layer_blocks is None:
            return f"{self.layers}: {self.block_for(config).describe()}"
        kinds = dict.fromkeys(b.describe() for b in self.layer_blocks)
        return f"{self.layers}: per layer {' | '.join(kinds)}"

    def resolved(self, config: Any) -> Family:
        """This family with its config-dependent choices made (what :meth:`to_dict` records)."""
        return Family(
            self.model_types, self.layers, self.block_for(config), self.residual_multiplier, self.layer_blocks
        )

    def to_dict(self, config: Any) -> dict[str, Any]:
        """The structure as JSON values, recorded in a converted model's config (``hc_retrofit_structure``)."""
        data: dict[str, Any] = {"layers": self.layers, "block": self.block_for(config).to_dict()}
        if self.residual_multiplier:
            data["residual_multiplier"] = self.residual_multiplier
        if self.layer_blocks is not None:
            data["layer_blocks"] = [b.to_dict() for b in self.layer_blocks]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any], model_type: str) -> Family:
        blocks = data.get("layer_blocks")
        return cls(
            (model_type,),
            str(data["layers"]),
            Block.from_dict(data["block"]),
            data.get("residual_multiplier"),
            tuple(Block.from_dict(b) for b in blocks) if blocks is not None else None,
        )


def _seq(*sites: tuple[tuple[str, ...], tuple[str, ...]], kind: str = "sequential") -> Block:
    return Block(kind, tuple(Site(entries, exits) for entries, exits in sites))


PRE_NORM = _seq((("input_layernorm",), ("self_attn",)), (("post_attention_layernorm",), ("mlp",)))
SANDWICH = _seq(
    (("input_layernorm",), ("post_attention_layernorm",)),
    (("pre_feedforward_layernorm",), ("post_feedforward_layernorm",)),
    kind="sandwich",
)
WHOLE_LAYER = Block("layer")

FAMILIES: dict[str, Family] = {}


def register_family(family: Family, *, replace: bool = False) -> Family:
    """Add the adapter for each of ``family.model_types``.

    A type that already has another adapter is refused unless ``replace`` (one import must not
    silently change how another's models convert).
    """
    taken = [t for t in family.model_types if t in FAMILIES and FAMILIES[t] is not family]
    if taken and not replace:
        raise ConfigError(
            f"{', '.join(map(repr, taken))} already has a family; pass register_family(..., replace=True) to replace it"
        )
    for model_type in family.model_types:
        FAMILIES[model_type] = family
    return family


register_family(
    Family(
        ("llama", "mistral", "qwen2", "qwen3", "mixtral", "qwen2_moe", "qwen3_moe", "starcoder2"),
        "model.layers",
        PRE_NORM,
    )
)
register_family(Family(("granite",), "model.layers", PRE_NORM, residual_multiplier="residual_multiplier"))
register_family(Family(("gemma2", "gemma3_text"), "model.layers", SANDWICH))
register_family(
    Family(
        ("olmo2",),
        "model.layers",
        _seq(
            (("self_attn",), ("post_attention_layernorm",)),
            (("mlp",), ("post_feedforward_layernorm",)),
            kind="post_norm",
        ),
    )
)
register_family(Family(("gpt2",), "transformer.h", _seq((("ln_1",), ("attn",)), (("ln_2",), ("mlp",)))))
register_family(Family(("gptj",), "transformer.h", _seq((("ln_1",), ("attn", "mlp")), kind="parallel")))
register_family(Family(("phi",), "model.layers", _seq((("input_layernorm",), ("self_attn", "mlp")), kind="parallel")))
register_family(
    Family(
        ("phi3",),
        "model.layers",
        _seq((("input_layernorm",), ("resid_attn_dropout",)), (("post_attention_layernorm",), ("resid_mlp_dropout",))),
    )
)
register_family(
    Family(
        ("gpt_neox",),
        "gpt_neox.layers",
        lambda c: (
            _seq(
                (("input_layernorm", "post_attention_layernorm"), ("post_attention_dropout", "post_mlp_dropout")),
                kind="parallel",
            )
            if c.use_parallel_residual
            else _seq(
                (("input_layernorm",), ("post_attention_dropout",)),
                (("post_attention_layernorm",), ("post_mlp_dropout",)),
            )
        ),
    )
)
register_family(
    Family(
        ("stablelm",),
        "model.layers",
        lambda c: (
            _seq((("input_layernorm",), ("self_attn", "dropout")), kind="parallel")
            if c.use_parallel_residual
            else _seq((("input_layernorm",), ("self_attn",)), (("post_attention_layernorm",), ("dropout",)))
        ),
    )
)


def _falcon_parallel_norms(config: Any) -> tuple[str, ...]:
    # FalconDecoderLayer: the new architecture with two norms has ln_attn/ln_mlp, every other one input_layernorm.
    two = config.new_decoder_architecture and config.num_ln_in_parallel_attn in (None, 2)
    return ("ln_attn", "ln_mlp") if two else ("input_layernorm",)


register_family(
    Family(
        ("falcon",),
        "transformer.h",
        lambda c: (
            _seq((_falcon_parallel_norms(c), ("self_attention", "mlp")), kind="parallel")
            if c.new_decoder_architecture or c.parallel_attn
            else _seq((("input_layernorm",), ("self_attention",)), (("post_attention_layernorm",), ("mlp",)))
        ),
    )
)
# OPT: post-LN when do_layer_norm_before is False, and the MLP path flattens (B, T, D) to (B*T, D)
# with functional dropout after fc2 either way: the whole layer is the branch.
register_family(Family(("opt",), "model.decoder.layers", WHOLE_LAYER))


def supported_model_types() -> list[str]:
    return sorted(FAMILIES)


STRUCTURE_KEY = "hc_retrofit_structure"


def recorded_family(config: Any) -> Family | None:
    """The structure a converted model's config records (see :meth:`Family.to_dict`), if any."""
    data = getattr(config, STRUCTURE_KEY, None)
    if not isinstance(data, dict):
        return None
    return Family.from_dict(data, str(getattr(config, "model_type", "")))


def family_for(config: Any) -> Family:
    """The adapter recorded in ``config`` (a converted model), else the hand-written one for
    ``config.model_type``, else a clear error naming the supported families."""
    recorded = recorded_family(config)
    if recorded is not None:
        return recorded
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        raise UnsupportedArchitectureError(
            f"architecture {model_type!r} is not supported; supported model types: {', '.join(supported_model_types())}"
        )
    return FAMILIES[model_type]
