"""Tiny random models of any model type of the installed transformers, built from its config alone.

The sweep (:mod:`hc_retrofit.sweep`) converts every model type of a task; it needs each one small
(two layers, a hidden size of 32, a 128-token vocabulary, few experts), under whichever names
its config spells the sizes, with weights nudged off their init (norms are identity at init,
which would hide misplaced hooks), and checked to run once.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

from hc_retrofit.tasks import DEFAULT_TASK, auto_class, model_class_names

TINY_VOCAB = 128
TINY_LAYERS = 2
# Small sizes under every name the configs use; unknown keys are just stored on the config.
TINY_SIZES: dict[str, Any] = dict(
    num_hidden_layers=TINY_LAYERS,
    num_layers=TINY_LAYERS,
    n_layer=TINY_LAYERS,
    n_layers=TINY_LAYERS,
    hidden_size=32,
    d_model=32,
    n_embd=32,
    intermediate_size=64,
    ffn_dim=64,
    n_inner=64,
    num_attention_heads=4,
    n_head=4,
    n_heads=4,
    num_key_value_heads=2,
    num_kv_heads=2,
    head_dim=8,
    kv_channels=8,
    vocab_size=TINY_VOCAB,
    max_position_embeddings=128,
    n_positions=128,
    n_ctx=128,
    seq_length=128,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
    # mixture of experts
    num_experts=4,
    num_local_experts=4,
    n_routed_experts=4,
    moe_num_experts=4,
    num_experts_per_tok=2,
    moe_k=2,
    moe_intermediate_size=32,
    shared_expert_intermediate_size=32,
    n_shared_experts=1,
    first_k_dense_replace=1,
    n_group=1,
    topk_group=1,
    # multi-head latent attention
    q_lora_rank=16,
    kv_lora_rank=16,
    qk_rope_head_dim=8,
    qk_nope_head_dim=8,
    qk_head_dim=16,
    v_head_dim=8,
    # state-space / linear attention
    state_size=8,
    ssm_state_size=8,
    mamba_d_state=8,
    mamba_n_heads=8,  # n_heads * d_head = expand * hidden_size
    num_heads=8,
    attn_layer_period=2,
    attn_layer_offset=1,
    expert_layer_period=2,
    expert_layer_offset=1,
    rotary_dim=4,
    attention_types=[[["global", "local"], 1]],
    mamba_d_head=8,
    mamba_headdim=8,
    mamba_d_conv=4,
    mamba_expand=2,
    linear_num_key_heads=2,
    linear_num_value_heads=2,
    linear_key_head_dim=8,
    linear_value_head_dim=8,
    conv_kernel=4,
    time_step_rank=4,
    expand=2,
    n_groups=1,
    # keep windows and chunking out of the way of a 8-token probe
    sliding_window=64,
    attention_window=64,
    use_cache=True,
)


# Image models: small pictures, few patches (unknown keys are just stored on text configs).
VISION_SIZES: dict[str, Any] = dict(image_size=32, patch_size=8, num_channels=3, num_labels=3)

# Types whose config needs more than the sizes above (tried after the plain tiny config fails).
TINY_OVERRIDES: dict[str, dict[str, Any]] = {
    "dbrx": dict(
        attn_config=dict(kv_n_heads=2, rope_theta=10000.0, clip_qkv=8.0),
        ffn_config=dict(ffn_hidden_size=64, moe_num_experts=4, moe_top_k=2),
    ),
    "falcon_h1": dict(mamba_d_ssm=64),
}
# Generic second tries: multi-head latent attention and some linear attentions need as many
# key/value heads as query heads.
TINY_RETRIES: tuple[dict[str, Any], ...] = (dict(num_key_value_heads=4, num_kv_heads=4),)


LAYER_KIND_KEYS = ("layer_types", "layers_block_type", "block_types")


def _layer_kinds(model_type: str) -> dict[str, list]:
    """One layer of each kind the default config of ``model_type`` mixes (hybrid stacks), in order."""
    from transformers import AutoConfig

    try:
        default = AutoConfig.for_model(model_type)
    except Exception:
        return {}
    kinds = {}
    for name in LAYER_KIND_KEYS:
        value = getattr(default, name, None)
        if isinstance(value, list) and len(set(map(str, value))) > 1:
            kinds[name] = list(dict.fromkeys(value))
    return kinds


def tiny_config(model_type: str, **overrides: Any) -> Any:
    """A tiny config of ``model_type`` (see :data:`TINY_SIZES`): a hybrid stack gets one layer of each kind.

    A size the config cannot take is left to the config: a derived property without a setter
    (``head_dim`` ...), or a value its field refuses on its own (per-stage lists of hierarchical
    models), unless the caller asked for it in ``overrides``.
    """
    from huggingface_hub.errors import StrictDataclassFieldValidationError
    from transformers import AutoConfig

    kwargs = {**TINY_SIZES, **_layer_kinds(model_type), **overrides}
    layers = max([TINY_LAYERS] + [len(v) for k, v in kwargs.items() if k in LAYER_KIND_KEYS and isinstance(v, list)])
    for key in ("num_hidden_layers", "num_layers", "n_layer", "n_layers"):
        kwargs.setdefault(key, layers)
        if key not in overrides:
            kwargs[key] = layers
    while True:
        try:
            return AutoConfig.for_model(model_type, **kwargs)
        except AttributeError:  # a derived property cannot be set: leave it derived
            culprit = next(iter(_read_only(model_type, kwargs)), None)
            if culprit is None:
                raise
        except StrictDataclassFieldValidationError:  # a size of another shape: its default
            culprit = next((k for k in kwargs if k not in overrides and _refused_alone(model_type, k, kwargs[k])), None)
            if culprit is None:
                raise
        del kwargs[culprit]


def _read_only(model_type: str, kwargs: dict[str, Any]) -> list[str]:
    """The names in ``kwargs`` that ``model_type``'s config class has as properties without a setter."""
    from transformers import CONFIG_MAPPING

    config_cls = CONFIG_MAPPING[model_type]
    found = []
    for name in kwargs:
        attr = inspect.getattr_static(config_cls, name, None)
        if isinstance(attr, property) and attr.fset is None:
            found.append(name)
    return found


def _refused_alone(model_type: str, name: str, value: Any) -> bool:
    """Whether ``model_type``'s config refuses ``name=value`` given alone (a field's own validation)."""
    from huggingface_hub.errors import StrictDataclassFieldValidationError
    from transformers import AutoConfig

    try:
        AutoConfig.for_model(model_type, **{name: value})
    except StrictDataclassFieldValidationError:
        return True
    except Exception:  # anything else is another field's business
        return False
    return False


def build_tiny(model_type: str, seed: int = 0, task: str = DEFAULT_TASK) -> Any:
    """A tiny random model of ``model_type`` for ``task`` (default: ``AutoModelForCausalLM``) in eval
    mode, weights nudged off their init (norms are identity at init, which would hide misplaced
    hooks); its forward is checked once. The plain tiny config first, then :data:`TINY_OVERRIDES` /
    :data:`TINY_RETRIES`."""
    attempts = [{}, *TINY_RETRIES]
    if model_type in TINY_OVERRIDES:
        attempts = [TINY_OVERRIDES[model_type], *({**TINY_OVERRIDES[model_type], **a} for a in TINY_RETRIES)]
    for number, overrides in enumerate(attempts):
        try:
            return _build(model_type, overrides, seed, task)
        except Exception:
            if number == len(attempts) - 1:
                raise
    raise AssertionError("unreachable")


def _build(model_type: str, overrides: dict[str, Any], seed: int, task: str = DEFAULT_TASK) -> Any:
    from hc_retrofit.equivalence import probe_inputs

    torch.manual_seed(seed)
    sizes = VISION_SIZES if task != "causal-lm" else {}
    config = tiny_config(model_type, **{**sizes, **overrides})
    names = model_class_names(task, model_type)
    if len(names) > 1:  # the auto class picks among several classes by config.architectures
        config.architectures = [names[0]]
    model = auto_class(task).from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.is_floating_point():
                p.add_(torch.randn_like(p) * 0.02)
    with torch.no_grad():
        if task == "causal-lm":
            vocab = model.get_input_embeddings().weight.shape[0]
            model(input_ids=torch.randint(3, min(vocab, TINY_VOCAB), (1, 4)))
        else:  # token ids or pixels, as the proof will feed them (other inputs: not built)
            model(**probe_inputs(model, batch=1, length=4))
    return model
