"""Training data: load text with `datasets`, tokenise, pack into fixed blocks, split, order batches.

* Sources: a local ``.txt`` (documents = blank-line separated paragraphs), ``.jsonl``/``.json``,
  ``.parquet``, ``.csv``, a directory of such files, or a dataset id (Hub, or anything
  ``datasets.load_dataset`` accepts).
* Each document is tokenised without special tokens and followed by EOS, then the stream is cut
  into ``block_size`` blocks (the tail of each packing batch that does not fill a block is
  dropped, as in transformers' ``run_clm``).
* Both maps carry explicit fingerprints (source, tokenizer, block size), so `datasets` caches
  them on disk and a second run with the same inputs loads the packed blocks without
  re-tokenising.
* The eval split is the *last* ``eval_fraction`` of the blocks: contiguous text the model
  never trains on (a random split of adjacent passages would leak). With ``heldout_fraction``
  the blocks are [train | eval | held-out]: a second untouched split after the eval one, so a
  setting chosen on the eval (validation) loss can be reported on text it was not chosen on.
* :class:`BatchSchedule` maps (micro-batch number, process) to sample indices from a seeded
  permutation per epoch, so the data order depends only on the seed and the step: resuming at
  step k sees exactly the batches an uninterrupted run sees, on any process.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import torch

from hc_retrofit.private_api import dataset_fingerprint
from hc_retrofit.train.errors import TrainingError

_FORMAT_VERSION = "hc-retrofit-pack-v1"
_BUILDERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
PACK_BATCH = 4096


@contextlib.contextmanager
def _quiet_datasets_errors() -> Iterator[None]:
    """Keep ``datasets`` from logging a traceback for a file we report ourselves."""
    logger = logging.getLogger("datasets")
    before = logger.level
    logger.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        logger.setLevel(before)


def load_documents(
    source: str | Path,
    *,
    text_column: str = "text",
    config_name: str | None = None,
    split: str = "train",
    cache_dir: str | None = None,
) -> datasets.Dataset:
    """The documents of ``source`` as a `datasets.Dataset` with a string column ``text_column``."""
    path = Path(source)
    if path.is_file() and not path.read_bytes()[:65536].strip():
        raise TrainingError(f"data {path} is empty; pass a file with text in it")
    try:
        with _quiet_datasets_errors():  # a bad file is reported below in one line, not logged with a traceback
            if path.is_file():
                builder = _BUILDERS.get(path.suffix.lower())
                if builder is None:
                    raise TrainingError(
                        f"cannot read {path}: use a .txt, .jsonl, .json, .parquet or .csv file, a directory, or a dataset id"
                    )
                kwargs: dict[str, Any] = {"sample_by": "paragraph"} if builder == "text" else {}
                ds = datasets.load_dataset(
                    builder, data_files=str(path.resolve()), split="train", cache_dir=cache_dir, **kwargs
                )
            else:
                ds = datasets.load_dataset(str(source), config_name, split=split, cache_dir=cache_dir)
    except TrainingError:
        raise
    except (FileNotFoundError, ValueError, ConnectionError, OSError) as err:
        raise TrainingError(f"cannot load data {source!s}: {err}") from err
    except datasets.exceptions.DatasetGenerationError as err:  # malformed jsonl/csv/parquet, undecodable text
        cause = err.__cause__ or err.__context__ or err
        raise TrainingError(
            f"cannot read data {source!s}: {type(cause).__name__}: {' '.join(str(cause).split())[:200]}; "
            "check the file's format (UTF-8 text, one JSON object per line for .jsonl)"
        ) from err
    if isinstance(ds, datasets.DatasetDict):  # pragma: no cover - split= makes this rare
        ds = ds[split]
    if len(ds) == 0:
        raise TrainingError(f"data {source!s} holds no documents; pass a file or dataset with text in it")
    if text_column not in ds.column_names:
        raise TrainingError(
            f"data {source!s} has no column {text_column!r} (columns: {', '.join(ds.column_names)}); pass --text-column"
        )
    feature = ds.features[text_column]
    if not (isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")):
        raise TrainingError(
            f"data {source!s}: column {text_column!r} holds {feature}, not text; every document's {text_column!r} "
            "must be a string (or pass --text-column)"
        )
    return ds


def data_fingerprint(source: str | Path | None) -> dict[str, Any]:
    """What a run trains on, for ``--resume`` to compare: the data's name and a SHA-256 of its files
    (of its id, for a Hub dataset)."""
    from hc_retrofit.ownership import sha256_file

    path = Path(str(source or "")).expanduser()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path] if path.is_file() else []
    digest = hashlib.sha256()
    for file in files:
        digest.update(str(file.relative_to(path) if path.is_dir() else file.name).encode() + b"\0")
        digest.update(sha256_file(file).encode())
    if not files:
        digest.update(str(source).encode())
    return {"name": path.name if files else str(source), "sha256": digest.hexdigest()}


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A stable hash of what decides the token ids: the vocabulary/merges and the EOS id."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    body = backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(f"{body}|{tokenizer.eos_token_id}".encode()).hexdigest()[:16]


def pack_documents(
    docs: datasets.Dataset, tokenizer: Any, block_size: int, *, text_column: str = "text", num_proc: int | None = None
) -> datasets.Dataset:
    """Tokenise ``docs`` (EOS after each document) and pack into blocks; a dataset of ``input_ids``.

    Cached by `datasets` under a fingerprint of (documents, tokenizer, block size).
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        raise TrainingError("the tokenizer has no EOS token, which separates packed documents; set tokenizer.eos_token")
    tok_fp = tokenizer_fingerprint(tokenizer)

    def tokenize(batch: dict[str, list]) -> dict[str, list]:
        texts = batch[text_column]
        if not all(isinstance(t, str) for t in texts):
            bad = next(t for t in texts if not isinstance(t, str))
            raise TrainingError(
                f"a document's {text_column!r} is {bad!r}, not a string: fix or drop it (an empty text is a string)"
            )
        ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
        return {"input_ids": [[*x, eos] for x in ids]}

    def pack(batch: dict[str, list]) -> dict[str, list]:
        flat = [t for ids in batch["input_ids"] for t in ids]
        usable = len(flat) // block_size * block_size
        return {"input_ids": [flat[i : i + block_size] for i in range(0, usable, block_size)]}

    fp_tok = _hash(dataset_fingerprint(docs), tok_fp, text_column, _FORMAT_VERSION)
    tokenized = docs.map(
        tokenize,
        batched=True,
        remove_columns=docs.column_names,
        new_fingerprint=fp_tok,
        num_proc=num_proc,
        desc="Tokenising",
    )
    packed = tokenized.map(
        pack,
        batched=True,
        batch_size=PACK_BATCH,
        new_fingerprint=_hash(fp_tok, str(block_size)),
        num_proc=num_proc,
        desc=f"Packing into blocks of {block_size}",
    )
    return packed.with_format("torch")


def _hash(*parts: str) -> str:
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def split_blocks(
    blocks: datasets.Dataset, eval_fraction: float, heldout_fraction: float = 0.0
) -> tuple[datasets.Dataset, datasets.Dataset | None, datasets.Dataset | None]:
    """(train, eval, held-out): the last ``heldout_fraction`` of the blocks, before it the last
    ``eval_fraction``, the rest is train (each fraction of all blocks; a split of 0 is ``None``)."""
    n = len(blocks)
    n_held = math.ceil(n * heldout_fraction) if heldout_fraction > 0 else 0
    n_eval = math.ceil(n * eval_fraction) if eval_fraction > 0 else 0
    n_train = n - n_eval - n_held
    if n_train < 1:
        raise TrainingError(
            f"the data gives only {n} block(s) ({n_eval + n_held} held out): use more text, a smaller --block-size "
            "or a smaller --eval-fraction"
        )
    train = blocks.select(range(n_train))
    evals = blocks.select(range(n_train, n_train + n_eval)) if n_eval else None
    return train, evals, (blocks.select(range(n - n_held, n)) if n_held else None)


@dataclass
class PackedData:
    """The packed training, eval (validation) and, optionally, second held-out blocks."""

    train: datasets.Dataset
    eval: datasets.Dataset | None
    heldout: datasets.Dataset | None = None

    @property
    def block_size(self) -> int:
        return len(self.train[0]["input_ids"])


def build_data(
    source: str | Path,
    tokenizer: Any,
    block_size: int,
    *,
    eval_fraction: float = 0.05,
    heldout_fraction: float = 0.0,
    text_column: str = "text",
    config_name: str | None = None,
    split: str = "train",
    cache_dir: str | None = None,
    progress: bool = True,
) -> PackedData:
    """Load, tokenise, pack and split ``source`` (see the module docstring).

    ``progress=False``: without datasets' own bars (building the split, tokenising, packing), as a
    run without a progress bar expects; their setting is restored afterwards.
    """
    with _datasets_progress(progress):
        docs = load_documents(
            source, text_column=text_column, config_name=config_name, split=split, cache_dir=cache_dir
        )
        blocks = pack_documents(docs, tokenizer, block_size, text_column=text_column)
    return PackedData(*split_blocks(blocks, eval_fraction, heldout_fraction))


@contextlib.contextmanager
def _datasets_progress(enabled: bool) -> Iterator[None]:
    """datasets' progress bars off inside the block when not ``enabled``, then as they were."""
    from datasets.utils import logging as datasets_logging

    switch = not enabled and datasets_logging.is_progress_bar_enabled()
    if switch:
        datasets_logging.disable_progress_bar()
    try:
        yield
    finally:
        if switch:
            datasets_logging.enable_progress_bar()


class BatchSchedule:
    """Deterministic batch order: micro-batch ``m`` of process ``rank`` depends only on (seed, m, rank).

    Global micro-batch ``m`` takes samples ``[m * B * W, (m + 1) * B * W)`` of an endless stream
    that concatenates seeded permutations of the training set (one per epoch); process ``rank``
    takes its ``B`` consecutive ones. So W processes at batch B see the same samples per step as
    one process at batch ``B * W``.
    """

    def __init__(self, num_samples: int, batch_size: int, *, seed: int, world_size: int = 1, rank: int = 0) -> None:
        if num_samples < 1:
            raise TrainingError("no training samples")
        self.num_samples, self.batch_size, self.seed = num_samples, batch_size, seed
        self.world_size, self.rank = world_size, rank
        self._perms: dict[int, torch.Tensor] = {}

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            if len(self._perms) > 2:
                self._perms.clear()
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perms[epoch] = torch.randperm(self.num_samples, generator=gen)
        return self._perms[epoch]

    def indices(self, micro_batch: int) -> list[int]:
        """Sample indices of global micro-batch number ``micro_batch`` for this process."""
        start = (micro_batch * self.world_size + self.rank) * self.batch_size
        out = []
        for k in range(start, start + self.batch_size):
            epoch, pos = divmod(k, self.num_samples)
            out.append(int(self._permutation(epoch)[pos]))
        return out


def eval_shards(
    num_samples: int, batch_size: int, *, world_size: int = 1, rank: int = 0
) -> list[tuple[list[int], list[float]]]:
    """This process's eval batches as (indices, weights); every process gets the same number of batches.

    Processes must run the same number of forward passes (FSDP gathers parameters in each), so
    the shorter shards are padded with sample 0 at weight 0.
    """
    mine = list(range(rank, num_samples, world_size))
    per_rank = math.ceil(num_samples / world_size)
    weights = [1.0] * len(mine) + [0.0] * (per_rank - len(mine))
    mine += [0] * (per_rank - len(mine))
    return [(mine[i : i + batch_size], weights[i : i + batch_size]) for i in range(0, per_rank, batch_size)]
