"""`run_compare` on a tiny llama: LR grid per arm, selection on validation, held-out report, resume."""

from __future__ import annotations

import json
import math

import pytest

from hc_retrofit import ownership
from hc_retrofit.compare import CompareSpec, Trial, run_compare
from hc_retrofit.compare.spec import Arm
from hc_retrofit.train.errors import TrainingError
from hc_retrofit.train.metrics import read_metrics

from .conftest import tiny_spec


def _summary(out, trial: Trial) -> dict:
    return json.loads((out / trial.relpath / "summary.json").read_text())


def test_grid_then_best_setting_on_other_seeds(plain_model, corpus, cache_dir, tmp_path):
    out = tmp_path / "cmp"
    spec = tiny_spec(out, plain_model, corpus, cache_dir, seeds=(0, 1), tune_seeds=1, hc_lr_multiplier_grid=(1.0, 30.0))
    lines: list[str] = []
    result = run_compare(spec, progress=False, log=lines.append)

    plain, hc = Arm(), Arm("mhc", 2)
    # grid on seed 0: 2 plain + 2x2 HC runs; seed 1: each arm only at its chosen setting
    assert len(lines) == 6 + 2
    runs = sorted(p.relative_to(out).as_posix() for p in out.glob("runs/*/*/seed*"))
    assert len(runs) == 8 and sum(r.endswith("seed1") for r in runs) == 2
    # the chosen setting is the lowest validation loss on seed 0, read back from the run dirs
    for arm, summary in ((plain, result.arms[0]), (hc, result.arms[1])):
        val = {s: _summary(out, Trial(arm, *s, 0))["final_eval_loss"] for s in spec.settings(arm)}
        assert (summary.lr, summary.hc_lr_multiplier) == min(val, key=val.get)
        # ... and it is reported on the held-out split, for both seeds
        for seed in (0, 1):
            held = _summary(out, Trial(arm, summary.lr, summary.hc_lr_multiplier, seed))["final_heldout_loss"]
            assert summary.heldout_by_seed[seed] == held
    # gain per seed = plain held-out - HC held-out, each at its own best LR
    gains = {s: result.arms[0].heldout_by_seed[s] - result.arms[1].heldout_by_seed[s] for s in (0, 1)}
    assert result.arms[1].gain_by_seed == pytest.approx(gains)
    assert result.arms[1].gain_mean == pytest.approx(sum(gains.values()) / 2)
    assert result.arms[1].gain_min == min(gains.values()) and result.arms[1].gain_std > 0
    assert result.arms[0].gain_mean is None
    assert all(a.tokens == 4 * 2 * 32 and a.tokens_per_s > 0 and a.train_seconds > 0 for a in result.arms)
    # held-out and validation are different text
    assert result.arms[0].validation_loss != result.arms[0].heldout_loss
    # grid: every setting once, one chosen per arm
    assert len(result.grid) == 2 + 4 and sum(g["chosen"] for g in result.grid) == 2
    saved = json.loads((out / "results.json").read_text())
    assert saved["arms"][1]["gain_by_seed"] == {str(k): v for k, v in result.arms[1].gain_by_seed.items()}
    assert (out / "compare.png").stat().st_size > 5000
    # every run dir is an ordinary train run with a held-out curve (eval at 0, 2, 4)
    rows = [r for r in read_metrics(out / runs[0]) if "heldout_loss" in r]
    assert [r["step"] for r in rows] == [0, 2, 4]


@pytest.mark.parametrize(("crash_at", "resumed_from"), [(3, 2), (1, 0)])
def test_interrupted_compare_resumes_to_the_same_result(
    crash_at, resumed_from, plain_model, corpus, cache_dir, tmp_path, monkeypatch
):
    """Killed after the step-2 checkpoint: the run resumes from it; killed before: it starts over."""
    from hc_retrofit.train.trainer import Trainer

    full = tiny_spec(tmp_path / "full", plain_model, corpus, cache_dir, lr_grid=(1e-2,))
    full.train["save_every"] = 2  # checkpoints at step 2: what the interrupted run resumes from
    reference = run_compare(full, progress=False, log=lambda _: None)

    spec = tiny_spec(tmp_path / "cut", plain_model, corpus, cache_dir, lr_grid=(1e-2,))
    spec.train["save_every"] = 2
    real = Trainer.forward_backward

    def crash_hc(self, step):
        if step == crash_at and not self.cfg.no_hc:
            raise KeyboardInterrupt
        return real(self, step)

    monkeypatch.setattr(Trainer, "forward_backward", crash_hc)
    with pytest.raises(KeyboardInterrupt):
        run_compare(spec, progress=False, log=lambda _: None)
    monkeypatch.setattr(Trainer, "forward_backward", real)
    plain_dir = tmp_path / "cut" / Trial(Arm(), 1e-2, None, 0).relpath
    plain_summary = (plain_dir / "summary.json").stat().st_mtime_ns

    lines: list[str] = []
    resumed = run_compare(spec, progress=False, log=lines.append)
    assert "already done" in lines[0] and "already done" not in lines[1]
    assert (plain_dir / "summary.json").stat().st_mtime_ns == plain_summary  # finished runs are not re-run
    hc_dir = tmp_path / "cut" / Trial(Arm("mhc", 2), 1e-2, 10.0, 0).relpath
    assert [r["step"] for r in read_metrics(hc_dir) if "loss" in r] == [0, 1, 2, 3]  # one clean curve
    assert json.loads((hc_dir / "summary.json").read_text())["start_step"] == resumed_from
    for a, b in zip(resumed.arms, reference.arms, strict=True):
        assert a.heldout_by_seed == b.heldout_by_seed


def test_a_diverged_setting_is_never_chosen(plain_model, corpus, cache_dir, tmp_path, monkeypatch):
    from hc_retrofit.train.trainer import Trainer

    real = Trainer.forward_backward

    def nan_at_high_lr(self, step):
        loss = real(self, step)
        return math.nan if self.cfg.lr == 1e-2 and step == 2 else loss

    monkeypatch.setattr(Trainer, "forward_backward", nan_at_high_lr)
    spec = tiny_spec(tmp_path / "cmp", plain_model, corpus, cache_dir)
    lines: list[str] = []
    result = run_compare(spec, progress=False, log=lines.append)
    assert sum("diverged" in line for line in lines) == 2
    assert all(a.lr == 3e-4 for a in result.arms)
    assert [g["diverged"] for g in result.grid] == [False, True, False, True]
    assert json.loads((tmp_path / "cmp" / "results.json").read_text())["grid"][1]["validation_loss"] is None
    # a second call reads the divergence back instead of re-running it
    monkeypatch.setattr(Trainer, "forward_backward", real)
    again: list[str] = []
    run_compare(spec, progress=False, log=again.append)
    assert all("already done" in line for line in again)


def test_out_dir_guards(plain_model, corpus, cache_dir, tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    spec = tiny_spec(foreign, plain_model, corpus, cache_dir, lr_grid=(1e-2,))
    with pytest.raises(TrainingError, match="holds no comparison"):
        run_compare(spec, progress=False, log=lambda _: None)

    out = tmp_path / "cmp"
    spec = tiny_spec(out, plain_model, corpus, cache_dir, lr_grid=(1e-2,))
    run_compare(spec, progress=False, log=lambda _: None)
    (out / "notes.txt").write_text("mine")
    other = tiny_spec(out, plain_model, corpus, cache_dir, lr_grid=(1e-2,))
    other.train["max_steps"] = 5
    with pytest.raises(TrainingError, match=r"other settings \(max_steps\)"):
        run_compare(other, progress=False, log=lambda _: None)
    with pytest.raises(TrainingError, match=r"did not write .*\(notes.txt\)"):  # would be lost: refused
        run_compare(other, overwrite=True, progress=False, log=lambda _: None)
    assert (out / "notes.txt").read_text() == "mine"
    (out / "notes.txt").unlink()
    run_compare(other, overwrite=True, progress=False, log=lambda _: None)
    assert json.loads((out / "results.json").read_text())["arms"][0]["tokens"] == 5 * 2 * 32


def test_hc_only_settings_apply_to_the_hc_arms(plain_model, corpus, cache_dir, tmp_path):
    """HC-only warm-up and the HC init reach every HC run; the plain arm runs without them, at the same start."""
    spec = tiny_spec(tmp_path / "cmp", plain_model, corpus, cache_dir, lr_grid=(1e-2,))
    spec.train.update(hc_warmup_steps=2, residual_init_main=0.7)
    plain, hc = (spec.trial_config(Trial(arm, *spec.settings(arm)[0], 0)) for arm in spec.arms)
    assert (plain.hc_warmup_steps, plain.residual_init_main) == (0, None)
    assert (hc.hc_warmup_steps, hc.residual_init_main) == (2, 0.7)
    run_compare(spec, progress=False, log=lambda _: None)
    summaries = {arm.slug: _summary(tmp_path / "cmp", Trial(arm, *spec.settings(arm)[0], 0)) for arm in spec.arms}
    # exact at init with the non-default init: both arms start from the same validation loss
    assert summaries["mhc-n2"]["initial_eval_loss"] == pytest.approx(summaries["plain"]["initial_eval_loss"], abs=1e-5)
    assert summaries["mhc-n2"]["final_eval_loss"] != summaries["plain"]["final_eval_loss"]
    # a bad HC init is refused before anything runs (n = 2: the diagonal must exceed 1/2)
    bad = tiny_spec(tmp_path / "bad", plain_model, corpus, cache_dir)
    bad.train["residual_init_main"] = 0.4
    with pytest.raises(TrainingError, match="residual_init_main must be in"):
        run_compare(bad, progress=False, log=lambda _: None)
    assert not (tmp_path / "bad").exists()


def test_a_comparison_from_before_a_new_train_setting_resumes(plain_model, corpus, cache_dir, tmp_path):
    """A fingerprint without a setting added since (its value: the default) is the same settings, not others."""
    spec = tiny_spec(tmp_path / "cmp", plain_model, corpus, cache_dir, lr_grid=(1e-2,))
    first = run_compare(spec, progress=False, log=lambda _: None)
    marker = tmp_path / "cmp" / "compare.json"
    saved = json.loads(marker.read_text())
    del saved["fingerprint"]["train"]["residual_init_main"]  # as written before the setting existed
    marker.write_text(json.dumps(saved))
    ownership.record(marker.parent, [marker.name])  # as that version wrote it
    lines: list[str] = []
    again = run_compare(spec, progress=False, log=lines.append)
    assert all(line.endswith("(already done)") for line in lines) and again.to_dict() == first.to_dict()
    # a real difference is still named
    spec.train["weight_decay"] = 0.0
    with pytest.raises(TrainingError, match=r"other settings \(weight_decay\)"):
        run_compare(spec, progress=False, log=lambda _: None)


def test_two_compares_on_one_out_dir_are_refused(plain_model, corpus, cache_dir, tmp_path):
    """A live process's lock refuses a second compare; a dead one's is taken over and released."""
    import os
    import subprocess
    import sys

    from hc_retrofit import outputs

    spec = tiny_spec(tmp_path / "cmp", plain_model, corpus, cache_dir, lr_grid=(1e-2,))
    lock = tmp_path / "cmp" / "compare.lock"
    lock.parent.mkdir()
    outputs.write_marker(lock.parent, "compare")  # as a running compare leaves it
    lock.write_text(str(os.getpid()))  # alive: this test
    ownership.record(lock.parent, [lock.name])
    with pytest.raises(TrainingError, match=r"being run by another compare \(process \d+\)"):
        run_compare(spec, progress=False, log=lambda _: None)
    assert "compare.json" not in {p.name for p in lock.parent.iterdir()}  # nothing run or recorded
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock.write_text(done.stdout.strip())  # a process that has exited
    ownership.record(lock.parent, [lock.name])
    result = run_compare(spec, progress=False, log=lambda _: None)
    assert result.arms and not lock.exists()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (dict(variants=("nope",)), "unknown variant"),
        (dict(streams=(1,)), "must be >= 2"),
        (dict(lr_grid=(1e-3, 1e-3)), "repeats a value"),
        (dict(tune_seeds=2), r"tune-seeds must be in \[1, 1\]"),
        (dict(train=dict(lr=1e-3)), "lr is set by compare per run: use --lr-grid"),
        (dict(train=dict(bogus=1)), "unknown setting"),
    ],
)
def test_bad_specs_are_one_clear_error(change, message, tmp_path):
    spec = CompareSpec(model="m", data="d", out=str(tmp_path / "x"), **change)
    with pytest.raises(TrainingError, match=message):
        spec.validate()
    assert not (tmp_path / "x").exists()


def test_an_arm_without_a_shared_eval_step_is_said_not_dropped(tmp_path, caplog):
    from hc_retrofit.compare.outcomes import CurvePoint, TrialOutcome
    from hc_retrofit.compare.report import mean_curve, plot_compare

    def run(arm: Arm, seed: int, steps: list[int]) -> TrialOutcome:
        curve = [CurvePoint(s, 100 * s, 1.0 * s, 2.0, 3.0 - 0.1 * s) for s in [0, *steps]]
        return TrialOutcome(Trial(arm, 1e-3, None, seed), "x", 2.0, 2.9, curve=curve)

    plain, hc = Arm(), Arm("mhc", 4)
    curves = {plain.name: [run(plain, 0, [2, 4]), run(plain, 1, [2, 4])], hc.name: [run(hc, 0, [2]), run(hc, 1, [3])]}
    assert [p[0] for p in mean_curve(curves[plain.name])] == [200, 400]
    assert mean_curve(curves[hc.name]) == []  # its seeds share no eval step after 0
    with caplog.at_level("WARNING", logger="hc_retrofit"):
        png = plot_compare(curves, tmp_path / "compare.png")
    assert png.is_file()
    assert any(
        "mhc n=4 is not plotted (no eval step after 0 shared by its 2 run(s))" in r.message for r in caplog.records
    )
