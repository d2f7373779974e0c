"""Nothing lost: --overwrite and --resume act only on files hc-retrofit wrote and can prove it wrote (a manifest)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from hc_retrofit import outputs, ownership
from hc_retrofit.modeling.errors import OutputExistsError

from .conftest import TRAIN, one_line_error, tree


def _user_run_like_folder(path: Path) -> Path:
    """A user's folder that merely looks like a run: metrics.jsonl and run-like names, no manifest."""
    path.mkdir(parents=True)
    (path / "metrics.jsonl").write_text('{"step": 1}\n')
    (path / "summary.json").write_text("{}")
    (path / "final").mkdir()
    (path / "final" / "my-notes.txt").write_text("precious")
    return path


@pytest.mark.parametrize("command", ["train", "convert"])
def test_overwrite_never_trusts_names(cli, base_dir: Path, data_file: Path, tmp_path: Path, command: str) -> None:
    folder = _user_run_like_folder(tmp_path / "looks-like-a-run")
    before = tree(folder)
    args = ["train", base_dir, "--data", data_file, *TRAIN] if command == "train" else ["convert", base_dir]
    result = cli(*args, "--out", folder, "--overwrite")
    assert result.exit_code == 1 and "not written by hc-retrofit" in one_line_error(result)
    assert tree(folder) == before


def test_demo_never_marks_a_user_folder(cli, base_dir: Path, tmp_path: Path) -> None:
    """demo --overwrite into a user's folder is refused up front: no marker a later convert would trust."""
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "thesis.tex").write_text("precious")
    result = cli("demo", "--quick", "--out", folder, "--overwrite", "--no-progress")
    assert result.exit_code == 1 and "thesis.tex" in one_line_error(result)
    assert sorted(p.name for p in folder.iterdir()) == ["thesis.tex"]
    with pytest.raises(OutputExistsError, match=r"thesis\.tex"):
        ownership.adopt_dir(folder, "demo")  # the mechanism itself: never a manifest in someone else's folder
    result = cli("convert", base_dir, "--out", folder, "--overwrite")
    assert result.exit_code == 1 and (folder / "thesis.tex").read_text() == "precious"


@pytest.mark.parametrize("command", ["convert", "demo"])
def test_outputs_inside_the_installed_package_are_refused(cli, base_dir: Path, command: str) -> None:
    import hc_retrofit

    data = Path(hc_retrofit.__file__).parent / "data"
    before = tree(data)
    target = data / "stories260K" if command == "demo" else data / "out"
    args = ["demo", "--quick", "--no-progress"] if command == "demo" else ["convert", base_dir]
    result = cli(*args, "--out", target, "--overwrite")
    assert result.exit_code == 1 and "installed hc-retrofit package" in one_line_error(result)
    assert tree(data) == before


@pytest.mark.parametrize("where", ["site-packages", "hf-cache"])
def test_outputs_in_site_packages_or_the_hf_cache_are_refused(
    base_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    import sysconfig

    from huggingface_hub import constants

    if where == "hf-cache":
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
        target, what = tmp_path / "hub-cache" / "models--x", "Hugging Face cache"
    else:
        target, what = Path(sysconfig.get_paths()["purelib"]) / "hc-out", "site-packages"
    with pytest.raises(OutputExistsError, match=what):
        outputs.check_output_dir(target, overwrite=True)


@pytest.mark.parametrize("added", ["notes.txt", "eval/results.json", "lora-adapter/adapter_model.safetensors"])
def test_overwrite_of_our_checkpoint_keeps_what_the_user_added(cli, base_dir: Path, tmp_path: Path, added: str) -> None:
    out = tmp_path / "ckpt"
    assert cli("convert", base_dir, "--out", out).exit_code == 0
    (out / added).parent.mkdir(parents=True, exist_ok=True)
    (out / added).write_text("the user's")
    result = cli("convert", base_dir, "--out", out, "--overwrite")
    assert result.exit_code == 1 and added in one_line_error(result)
    assert (out / added).read_text() == "the user's"


def test_a_checkpoint_without_manifest_is_never_replaced(cli, converted_dir: Path, base_dir: Path, tmp_path: Path):
    """As downloaded from the Hub (push never uploads the manifest): not provably ours."""
    copy = Path(shutil.copytree(converted_dir, tmp_path / "downloaded"))
    (copy / outputs.MARKER).unlink()
    result = cli("convert", base_dir, "--out", copy, "--overwrite")
    assert result.exit_code == 1 and "not written by hc-retrofit" in one_line_error(result)


def test_an_edited_file_is_not_ours_any_more(tmp_path: Path) -> None:
    out = tmp_path / "out"
    ownership.adopt_dir(out, "test")
    (out / "config.json").write_text('{"a": 1}')
    (out / "metrics.jsonl").write_text('{"step": 1}\n')
    ownership.record(out, ["config.json"], append=["metrics.jsonl"])
    assert ownership.lost_files(out) == []
    os.utime(out / "config.json", ns=(1, 1))  # same bytes, another time (a copy): hashed, still ours
    assert ownership.lost_files(out) == []
    (out / "config.json").write_text('{"a": 2}')  # same size, other bytes
    with (out / "metrics.jsonl").open("a") as f:
        f.write('{"step": 2}\n')  # a log only grows: still ours
    assert ownership.lost_files(out) == ["config.json"]
    (out / "metrics.jsonl").write_text('{"step": 9}\n')  # rewritten: not what we wrote
    assert ownership.lost_files(out) == ["config.json", "metrics.jsonl"]


def test_overwrite_of_a_run_with_a_user_file_is_refused(cli, base_dir: Path, data_file: Path, tmp_path: Path):
    run = tmp_path / "run"
    train = ["train", base_dir, "--data", data_file, "--out", run, *TRAIN]
    assert cli(*train).exit_code == 0
    (run / "final" / "eval-notes.md").write_text("mine")
    result = cli(*train, "--overwrite")
    assert result.exit_code == 1 and "final/eval-notes.md" in one_line_error(result)
    (run / "final" / "eval-notes.md").unlink()
    assert cli(*train, "--overwrite").exit_code == 0  # all ours: replaced


@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_output_modes_follow_the_umask(cli, base_dir: Path, tmp_path: Path, mask: int) -> None:
    old = os.umask(mask)
    try:
        assert cli("convert", base_dir, "--out", tmp_path / "out").exit_code == 0
    finally:
        os.umask(old)
    out = tmp_path / "out"
    assert out.stat().st_mode & 0o777 == 0o777 & ~mask
    for path in out.iterdir():
        assert path.stat().st_mode & 0o777 == 0o666 & ~mask, path.name


def test_leftovers_of_dead_writers_are_reported_and_cleaned(base_dir: Path, tmp_path: Path, caplog) -> None:
    out = tmp_path / "out"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".out.{dead.stdout.strip()}-abc.partial"
    live = tmp_path / f".out.{os.getppid()}-def.partial"  # a process that is alive: another writer's
    for path in (stale, live):
        path.mkdir()
        (path / "model.safetensors").write_bytes(b"half")
    outputs.check_output_dir(out, overwrite=False)
    assert any(str(stale) in r.getMessage() for r in caplog.records)
    assert not any(str(live) in r.getMessage() for r in caplog.records)
    with ownership.output_lock(out):
        outputs.staging_dir(out)
    assert not stale.exists() and live.is_dir()


def test_a_refused_compare_leaves_nothing(base_dir: Path, tmp_path: Path) -> None:
    """A comparison that fails before any run trained leaves no marker, lock or empty folders behind."""
    from hc_retrofit.compare import CompareSpec, run_compare
    from hc_retrofit.train.errors import TrainingError

    empty = tmp_path / "empty.txt"
    empty.write_text("")
    out = tmp_path / "cmp"
    spec = CompareSpec(model=str(base_dir), data=str(empty), out=str(out), lr_grid=(1e-2,), seeds=(0,))
    spec.train.update(block_size=16, batch_size=2, max_steps=2)
    with pytest.raises(TrainingError, match="empty"):
        run_compare(spec, progress=False, log=lambda _: None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.txt"]


def test_resume_into_a_folder_we_did_not_write_is_refused(cli, base_dir: Path, data_file: Path, tmp_path: Path):
    folder = _user_run_like_folder(tmp_path / "theirs")
    before = tree(folder)
    result = cli("train", base_dir, "--data", data_file, "--out", folder, *TRAIN, "--resume")
    assert result.exit_code == 1 and "not written by hc-retrofit" in one_line_error(result)
    assert tree(folder) == before


def test_the_manifest_lists_exactly_what_was_written(cli, base_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert cli("convert", base_dir, "--out", out).exit_code == 0
    manifest = json.loads((out / outputs.MARKER).read_text())
    files = {p.name for p in out.iterdir() if p.name != outputs.MARKER}
    assert set(manifest["files"]) == files
    for name, entry in manifest["files"].items():
        assert entry["size"] == (out / name).stat().st_size
        assert entry["sha256"] == ownership.sha256_file(out / name)
