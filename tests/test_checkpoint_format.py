"""The one safetensors header reader and the checkpoint's config keys."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from hc_retrofit import checkpoint_format as fmt
from hc_retrofit.modeling.errors import CheckpointError


def _file(tmp_path: Path) -> Path:
    path = tmp_path / "model.safetensors"
    save_file({"w": torch.ones(3, 4, dtype=torch.bfloat16), "b": torch.zeros(2)}, str(path), metadata={"k": "v"})
    return path


def test_reads_entries_metadata_and_data_start(tmp_path: Path) -> None:
    path = _file(tmp_path)
    header = fmt.read_header(path)
    assert header.metadata == {"k": "v"} and set(header.tensors) == {"w", "b"}
    entry = header.tensors["w"]
    assert fmt.torch_dtype(entry["dtype"]) == torch.bfloat16 and entry["shape"] == [3, 4]
    begin, end = entry["data_offsets"]
    raw = path.read_bytes()[header.data_start + begin : header.data_start + end]
    assert torch.equal(
        torch.frombuffer(bytearray(raw), dtype=torch.bfloat16).reshape(3, 4), torch.ones(3, 4).bfloat16()
    )
    assert fmt.st_name(torch.float16) == "F16" and fmt.torch_dtype("F8_E4M3") is None


@pytest.mark.parametrize("damage", ["truncated", "garbage", "bad json", "empty"])
def test_damaged_files_are_one_line_errors(tmp_path: Path, damage: str) -> None:
    path = _file(tmp_path)
    data = path.read_bytes()
    if damage == "truncated":
        path.write_bytes(data[:-5])
    elif damage == "garbage":
        path.write_bytes(b"\xff" * 64)
    elif damage == "bad json":
        path.write_bytes(data[:8] + b"{" * (len(data) - 8))
    else:
        path.write_bytes(b"")
    with pytest.raises(CheckpointError, match="download or copy the checkpoint again") as err:
        fmt.check_weight_files(tmp_path)
    assert "\n" not in str(err.value) and str(path) in str(err.value)


def test_keys_are_spelled_once() -> None:
    """The tool's modules name config keys through this module, never as string literals."""
    root = Path(fmt.__file__).parent
    keys = {fmt.BASE_KEY, fmt.VERSION_KEY, fmt.CODE_HASH_KEY, fmt.METADATA_KEY, fmt.STRUCTURE_KEY}
    keys |= {fmt.BASE_TYPE_KEY, fmt.BASE_ARCH_KEY}
    allowed = {root / "checkpoint_format.py", root / "modeling" / "config.py", root / "modeling" / "families.py"}
    spelled = [
        (path.relative_to(root), key)
        for path in root.rglob("*.py")
        if path not in allowed
        for key in keys
        if f'"{key}"' in path.read_text(encoding="utf-8")
    ]
    assert not spelled


def test_importing_it_does_not_import_torch() -> None:
    """The shard copy imports it before torch (so the copy starts first)."""
    code = "import sys, hc_retrofit.checkpoint_format, hc_retrofit.shard_copy; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
