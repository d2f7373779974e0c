"""Saving and loading converted checkpoints: exact round trips, dtypes, atomicity, base-model loading."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import hc_retrofit
from hc_retrofit import saving
from hc_retrofit.base_model import load_base_model
from hc_retrofit.checkpoint_format import is_converted_dir
from hc_retrofit.loading import load_converted
from hc_retrofit.modeling.errors import AlreadyConvertedError, CheckpointError, NotConvertedError, OutputExistsError
from hc_retrofit.saving import save_converted
from tests.checkpoints import (
    HUB_OFFLINE_ENV,
    config_json,
    populate_hf_cache,
    save_base,
    train_a_few_steps,
    word_tokenizer,
)
from tests.tiny import CASES, ENCODER_CASES, VOCAB, tiny_encoder, tiny_model

VARIANTS = ("static", "dynamic", "mhc")


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in HUB_OFFLINE_ENV.items():
        monkeypatch.setenv(key, value)
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def _ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(3, VOCAB, (2, 10), generator=torch.Generator().manual_seed(seed))


def _converted(case: str, variant: str, *, perturb: bool = False) -> torch.nn.Module:
    model = hc_retrofit.convert(tiny_model(case), hc_retrofit.HCConfig(num_streams=4, variant=variant))
    if perturb:  # HC parameters away from their init, so that a dropped/reinitialised tensor would show
        with torch.no_grad():
            for p in hc_retrofit.hyper_connection_sites(model)[0].parameters():
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.05)
    return model


@torch.no_grad()
def _logits(model: torch.nn.Module) -> torch.Tensor:
    return model(_ids()).logits


@pytest.mark.parametrize("case", sorted(CASES))
def test_round_trip_every_family_and_variant(case: str, tmp_path: Path) -> None:
    for variant in VARIANTS:
        model = _converted(case, variant, perturb=True)
        before = _logits(model)
        out = save_converted(model, tmp_path / variant)
        loaded = load_converted(out)  # also asserts a clean load report
        assert type(loaded).__name__.startswith("HCRetrofit")
        assert loaded.hc_config == model.hc_config
        torch.testing.assert_close(_logits(loaded), before, rtol=0, atol=0)


def test_round_trip_after_training(tmp_path: Path) -> None:
    model = train_a_few_steps(_converted("llama-gqa-untied", "mhc"))
    site = hc_retrofit.hyper_connection_sites(model)[0]
    init = hc_retrofit.HyperConnection(site.dim, model.hc_config, site.site_index)
    assert not torch.equal(site.width_logits, init.width_logits), "training should move the HC parameters"
    before = _logits(model)
    loaded = load_converted(save_converted(model, tmp_path / "trained"))
    torch.testing.assert_close(_logits(loaded), before, rtol=0, atol=0)
    state = dict(loaded.named_parameters())
    for name, p in model.named_parameters():
        assert torch.equal(state[name], p), name


def test_hc_parameters_stay_float32_in_bfloat16(tmp_path: Path) -> None:
    model = _converted("qwen2-tied", "dynamic", perturb=True)
    out = save_converted(model, tmp_path / "ckpt")
    loaded = load_converted(out, dtype=torch.bfloat16)
    saved = dict(model.named_parameters())
    hc = {n: p for n, p in loaded.named_parameters() if ".hyper_connections." in n}
    assert hc and all(p.dtype == torch.float32 for p in hc.values())
    assert all(torch.equal(p, saved[n]) for n, p in hc.items()), "HC values must not pass through bf16"
    assert {p.dtype for n, p in loaded.named_parameters() if n not in hc} == {torch.bfloat16}


def test_checkpoint_contents(tmp_path: Path) -> None:
    model = _converted("llama-gqa-untied", "mhc")
    model.config._name_or_path = "org/tiny-llama"
    out = save_converted(model, tmp_path / "ckpt", word_tokenizer(), extra_metadata={"note": "x"})
    data = config_json(out)
    assert data["model_type"] == "hc_retrofit_llama"
    assert data["architectures"] == ["HCRetrofitLlamaForCausalLM"]
    assert data["auto_map"]["AutoModelForCausalLM"] == "modeling_hc_retrofit.HCRetrofitLlamaForCausalLM"
    assert data["hc_retrofit"] == model.hc_config.to_dict()
    assert data["hc_retrofit_base"] == "org/tiny-llama"
    assert data["hc_retrofit_metadata"] == {"note": "x"}
    for name in (
        "model.safetensors",
        "tokenizer.json",
        "generation_config.json",
        "modeling_hc_retrofit.py",
        "patch.py",
    ):
        assert (out / name).is_file(), name
    assert is_converted_dir(out)
    assert not list(tmp_path.glob(".*")), "no temporary directory may be left behind"
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
    expected = {n for n, _ in model.named_parameters() if ".hyper_connections." in n}
    assert expected and expected <= keys


def test_sharded_save_loads(tmp_path: Path) -> None:
    model = _converted("gpt2", "static", perturb=True)
    out = save_converted(model, tmp_path / "ckpt", max_shard_size="20KB")
    assert len(list(out.glob("*.safetensors"))) > 1 and (out / "model.safetensors.index.json").is_file()
    torch.testing.assert_close(_logits(load_converted(out)), _logits(model), rtol=0, atol=0)


def test_resave_of_loaded_model_keeps_base(tmp_path: Path) -> None:
    model = _converted("mixtral-moe", "mhc", perturb=True)
    model.config._name_or_path = "org/base"
    first = load_converted(save_converted(model, tmp_path / "a"))
    second = save_converted(first, tmp_path / "b")
    assert config_json(second)["hc_retrofit_base"] == "org/base"
    torch.testing.assert_close(_logits(load_converted(second)), _logits(model), rtol=0, atol=0)


def test_save_refuses_existing_dir_and_overwrites_on_request(tmp_path: Path) -> None:
    model = _converted("llama-gqa-untied", "static")
    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match="overwrite"):
        save_converted(model, out)
    assert (out / "keep.txt").read_text() == "mine"
    with pytest.raises(OutputExistsError, match="not written by hc-retrofit"):  # not ours: never replaced
        save_converted(model, out, overwrite=True)
    assert (out / "keep.txt").read_text() == "mine"
    ours = tmp_path / "ours"
    save_converted(model, ours)
    (ours / "notes.txt").write_text("added by the user after the conversion")
    with pytest.raises(OutputExistsError, match=r"did not write or that changed since \(notes.txt\)"):
        save_converted(model, ours, overwrite=True)  # would lose the user's file: refused
    assert (ours / "notes.txt").is_file()
    (ours / "notes.txt").unlink()
    save_converted(model, ours, overwrite=True)  # only our own, unchanged files: replaced
    assert is_converted_dir(ours)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "ours"]


def test_failed_save_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = _converted("llama-gqa-untied", "static")

    def boom(*_args: object, **_kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(saving, "write_remote_code", boom)
    with pytest.raises(KeyboardInterrupt):
        save_converted(model, tmp_path / "ckpt")
    assert list(tmp_path.iterdir()) == []


def test_save_needs_a_converted_model(tmp_path: Path) -> None:
    with pytest.raises(NotConvertedError):
        save_converted(tiny_model("gpt2"), tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_plain_transformers_refuses_without_trust_remote_code(tmp_path: Path) -> None:
    out = save_converted(_converted("llama-gqa-untied", "mhc"), tmp_path / "ckpt")
    with pytest.raises(ValueError, match="trust_remote_code"):
        AutoModelForCausalLM.from_pretrained(out, trust_remote_code=False)


def test_load_converted_rejects_plain_checkpoint(tmp_path: Path) -> None:
    base = save_base("gpt2", tmp_path / "base", tokenizer=False)
    assert not is_converted_dir(base)
    with pytest.raises(NotConvertedError):
        load_converted(base)


def test_load_converted_rejects_incomplete_checkpoint(tmp_path: Path) -> None:
    """A checkpoint without its HC tensors must fail, never load uninitialised memory."""
    from safetensors.torch import load_file, save_file

    out = save_converted(_converted("llama-gqa-untied", "mhc"), tmp_path / "ckpt")
    weights = load_file(out / "model.safetensors")
    save_file(
        {k: v for k, v in weights.items() if ".hyper_connections.0." not in k},
        out / "model.safetensors",
        {"format": "pt"},
    )
    with pytest.raises(CheckpointError, match="missing keys"):
        load_converted(out)
    # the shipped code (what trust_remote_code users run) refuses it too, without hc-retrofit installed
    script = (
        "import sys; sys.modules['hc_retrofit'] = None\n"
        "from transformers import AutoModelForCausalLM\n"
        "try:\n"
        f"    AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True)\n"
        "except Exception as err:\n"
        "    print(type(err).__name__, err)\n"
        "else:\n"
        "    print('LOADED')\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=True)
    assert "CheckpointError" in done.stdout and "missing keys" in done.stdout, done.stdout + done.stderr


# ----------------------------------------------------------------------------- trust_remote_code, no hc_retrofit
REMOTE_SCRIPT = textwrap.dedent(
    """
    import sys
    sys.modules["hc_retrofit"] = None  # as if hc-retrofit were not installed
    try:
        import hc_retrofit.modeling.patch
    except ImportError:
        pass
    else:
        raise SystemExit("hc_retrofit is importable")
    import json, torch
    from transformers import AutoModelForCausalLM
    results = {}
    for directory in sys.argv[1:]:
        model, info = AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=True, output_loading_info=True)
        expected = torch.load(directory + "/expected.pt")
        with torch.no_grad():
            got = model(expected["ids"]).logits
        bf16 = AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=True, dtype=torch.bfloat16)
        results[directory] = {
            "class": type(model).__name__,
            "module": type(model).__module__,
            "report": {k: sorted(map(str, v)) for k, v in info.items()},
            "max_diff": float((got - expected["logits"]).abs().max()),
            "hc_dtypes": sorted({str(p.dtype) for n, p in bf16.named_parameters() if ".hyper_connections." in n}),
        }
    print(json.dumps(results))
    """
)


def test_trust_remote_code_loads_without_hc_retrofit(tmp_path: Path) -> None:
    cases = {"llama-gqa-untied": "mhc", "mixtral-moe": "dynamic", "gpt_neox-parallel": "static", "opt-post-ln": "mhc"}
    dirs = []
    for i, (case, variant) in enumerate(cases.items()):
        model = _converted(case, variant, perturb=True)
        if i == 0:
            model = train_a_few_steps(model)
        out = save_converted(model, tmp_path / f"ckpt_{case.replace('-', '_')}")
        torch.save({"ids": _ids(), "logits": _logits(model)}, out / "expected.pt")
        dirs.append(str(out))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HUB_OFFLINE_ENV, HF_HOME=str(tmp_path / "hf_home"))
    proc = subprocess.run(
        [sys.executable, "-c", REMOTE_SCRIPT, *dirs], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    for directory in dirs:
        r = results[directory]
        assert r["class"].startswith("HCRetrofit") and r["module"].startswith("transformers_modules."), r
        assert r["report"]["missing_keys"] == [] and r["report"]["unexpected_keys"] == [], r["report"]
        assert r["report"]["mismatched_keys"] == [], r["report"]
        assert r["max_diff"] < 1e-5, r  # another process: kernels may pick another summation order
        assert r["hc_dtypes"] == ["torch.float32"], r


# ----------------------------------------------------------------------------- base models
def test_load_base_model_from_directory(tmp_path: Path) -> None:
    base = save_base("qwen2-tied", tmp_path / "base")
    model, tokenizer = load_base_model(str(base))
    assert model.config.model_type == "qwen2" and not hc_retrofit.is_converted(model)
    assert tokenizer is not None and tokenizer("Once upon a time")["input_ids"]
    model, tokenizer = load_base_model(str(save_base("gpt2", tmp_path / "notok", tokenizer=False)))
    assert tokenizer is None


def test_load_base_model_errors(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="HF_HUB_OFFLINE"):
        load_base_model("no-such-org/no-such-model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=r"no config\.json"):
        load_base_model(str(tmp_path / "empty"))
    with pytest.raises(CheckpointError, match="no such directory"):
        load_base_model(str(tmp_path / "missing" / "dir"))
    out = save_converted(_converted("gpt2", "mhc"), tmp_path / "converted")
    with pytest.raises(AlreadyConvertedError):
        load_base_model(str(out))
    tiny_encoder("vit-classifier").save_pretrained(tmp_path / "vit")  # no causal-LM class: one line, before loading
    with pytest.raises(CheckpointError, match=r"'vit' model, which has no causal-LM class.*hc_retrofit\.convert"):
        load_base_model(str(tmp_path / "vit"))


def test_load_base_model_from_populated_hf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    cache = tmp_path / "hub"
    populate_hf_cache(cache, "tiny-org/tiny-llama", save_base("llama-gqa-untied", tmp_path / "src"))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    model, tokenizer = load_base_model("tiny-org/tiny-llama")
    reference = tiny_model("llama-gqa-untied")
    torch.testing.assert_close(_logits(model), _logits(reference), rtol=0, atol=0)
    assert tokenizer is not None
    with pytest.raises(CheckpointError):
        load_base_model("tiny-org/not-in-cache")


# ----------------------------------------------------------------------------- encoders and vision
def _perturbed_encoder(case: str, variant: str) -> tuple[torch.nn.Module, dict]:
    """The converted ``case`` with its HC parameters moved off their init, and a probe batch for it."""
    from hc_retrofit.equivalence import probe_inputs

    model = hc_retrofit.convert(tiny_encoder(case), hc_retrofit.HCConfig(num_streams=4, variant=variant))
    with torch.no_grad():  # HC parameters away from their init, so that a dropped tensor would show
        for site in hc_retrofit.hyper_connection_sites(model):
            for p in site.parameters():
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.05)
    return model, probe_inputs(model, batch=3, length=9, seed=2)


@torch.no_grad()
def _encoder_output(model: torch.nn.Module, inputs: dict) -> torch.Tensor:
    output = model(**inputs)
    return output.logits if getattr(output, "logits", None) is not None else output.last_hidden_state


ROUND_TRIP_ENCODERS = {
    "bert-base": "mhc",
    "roberta-masked-lm": "dynamic",
    "vit-classifier": "static",
    "deit-classifier": "mhc",
}


@pytest.mark.parametrize(("case", "variant"), sorted(ROUND_TRIP_ENCODERS.items()))
def test_encoders_and_vision_models_round_trip(case: str, variant: str, tmp_path: Path) -> None:
    """Saved, then loaded both by hc-retrofit and by the task's Auto class with trust_remote_code."""
    from hc_retrofit.tasks import auto_class

    model, inputs = _perturbed_encoder(case, variant)
    before = _encoder_output(model, inputs)
    out = save_converted(model, tmp_path / "ckpt")
    task = ENCODER_CASES[case][1]
    auto = auto_class(task).__name__
    config = json.loads((out / "config.json").read_text())
    assert config["auto_map"][auto] == f"modeling_hc_retrofit.HCRetrofit{type(model).__name__}"
    assert "AutoModelForCausalLM" not in config["auto_map"]
    loaded = load_converted(out)
    assert type(loaded).__name__ == f"HCRetrofit{type(model).__name__}" and loaded.hc_config == model.hc_config
    torch.testing.assert_close(_encoder_output(loaded, inputs), before, rtol=0, atol=0)
    remote = auto_class(task).from_pretrained(out, trust_remote_code=True).eval()
    assert type(remote).__module__.startswith("transformers_modules.")
    torch.testing.assert_close(_encoder_output(remote, inputs), before, rtol=0, atol=0)


ENCODER_REMOTE_SCRIPT = textwrap.dedent(
    """
    import sys
    sys.modules["hc_retrofit"] = None  # as if hc-retrofit were not installed
    import json, torch, transformers
    results = {}
    for directory in sys.argv[1:]:
        expected = torch.load(directory + "/expected.pt")
        auto = getattr(transformers, expected["auto"])
        model, info = auto.from_pretrained(directory, trust_remote_code=True, output_loading_info=True)
        with torch.no_grad():
            output = model(**expected["inputs"])
        got = output.logits if getattr(output, "logits", None) is not None else output.last_hidden_state
        results[directory] = {
            "class": type(model).__name__,
            "report": {k: sorted(map(str, v)) for k, v in info.items()},
            "max_diff": float((got - expected["output"]).abs().max()),
        }
    print(json.dumps(results))
    """
)


def test_encoder_checkpoints_load_without_hc_retrofit(tmp_path: Path) -> None:
    from hc_retrofit.tasks import auto_class

    dirs = []
    for case, variant in {"bert-masked-lm": "mhc", "vit-base": "dynamic"}.items():
        model, inputs = _perturbed_encoder(case, variant)
        out = save_converted(model, tmp_path / case)
        auto = auto_class(ENCODER_CASES[case][1]).__name__
        torch.save({"auto": auto, "inputs": inputs, "output": _encoder_output(model, inputs)}, out / "expected.pt")
        dirs.append(str(out))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HUB_OFFLINE_ENV, HF_HOME=str(tmp_path / "hf_home"))
    proc = subprocess.run(
        [sys.executable, "-c", ENCODER_REMOTE_SCRIPT, *dirs],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    for directory in dirs:
        r = results[directory]
        assert r["class"].startswith("HCRetrofit"), r
        assert all(v == [] for v in r["report"].values()), r["report"]
        assert r["max_diff"] < 1e-5, r
