"""One module says whether a model is its original's function: its probe, run, comparison and tolerance
table serve the proof at every conversion, verify (in memory and layer by layer), the streamed
convert and the demo, so a model perturbed beyond the tolerance is refused by each of them, and
changing the one table changes what each of them accepts."""

from __future__ import annotations

import copy
import math
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

import hc_retrofit
from hc_retrofit import equivalence
from hc_retrofit.base_model import load_base_model
from hc_retrofit.equivalence import (
    TOLERANCES,
    NotEquivalentError,
    ProbeOutputs,
    Tolerance,
    measure,
    pad_id,
    probe_ids,
    probe_inputs,
    run_probe,
    tolerance_for,
)
from hc_retrofit.modeling.config import HCConfig
from hc_retrofit.modeling.errors import UnsupportedArchitectureError
from hc_retrofit.modeling.patch import hyper_connection_sites
from tests.checkpoints import save_base, word_tokenizer
from tests.tiny import VOCAB, tiny_model

CASE = "llama-gqa-untied"
CONFIG = HCConfig(num_streams=4, variant="mhc")
# b = 2 sigmoid(0.01) at one site: logits move ~25x the float32 tolerance, greedy tokens stay the same
# (so only the tolerance decides), measured on the tiny model and on the demo's stories260K
DELTA = 1e-2
WIDE = Tolerance(atol=1e3, rtol=0.0, kl=math.inf)  # accepts the perturbed model
NONE = Tolerance(atol=-1.0, rtol=0.0, kl=-1.0)  # accepts nothing, not even an exact model


# ----------------------------------------------------------------------------- the table and the comparison
def test_the_tolerance_table() -> None:
    assert TOLERANCES[torch.float32] == Tolerance(atol=1e-4, rtol=1e-4, kl=1e-6)
    assert TOLERANCES[torch.float64] == TOLERANCES[torch.float32]
    assert TOLERANCES[torch.bfloat16].rtol == 4 * torch.finfo(torch.bfloat16).eps
    assert TOLERANCES[torch.float16].rtol == 4 * torch.finfo(torch.float16).eps
    assert tolerance_for(torch.bfloat16) is TOLERANCES[torch.bfloat16]
    assert tolerance_for(torch.float8_e4m3fn).rtol == 4 * torch.finfo(torch.float8_e4m3fn).eps
    assert TOLERANCES[torch.float32].limit(torch.tensor([[-3.0, 2.0]])) == pytest.approx(1e-4 + 3e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_comparison_is_decided_by_the_dtype_s_tolerance(dtype: torch.dtype) -> None:
    logits = torch.randn(2, 5, 11, generator=torch.Generator().manual_seed(0))
    limit = tolerance_for(dtype).limit(logits)
    reference = ProbeOutputs(logits)
    inside, outside = ProbeOutputs(logits + 0.9 * limit), ProbeOutputs(logits + 1.1 * limit)
    assert measure(reference, inside, dtype).equivalent
    assert "logit diff" in measure(reference, outside, dtype).problem
    assert measure(reference, inside, dtype).logit_tolerance == pytest.approx(limit)


def test_kl_is_measured_on_logits_and_bounded_in_float32() -> None:
    logits = torch.zeros(1, 2, 4)
    other = logits.clone()
    other[0, 0, 0] = 5e-5  # within the logit bound, KL ~ 1e-10
    comparison = measure(ProbeOutputs(logits), ProbeOutputs(other), torch.float32)
    assert comparison.equivalent and 0 < comparison.max_kl < 1e-9
    hidden = measure(ProbeOutputs(logits, is_logits=False), ProbeOutputs(other, is_logits=False), torch.float32)
    assert hidden.equivalent and hidden.max_kl is None  # hidden states are not distributions
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(TOLERANCES, torch.float32, Tolerance(atol=1e-4, rtol=1e-4, kl=1e-12))
        assert "KL" in measure(ProbeOutputs(logits), ProbeOutputs(other), torch.float32).problem


def test_greedy_agreement_counts_tokens() -> None:
    logits = torch.zeros(2, 3, 5)
    tokens = torch.tensor([[1, 2], [3, 4]])
    steps = (logits[:, -1], logits[:, -1])
    changed = ProbeOutputs(logits, torch.tensor([[1, 2], [3, 0]]), steps)
    comparison = measure(ProbeOutputs(logits, tokens, steps), changed, torch.float32)
    assert comparison.greedy_agreement == 0.75 and not comparison.greedy_identical
    assert "greedy" in comparison.problem


# ----------------------------------------------------------------------------- probe inputs
def test_one_probe_builder_text_or_seeded_ids() -> None:
    model = tiny_model(CASE)
    text = probe_ids(model, tokenizer=word_tokenizer(), batch=4, length=16)
    expected = [word_tokenizer()(t)["input_ids"] for t in equivalence.PROBE_TEXTS]
    assert text.shape[0] == 4 and text.tolist() == [row[: text.shape[1]] for row in expected]
    random = probe_ids(model, batch=3, length=9, seed=4)
    assert random.shape == (3, 9) and torch.equal(random, probe_ids(model, batch=3, length=9, seed=4))
    assert int(random.min()) >= 3 and int(random.max()) < VOCAB
    assert int(probe_ids(model, vocab=10, batch=4, length=32).max()) < 10  # another model's smaller vocabulary
    # a tokenizer whose ids fall outside the vocabulary: seeded ids instead
    assert torch.equal(probe_ids(model, tokenizer=word_tokenizer(), vocab=5, seed=1), probe_ids(model, vocab=5, seed=1))


def test_one_pad_id_rule() -> None:
    model = tiny_model(CASE)
    model.generation_config.pad_token_id, model.config.pad_token_id = None, None
    model.generation_config.eos_token_id, model.config.eos_token_id = [7, 8], None
    assert pad_id(model) == 7
    model.config.pad_token_id = 5
    assert pad_id(model) == 5  # the config's pad id before any eos id
    model.generation_config.pad_token_id = 4
    assert pad_id(model) == 4
    model.generation_config.pad_token_id = model.generation_config.eos_token_id = None
    model.config.pad_token_id = model.config.eos_token_id = None
    assert pad_id(model) == 0


def test_run_probe_generates_from_the_whole_probe() -> None:
    model = tiny_model(CASE)
    inputs = probe_inputs(model, batch=2, length=6)
    out = run_probe(model, inputs, new_tokens=3)
    assert out.tokens.shape == (2, 3) and len(out.step_logits) == 3 and out.is_logits
    torch.testing.assert_close(out.step_logits[0], out.logits[:, -1])


def _generate_calls(model: torch.nn.Module, monkeypatch: pytest.MonkeyPatch, fail_with_cache: bool = False) -> list:
    """Record the keyword arguments of ``model.generate`` (optionally refusing a given cache)."""
    calls: list[dict[str, Any]] = []
    real = model.generate

    def generate(ids: torch.Tensor, **kwargs: Any) -> Any:
        calls.append(kwargs)
        if fail_with_cache and ({"cache", "past_key_values"} & set(kwargs)):
            raise ValueError("this cache cannot be continued")
        return real(ids, **kwargs)

    monkeypatch.setattr(model, "generate", generate)
    return calls


@pytest.mark.parametrize("hc", [False, True])
def test_generation_continues_from_the_full_forward_s_cache(monkeypatch: pytest.MonkeyPatch, hc: bool) -> None:
    """The prompt runs once: generate() gets the full forward's KV cache less its last position and
    computes what it computes from the whole prompt (tokens, and each step's logits within float error)."""
    model = tiny_model(CASE)
    if hc:
        model = hc_retrofit.convert(model, CONFIG)
    inputs = probe_inputs(model, batch=2, length=6)
    whole = run_probe(model, inputs, new_tokens=3, check_cache=True)
    monkeypatch.setattr(equivalence, "prompt_cache", lambda _output, _length: {})
    calls = _generate_calls(model, monkeypatch)
    plain = run_probe(model, inputs, new_tokens=3)
    assert not ({"cache", "past_key_values"} & set(calls[0]))
    monkeypatch.undo()
    calls = _generate_calls(model, monkeypatch)
    reused = run_probe(model, inputs, new_tokens=3)
    [kwargs] = calls
    [cache] = [kwargs[k] for k in ("cache", "past_key_values") if k in kwargs]
    assert cache.get_seq_length() == 6 + 3 - 1  # the prompt, less its last position, plus what was generated
    assert torch.equal(reused.tokens, plain.tokens) and torch.equal(reused.tokens, whole.tokens)
    for a, b in zip(reused.step_logits, plain.step_logits, strict=True):
        torch.testing.assert_close(a, b)


def test_a_cache_generate_cannot_continue_falls_back_to_the_whole_prompt(monkeypatch: pytest.MonkeyPatch) -> None:
    model = tiny_model(CASE)
    inputs = probe_inputs(model, batch=2, length=6)
    calls = _generate_calls(model, monkeypatch, fail_with_cache=True)
    out = run_probe(model, inputs, new_tokens=2)
    assert len(calls) == 2 and out.tokens.shape == (2, 2) and not out.cache_note


# ----------------------------------------------------------------------------- every caller
def _perturb_sites(model: torch.nn.Module) -> None:
    with torch.no_grad():
        hyper_connection_sites(model)[0].depth_logits.add_(DELTA)


def _perturb_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    name = next(k for k in tensors if k.endswith("depth_logits"))
    return {**tensors, name: tensors[name] + DELTA}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A saved base, its exact conversion, and that conversion with one HC tensor perturbed."""
    root = tmp_path_factory.mktemp("equivalence")
    base_dir = save_base(CASE, root / "base")
    model, _ = load_base_model(str(base_dir), dtype=torch.float32)
    exact = hc_retrofit.save_converted(hc_retrofit.convert(model, CONFIG), root / "exact")
    perturbed = Path(shutil.copytree(exact, root / "perturbed"))
    shard = perturbed / "model.safetensors"
    save_file(_perturb_tensors(load_file(shard)), shard, metadata={"format": "pt"})
    return {"base": base_dir, "exact": Path(exact), "perturbed": perturbed}


def _proof(perturbed: bool, paths: dict[str, Path], tmp: Path, mp: pytest.MonkeyPatch) -> bool:
    from hc_retrofit import proof

    if perturbed:
        real = proof.apply_family

        def apply_perturbed(model: Any, *args: Any, **kwargs: Any) -> Any:
            out = real(model, *args, **kwargs)
            _perturb_sites(model)
            return out

        mp.setattr(proof, "apply_family", apply_perturbed)
    try:
        hc_retrofit.convert(tiny_model(CASE), CONFIG)
    except UnsupportedArchitectureError as err:
        assert "cannot convert" in str(err) and "max |logit diff|" in str(err)
        return False
    return True


def _verify(mode: str) -> Callable[[bool, dict[str, Path], Path, pytest.MonkeyPatch], bool]:
    def run(perturbed: bool, paths: dict[str, Path], tmp: Path, mp: pytest.MonkeyPatch) -> bool:
        from hc_retrofit.verify import verify_checkpoint

        directory = paths["perturbed" if perturbed else "exact"]
        report = verify_checkpoint(directory, base=str(paths["base"]), mode=mode)
        assert report.equivalent == (report.difference is None)
        return report.equivalent

    return run


def _stream(perturbed: bool, paths: dict[str, Path], tmp: Path, mp: pytest.MonkeyPatch) -> bool:
    from hc_retrofit import stream_plan
    from hc_retrofit.streaming import stream_convert

    if perturbed:
        real = stream_plan.hc_tensors
        mp.setattr(stream_plan, "hc_tensors", lambda model: _perturb_tensors(real(model)))
    out = tmp / f"streamed-{perturbed}"
    try:
        stream_convert(str(paths["base"]), out, CONFIG, verify=True)
    except NotEquivalentError as err:
        assert "not equivalent" in str(err) and not out.exists()
        return False
    return True


def _demo(perturbed: bool, paths: dict[str, Path], tmp: Path, mp: pytest.MonkeyPatch) -> bool:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hc_retrofit import demo

    if perturbed:
        real = demo.convert

        def convert_perturbed(model: Any, *args: Any, **kwargs: Any) -> Any:
            converted = real(model, *args, **kwargs)
            _perturb_sites(converted)
            return converted

        mp.setattr(demo, "convert", convert_perturbed)
    base = AutoModelForCausalLM.from_pretrained(demo.pretrained_path(), dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(demo.pretrained_path())
    try:
        worst, same, _ = demo.check_exact(base, tokenizer, ("mhc",), 4)
    except NotEquivalentError as err:  # the demo's own comparison on its longer probe
        assert "the mhc retrofit is not equivalent" in str(err)
        return False
    except UnsupportedArchitectureError as err:  # the proof inside hc_retrofit.convert
        assert "cannot convert" in str(err)
        return False
    assert same and worst > 0.0 if perturbed else same  # what it shows: the measured difference
    return True


CALLERS = {
    "proof": _proof,
    "verify in memory": _verify("memory"),
    "verify layer by layer": _verify("layers"),
    "streamed convert": _stream,
    "demo": _demo,
}


@pytest.mark.parametrize("caller", sorted(CALLERS))
def test_every_caller_refuses_a_model_perturbed_beyond_the_tolerance(
    caller: str, checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    accepted = CALLERS[caller]
    with pytest.MonkeyPatch.context() as mp:
        assert accepted(False, checkpoints, tmp_path, mp)
    with pytest.MonkeyPatch.context() as mp:
        assert not accepted(True, checkpoints, tmp_path, mp)


@pytest.mark.parametrize("caller", sorted(CALLERS))
def test_every_caller_reads_the_one_tolerance_table(caller: str, checkpoints: dict[str, Path], tmp_path: Path) -> None:
    accepted = CALLERS[caller]
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(TOLERANCES, torch.float32, WIDE)
        assert accepted(True, checkpoints, tmp_path, mp)  # the perturbation is now within tolerance
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(TOLERANCES, torch.float32, NONE)
        assert not accepted(False, checkpoints, tmp_path, mp)  # nothing is within tolerance


def test_the_demo_s_refusal_is_one_module_s_refusal() -> None:
    base = tiny_model(CASE)
    inputs = probe_inputs(base)
    reference = run_probe(base, inputs)
    model = hc_retrofit.convert(copy.deepcopy(base), CONFIG)
    assert equivalence.require_equivalent(reference, run_probe(model, inputs), torch.float32, "it").equivalent
    _perturb_sites(model)
    with pytest.raises(NotEquivalentError, match=r"^it is not equivalent to its original: max \|logit diff\|"):
        equivalence.require_equivalent(reference, run_probe(model, inputs), torch.float32, "it")
