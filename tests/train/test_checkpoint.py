"""`train/checkpoint.py`: atomic accelerate checkpoints, without a notice per save for known weight ties."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator

from hc_retrofit.train import checkpoint as ckpt


class Tied(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(8, 4)
        self.head = torch.nn.Linear(4, 8, bias=False)
        self.head.weight = self.embed.weight


def test_tied_names_finds_the_second_name_of_a_shared_weight() -> None:
    assert ckpt.tied_names(Tied()) == {"head.weight"}
    assert ckpt.tied_names(torch.nn.Linear(2, 2)) == set()


def test_a_known_tie_is_saved_quietly_and_restored(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    accelerator = Accelerator(cpu=True)
    model = accelerator.prepare(Tied())
    with caplog.at_level(logging.WARNING):
        path = ckpt.save_checkpoint(accelerator, tmp_path, 3, {}, keep=2, models=[model])
        assert ckpt.latest_checkpoint(tmp_path) == (3, path)
    assert not [r for r in caplog.records if "Removed shared tensor" in r.getMessage()]
    with torch.no_grad():
        model.embed.weight.zero_()
    accelerator.load_state(str(path))
    assert model.head.weight is model.embed.weight and model.embed.weight.abs().sum() > 0


def test_an_unknown_shared_tensor_is_still_reported(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    accelerator = Accelerator(cpu=True)
    accelerator.prepare(Tied())
    with caplog.at_level(logging.WARNING):
        ckpt.save_checkpoint(accelerator, tmp_path, 1, {}, keep=1)  # ties not declared: accelerate says so
    assert [r for r in caplog.records if "Removed shared tensor" in r.getMessage()]
