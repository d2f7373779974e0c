"""The trust_remote_code files: the package's own modules as installed (relative imports), and their hash."""

from __future__ import annotations

import ast
import json
import logging
from pathlib import Path

import pytest

import hc_retrofit
from hc_retrofit import remote_code
from tests.tiny import tiny_encoder, tiny_model


def test_closure_holds_every_imported_module_as_installed() -> None:
    files = remote_code.package_module_closure()
    hc = {"site.py", "site_cache.py", "formulas.py", "kernels.py", "sinkhorn_knopp.py", "stream_ops.py"}
    surgery = {"patch.py", "converted_layer.py", "stream_placement.py", "surgery.py"}
    assert {"remote_model.py", "config.py", "errors.py", "families.py", *surgery, *hc} <= set(files)
    for name, source in files.items():
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                assert f"{node.module}.py" in files, f"{name} imports .{node.module}, which is not copied"
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
                assert not any(n.startswith("hc_retrofit") for n in names if n), f"{name} still imports hc_retrofit"
    package = Path(hc_retrofit.__file__).parent / "modeling"
    for name, source in files.items():  # copied, not rewritten
        assert source == (package / name).read_text(encoding="utf-8")
    # the subpackage is exactly what ships: no module there stays behind, none outside is copied
    assert set(files) == {p.name for p in package.glob("*.py")} - {"__init__.py"}


def test_an_absolute_package_import_in_shipped_code_is_refused(monkeypatch) -> None:
    real = remote_code._module_source
    monkeypatch.setattr(
        remote_code,
        "_module_source",
        lambda name: (
            real(name) + ("\nfrom hc_retrofit.modeling.errors import ConfigError\n" if name == "config" else "")
        ),
    )
    with pytest.raises(
        RuntimeError, match=r"config\.py is shipped as remote code: import hc_retrofit\.modeling\.errors relatively"
    ):
        remote_code.package_module_closure()


def test_modeling_file_names_the_base_classes() -> None:
    model = hc_retrofit.convert(tiny_model("gemma3-text"), hc_retrofit.HCConfig(num_streams=2, variant="static"))
    source = remote_code.modeling_source(model)
    compile(source, remote_code.MODELING_FILE, "exec")
    assert "from transformers import Gemma3ForCausalLM as _BaseModel" in source  # public names
    assert "from transformers import Gemma3TextConfig as _BaseConfig" in source
    for name in remote_code.package_module_closure():  # each sibling imported here (transformers 5.0 needs it)
        assert f"from .{name.removesuffix('.py')} import" in source
    assert 'model_type = "hc_retrofit_gemma3_text"' in source
    assert "class HCRetrofitGemma3ForCausalLM(HCRetrofitModelMixin, _BaseModel):" in source


def test_auto_map_names_the_auto_classes_that_build_the_base_class() -> None:
    assert remote_code.auto_classes(type(tiny_model("gpt2")))[0] == "AutoModelForCausalLM"
    assert remote_code.auto_classes(type(tiny_encoder("bert-masked-lm")))[0] == "AutoModelForMaskedLM"
    assert remote_code.auto_classes(type(tiny_encoder("bert-base")))[0] == "AutoModel"
    assert remote_code.auto_classes(type(tiny_encoder("vit-classifier"))) == ["AutoModelForImageClassification"]
    model = hc_retrofit.convert(tiny_encoder("vit-base"), hc_retrofit.HCConfig(num_streams=2))
    source = remote_code.modeling_source(model)
    assert "AutoModel.from_pretrained(this_dir, trust_remote_code=True)" in source
    assert "class HCRetrofitViTModel(HCRetrofitModelMixin, _BaseModel):" in source


def _saved(tmp_path: Path) -> Path:
    model = hc_retrofit.convert(tiny_model("llama-gqa-untied"), hc_retrofit.HCConfig(num_streams=2, variant="static"))
    return hc_retrofit.save_converted(model, tmp_path / "ckpt")


def _warnings(caplog: pytest.LogCaptureFixture, path: Path) -> list[str]:
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="hc_retrofit"):
        hc_retrofit.load_converted(path)
    return [r.getMessage() for r in caplog.records if r.name.startswith("hc_retrofit")]


def test_config_records_version_and_hash_that_load_converted_checks(tmp_path, caplog) -> None:
    out = _saved(tmp_path)
    config = json.loads((out / "config.json").read_text())
    files = remote_code.package_module_closure()
    files = {name: (out / name).read_text(encoding="utf-8") for name in [*files, remote_code.MODELING_FILE]}
    assert config[remote_code.VERSION_KEY] == hc_retrofit.__version__
    assert config[remote_code.CODE_HASH_KEY] == remote_code.code_hash(files)
    assert _warnings(caplog, out) == []  # fresh: nothing to say

    site = out / "site.py"
    site.write_text(site.read_text() + "\n# edited\n")  # what trust_remote_code users run changes
    messages = _warnings(caplog, out)
    assert len(messages) == 2
    assert "modeling files were changed after hc-retrofit" in messages[0]
    assert "differ from what hc-retrofit" in messages[1] and "save the model again" in messages[1]


def test_a_checkpoint_of_another_version_warns_once(tmp_path, caplog) -> None:
    out = _saved(tmp_path)
    config = json.loads((out / "config.json").read_text())
    site = out / "site.py"
    site.write_text(site.read_text() + "\n# as an older hc-retrofit wrote it\n")
    files = {
        n: (out / n).read_text(encoding="utf-8")
        for n in [*remote_code.package_module_closure(), remote_code.MODELING_FILE]
    }
    config.update({remote_code.VERSION_KEY: "0.0.1", remote_code.CODE_HASH_KEY: remote_code.code_hash(files)})
    (out / "config.json").write_text(json.dumps(config))
    messages = _warnings(caplog, out)
    assert len(messages) == 1 and "written by hc-retrofit 0.0.1" in messages[0]
