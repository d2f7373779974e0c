"""`hc-retrofit train` and `hc-retrofit demo` through the CLI entry point."""

from __future__ import annotations

import json

import pytest

from hc_retrofit.cli.app import main
from hc_retrofit.train.metrics import read_metrics

from .conftest import tiny_lm


def run_cli(*args: str) -> int:
    try:
        main([str(a) for a in args])
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


@pytest.fixture
def plain_dir(tmp_path, tokenizer):
    path = tmp_path / "plain-model"
    tiny_lm(tokenizer).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_train_plain_dir_with_recipe_then_continue_from_the_converted_output(plain_dir, corpus, cache_dir, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"block_size: 32\nbatch_size: 2\nmax_steps: 50\nlr: 3e-3\nwarmup_steps: 1\neval_every: 2\n"
        f"eval_batches: 2\nsave_every: 0\ncache_dir: {cache_dir}\nvariant: static\nstreams: 2\n"
    )
    out = tmp_path / "run1"
    code = run_cli(
        "train", plain_dir, "--data", corpus, "--out", out, "--config", recipe,
        "--max-steps", "3", "--report-to", "tensorboard", "--threads", "1", "--no-progress",
    )  # fmt: skip
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["hc"] and summary["steps"] == 3  # the flag beat the recipe's max_steps: 50
    assert (summary["threads"], summary["strategy"]) == (1, "single")
    config = json.loads((out / "final" / "config.json").read_text())
    assert config["hc_retrofit"]["variant"] == "static" and config["hc_retrofit"]["num_streams"] == 2
    assert list((out / "logs").rglob("events.out.tfevents*")), "tensorboard tracker should write events"

    # a converted dir is trained as is; its step-0 eval equals the first run's final eval (same weights, data)
    out2 = tmp_path / "run2"
    assert (
        run_cli(
            "train",
            out / "final",
            "--data",
            corpus,
            "--out",
            out2,
            "--config",
            recipe,
            "--max-steps",
            "1",
            "--no-progress",
        )
        == 0
    )
    from hc_retrofit.train.threads import available_cores

    assert 1 <= json.loads((out2 / "summary.json").read_text())["threads"] <= available_cores()  # the default
    first_eval = next(r for r in read_metrics(out2) if "eval_loss" in r)
    assert first_eval["step"] == 0
    assert first_eval["eval_loss"] == pytest.approx(summary["final_eval_loss"], abs=1e-5)


def test_user_errors_are_one_line(plain_dir, tmp_path, capsys):
    assert run_cli("train", plain_dir, "--out", tmp_path / "o") == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: no data given") and "\n" not in err


@pytest.mark.parametrize(
    ("case", "converted"), [("bert-masked-lm", False), ("bert-masked-lm", True), ("vit-classifier", False)]
)
def test_encoders_and_vision_models_are_refused_in_one_line(corpus, tmp_path, capsys, case, converted):
    """A plain BERT loads as BertLMHeadModel, which attends both ways; a converted one is a masked LM;
    a ViT has no causal-LM class at all."""
    import hc_retrofit
    from tests.tiny import tiny_encoder

    model = tiny_encoder(case)
    path = tmp_path / "model"
    if converted:
        hc_retrofit.save_converted(hc_retrofit.convert(model, hc_retrofit.HCConfig(num_streams=2)), path)
    else:
        model.save_pretrained(path)
    capsys.readouterr()
    assert run_cli("train", path, "--data", corpus, "--out", tmp_path / "o", "--no-progress") == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("error: ") and "causal" in last, last
    assert not (tmp_path / "o").exists()  # a refused run leaves nothing behind


def test_a_refused_run_in_an_existing_empty_dir_keeps_the_dir_and_leaves_no_marker(plain_dir, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    assert run_cli("train", plain_dir, "--data", tmp_path / "no-such.txt", "--out", out, "--no-progress") == 1
    assert out.is_dir() and not any(out.iterdir())  # the user's directory stays, as it was


def test_demo_quick_retrofits_the_bundled_pretrained_model(tmp_path, capsys):
    out = tmp_path / "demo"
    assert run_cli("demo", "--quick", "--steps", "3", "--out", out, "--no-progress") == 0
    report = json.loads((out / "demo.json").read_text())
    assert report["model"] == "stories260K"
    assert report["retrofit_max_abs_diff"] < 1e-4 and report["greedy_identical"]
    assert report["params"]["mhc n=4"] > report["params"]["plain"] > 200_000  # the real 260K-parameter model
    arms = report["compare"]["arms"]
    assert [a["arm"] for a in arms] == ["plain", "mhc n=4"]
    assert arms[1]["gain_mean"] == pytest.approx(arms[0]["heldout_loss"] - arms[1]["heldout_loss"])
    # a pretrained start: the step-0 held-out loss of every run is the base model's, far below a random init's
    step0 = {
        json.loads(line).get("heldout_loss")
        for p in out.glob("compare/runs/*/*/seed0/metrics.jsonl")
        for line in p.read_text().splitlines()
        if json.loads(line).get("step") == 0 and "heldout_loss" in line
    }
    assert len(step0) == 2 and max(step0) - min(step0) < 1e-5  # plain and HC: the same model at step 0
    assert max(step0) < 6.0  # ln(512) = 6.24 for a uniform guess
    assert len(list(out.glob("compare/runs/*/*/seed0/summary.json"))) == 4  # 2 LRs x (plain, mhc)
    assert (out / "compare" / "compare.png").stat().st_size > 5000
    assert "retrofit exact: max |logit diff|" in capsys.readouterr().err
    # a second call reads the finished runs; another --steps in the same dir needs --overwrite
    assert run_cli("demo", "--quick", "--steps", "3", "--out", out, "--no-progress") == 0
    assert run_cli("demo", "--quick", "--steps", "4", "--out", out, "--no-progress") == 1


def test_demo_refuses_to_replace_an_earlier_demo_without_overwrite(tmp_path, capsys):
    out = tmp_path / "demo"
    out.mkdir()
    (out / "demo.json").write_text('{"earlier": true}')
    assert run_cli("demo", "--quick", "--steps", "1", "--out", out, "--no-progress") == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "--overwrite" in err and "\n" not in err
    assert (out / "demo.json").read_text() == '{"earlier": true}'  # nothing touched
    assert run_cli("demo", "--quick", "--steps", "1", "--out", out, "--no-progress", "--overwrite") == 1
    assert "(demo.json)" in capsys.readouterr().err  # not written by hc-retrofit: never replaced
    (out / "demo.json").unlink()
    assert run_cli("demo", "--quick", "--steps", "1", "--out", out, "--no-progress") == 0
    (out / "notes.txt").write_text("mine")
    assert run_cli("demo", "--quick", "--steps", "1", "--out", out, "--no-progress", "--overwrite") == 1
    assert "(notes.txt)" in capsys.readouterr().err  # --overwrite never loses a file the user added
    (out / "notes.txt").unlink()
    assert run_cli("demo", "--quick", "--steps", "1", "--out", out, "--no-progress", "--overwrite") == 0
    assert "earlier" not in (out / "demo.json").read_text()
