"""Layer-by-layer verify: the same numbers as the in-memory verify, with one decoder layer in memory."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from hc_retrofit import layered, layered_verify
from hc_retrofit.conversion import convert_checkpoint
from hc_retrofit.loading import load_converted
from hc_retrofit.modeling.config import HCConfig
from hc_retrofit.modeling.errors import CheckpointError
from hc_retrofit.saving import save_converted
from hc_retrofit.verify import LAYERS, MEMORY, choose_mode, verify_checkpoint
from tests.checkpoints import save_base, train_a_few_steps


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _convert(tmp_path: Path, case: str, settings: HCConfig, dtype: str = "auto") -> Path:
    base = save_base(case, tmp_path / f"{case}-base")
    return convert_checkpoint(str(base), tmp_path / f"{case}-hc", settings, dtype=dtype).out_dir


def _same_report(directory: Path, **kwargs: object) -> dict:
    """Both reports, which must agree on every number; returns the layered one."""
    memory = verify_checkpoint(directory, mode="memory", **kwargs).to_dict()
    layers = verify_checkpoint(directory, mode="layers", **kwargs).to_dict()
    assert (memory.pop("loading"), layers.pop("loading")) == (MEMORY, LAYERS)
    assert layers == memory
    return layers


@pytest.mark.parametrize(
    ("case", "settings", "dtype"),
    [
        ("llama-gqa-untied", HCConfig(variant="mhc"), "auto"),
        ("qwen2-tied", HCConfig(variant="dynamic", num_streams=3), "bfloat16"),
        ("gpt2", HCConfig(variant="static", num_streams=2), "auto"),
    ],
    ids=["llama-mhc", "qwen2-tied-dynamic-bf16", "gpt2-static"],
)
def test_layered_verify_reports_the_in_memory_numbers(
    tmp_path: Path, case: str, settings: HCConfig, dtype: str
) -> None:
    converted = Path(_convert(tmp_path, case, settings, dtype))
    base_dtype = torch.bfloat16 if dtype == "bfloat16" else None
    report = _same_report(converted, base_dtype=base_dtype)
    assert report["equivalent"] and report["ok"]
    # a trained model differs from its base: the same (non-zero) numbers too
    model = train_a_few_steps(load_converted(converted), steps=2)
    save_converted(model, tmp_path / "trained")
    report = _same_report(tmp_path / "trained", trained=True, base_dtype=base_dtype)
    assert not report["equivalent"] and report["max_abs_logit_diff"] > 1e-3


def test_a_tampered_hc_tensor_is_not_exact_layer_by_layer(tmp_path: Path) -> None:
    converted = Path(_convert(tmp_path, "llama-gqa-untied", HCConfig(variant="mhc")))
    file = converted / "model.safetensors"
    tensors = load_file(file)
    generator = torch.Generator().manual_seed(0)
    site = "model.layers.1.hyper_connections.0."
    for key in [k for k in tensors if k.startswith(site)]:  # one site away from its exact init
        tensors[key] = tensors[key] + 0.5 * torch.randn(tensors[key].shape, generator=generator)
    save_file(tensors, file, metadata={"format": "pt"})
    report = _same_report(converted)
    assert not report["equivalent"] and not report["ok"]
    del tensors[key]  # a missing tensor (the site's last) is refused, as the in-memory load refuses it
    save_file(tensors, file, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=f"missing tensor {key}"):
        verify_checkpoint(converted, mode="layers")


def test_one_decoder_layer_in_memory_at_a_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    converted = Path(_convert(tmp_path, "llama-gqa-untied", HCConfig(variant="dynamic")))
    loaded: list[int] = []  # how many decoder layers hold real tensors, seen inside every layer call

    class Counting(layered.LayerLoader):
        def __init__(self, model: torch.nn.Module, layers: torch.nn.ModuleList, *args: object, **kwargs: object):
            super().__init__(model, layers, *args, **kwargs)
            assert all(p.is_meta for p in layers.parameters())  # nothing of the layers loaded up front
            assert not any(p.is_meta for n, p in model.named_parameters() if ".layers." not in n)

            def count(_module: torch.nn.Module, _args: object) -> None:
                loaded.append(sum(any(not p.is_meta for p in layer.parameters()) for layer in layers))

            for layer in layers:
                self._hooks.append(layer.register_forward_pre_hook(count))  # runs after the loading hook

    monkeypatch.setattr(layered_verify, "LayerLoader", Counting)
    assert verify_checkpoint(converted, mode="layers").equivalent
    # 2 models x (1 probe pass + 12 generation steps) x 3 layers, each call with exactly one layer loaded
    assert loaded == [1] * (2 * 13 * 3)


def test_auto_mode_goes_layer_by_layer_when_both_models_do_not_fit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    converted = Path(_convert(tmp_path, "llama-gqa-untied", HCConfig()))
    assert choose_mode(converted) == MEMORY  # a tiny model fits
    monkeypatch.setattr(layered, "available_memory", lambda: 2**16)
    assert choose_mode(converted) == LAYERS
    report = verify_checkpoint(converted)
    assert report.loading == LAYERS and report.equivalent
    assert choose_mode(converted, "memory") == MEMORY


def test_a_checkpoint_that_needs_key_conversions_is_refused_layer_by_layer(tmp_path: Path) -> None:
    converted = Path(_convert(tmp_path, "mixtral-moe", HCConfig()))  # per-expert keys, fused at load
    with pytest.raises(CheckpointError, match=r"cannot verify layer by layer: .*unexpected tensor"):
        verify_checkpoint(converted, mode="layers")


@pytest.mark.parametrize("version", [2, 1])
def test_cgroup_room_is_the_limit_minus_the_working_set(tmp_path: Path, version: int) -> None:
    limit_file, usage_file, stat_file, cache_key = layered.CGROUPS[0 if version == 2 else 1]
    root = tmp_path / f"v{version}"
    for name, text in (
        (limit_file, f"{8 * 2**30}"),
        (usage_file, f"{5 * 2**30}"),
        (stat_file, f"anon 123\n{cache_key} {2 * 2**30}\nactive_file 7"),
    ):
        (root / name.lstrip("/")).parent.mkdir(parents=True, exist_ok=True)
        (root / name.lstrip("/")).write_text(text + "\n")
    # limit 8 GiB, usage 5 GiB of which 2 GiB is reclaimable file cache: 5 GiB of room
    assert layered._cgroup_room(str(root)) == 5 * 2**30
    no_limit = "max" if version == 2 else "9223372036854771712"  # how each version says "no limit"
    (root / limit_file.lstrip("/")).write_text(no_limit + "\n")
    assert layered._cgroup_room(str(root)) is None
    assert layered._cgroup_room(str(tmp_path / "none")) is None


def test_available_memory_is_capped_by_the_cgroup_room(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(layered, "_system_available", lambda: 20 * 2**30)
    monkeypatch.setattr(layered, "_cgroup_room", lambda: 3 * 2**30)
    assert layered.available_memory() == 3 * 2**30  # the container's room, not the host's
    monkeypatch.setattr(layered, "_cgroup_room", lambda: None)
    assert layered.available_memory() == 20 * 2**30


def test_the_weightless_build_patches_nothing_and_leaves_other_threads_alone(tmp_path: Path) -> None:
    """While a layered verify builds its models, ``nn.Module.register_parameter`` is torch's own and
    a module built by another thread (e.g. a shard copy) gets real parameters, not meta ones."""
    converted = Path(_convert(tmp_path, "qwen2-tied", HCConfig(variant="dynamic")))
    original = torch.nn.Module.register_parameter
    seen: list[tuple[bool, str]] = []  # (torch's own register_parameter, device of another thread's module)
    verifying = threading.current_thread()

    def check(_module: torch.nn.Module, _name: str, param: torch.nn.Parameter | None) -> None:
        if threading.current_thread() is verifying and len(seen) < 3:  # a few registrations suffice
            other: list[str] = []
            thread = threading.Thread(target=lambda: other.append(torch.nn.Linear(2, 2).weight.device.type))
            thread.start()
            thread.join()
            seen.append((torch.nn.Module.register_parameter is original, other[0]))

    handle = torch.nn.modules.module.register_module_parameter_registration_hook(check)
    try:
        assert verify_checkpoint(converted, mode="layers").equivalent
    finally:
        handle.remove()
    assert torch.nn.Module.register_parameter is original
    assert seen and all(own and device == "cpu" for own, device in seen), seen


@pytest.mark.parametrize("target_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("contiguous", [True, False])
def test_read_into_sets_the_target_to_the_stored_tensor(
    tmp_path: Path, target_dtype: torch.dtype, contiguous: bool
) -> None:
    """Straight into a contiguous target of the stored dtype, else read then converted: the same values."""
    stored = {"w": torch.randn(6, 5), "empty": torch.zeros(0, 3)}
    save_file(stored, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    tensors = layered.stored_tensors(tmp_path)
    target = torch.zeros(6, 5, dtype=target_dtype) if contiguous else torch.zeros(5, 6, dtype=target_dtype).t()
    tensors["w"].read_into(target)
    assert torch.equal(target, stored["w"].to(target_dtype))
    tensors["empty"].read_into(torch.zeros(0, 3))
    with pytest.raises(ValueError, match="shape"):
        tensors["w"].read_into(torch.zeros(5, 6))


def test_read_into_writes_only_the_blocks_that_differ(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A target that already holds the stored bytes is only read; one that differs in a block gets
    that block; odd sizes (unaligned blocks) too. The result is always the stored tensor, bit for bit."""
    monkeypatch.setattr(layered, "READ_BLOCK", 64)
    stored = {"w": torch.randn(40, 7), "odd": torch.randn(37).to(torch.float16)}  # 1120 and 74 bytes
    stored["w"][3, 1] = -0.0
    save_file(stored, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    tensors = layered.stored_tensors(tmp_path)
    copies: list[int] = []
    real = torch.Tensor.copy_
    monkeypatch.setattr(
        torch.Tensor, "copy_", lambda self, src, *a, **k: copies.append(src.numel()) or real(self, src, *a, **k)
    )
    for name, value in stored.items():
        same = value.clone()
        tensors[name].read_into(same)
        assert copies == [] and torch.equal(same.view(torch.uint8), value.view(torch.uint8))
        changed = value.clone()
        changed.view(-1)[5] = 1e4
        tensors[name].read_into(changed)
        assert len(copies) == 1 and copies.pop() <= 64  # one block rewritten
        assert torch.equal(changed.view(torch.uint8), value.view(torch.uint8))
    zero = torch.zeros(40, 7)
    zero[3, 1] = 0.0  # +0.0 where the file holds -0.0: a different bit pattern, rewritten
    tensors["w"].read_into(zero)
    assert torch.equal(zero.view(torch.uint8), stored["w"].view(torch.uint8))
