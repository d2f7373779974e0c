"""Streaming convert: the same checkpoint as the in-memory convert, without loading the base weights."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from hc_retrofit.checkpoint_format import is_converted_dir, read_config_dict, read_header
from hc_retrofit.conversion import convert_checkpoint
from hc_retrofit.loading import load_converted
from hc_retrofit.modeling.config import HCConfig
from hc_retrofit.modeling.errors import OutputExistsError
from hc_retrofit.outputs import MARKER
from hc_retrofit.streaming import (
    HC_SHARD,
    INDEX_FILE,
    CannotStream,
    stream_convert,
    write_safetensors,
)
from tests.checkpoints import HUB_OFFLINE_ENV, populate_hf_cache, word_tokenizer
from tests.tiny import tiny_model

WEIGHT_SUFFIXES = (".safetensors", ".safetensors.index.json")


def _sharded_base(directory: Path, case: str = "llama-gqa-untied", shard: str = "20KB") -> Path:
    tiny_model(case).save_pretrained(directory, max_shard_size=shard)
    word_tokenizer().save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def sharded_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = _sharded_base(tmp_path_factory.mktemp("stream") / "base")
    assert len(list(base.glob("*.safetensors"))) > 3  # really sharded
    return base


def _assert_same_checkpoint(streamed: Path, in_memory: Path) -> None:
    """Bit-identical state dicts (values and dtypes) once loaded, and the same non-weight files."""
    a = load_converted(streamed).state_dict()
    b = load_converted(in_memory).state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        assert torch.equal(a[key], b[key]), key
    others = {p.name for p in streamed.iterdir() if not p.name.endswith(WEIGHT_SUFFIXES)}
    assert others == {p.name for p in in_memory.iterdir() if not p.name.endswith(WEIGHT_SUFFIXES)}
    for name in others - {MARKER}:  # the manifests list other weight files (and times)
        assert (streamed / name).read_bytes() == (in_memory / name).read_bytes(), name


@pytest.mark.parametrize(
    ("case", "settings", "dtype"),
    [
        ("llama-gqa-untied", HCConfig(variant="mhc"), "auto"),
        ("llama-gqa-untied", HCConfig(variant="dynamic", num_streams=3), "bfloat16"),
        ("qwen2-tied", HCConfig(variant="static", num_streams=2), "auto"),
        ("gpt2", HCConfig(variant="mhc", mhc_dynamic=False), "float16"),
    ],
    ids=["llama-mhc", "llama-dynamic-bf16", "qwen2-tied-static", "gpt2-static-mhc-fp16"],
)
def test_streamed_equals_in_memory(tmp_path: Path, case: str, settings: HCConfig, dtype: str) -> None:
    base = _sharded_base(tmp_path / "base", case)
    streamed = stream_convert(str(base), tmp_path / "streamed", settings, dtype=dtype)
    in_memory = convert_checkpoint(str(base), tmp_path / "memory", settings, dtype=dtype)
    _assert_same_checkpoint(tmp_path / "streamed", tmp_path / "memory")
    for field in ("base_model", "layers", "sites", "base_parameters", "added_parameters", "has_tokenizer"):
        assert getattr(streamed, field) == getattr(in_memory, field), field
    index = json.loads((tmp_path / "streamed" / INDEX_FILE).read_text())
    assert {k for k, v in index["weight_map"].items() if v == HC_SHARD} == {
        k for k in index["weight_map"] if ".hyper_connections." in k
    }
    assert not list(tmp_path.glob(".*partial"))


def test_base_shards_are_copied_unchanged_or_hard_linked(sharded_base: Path, tmp_path: Path) -> None:
    copied, linked = tmp_path / "copied", tmp_path / "linked"
    stream_convert(str(sharded_base), copied, HCConfig())
    summary = stream_convert(str(sharded_base), linked, HCConfig(), link=True)
    shards = sorted(sharded_base.glob("*.safetensors"))
    assert summary.shards == summary.linked_shards == len(shards) and summary.reencoded_shards == 0
    for shard in shards:
        assert (copied / shard.name).read_bytes() == shard.read_bytes()
        assert not os.path.samefile(copied / shard.name, shard)
        assert os.path.samefile(linked / shard.name, shard)
    _assert_same_checkpoint(linked, copied)
    # replacing a linked output unlinks its files and leaves the base shards intact
    before = {s.name: s.read_bytes() for s in shards}
    stream_convert(str(sharded_base), linked, HCConfig(num_streams=2), overwrite=True)
    assert {s.name: s.read_bytes() for s in shards} == before


def test_single_file_checkpoint(tmp_path: Path) -> None:
    base = _sharded_base(tmp_path / "base", shard="100MB")
    assert (base / "model.safetensors").is_file()
    stream_convert(str(base), tmp_path / "streamed", HCConfig())
    assert not (tmp_path / "streamed" / "model.safetensors").exists()  # it would hide the index
    convert_checkpoint(str(base), tmp_path / "memory", HCConfig())
    _assert_same_checkpoint(tmp_path / "streamed", tmp_path / "memory")


def test_output_safety_and_atomicity(sharded_base: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    with pytest.raises(OutputExistsError, match="already exists"):
        stream_convert(str(sharded_base), out, HCConfig())
    with pytest.raises(OutputExistsError, match="not written by hc-retrofit"):
        stream_convert(str(sharded_base), out, HCConfig(), overwrite=True)
    with pytest.raises(OutputExistsError, match="inside the input directory"):
        stream_convert(str(sharded_base), sharded_base / "out", HCConfig())
    assert sorted(p.name for p in out.iterdir()) == ["mine.txt"]

    def refuse(directory: Path) -> None:
        assert (directory / INDEX_FILE).is_file()  # checked on the finished directory, before the rename
        raise RuntimeError("check failed")

    ours = tmp_path / "ours"
    stream_convert(str(sharded_base), ours, HCConfig())
    before = sorted(p.name for p in ours.iterdir())
    with pytest.raises(RuntimeError, match="check failed"):
        stream_convert(str(sharded_base), ours, HCConfig(), overwrite=True, check=refuse)
    assert sorted(p.name for p in ours.iterdir()) == before
    with pytest.raises(RuntimeError, match="check failed"):
        stream_convert(str(sharded_base), tmp_path / "new", HCConfig(), check=refuse)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ours", "out"]


def test_refuses_what_it_cannot_prove(tmp_path: Path) -> None:
    moe = _sharded_base(tmp_path / "moe", "mixtral-moe")  # saved with per-expert keys, loaded fused
    with pytest.raises(CannotStream, match="not a parameter"):
        stream_convert(str(moe), tmp_path / "out", HCConfig())
    extra = _sharded_base(tmp_path / "extra", shard="100MB")
    from safetensors.torch import load_file, save_file

    tensors = load_file(extra / "model.safetensors")
    save_file({**tensors, "stray.weight": torch.zeros(2)}, extra / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CannotStream, match=r"stray\.weight"):
        stream_convert(str(extra), tmp_path / "out", HCConfig())
    save_file(
        {k: v for k, v in tensors.items() if "layers.1.mlp" not in k},
        extra / "model.safetensors",
        metadata={"format": "pt"},
    )
    with pytest.raises(CannotStream, match=r"lacks model\.layers\.1\.mlp"):
        stream_convert(str(extra), tmp_path / "out", HCConfig())
    (extra / "model.safetensors").unlink()
    with pytest.raises(CannotStream, match="no safetensors"):
        stream_convert(str(extra), tmp_path / "out", HCConfig())
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".*partial"))


def test_write_safetensors_round_trips(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    tensors = {
        "a": torch.randn(3, 5, dtype=torch.float32),
        "b": torch.arange(7, dtype=torch.int64),
        "c": torch.randn(2, 2, 2).to(torch.bfloat16),
        "empty": torch.zeros(0, 4),
        "scalar": torch.tensor(1.5),
    }
    specs = {k: (torch.float16 if k == "a" else v.dtype, list(v.shape)) for k, v in tensors.items()}
    write_safetensors(tmp_path / "x.safetensors", list(tensors), tensors.__getitem__, specs, {"format": "pt"})
    back = load_file(tmp_path / "x.safetensors")
    assert torch.equal(back["a"], tensors["a"].half())
    for key in ("b", "c", "empty", "scalar"):
        assert back[key].dtype == tensors[key].dtype and torch.equal(back[key], tensors[key])
    header = read_header(tmp_path / "x.safetensors")
    assert header.metadata == {"format": "pt"} and header.tensors["a"]["dtype"] == "F16"


def test_hub_id_streams_from_its_downloaded_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A Hub id is resolved to its (here: cached, offline) snapshot, whose files are streamed."""
    import huggingface_hub.constants

    for key, value in HUB_OFFLINE_ENV.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    cache = tmp_path / "hub"
    snapshot = populate_hf_cache(cache, "tiny-org/sharded", _sharded_base(tmp_path / "src"))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    messages: list[str] = []
    summary = stream_convert("tiny-org/sharded", tmp_path / "streamed", HCConfig(), progress=messages.append)
    assert summary.base_model == "tiny-org/sharded" and any("downloading tiny-org/sharded" in m for m in messages)
    assert read_config_dict(tmp_path / "streamed")["hc_retrofit_base"] == "tiny-org/sharded"
    convert_checkpoint("tiny-org/sharded", tmp_path / "memory", HCConfig())
    _assert_same_checkpoint(tmp_path / "streamed", tmp_path / "memory")
    for shard in snapshot.glob("*.safetensors"):
        assert (tmp_path / "streamed" / shard.name).read_bytes() == shard.read_bytes()


def test_verify_runs_before_the_rename_layer_by_layer_when_it_cannot_fit(
    sharded_base: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from hc_retrofit import layered, verify

    runs: list[tuple[Path, str]] = []
    real = verify.verify_checkpoint

    def spy(directory: Path, **kwargs: object) -> verify.VerifyReport:
        runs.append((Path(directory), str(kwargs["mode"])))
        return real(directory, **kwargs)

    monkeypatch.setattr(verify, "verify_checkpoint", spy)
    summary = stream_convert(str(sharded_base), tmp_path / "fits", HCConfig(), verify=True)
    assert summary.verified and summary.verify_loading == "in memory"
    assert runs[-1][0].name.endswith(".partial") and runs[-1][1] == "memory"  # the staging dir, not the output
    monkeypatch.setattr(layered, "available_memory", lambda: 2**10)  # nothing fits: layer by layer
    messages: list[str] = []
    summary = stream_convert(str(sharded_base), tmp_path / "big", HCConfig(), verify=True, progress=messages.append)
    assert summary.verified and summary.verify_loading == "layer by layer" and runs[-1][1] == "layers"
    assert any("layer by layer" in m for m in messages)
    assert is_converted_dir(tmp_path / "big")


def test_available_memory_needs_no_psutil(monkeypatch):
    """verify's memory check runs on the core install (psutil is only a [bench] dependency)."""
    import sys

    from hc_retrofit import layered

    monkeypatch.setitem(sys.modules, "psutil", None)
    available = layered.available_memory()
    total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    assert 0 < available <= total


def test_a_linked_shard_that_must_be_re_encoded_leaves_the_base_intact(tmp_path: Path) -> None:
    """The early copy links every shard; a shard re-encoded afterwards must replace the link, not write through it."""
    base = _sharded_base(tmp_path / "base")  # float32 tensors
    config = json.loads((base / "config.json").read_text())
    config["dtype"] = "bfloat16"  # dtype auto -> bfloat16: every shard is re-encoded
    (base / "config.json").write_text(json.dumps(config))
    before = {s.name: s.read_bytes() for s in base.glob("*.safetensors")}
    summary = stream_convert(str(base), tmp_path / "out", HCConfig(), link=True)
    assert summary.reencoded_shards == summary.shards and summary.linked_shards == 0
    assert {s.name: s.read_bytes() for s in base.glob("*.safetensors")} == before
    for name in before:
        assert not os.path.samefile(tmp_path / "out" / name, base / name)
        assert read_header(tmp_path / "out" / name).tensors  # a readable bf16 shard
    loaded = load_converted(tmp_path / "out")
    assert next(loaded.model.layers[0].parameters()).dtype == torch.bfloat16


def test_the_shard_copy_is_cancelled_between_chunks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import threading

    from hc_retrofit import shard_copy

    src = tmp_path / "big.bin"
    src.write_bytes(os.urandom(1 << 20))
    monkeypatch.setattr(shard_copy, "CHUNK", 4096)
    copier = shard_copy.ShardCopier([(src, "copy.bin")], tmp_path)
    started = threading.Event()
    real = shard_copy.os.copy_file_range

    def slow(*args: int) -> int:
        started.set()
        threading.Event().wait(0.01)
        return real(*args)

    monkeypatch.setattr(shard_copy.os, "copy_file_range", slow)
    copier.start()
    started.wait()
    copier.cancel()
    assert (tmp_path / "copy.bin").stat().st_size < src.stat().st_size
    with pytest.raises(shard_copy.Cancelled):
        copier.wait()
    monkeypatch.setattr(shard_copy.os, "copy_file_range", real)
    whole = shard_copy.ShardCopier([(src, "whole.bin")], tmp_path).start()
    assert whole.wait() == [] and (tmp_path / "whole.bin").read_bytes() == src.read_bytes()
