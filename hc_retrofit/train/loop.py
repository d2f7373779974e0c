"""``train(cfg)``: one continued-pretraining run on accelerate (one process, DDP, FSDP2; CPU or GPU).

The run reads as its parts: the threads and the accelerator (:mod:`.threads`, :mod:`.strategy`),
the run directory (:mod:`.run_dir`), the model and the data (:mod:`.model`, :mod:`.data`), the
loop (:class:`~hc_retrofit.train.trainer.Trainer`), the final save (:mod:`.export`), the summary.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from torch import nn

from hc_retrofit.train.compile import compile_layers
from hc_retrofit.train.data import PackedData, build_data
from hc_retrofit.train.export import save_trained
from hc_retrofit.train.launch_check import warn_if_alone
from hc_retrofit.train.metrics import plot_losses, read_metrics
from hc_retrofit.train.model import load_model, prepare_model
from hc_retrofit.train.recipe import TrainConfig
from hc_retrofit.train.run_dir import FINAL_DIR, PLOT_FILE, SUMMARY_FILE, RunDirectory
from hc_retrofit.train.strategy import local_parameter_fraction, make_accelerator, strategy_name
from hc_retrofit.train.threads import apply_threads
from hc_retrofit.train.trainer import Trainer

__all__ = ["FINAL_DIR", "PLOT_FILE", "SUMMARY_FILE", "TrainResult", "train"]


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
    strategy: str = "single"
    """What ran: ``single``, ``ddp``, ``fsdp2`` (read from the prepared model, not the launch config)."""
    local_parameter_fraction: float = 1.0
    """Share of the parameters the main process held while training (~1/N when FSDP shards them)."""
    threads: int = 1
    """torch intra-op threads per process."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def train(cfg: TrainConfig, *, model: nn.Module | None = None, tokenizer: Any = None) -> TrainResult:
    """Run continued pretraining as ``cfg`` says; ``model``/``tokenizer`` override ``cfg.model``.

    Raises:
        TrainingError: bad settings, data or output directory.
        NonFiniteLossError: the loss diverged; the last good checkpoint is kept.
    """
    cfg.validate()
    threads = apply_threads(cfg.threads)
    run = RunDirectory(cfg, make_accelerator(cfg, Path(cfg.out).expanduser().resolve()))
    warn_if_alone(run.accelerator.num_processes)
    with run.locked():  # a second writer of this run (another train --resume) is refused
        run.open()
        try:
            result = _run(cfg, run, model, tokenizer, threads)
        except BaseException:
            run.failed()
            raise
        run.succeeded()
    return result


def _run(cfg: TrainConfig, run: RunDirectory, model: nn.Module | None, tokenizer: Any, threads: int) -> TrainResult:
    """Load, train, save, summarise: the run itself, in the opened run directory."""
    accelerator = run.accelerator
    if model is None:
        model, loaded_tokenizer = load_model(cfg)
        tokenizer = tokenizer or loaded_tokenizer
    model = prepare_model(cfg, model, tokenizer)
    if cfg.compile:  # regional: each decoder layer, in place, before accelerate wraps the model
        compile_layers(model, backend=cfg.compile_backend)
    data = _data(cfg, tokenizer, accelerator)
    trainer = Trainer(cfg, accelerator, run, model, data)
    if cfg.report_to:
        accelerator.init_trackers("hc-retrofit", config=tracker_config(cfg))
    trainer.fit()
    metadata = {"training": {k: v for k, v in tracker_config(cfg).items() if k not in ("out", "cache_dir")}}
    final = save_trained(
        accelerator, trainer.model, tokenizer, run.final, metadata=metadata, grad_ckpt=cfg.grad_checkpointing
    )
    plot = None
    if accelerator.is_main_process:
        plot = str(plot_losses({"HC" if trainer.hc else "plain": read_metrics(run.path)}, run.plot))
    if cfg.report_to:
        accelerator.end_training()
    result = TrainResult(
        out_dir=str(run.path),
        final_dir=str(final),
        hc=trainer.hc,
        steps=cfg.max_steps,
        start_step=trainer.start_step,
        num_processes=accelerator.num_processes,
        tokens_per_step=trainer.tokens_per_step,
        step0_loss=trainer.step0_loss,
        last_loss=trainer.last_loss,
        initial_eval_loss=trainer.initial_eval,
        final_eval_loss=trainer.final_eval if trainer.data.eval is not None else None,
        tokens_per_s=trainer.trained_tokens / trainer.train_seconds if trainer.train_seconds else 0.0,
        train_seconds=trainer.train_seconds,
        plot=plot,
        final_heldout_loss=trainer.final_heldout,
        strategy=strategy_name(accelerator, trainer.model),
        local_parameter_fraction=local_parameter_fraction(trainer.model),
        threads=threads,
    )
    run.write_summary(result.to_dict())
    accelerator.wait_for_everyone()
    return result


def _data(cfg: TrainConfig, tokenizer: Any, accelerator: Any) -> PackedData:
    with accelerator.main_process_first():  # the main process tokenises; the others load its cache
        return build_data(
            cfg.data,
            tokenizer,
            cfg.block_size,
            eval_fraction=cfg.eval_fraction,
            heldout_fraction=cfg.heldout_fraction,
            text_column=cfg.text_column,
            config_name=cfg.dataset_config,
            split=cfg.dataset_split,
            cache_dir=cfg.cache_dir,
            progress=accelerator.is_main_process and bool(cfg.progress),
        )


def tracker_config(cfg: TrainConfig) -> dict[str, Any]:
    """The run's settings as scalars (what trackers accept)."""
    return {k: (",".join(v) if isinstance(v, list) else v) for k, v in cfg.to_dict().items() if v is not None}
