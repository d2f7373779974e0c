"""The trust_remote_code files: the package's own modules, made self-contained by relative imports."""

from __future__ import annotations

import ast

import hc_retrofit
from hc_retrofit import remote_code
from tests.tiny import tiny_encoder, tiny_model


def test_closure_holds_every_imported_module_rewritten_relative() -> None:
    files = remote_code.package_module_closure()
    hc = {"site.py", "site_cache.py", "formulas.py", "kernels.py", "sinkhorn_knopp.py", "stream_ops.py"}
    assert {"remote_model.py", "patch.py", "config.py", "errors.py", "families.py", *hc} <= set(files)
    for name, source in files.items():
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                assert f"{node.module}.py" in files, f"{name} imports .{node.module}, which is not copied"
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
                assert not any(n.startswith("hc_retrofit") for n in names if n), f"{name} still imports hc_retrofit"


def test_modeling_file_names_the_base_classes() -> None:
    model = hc_retrofit.convert(tiny_model("gemma3-text"), hc_retrofit.HCConfig(num_streams=2, variant="static"))
    source = remote_code.modeling_source(model)
    compile(source, remote_code.MODELING_FILE, "exec")
    assert "from transformers.models.gemma3.modeling_gemma3 import Gemma3ForCausalLM as _BaseModel" in source
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
