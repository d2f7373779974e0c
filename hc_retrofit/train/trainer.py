"""The training loop: a :class:`Trainer` with ``train_step``, ``evaluate`` and ``save_checkpoint``.

Per optimiser step: ``grad_accum`` micro-batches (gradient sync only on the last), the loss is
averaged over micro-batches and processes, a non-finite loss or gradient norm stops the run
*before* the weights change, gradients are clipped, AdamW steps, the schedule steps once.

Step numbering: the row for step ``k`` reports the loss of the weights after ``k`` updates, on
batch ``k``; step 0 is therefore the model as loaded, and for a fresh retrofit its loss is the
base model's loss (the conversion is exact: no spike). Eval runs at step 0, every
``eval_every`` steps and at the end. A checkpoint is saved every ``save_every`` steps and at
the end, so ``--resume --max-steps N`` continues a finished run from its last step.

Only the main process writes files; checkpoints are collective (each process saves its own RNG
state, FSDP shards). The data order is a pure function of the seed and the step
(:class:`~hc_retrofit.train.data.BatchSchedule`), so ``--resume`` reproduces the uninterrupted run.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from hc_retrofit.log import get_logger
from hc_retrofit.outputs import honour_umask
from hc_retrofit.train import checkpoint as ckpt
from hc_retrofit.train.data import BatchSchedule, PackedData, data_fingerprint, eval_shards
from hc_retrofit.train.errors import NonFiniteLossError, TrainingError
from hc_retrofit.train.fsdp_precision import shard_hyper_connections
from hc_retrofit.train.metrics import MetricsLog
from hc_retrofit.train.optim import build_optimizer, build_scheduler, drop_base_gradients, group_lrs
from hc_retrofit.train.progress import TrainProgress
from hc_retrofit.train.recipe import TrainConfig
from hc_retrofit.train.run_dir import RunDirectory

log = get_logger(__name__)


@dataclass
class StepStats:
    """What one optimiser step measured."""

    loss: float
    grad_norm: float
    lrs: dict[str, float]
    seconds: float


class Trainer:
    """Trains a prepared (converted, or plain for ``--no-hc``) model on packed data, as ``cfg`` says."""

    def __init__(self, cfg: TrainConfig, accelerator: Any, run: RunDirectory, model: nn.Module, data: PackedData):
        self.cfg, self.accelerator, self.run, self.data = cfg, accelerator, run, data
        world, rank = accelerator.num_processes, accelerator.process_index
        if cfg.batch_size * world > len(data.train):
            raise TrainingError(
                f"--batch-size {cfg.batch_size} (x {world} processes) is larger than the {len(data.train)} training "
                f"blocks of {cfg.block_size} tokens in the data; pass --batch-size {max(1, len(data.train) // world)} "
                "or less"
            )
        self.schedule = BatchSchedule(len(data.train), cfg.batch_size, seed=cfg.seed, world_size=world, rank=rank)
        self.tokens_per_step = cfg.batch_size * cfg.block_size * cfg.grad_accum * world
        torch.manual_seed(cfg.seed)
        shard_hyper_connections(accelerator, model)  # FSDP2: HC in a float32 unit, before the optimiser sees it
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
        self.model, self.optimizer, self.scheduler = accelerator.prepare(model, optimizer, scheduler)
        hc_cfg = getattr(accelerator.unwrap_model(self.model), "hc_config", None)
        self.hc = hc_cfg is not None
        self.checkpoint_state = {
            "num_processes": world,
            "batch_size": cfg.batch_size,
            "seed": cfg.seed,
            "hc": self.hc,
            "streams": getattr(hc_cfg, "num_streams", None),
            "variant": getattr(hc_cfg, "variant", None),
            "data": data_fingerprint(cfg.data),
        }
        self.start_step, self.last_checkpoint = 0, None
        self.step0_loss = self.last_loss = self.initial_eval = self.final_eval = self.final_heldout = None
        self.train_seconds, self.trained_tokens = 0.0, 0
        self.metrics: MetricsLog | None = None

    # the loop -------------------------------------------------------------------------------

    def fit(self) -> None:
        """Train from the start (or the checkpoint ``--resume`` finds) to ``max_steps``; save a checkpoint at the end."""
        cfg, main = self.cfg, self.accelerator.is_main_process
        if cfg.resume:
            self.start_step, self.last_checkpoint = self.resume()
        self.metrics = MetricsLog(self.run.metrics, enabled=main, resume_step=self.start_step if cfg.resume else None)
        self.run.record()
        self.model.train()
        progress = TrainProgress(cfg.max_steps, self.start_step, enabled=main and cfg.progress, lines=main, hc=self.hc)
        with progress:
            for step in range(self.start_step, cfg.max_steps):
                if cfg.eval_every and step % cfg.eval_every == 0:
                    progress.note_eval(step, self.validate(step))
                stats = self.train_step(step)
                self.log_step(step, stats)
                progress.update(step + 1, stats.loss, self.tokens_per_step / stats.seconds)
                if cfg.save_every and (step + 1) % cfg.save_every == 0 and step + 1 < cfg.max_steps:
                    self.save_checkpoint(step + 1)
            if self.data.eval is not None:
                progress.note_eval(cfg.max_steps, self.validate(cfg.max_steps))
        if self.start_step < cfg.max_steps:
            self.save_checkpoint(cfg.max_steps)

    def train_step(self, step: int) -> StepStats:
        """One optimiser step; stops the run (before the update) on a non-finite loss or gradient norm."""
        t0 = time.perf_counter()
        loss = self.forward_backward(step)
        if not math.isfinite(loss):
            self.stop(step, f"non-finite loss ({loss})")
        if step < self.cfg.hc_warmup_steps:
            drop_base_gradients(self.optimizer)
        grad_norm = float(self.accelerator.clip_grad_norm_(self.model.parameters(), self.cfg.max_grad_norm or math.inf))
        if not math.isfinite(grad_norm) and self.accelerator.mixed_precision != "fp16":
            self.stop(step, f"non-finite gradient norm ({grad_norm})")
        lrs = group_lrs(self.optimizer)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        seconds = time.perf_counter() - t0
        self.train_seconds += seconds
        self.trained_tokens += self.tokens_per_step
        if step == 0:
            self.step0_loss = loss
        self.last_loss = loss
        return StepStats(loss, grad_norm, lrs, seconds)

    def forward_backward(self, step: int) -> float:
        """Accumulate the gradients of one step; return the loss averaged over micro-batches and processes."""
        cfg, accelerator = self.cfg, self.accelerator
        total = torch.zeros((), device=accelerator.device)
        for micro in range(cfg.grad_accum):
            index = self.schedule.indices(step * cfg.grad_accum + micro)
            x = self.data.train[index]["input_ids"].to(accelerator.device)
            last = micro == cfg.grad_accum - 1
            with contextlib.nullcontext() if last else accelerator.no_sync(self.model):
                loss = self.model(input_ids=x, labels=x).loss
                accelerator.backward(loss / cfg.grad_accum)
            total += loss.detach().float()
        return float(accelerator.reduce(total / cfg.grad_accum, reduction="mean"))

    # evaluation -----------------------------------------------------------------------------

    def validate(self, step: int) -> float | None:
        """Evaluate on the eval (and held-out) split and log the row; return the eval loss."""
        value = self.evaluate("eval")
        if value is None:
            return None
        row = {"step": step, "eval_loss": value, "eval_ppl": math.exp(min(value, 50.0))}
        self.final_heldout = self.evaluate("heldout")
        if self.final_heldout is not None:
            row["heldout_loss"] = self.final_heldout
        self.log(row)
        if step == 0:
            self.initial_eval = value
        self.final_eval = value
        return value

    @torch.no_grad()
    def evaluate(self, split: str = "eval") -> float | None:
        """Mean next-token loss over the ``split`` blocks (at most ``eval_batches`` per process)."""
        blocks, cfg, accelerator = getattr(self.data, split), self.cfg, self.accelerator
        if blocks is None:
            return None
        n = len(blocks)
        if cfg.eval_batches:
            n = min(n, cfg.eval_batches * cfg.batch_size * accelerator.num_processes)
        was_training = self.model.training
        self.model.eval()
        total = torch.zeros(2, device=accelerator.device, dtype=torch.float64)
        world, rank = accelerator.num_processes, accelerator.process_index
        for idx, weights in eval_shards(n, cfg.batch_size, world_size=world, rank=rank):
            x = blocks[idx]["input_ids"].to(accelerator.device)
            logits = self.model(input_ids=x).logits.float()
            per_token = F.cross_entropy(logits[:, :-1].flatten(0, 1), x[:, 1:].flatten(), reduction="none")
            per_sample = per_token.view(x.shape[0], -1).mean(dim=1).double()
            w = torch.tensor(weights, device=accelerator.device, dtype=torch.float64)
            total += torch.stack([(per_sample * w).sum(), w.sum()])
        total = accelerator.reduce(total, reduction="sum")
        self.model.train(was_training)
        return float(total[0] / total[1])

    # bookkeeping ----------------------------------------------------------------------------

    def log(self, row: dict[str, Any]) -> None:
        self.metrics.write(row)
        if self.cfg.report_to:
            self.accelerator.log({k: v for k, v in row.items() if k != "step" and v is not None}, step=row["step"])

    def log_step(self, step: int, stats: StepStats) -> None:
        if step % self.cfg.log_every and step != self.cfg.max_steps - 1:
            return
        row = {
            "step": step,
            "loss": stats.loss,
            "lr": stats.lrs.get("base/decay", stats.lrs.get("base/no_decay")),
            "grad_norm": stats.grad_norm,
            "tokens": (step + 1) * self.tokens_per_step,
            "tokens_per_s": self.tokens_per_step / stats.seconds,
        }
        if "hc" in stats.lrs:
            row["hc_lr"] = stats.lrs["hc"]
        self.log(row)

    def save_checkpoint(self, step: int) -> Path:
        """Save the full training state after ``step`` updates (never from non-finite weights). Collective."""
        if not self.weights_finite():
            self.stop(step - 1, "non-finite weights after the update")
        self.last_checkpoint = ckpt.save_checkpoint(
            self.accelerator,
            self.run.path,
            step,
            self.checkpoint_state,
            keep=self.cfg.keep_checkpoints,
            models=[self.accelerator.unwrap_model(self.model)],  # the names save_state writes
        )
        if self.accelerator.is_main_process:
            honour_umask(self.last_checkpoint)  # accelerate writes its weights as 0600
        self.run.record(ckpt.CHECKPOINTS)
        return self.last_checkpoint

    def resume(self) -> tuple[int, Path | None]:
        """Load the newest loadable checkpoint of the run (a damaged one is skipped); return its step."""
        found = ckpt.list_checkpoints(self.run.path)
        if not found:
            self.accelerator.print(f"--resume: {self.run.path} holds no run yet, starting at step 0")
            return 0, None
        for step, path in reversed(found):
            for warning in self._resume_warnings(ckpt.read_state(path), path):
                if self.accelerator.is_main_process:
                    log.warning(warning)
            try:
                self.accelerator.load_state(str(path))
            except Exception as err:  # a damaged checkpoint: fall back to the one before it
                if self.accelerator.is_main_process:
                    log.warning(
                        f"checkpoint {path} cannot be loaded ({type(err).__name__}: {err}); trying an older one"
                    )
                continue
            self.accelerator.print(f"resuming from {path} (step {step})")
            return step, path
        raise TrainingError(
            f"--resume: no checkpoint in {self.run.path / ckpt.CHECKPOINTS} can be loaded; pass --overwrite to start over"
        )

    def _resume_warnings(self, state: dict[str, Any], path: Path) -> list[str]:
        """Refuse a checkpoint of another model shape; return warnings for settings that only change the run."""
        now = {k: self.checkpoint_state[k] for k in ("hc", "streams", "variant")}
        for key, value in now.items():
            if key in state and state[key] != value:
                raise TrainingError(
                    f"--resume: checkpoint {path} was trained with {key}={state[key]}, this run has {key}={value}; "
                    "use the same settings, or --overwrite / a new --out for a new run"
                )
        warnings = []
        if "data" in state and state["data"] != self.checkpoint_state["data"]:
            warnings.append(
                f"--data differs from the data the checkpoint was trained on ({state['data']['name']}, sha256 "
                f"{str(state['data']['sha256'])[:12]}): the run continues on the new data"
            )
        if "seed" in state and state["seed"] != self.cfg.seed:
            warnings.append(
                f"the checkpoint was trained with seed {state['seed']}, now {self.cfg.seed}: the data order differs"
            )
        world = self.accelerator.num_processes
        if state.get("num_processes") != world or state.get("batch_size") != self.cfg.batch_size:
            warnings.append(
                f"the checkpoint was written with {state.get('num_processes')} process(es) x batch "
                f"{state.get('batch_size')}; now {world} x {self.cfg.batch_size}: the data order differs"
            )
        return warnings

    @torch.no_grad()
    def weights_finite(self) -> bool:
        """Whether every parameter (every process's shard) is finite: checked before anything is saved."""
        bad = torch.zeros((), device=self.accelerator.device)
        for p in self.model.parameters():
            local = p.to_local() if hasattr(p, "to_local") else p
            bad += (~torch.isfinite(local)).any().float()
        return float(self.accelerator.reduce(bad, reduction="sum")) == 0.0

    def stop(self, step: int, what: str) -> None:
        """Record why the run stops and raise :class:`NonFiniteLossError` naming the last good checkpoint."""
        self.metrics.write({"step": step, "loss": None, "error": what})
        if self.cfg.report_to:
            self.accelerator.end_training()
        last = self.last_checkpoint
        where = (
            f"the last good checkpoint is {last} (continue with --resume)" if last else "no checkpoint was written yet"
        )
        raise NonFiniteLossError(
            f"{what} at step {step}: stopped before updating the weights; {where}. "
            "Lower --lr or --hc-lr-multiplier, or keep --max-grad-norm clipping on.",
            step=step,
            last_checkpoint=str(last) if last else None,
        )
