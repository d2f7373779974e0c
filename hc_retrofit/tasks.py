"""The model tasks hc-retrofit converts, each with its transformers ``Auto*`` class.

``convert`` works on any model whose layer stack maps hidden states to hidden states; what differs
by task is how a model is built and probed. Coverage is measured per task (``hc-retrofit
architectures --check --task ...``); training stays causal-LM only (:func:`is_causal_lm`).
"""

from __future__ import annotations

from typing import Any

# task -> (Auto class, the name of its model_type -> class-name mapping in transformers)
TASKS: dict[str, tuple[str, str]] = {
    "causal-lm": ("AutoModelForCausalLM", "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES"),
    "masked-lm": ("AutoModelForMaskedLM", "MODEL_FOR_MASKED_LM_MAPPING_NAMES"),
    "image-classification": ("AutoModelForImageClassification", "MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES"),
    "base": ("AutoModel", "MODEL_MAPPING_NAMES"),
}
DEFAULT_TASK = "causal-lm"


def check_task(task: str) -> str:
    """``task`` if known, else a one-line ``ValueError`` naming the choices."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}: choose one of {', '.join(TASKS)}")
    return task


def _mapping(task: str) -> dict[str, Any]:
    from transformers.models.auto import modeling_auto

    return dict(getattr(modeling_auto, TASKS[check_task(task)][1]))


def model_types(task: str = DEFAULT_TASK) -> list[str]:
    """Every ``model_type`` the installed transformers has a model class for in ``task``."""
    return sorted(_mapping(task))


def model_class_names(task: str, model_type: str) -> tuple[str, ...]:
    """The class name(s) the ``task``'s auto class builds for ``model_type`` (several for a few types,
    e.g. DeiT's classifier with and without teacher), first the default one."""
    value = _mapping(task).get(model_type, ())
    return (value,) if isinstance(value, str) else tuple(value)


def auto_class(task: str) -> type:
    """The transformers ``Auto*`` class of ``task``."""
    import transformers

    return getattr(transformers, TASKS[check_task(task)][0])


def _library_class_name(model: Any) -> str:
    cls = model if isinstance(model, type) else type(model)
    for klass in cls.__mro__:
        if klass.__module__.startswith("transformers."):
            return klass.__name__
    return cls.__name__


def is_causal_lm(model: Any) -> bool:
    """Whether ``model`` (converted or not; or its class) is a transformers causal LM, the one kind hc-retrofit
    trains."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    name = _library_class_name(model)
    return any(
        name == value or (not isinstance(value, str) and name in value)
        for value in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()
    )


def sees_future_tokens(model: Any) -> bool:
    """Whether ``model``'s logits at a position change with a later token: an encoder loaded as a causal
    LM (BERT's ``BertLMHeadModel`` without ``is_decoder=True`` attends both ways), which a next-token
    loss would train to copy the answer. Two forwards of one 6-token row, in eval mode."""
    import torch

    from hc_retrofit.equivalence import probe_ids

    ids = probe_ids(model, batch=1, length=6)
    changed = ids.clone()
    vocab = int(model.get_input_embeddings().weight.shape[0]) if hasattr(model, "get_input_embeddings") else 0
    changed[0, -1] = 3 + (int(ids[0, -1]) - 2) % max(1, vocab - 3) if vocab > 4 else int(ids[0, -1]) ^ 1
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            before = model(input_ids=ids).logits[:, :-1].float()
            after = model(input_ids=changed).logits[:, :-1].float()
    finally:
        for module, training in modes:
            module.training = training
    scale = float(before.abs().max()) + 1e-6
    return bool((after - before).abs().max() > 1e-4 * scale + 1e-5)
