"""Tiny random models of every supported family, for tests (no Hub access needed).

Each case varies what real checkpoints vary: grouped-query attention, tied and untied embeddings,
sliding windows, parallel vs sequential blocks, post-LN, residual multipliers, MoE.
"""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

VOCAB = 96
COMMON = dict(
    num_hidden_layers=3,
    hidden_size=32,
    intermediate_size=64,
    num_attention_heads=4,
    vocab_size=VOCAB,
    max_position_embeddings=128,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)
GPT_STYLE = dict(
    n_layer=3, n_embd=32, n_head=4, vocab_size=VOCAB, n_positions=128, bos_token_id=1, eos_token_id=2, pad_token_id=0
)

# case id -> (model_type, overrides of COMMON)
CASES: dict[str, tuple[str, dict]] = {
    "llama-gqa-untied": ("llama", dict(num_key_value_heads=2, tie_word_embeddings=False)),
    "mistral-sliding": ("mistral", dict(num_key_value_heads=2, sliding_window=4)),
    "qwen2-tied": ("qwen2", dict(num_key_value_heads=2, tie_word_embeddings=True)),
    "qwen3": ("qwen3", dict(num_key_value_heads=2, head_dim=8)),
    "gemma2-sandwich": ("gemma2", dict(num_key_value_heads=2, head_dim=8, sliding_window=4)),
    "gemma3-text": ("gemma3_text", dict(num_key_value_heads=1, head_dim=8, sliding_window=4)),
    "phi-parallel": ("phi", dict(num_key_value_heads=4)),
    "phi3": ("phi3", dict(num_key_value_heads=2)),
    "gpt2": ("gpt2", GPT_STYLE),
    "gpt_neox-parallel": ("gpt_neox", dict(use_parallel_residual=True)),
    "gpt_neox-sequential": ("gpt_neox", dict(use_parallel_residual=False)),
    "gptj": ("gptj", dict(GPT_STYLE, rotary_dim=4)),
    "falcon-parallel": ("falcon", dict(new_decoder_architecture=False, parallel_attn=True)),
    "falcon-sequential-alibi": ("falcon", dict(new_decoder_architecture=False, parallel_attn=False, alibi=True)),
    "falcon-new-arch": ("falcon", dict(new_decoder_architecture=True, num_kv_heads=2, num_ln_in_parallel_attn=2)),
    "olmo2": ("olmo2", dict(num_key_value_heads=2)),
    "granite-multipliers": ("granite", dict(residual_multiplier=0.5, embedding_multiplier=2.0, logits_scaling=2.0)),
    "mixtral-moe": ("mixtral", dict(num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2)),
    "qwen2_moe": (
        "qwen2_moe",
        dict(
            num_key_value_heads=2,
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=32,
        ),
    ),
    "qwen3_moe": ("qwen3_moe", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, head_dim=8)),
    "opt-pre-ln": ("opt", dict(ffn_dim=64, word_embed_proj_dim=32, do_layer_norm_before=True)),
    "opt-post-ln": ("opt", dict(ffn_dim=64, word_embed_proj_dim=32, do_layer_norm_before=False)),
    "stablelm-sequential": ("stablelm", dict(num_key_value_heads=4, use_parallel_residual=False)),
    "stablelm-parallel": ("stablelm", dict(num_key_value_heads=2, use_parallel_residual=True)),
    "starcoder2": ("starcoder2", dict(num_key_value_heads=2)),
}


def tiny_config(case: str):
    model_type, overrides = CASES[case]
    kwargs = dict(overrides) if overrides is GPT_STYLE or "n_layer" in overrides else {**COMMON, **overrides}
    if model_type == "opt":
        kwargs.pop("intermediate_size")
    return AutoConfig.for_model(model_type, **kwargs)


def tiny_model(case: str, seed: int = 0, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """A randomly initialised tiny causal LM for ``case`` (eval mode, deterministic weights)."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(case), dtype=dtype)
    # Random init of norms is identity; perturb every parameter so norms/biases matter in tests.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model.eval()


# Encoders and vision models (converted, saved and loaded; never trained):
# case id -> (model_type, task, config overrides)
ENCODER_COMMON = dict(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4)
TEXT = dict(ENCODER_COMMON, vocab_size=VOCAB, max_position_embeddings=64, pad_token_id=0)
IMAGE = dict(ENCODER_COMMON, image_size=16, patch_size=8, num_channels=3)
ENCODER_CASES: dict[str, tuple[str, str, dict]] = {
    "bert-base": ("bert", "base", TEXT),
    "bert-masked-lm": ("bert", "masked-lm", TEXT),
    "roberta-masked-lm": ("roberta", "masked-lm", dict(TEXT, pad_token_id=1)),
    "vit-base": ("vit", "base", IMAGE),
    "vit-classifier": ("vit", "image-classification", dict(IMAGE, num_labels=3)),
    "deit-classifier": ("deit", "image-classification", dict(IMAGE, num_labels=3)),
    "modernbert-masked-lm": (
        "modernbert",
        "masked-lm",
        dict(TEXT, bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2),
    ),
}


def tiny_encoder(case: str, seed: int = 0) -> PreTrainedModel:
    """A randomly initialised tiny encoder or vision model for ``case`` (eval mode, weights nudged)."""
    from hc_retrofit.tasks import auto_class, model_class_names

    model_type, task, overrides = ENCODER_CASES[case]
    config = AutoConfig.for_model(model_type, **overrides)
    config.architectures = [model_class_names(task, model_type)[0]]  # DeiT lists two classifiers
    torch.manual_seed(seed)
    model = auto_class(task).from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model.eval()
