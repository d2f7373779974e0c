"""The continued-pretraining loop on accelerate (one process, DDP, FSDP; CPU or GPU).

Per optimiser step: ``grad_accum`` micro-batches (gradient sync only on the last), the loss is
averaged over micro-batches and processes, a non-finite loss or gradient norm stops the run
*before* the weights change, gradients are clipped, AdamW steps, the schedule steps once.

Step numbering: the row for step ``k`` reports the loss of the weights after ``k`` updates, on
batch ``k``; step 0 is therefore the model as loaded, and for a fresh retrofit its loss is the
base model's loss (the conversion is exact: no spike). Eval runs at step 0, every
``eval_every`` steps and at the end.

Only the main process writes files (metrics, plot, final model); checkpoints are collective
(each process saves its own RNG state, FSDP shards). The data order is a pure function of the
seed and the step (:class:`~hc_retrofit.train.data.BatchSchedule`), so ``--resume`` reproduces
the uninterrupted run.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from hc_retrofit import outputs, ownership
from hc_retrofit.log import get_logger
from hc_retrofit.modeling.patch import hyper_connection_sites, is_converted
from hc_retrofit.train import checkpoint as ckpt
from hc_retrofit.train.compile import compile_layers
from hc_retrofit.train.data import BatchSchedule, PackedData, build_data, eval_shards
from hc_retrofit.train.errors import NonFiniteLossError, TrainingError
from hc_retrofit.train.launch_check import warn_if_alone
from hc_retrofit.train.metrics import METRICS_FILE, MetricsLog, plot_losses, read_metrics
from hc_retrofit.train.model import load_model, prepare_model, resolve_dtype, save_final
from hc_retrofit.train.optim import build_optimizer, build_scheduler, drop_base_gradients, group_lrs
from hc_retrofit.train.progress import TrainProgress
from hc_retrofit.train.recipe import TrainConfig

log = get_logger(__name__)

FINAL_DIR = "final"
PLOT_FILE = "loss.png"
SUMMARY_FILE = "summary.json"
RUN_CLAIMS = (FINAL_DIR, f"{ckpt.CHECKPOINTS}/step-*")
"""What a run writes beside its files (the manifest vouches for their staging and lock files too)."""


@dataclass
class TrainResult:
    """What a finished run produced (also written to ``OUT/summary.json``)."""

    out_dir: str
    final_dir: str | None
    hc: bool
    steps: int
    start_step: int
    num_processes: int
    tokens_per_step: int
    step0_loss: float | None
    last_loss: float | None
    initial_eval_loss: float | None
    final_eval_loss: float | None
    tokens_per_s: float
    train_seconds: float
    plot: str | None
    final_heldout_loss: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def make_accelerator(cfg: TrainConfig, out_dir: Path) -> Any:
    """An ``Accelerator`` for this run: CPU/gloo when there is no GPU, bf16 when the GPU has it."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import ProjectConfiguration

    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if not distributed:  # in-process runs (demo, tests) may each want other settings
        AcceleratorState._reset_state(reset_partial_state=True)
    # Without a GPU, `accelerate launch --multi_gpu` needs cpu=True to form a gloo group (else each
    # process runs alone and all of them act as the main process).
    cpu = cfg.cpu or (distributed and not torch.cuda.is_available())
    return Accelerator(
        cpu=cpu,
        mixed_precision=resolve_mixed_precision(cfg.mixed_precision, cpu=cpu),
        log_with=(cfg.report_to or None),
        project_config=ProjectConfiguration(project_dir=str(out_dir), logging_dir=str(out_dir / "logs")),
        step_scheduler_with_optimizer=False,  # our schedule counts optimiser steps, not process-steps
    )


def resolve_mixed_precision(name: str, *, cpu: bool = False) -> str | None:
    """``auto``: the launcher's setting if any, else bf16 on a GPU that supports it, else none."""
    if name != "auto":
        return name
    if os.environ.get("ACCELERATE_MIXED_PRECISION"):
        return None  # accelerate reads it from the environment (accelerate launch / config file)
    if not cpu and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16"
    return "no"


def _check_fsdp_dtype(cfg: TrainConfig, accelerator: Any) -> None:
    """FSDP shards parameters in units of one dtype; HC parameters are float32, so the rest must be too.

    With float32 master weights the FSDP mixed-precision policy (``mixed_precision: bf16``) still
    computes in bf16, so nothing is lost; a bf16-loaded model would mix dtypes inside a unit.
    """
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.FSDP and resolve_dtype(cfg.model_dtype) != torch.float32:
        raise TrainingError(
            "under FSDP load the model in float32 (model_dtype: float32): HC parameters are float32 and an FSDP "
            "unit holds one dtype; FSDP's mixed precision (mixed_precision: bf16) still computes in bf16"
        )


def _prepare_out_dir(cfg: TrainConfig, out: Path, accelerator: Any) -> Path | None:
    """Check ``out`` before anything is loaded; with ``--overwrite``, set the old run aside (not delete it).

    Returns where an overwritten run was moved (it is removed only once the new run is complete).
    """
    if out.is_dir() and any(out.iterdir()) and not (cfg.resume or cfg.overwrite):
        raise TrainingError(f"{out} exists and is not empty: pass --resume to continue that run or --overwrite")
    outputs.check_output_dir(out, overwrite=cfg.overwrite, resume=cfg.resume, inputs=[cfg.model, cfg.data])
    if cfg.resume:
        _check_resumable(cfg, out)
    replace = cfg.overwrite and out.is_dir() and any(out.iterdir())
    aside = None
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if replace:
            outputs.clean_leftovers(out)
            aside = outputs.set_aside(out)
        ownership.adopt_dir(out, "run")
        ownership.claim(out, RUN_CLAIMS)
    accelerator.wait_for_everyone()
    return aside


def _completed_steps(out: Path) -> int | None:
    """Steps of the finished run in ``out`` (its ``summary.json``), or ``None``."""
    import json

    try:
        return int(json.loads((out / SUMMARY_FILE).read_text())["steps"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _check_resumable(cfg: TrainConfig, out: Path) -> None:
    """``--resume`` never restarts or shortens a run: refuse when there is nothing to continue."""
    if not out.is_dir() or not any(p.name != outputs.MARKER for p in out.iterdir()):
        return  # nothing there yet: a fresh start loses nothing
    done = _completed_steps(out)
    found = ckpt.latest_checkpoint(out)
    if done is not None and done >= cfg.max_steps:
        raise TrainingError(
            f"the run in {out} is complete ({done} steps): nothing to resume; pass a larger --max-steps to "
            "train on from its last checkpoint, or choose a new --out"
        )
    if found is None:
        if done is not None:
            raise TrainingError(
                f"the run in {out} is complete ({done} steps) and kept no checkpoint (save_every 0) to continue "
                "from; start a new run in another --out"
            )
        raise TrainingError(
            f"nothing to resume in {out}: it has no complete checkpoint; pass --overwrite to start over"
        )
    step, path = found
    if step >= cfg.max_steps:
        raise TrainingError(
            f"the newest checkpoint {path} is at step {step}, not below --max-steps {cfg.max_steps}: resuming would "
            f"save later weights as a shorter run; pass --max-steps > {step}"
        )


def _check_checkpoint_matches(state: dict[str, Any], model: nn.Module, cfg: TrainConfig, path: Path) -> list[str]:
    """Refuse a checkpoint of another model shape; return warnings for settings that only change the run."""
    hc_cfg = getattr(model, "hc_config", None)
    now = {
        "hc": hc_cfg is not None,
        "streams": getattr(hc_cfg, "num_streams", None),
        "variant": getattr(hc_cfg, "variant", None),
    }
    for key, value in now.items():
        if key in state and state[key] != value:
            raise TrainingError(
                f"--resume: checkpoint {path} was trained with {key}={state[key]}, this run has {key}={value}; "
                "use the same settings, or --overwrite / a new --out for a new run"
            )
    warnings = []
    if "seed" in state and state["seed"] != cfg.seed:
        warnings.append(f"the checkpoint was trained with seed {state['seed']}, now {cfg.seed}: the data order differs")
    return warnings


@torch.no_grad()
def evaluate(
    model: nn.Module, data: PackedData, cfg: TrainConfig, accelerator: Any, split: str = "eval"
) -> float | None:
    """Mean next-token loss over the ``split`` blocks (``eval`` or ``heldout``; at most ``eval_batches`` per process)."""
    blocks = getattr(data, split)
    if blocks is None:
        return None
    n = len(blocks)
    if cfg.eval_batches:
        n = min(n, cfg.eval_batches * cfg.batch_size * accelerator.num_processes)
    was_training = model.training
    model.eval()
    total = torch.zeros(2, device=accelerator.device, dtype=torch.float64)
    for idx, weights in eval_shards(
        n, cfg.batch_size, world_size=accelerator.num_processes, rank=accelerator.process_index
    ):
        x = blocks[idx]["input_ids"].to(accelerator.device)
        logits = model(input_ids=x).logits.float()
        per_token = F.cross_entropy(logits[:, :-1].flatten(0, 1), x[:, 1:].flatten(), reduction="none")
        per_sample = per_token.view(x.shape[0], -1).mean(dim=1).double()
        w = torch.tensor(weights, device=accelerator.device, dtype=torch.float64)
        total += torch.stack([(per_sample * w).sum(), w.sum()])
    total = accelerator.reduce(total, reduction="sum")
    model.train(was_training)
    return float(total[0] / total[1])


def train(cfg: TrainConfig, *, model: nn.Module | None = None, tokenizer: Any = None) -> TrainResult:
    """Run continued pretraining as ``cfg`` says; ``model``/``tokenizer`` override ``cfg.model``.

    Raises:
        TrainingError: bad settings, data or output directory.
        NonFiniteLossError: the loss diverged; the last good checkpoint is kept.
    """
    cfg.validate()
    out = Path(cfg.out).expanduser().resolve()
    accelerator = make_accelerator(cfg, out)
    warn_if_alone(accelerator.num_processes)
    _check_fsdp_dtype(cfg, accelerator)
    existed = out.exists()
    lock = ownership.output_lock(out) if accelerator.is_main_process else contextlib.nullcontext()
    with lock:  # a second writer of this run (another train --resume) is refused
        return _train_locked(cfg, out, accelerator, model, tokenizer, existed)


def _train_locked(
    cfg: TrainConfig, out: Path, accelerator: Any, model: nn.Module | None, tokenizer: Any, existed: bool
) -> TrainResult:
    """:func:`train` while holding the run directory's lock."""
    aside = _prepare_out_dir(cfg, out, accelerator)
    try:
        result = _train_in(cfg, out, accelerator, model, tokenizer)
    except BaseException:
        if aside is not None and accelerator.is_main_process:
            _after_failed_overwrite(out, aside, accelerator)
        elif accelerator.is_main_process:
            _after_failed_start(out, existed=existed)
        raise
    if aside is not None and accelerator.is_main_process:
        shutil.rmtree(aside, ignore_errors=True)  # the new run is complete: now the old one may go
    return result


def _after_failed_start(out: Path, *, existed: bool) -> None:
    """A run that failed before writing anything but the marker leaves no trace (and no directory it made)."""
    if [p.name for p in out.iterdir()] != [outputs.MARKER]:
        return  # it wrote something (metrics, checkpoints) worth reading or resuming
    (out / outputs.MARKER).unlink()
    if not existed:
        out.rmdir()


def _after_failed_overwrite(out: Path, aside: Path, accelerator: Any) -> None:
    """An ``--overwrite`` run failed: put the old run back unless the new one has a checkpoint to resume."""
    if ckpt.latest_checkpoint(out) is None:
        shutil.rmtree(out, ignore_errors=True)  # ours, just created, nothing worth keeping
        os.rename(aside, out)
        accelerator.print(f"the run failed; the previous contents of {out} are back in place")
    else:
        accelerator.print(f"the run failed; its checkpoints are in {out}, the run it replaced is kept in {aside}")


def _train_in(cfg: TrainConfig, out: Path, accelerator: Any, model: nn.Module | None, tokenizer: Any) -> TrainResult:
    """The run itself, in the prepared ``out``."""
    main = accelerator.is_main_process
    world, rank = accelerator.num_processes, accelerator.process_index

    if model is None:
        model, loaded_tokenizer = load_model(cfg)
        tokenizer = tokenizer or loaded_tokenizer
    model = prepare_model(cfg, model, tokenizer)
    if cfg.compile:  # regional: each decoder layer, in place, before accelerate wraps the model
        compile_layers(model, backend=cfg.compile_backend)
    hc = is_converted(model)
    with accelerator.main_process_first():  # the main process tokenises; the others load its cache
        data = build_data(
            cfg.data,
            tokenizer,
            cfg.block_size,
            eval_fraction=cfg.eval_fraction,
            heldout_fraction=cfg.heldout_fraction,
            text_column=cfg.text_column,
            config_name=cfg.dataset_config,
            split=cfg.dataset_split,
            cache_dir=cfg.cache_dir,
            progress=main and bool(cfg.progress),
        )
    schedule = BatchSchedule(len(data.train), cfg.batch_size, seed=cfg.seed, world_size=world, rank=rank)
    tokens_per_step = cfg.batch_size * cfg.block_size * cfg.grad_accum * world

    torch.manual_seed(cfg.seed)
    optimizer = build_optimizer(
        model,
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
        hc_lr_multiplier=cfg.hc_lr_multiplier,
        betas=(cfg.beta1, cfg.beta2),
    )
    scheduler = build_scheduler(
        optimizer, warmup_steps=cfg.warmup_steps, max_steps=cfg.max_steps, min_lr_ratio=cfg.min_lr_ratio
    )
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)

    start_step, last_ckpt = 0, None
    if cfg.resume:
        start_step, last_ckpt = _load_latest(cfg, out, model, accelerator)
    metrics = MetricsLog(out / METRICS_FILE, enabled=main, resume_step=start_step if cfg.resume else None)
    if main:
        ownership.record(out, [], append=[METRICS_FILE])
    if cfg.report_to:
        accelerator.init_trackers("hc-retrofit", config=_tracker_config(cfg))

    hc_cfg = getattr(accelerator.unwrap_model(model), "hc_config", None)
    ckpt_state = {
        "num_processes": world,
        "batch_size": cfg.batch_size,
        "seed": cfg.seed,
        "hc": hc,
        "streams": getattr(hc_cfg, "num_streams", None),
        "variant": getattr(hc_cfg, "variant", None),
    }
    step0_loss = last_loss = initial_eval = final_eval = final_heldout = None
    train_seconds, trained_tokens = 0.0, 0

    def log(row: dict[str, Any]) -> None:
        metrics.write(row)
        if cfg.report_to:
            accelerator.log({k: v for k, v in row.items() if k != "step" and v is not None}, step=row["step"])

    def run_eval(step: int) -> float | None:
        nonlocal final_heldout
        value = evaluate(model, data, cfg, accelerator)
        if value is not None:
            row = {"step": step, "eval_loss": value, "eval_ppl": math.exp(min(value, 50.0))}
            final_heldout = evaluate(model, data, cfg, accelerator, "heldout")
            if final_heldout is not None:
                row["heldout_loss"] = final_heldout
            log(row)
        return value

    model.train()
    progress = TrainProgress(cfg.max_steps, start_step, enabled=main and cfg.progress, lines=main, hc=hc)
    with progress:
        for step in range(start_step, cfg.max_steps):
            if cfg.eval_every and step % cfg.eval_every == 0:
                value = run_eval(step)
                if step == 0:
                    initial_eval = value
                progress.note_eval(step, value)
            t0 = time.perf_counter()
            loss = _forward_backward(model, data, schedule, step, cfg, accelerator)
            if not math.isfinite(loss):
                _stop(accelerator, metrics, step, f"non-finite loss ({loss})", last_ckpt, cfg)
            if step < cfg.hc_warmup_steps:
                drop_base_gradients(optimizer)
            grad_norm = float(accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm or math.inf))
            if not math.isfinite(grad_norm) and accelerator.mixed_precision != "fp16":
                _stop(accelerator, metrics, step, f"non-finite gradient norm ({grad_norm})", last_ckpt, cfg)
            lrs = group_lrs(optimizer)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            dt = time.perf_counter() - t0
            train_seconds += dt
            trained_tokens += tokens_per_step
            if step == 0:
                step0_loss = loss
            last_loss = loss
            if step % cfg.log_every == 0 or step == cfg.max_steps - 1:
                row = {
                    "step": step,
                    "loss": loss,
                    "lr": lrs.get("base/decay", lrs.get("base/no_decay")),
                    "grad_norm": grad_norm,
                    "tokens": (step + 1) * tokens_per_step,
                    "tokens_per_s": tokens_per_step / dt,
                }
                if "hc" in lrs:
                    row["hc_lr"] = lrs["hc"]
                log(row)
            progress.update(step + 1, loss, tokens_per_step / dt)
            if cfg.save_every and (step + 1) % cfg.save_every == 0 and step + 1 < cfg.max_steps:
                if not _weights_finite(model, accelerator):
                    _stop(accelerator, metrics, step, "non-finite weights after the update", last_ckpt, cfg)
                last_ckpt = ckpt.save_checkpoint(
                    accelerator, out, step + 1, ckpt_state, keep=cfg.keep_checkpoints, models=[model]
                )
                if main:
                    ownership.record(out, [ckpt.CHECKPOINTS], append=[METRICS_FILE])
        if data.eval is not None:
            final_eval = run_eval(cfg.max_steps)
            progress.note_eval(cfg.max_steps, final_eval)

    if not _weights_finite(model, accelerator):
        _stop(accelerator, metrics, cfg.max_steps - 1, "non-finite weights after the update", last_ckpt, cfg)
    final_dir = _save_model(accelerator, model, tokenizer, out, cfg, hc)
    plot = None
    if main:
        plot = str(plot_losses({"HC" if hc else "plain": read_metrics(out)}, out / PLOT_FILE))
    if cfg.report_to:
        accelerator.end_training()
    result = TrainResult(
        out_dir=str(out),
        final_dir=str(final_dir) if final_dir else None,
        hc=hc,
        steps=cfg.max_steps,
        start_step=start_step,
        num_processes=world,
        tokens_per_step=tokens_per_step,
        step0_loss=step0_loss,
        last_loss=last_loss,
        initial_eval_loss=initial_eval,
        final_eval_loss=final_eval,
        tokens_per_s=trained_tokens / train_seconds if train_seconds else 0.0,
        train_seconds=train_seconds,
        plot=plot,
        final_heldout_loss=final_heldout,
    )
    if main:
        import json

        (out / SUMMARY_FILE).write_text(json.dumps(result.to_dict(), indent=2))
        written = [SUMMARY_FILE, FINAL_DIR, ckpt.CHECKPOINTS, *([PLOT_FILE] if plot else [])]
        ownership.record(out, [n for n in written if (out / n).exists()], append=[METRICS_FILE])
    accelerator.wait_for_everyone()
    return result


def _load_latest(cfg: TrainConfig, out: Path, model: nn.Module, accelerator: Any) -> tuple[int, Path | None]:
    """Load the newest intact checkpoint (an unreadable one is skipped with a warning); return its step."""
    found = ckpt.list_checkpoints(out)
    if not found:
        accelerator.print(f"--resume: {out} holds no run yet, starting at step 0")
        return 0, None
    for step, path in reversed(found):
        state = ckpt.read_state(path)
        warnings = _check_checkpoint_matches(state, accelerator.unwrap_model(model), cfg, path)
        if state.get("num_processes") != accelerator.num_processes or state.get("batch_size") != cfg.batch_size:
            warnings.append(
                f"the checkpoint was written with {state.get('num_processes')} process(es) x batch "
                f"{state.get('batch_size')}; now {accelerator.num_processes} x {cfg.batch_size}: the data order differs"
            )
        for warning in warnings if accelerator.is_main_process else ():
            log.warning(warning)
        try:
            accelerator.load_state(str(path))
        except Exception as err:  # a damaged checkpoint: fall back to the one before it
            if accelerator.is_main_process:
                log.warning(f"checkpoint {path} cannot be loaded ({type(err).__name__}: {err}); trying an older one")
            continue
        accelerator.print(f"resuming from {path} (step {step})")
        return step, path
    raise TrainingError(
        f"--resume: no checkpoint in {out / ckpt.CHECKPOINTS} can be loaded; pass --overwrite to start over"
    )


@torch.no_grad()
def _weights_finite(model: nn.Module, accelerator: Any) -> bool:
    """Whether every parameter (every process's shard) is finite: checked before anything is saved."""
    bad = torch.zeros((), device=accelerator.device)
    for p in model.parameters():
        local = p.to_local() if hasattr(p, "to_local") else p
        bad += (~torch.isfinite(local)).any().float()
    return float(accelerator.reduce(bad, reduction="sum")) == 0.0


def _forward_backward(
    model: nn.Module, data: PackedData, schedule: BatchSchedule, step: int, cfg: TrainConfig, accelerator: Any
) -> float:
    """Accumulate gradients of one optimiser step; return the loss averaged over micro-batches and processes."""
    total = torch.zeros((), device=accelerator.device)
    for micro in range(cfg.grad_accum):
        x = data.train[schedule.indices(step * cfg.grad_accum + micro)]["input_ids"].to(accelerator.device)
        last = micro == cfg.grad_accum - 1
        with contextlib.nullcontext() if last else accelerator.no_sync(model):
            loss = model(input_ids=x, labels=x).loss
            accelerator.backward(loss / cfg.grad_accum)
        total += loss.detach().float()
    return float(accelerator.reduce(total / cfg.grad_accum, reduction="mean"))


def _stop(
    accelerator: Any, metrics: MetricsLog, step: int, what: str, last_ckpt: Path | None, cfg: TrainConfig
) -> None:
    metrics.write({"step": step, "loss": None, "error": what})
    if cfg.report_to:
        accelerator.end_training()
    where = (
        f"the last good checkpoint is {last_ckpt} (continue with --resume)"
        if last_ckpt
        else "no checkpoint was written yet"
    )
    raise NonFiniteLossError(
        f"{what} at step {step}: stopped before updating the weights; {where}. "
        "Lower --lr or --hc-lr-multiplier, or keep --max-grad-norm clipping on.",
        step=step,
        last_checkpoint=str(last_ckpt) if last_ckpt else None,
    )


def _save_model(
    accelerator: Any, model: nn.Module, tokenizer: Any, out: Path, cfg: TrainConfig, hc: bool
) -> Path | None:
    """Write ``OUT/final`` (converted format, or ``save_pretrained`` for ``--no-hc``) from the main process.

    Under FSDP the full state dict is gathered first (collective) and loaded into an unsharded
    CPU copy of the model, which is what gets saved.
    """
    from accelerate.utils import DistributedType

    accelerator.wait_for_everyone()
    metadata = {"training": {k: v for k, v in _tracker_config(cfg).items() if k not in ("out", "cache_dir")}}
    if accelerator.distributed_type == DistributedType.FSDP:
        state_dict = accelerator.get_state_dict(model)
        unwrapped = (
            _unsharded_copy(accelerator.unwrap_model(model), state_dict) if accelerator.is_main_process else None
        )
    else:
        unwrapped = accelerator.unwrap_model(model)
    final = out / FINAL_DIR
    if accelerator.is_main_process:
        if cfg.grad_checkpointing:
            getattr(unwrapped, "activation_checkpointing_disable", unwrapped.gradient_checkpointing_disable)()
        unwrapped.config.use_cache = True
        save_final(unwrapped, tokenizer, final, metadata=metadata)
    accelerator.wait_for_everyone()
    return final


def _unsharded_copy(sharded: nn.Module, state_dict: dict[str, torch.Tensor]) -> nn.Module:
    """A CPU model with ``sharded``'s structure (incl. hyper-connections) holding ``state_dict``.

    A model converted on the fly has the plain class: its sites are rebuilt from the structure its
    config records (the one it was converted with, proven or discovered), never looked up anew.
    """
    from hc_retrofit.modeling.families import recorded_family
    from hc_retrofit.modeling.patch import apply_family

    model = type(sharded)._from_config(sharded.config, dtype=torch.float32)
    if hyper_connection_sites(sharded) and not hyper_connection_sites(model):
        family = recorded_family(sharded.config)
        if family is None:
            raise TrainingError("the trained model records no hyper-connection structure; cannot gather it to save")
        apply_family(model, sharded.hc_config, family=family)  # the structure proven at conversion
    model.load_state_dict(state_dict, strict=True)
    return model


def _tracker_config(cfg: TrainConfig) -> dict[str, Any]:
    """The run's settings as scalars (what trackers accept)."""
    return {k: (",".join(v) if isinstance(v, list) else v) for k, v in cfg.to_dict().items() if v is not None}
