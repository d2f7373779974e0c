"""Each named use of another library's private API still works with the installed versions.

One test per helper of :mod:`hc_retrofit.private_api` and :mod:`hc_retrofit.modeling.private_api`:
each fails when the private attribute (or message format) it relies on disappears or changes.
"""

from __future__ import annotations

import logging

import pytest
import torch

from hc_retrofit import private_api
from hc_retrofit.modeling.private_api import version_counter, version_counters


def test_reset_accelerate_state_forgets_the_shared_state() -> None:
    from accelerate import PartialState
    from accelerate.state import AcceleratorState

    PartialState(cpu=True)
    assert PartialState._shared_state  # accelerate's singleton holds the state ...
    private_api.reset_accelerate_state()
    assert not PartialState._shared_state and not AcceleratorState._shared_state  # ... until reset


def test_auto_class_model_names_lists_what_each_auto_class_builds() -> None:
    names = private_api.auto_class_model_names()
    assert names["AutoModelForCausalLM"]["llama"] == "LlamaForCausalLM"
    assert names["AutoModelForMaskedLM"]["bert"] == "BertForMaskedLM"
    assert names["AutoModel"]["bert"] == "BertModel"
    assert not any(name.startswith("_") for name in names)


def test_dataset_fingerprint_is_what_datasets_keys_its_cache_on() -> None:
    import datasets

    docs = datasets.Dataset.from_dict({"text": ["a", "b"]})
    same = datasets.Dataset.from_dict({"text": ["a", "b"]})
    other = datasets.Dataset.from_dict({"text": ["a", "c"]})
    fingerprint = private_api.dataset_fingerprint(docs)
    assert isinstance(fingerprint, str) and fingerprint
    assert fingerprint == private_api.dataset_fingerprint(same) != private_api.dataset_fingerprint(other)
    mapped = docs.map(lambda b: b, batched=True, new_fingerprint="f" * 16)
    assert private_api.dataset_fingerprint(mapped) == "f" * 16


def test_click_exceptions_are_the_ones_typer_raises() -> None:
    import typer
    from typer.testing import CliRunner

    exceptions = private_api.click_exceptions_module()
    assert issubclass(typer.BadParameter, exceptions.UsageError)
    assert issubclass(exceptions.NoArgsIsHelpError, exceptions.UsageError)
    assert issubclass(exceptions.UsageError, exceptions.ClickException)
    app = typer.Typer()

    @app.command()
    def main(count: int) -> None: ...

    result = CliRunner().invoke(app, ["not-a-number"], standalone_mode=False)
    assert isinstance(result.exception, exceptions.UsageError)


def test_removed_shared_tensors_reads_accelerates_notice(caplog: pytest.LogCaptureFixture) -> None:
    from accelerate import PartialState
    from accelerate.utils.other import clean_state_dict_for_safetensors

    PartialState(cpu=True)
    weight = torch.zeros(2, 2)
    with caplog.at_level(logging.WARNING, logger="accelerate.utils.other"):
        clean_state_dict_for_safetensors({"embed.weight": weight, "head.weight": weight, "other": torch.ones(1)})
    notices = [private_api.removed_shared_tensors(r.getMessage()) for r in caplog.records]
    assert {"head.weight"} in notices or {"embed.weight"} in notices, [r.getMessage() for r in caplog.records]
    assert private_api.removed_shared_tensors("something else") is None


def test_version_counter_counts_in_place_updates() -> None:
    param = torch.nn.Parameter(torch.zeros(3))
    before = version_counter(param)
    with torch.no_grad():
        param.add_(1)
    assert version_counter(param) == before + 1
    with torch.inference_mode():
        inference = torch.zeros(1)
    with pytest.raises(RuntimeError):
        version_counter(inference)


def test_version_counters_reads_each_tensors_counter() -> None:
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    with torch.no_grad():
        b.mul_(2)
        b.mul_(2)
    assert version_counters([a, b]) == [version_counter(a), version_counter(b)] == [0, 2]
    with torch.inference_mode():
        inference = torch.zeros(1)
    with pytest.raises(RuntimeError):
        version_counters([a, inference])


def test_reports_full_disk_reads_the_c_librarys_text() -> None:
    """A writer without ``errno`` (safetensors' Rust error, torch's C++ writer) prints the OS's strerror."""
    import errno
    import os

    rust_style = RuntimeError(f"Error while serializing: IoError({os.strerror(errno.ENOSPC)} (os error 28))")
    assert private_api.reports_full_disk(rust_style)
    assert private_api.reports_full_disk(RuntimeError(str(OSError(errno.EDQUOT, os.strerror(errno.EDQUOT)))))
    assert not private_api.reports_full_disk(RuntimeError("header too large"))
