"""Exactness on a real trained checkpoint (llama2.c stories260K): same greedy text, same perplexity."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import hc_retrofit
from hc_retrofit import HCConfig


@pytest.fixture(scope="module")
def stories(bundled_data):
    path = bundled_data / "stories260K"
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    tok = AutoTokenizer.from_pretrained(path, padding_side="left")
    tok.pad_token = tok.pad_token or tok.unk_token or tok.eos_token
    return model, tok, bundled_data


def perplexity(model, ids: torch.Tensor, block: int = 256) -> float:
    blocks = ids[: len(ids) // block * block].view(-1, block)[:8]
    with torch.no_grad():
        return math.exp(model(blocks, labels=blocks).loss.item())


@pytest.mark.parametrize("variant", ["static", "dynamic", "mhc"])
def test_same_greedy_text_and_perplexity(stories, variant):
    base, tok, data = stories
    model = hc_retrofit.convert(copy.deepcopy(base), HCConfig(variant=variant))
    prompt = tok(["Once upon a time", "The little dog"], return_tensors="pt", padding=True)
    gen = dict(max_new_tokens=40, do_sample=False, pad_token_id=tok.pad_token_id)
    out_base = base.generate(**prompt, **gen)
    out_hc = model.generate(**prompt, **gen)
    assert tok.batch_decode(out_hc) == tok.batch_decode(out_base)
    text = (data / "tinyshakespeare.txt").read_text(encoding="utf-8")
    ids = torch.tensor(tok(text[:60_000])["input_ids"])
    ppl_base, ppl_hc = perplexity(base, ids), perplexity(model, ids)
    assert ppl_base < 0.5 * base.config.vocab_size  # a trained model off-domain (measured 62), far from uniform
    assert abs(ppl_hc - ppl_base) < 1e-4 * ppl_base


def test_discovered_path_equals_the_hand_written_llama_family(monkeypatch):
    """The bundled stories260K converted with no llama Family (discovery) is the same model as with it."""
    from pathlib import Path

    from hc_retrofit.modeling.families import FAMILIES, STRUCTURE_KEY

    path = Path(hc_retrofit.__file__).parent / "data" / "stories260K"
    base = AutoModelForCausalLM.from_pretrained(path).eval()
    tok = AutoTokenizer.from_pretrained(path, padding_side="left")
    tok.pad_token = tok.pad_token or tok.unk_token or tok.eos_token
    hand = hc_retrofit.convert(copy.deepcopy(base), HCConfig(variant="mhc"))
    monkeypatch.delitem(FAMILIES, "llama")
    discovered = hc_retrofit.convert(copy.deepcopy(base), HCConfig(variant="mhc"))
    assert getattr(discovered.config, STRUCTURE_KEY) == getattr(hand.config, STRUCTURE_KEY)
    prompt = tok(["Once upon a time", "The little dog"], return_tensors="pt", padding=True)
    gen = dict(max_new_tokens=30, do_sample=False, pad_token_id=tok.pad_token_id)
    out = discovered.generate(**prompt, **gen)
    assert tok.batch_decode(out) == tok.batch_decode(hand.generate(**prompt, **gen))
    assert tok.batch_decode(out) == tok.batch_decode(base.generate(**prompt, **gen))
    with torch.no_grad():
        assert torch.equal(discovered(**prompt).logits, hand(**prompt).logits)
