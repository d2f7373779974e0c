"""Loading, tokenising, packing, caching, splitting and batch order of the training data."""

from __future__ import annotations

import json

import pytest
import torch

from hc_retrofit.train.data import (
    BatchSchedule,
    build_data,
    eval_shards,
    load_documents,
    pack_documents,
    split_blocks,
)
from hc_retrofit.train.errors import TrainingError


def test_packing_is_the_token_stream_with_eos_between_documents(tokenizer, tmp_path, cache_dir):
    docs = ["To be, or not to be.", "That is the question:\nwhether 'tis nobler", "in the mind to suffer."]
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"body": d, "id": i}) + "\n" for i, d in enumerate(docs)))
    ds = load_documents(path, text_column="body", cache_dir=cache_dir)
    packed = pack_documents(ds, tokenizer, 4, text_column="body")
    stream = []
    for d in docs:
        stream += [*tokenizer(d, add_special_tokens=False)["input_ids"], tokenizer.eos_token_id]
    blocks = [row["input_ids"].tolist() for row in packed]
    assert all(len(b) == 4 for b in blocks)
    assert [t for b in blocks for t in b] == stream[: len(stream) // 4 * 4]  # order kept, tail dropped
    assert sum(t == tokenizer.eos_token_id for b in blocks for t in b) >= 2


def test_text_file_documents_are_paragraphs(tmp_path, cache_dir):
    path = tmp_path / "a.txt"
    path.write_text("First:\nline one\nline two\n\nSecond:\nmore\n")
    ds = load_documents(path, cache_dir=cache_dir)
    assert len(ds) == 2
    assert ds[0]["text"].startswith("First:\nline one")


def test_parquet_and_missing_column(tokenizer, tmp_path, cache_dir):
    import datasets

    path = tmp_path / "d.parquet"
    datasets.Dataset.from_dict({"content": ["alpha beta gamma " * 20, "delta " * 30]}).to_parquet(str(path))
    with pytest.raises(TrainingError, match=r"no column .text.*--text-column"):
        load_documents(path, cache_dir=cache_dir)
    data = build_data(path, tokenizer, 8, eval_fraction=0.25, text_column="content", cache_dir=cache_dir)
    assert len(data.train) >= 3 and len(data.eval) >= 1 and data.block_size == 8


def test_unknown_extension_is_a_clear_error(tmp_path):
    path = tmp_path / "x.docx"
    path.write_text("hi")
    with pytest.raises(TrainingError, match=r"\.txt, \.jsonl"):
        load_documents(path)


def test_held_out_split_is_the_tail_and_never_trained_on(tokenizer, corpus, cache_dir):
    data = build_data(corpus, tokenizer, 32, eval_fraction=0.1, cache_dir=cache_dir)
    all_blocks = build_data(corpus, tokenizer, 32, eval_fraction=0.0, cache_dir=cache_dir).train
    n = len(all_blocks)
    assert data.eval is not None and len(data.eval) == -(-n // 10)
    assert len(data.train) + len(data.eval) == n
    assert data.eval[0]["input_ids"].tolist() == all_blocks[len(data.train)]["input_ids"].tolist()
    with pytest.raises(TrainingError, match="only"):
        split_blocks(all_blocks.select(range(1)), 0.5)


def test_heldout_split_follows_the_eval_split(tokenizer, corpus, cache_dir):
    all_blocks = build_data(corpus, tokenizer, 32, eval_fraction=0.0, cache_dir=cache_dir).train
    data = build_data(corpus, tokenizer, 32, eval_fraction=0.1, heldout_fraction=0.1, cache_dir=cache_dir)
    n, k = len(all_blocks), -(-len(all_blocks) // 10)
    assert len(data.eval) == len(data.heldout) == k and len(data.train) == n - 2 * k
    ids = [b.tolist() for b in all_blocks["input_ids"]]
    assert [b.tolist() for b in data.eval["input_ids"]] == ids[n - 2 * k : n - k]
    assert [b.tolist() for b in data.heldout["input_ids"]] == ids[n - k :]
    assert build_data(corpus, tokenizer, 32, eval_fraction=0.1, cache_dir=cache_dir).heldout is None


def test_second_run_reuses_the_tokenised_cache(tokenizer, corpus, tmp_path):
    cache = tmp_path / "cache"

    def files():
        return {p: p.stat().st_mtime_ns for p in cache.rglob("*.arrow")}

    first = build_data(corpus, tokenizer, 32, cache_dir=str(cache))
    before = files()
    assert any("cache-" in p.name for p in before), "tokenised data should be cached as arrow files"
    second = build_data(corpus, tokenizer, 32, cache_dir=str(cache))
    assert files() == before  # nothing re-tokenised or re-written
    assert torch.equal(first.train[:]["input_ids"], second.train[:]["input_ids"])
    build_data(corpus, tokenizer, 16, cache_dir=str(cache))  # another block size: a new cache entry
    assert len(files()) > len(before)


def test_batch_schedule_is_deterministic_and_shards_processes():
    one = BatchSchedule(10, 4, seed=3)
    again = BatchSchedule(10, 4, seed=3)
    assert [one.indices(m) for m in range(6)] == [again.indices(m) for m in range(6)]
    assert sorted(one.indices(0) + one.indices(1) + one.indices(2)[:2]) == list(range(10))  # an epoch is a permutation
    assert BatchSchedule(10, 4, seed=4).indices(0) != one.indices(0) or BatchSchedule(10, 4, seed=4).indices(
        1
    ) != one.indices(1)
    # two processes at batch 2 see exactly what one process at batch 4 sees, split in halves
    r0 = BatchSchedule(10, 2, seed=3, world_size=2, rank=0)
    r1 = BatchSchedule(10, 2, seed=3, world_size=2, rank=1)
    for m in range(5):
        assert r0.indices(m) + r1.indices(m) == one.indices(m)


def test_eval_shards_give_every_process_the_same_number_of_batches():
    shards = [eval_shards(7, 2, world_size=3, rank=r) for r in range(3)]
    assert len({len(s) for s in shards}) == 1
    real = sorted(i for s in shards for idx, w in s for i, wt in zip(idx, w, strict=True) if wt > 0)
    assert real == list(range(7))


@pytest.mark.parametrize("progress", [True, False])
def test_datasets_bars_only_with_progress_and_their_setting_restored(tokenizer, tmp_path, capfd, progress):
    from datasets.utils import logging as datasets_logging

    path = tmp_path / "a.txt"
    path.write_text("\n\n".join(f"paragraph {i}: " + "words " * 20 for i in range(50)))
    assert datasets_logging.is_progress_bar_enabled()
    capfd.readouterr()
    build_data(path, tokenizer, 8, eval_fraction=0.1, cache_dir=str(tmp_path / "cache"), progress=progress)
    err = capfd.readouterr().err
    assert ("Tokenising" in err and "Packing into blocks of 8" in err) is progress  # a fresh cache: work to show
    assert datasets_logging.is_progress_bar_enabled()  # the caller's setting is left as it was
