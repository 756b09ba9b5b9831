"""Built-in corpus, shard folders and the resumable distributed loader."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from megatron_pept.data.builtin import write_token_shards
from megatron_pept.data.corpus import generate_stories
from megatron_pept.data.loader import DistributedBatchLoader, WindowDataset, fixed_batches
from megatron_pept.data.shards import read_index, verify_shards
from megatron_pept.data.tokenizer import load_tokenizer, train_sentencepiece
from megatron_pept.errors import DataError


def test_corpus_is_deterministic_and_varied() -> None:
    a, b = list(generate_stories(50, seed=3)), list(generate_stories(50, seed=3))
    assert a == b
    assert len(set(a)) == 50
    assert list(generate_stories(5, seed=4)) != a[:5]


def test_builtin_index_matches_an_independent_encoding(quickstart_data: Path) -> None:
    index = read_index(quickstart_data)
    tok = load_tokenizer(quickstart_data)
    assert index.vocab_size == tok.vocab_size == 1024
    assert index.tokenizer_sha256 == tok.sha256
    assert index.splits["train"].documents > 10 * index.splits["val"].documents > 0
    verify_shards(index, split="train", checksums=True)
    # The first shard decodes back into whole stories separated by EOS.
    first = np.fromfile(quickstart_data / index.splits["train"].shards[0].file, dtype=index.np_dtype)
    docs = np.split(first, np.flatnonzero(first == index.eos_id) + 1)[:-1]
    assert len(docs) == index.splits["train"].shards[0].documents
    assert tok.decode(docs[0][:-1].tolist()).endswith(".")


def _small_folder(tmp_path: Path, *, docs: int = 400) -> Path:
    texts = list(generate_stories(docs, seed=0))
    tok = train_sentencepiece(iter(texts), output_dir=tmp_path / "tok", vocab_size=400)
    out = tmp_path / "data"
    out.mkdir()
    (out / "tokenizer.model").write_bytes(tok.path.read_bytes())
    pairs = [("val" if i % 10 == 0 else "train", t) for i, t in enumerate(texts)]
    write_token_shards(pairs, tokenizer=tok, output_dir=out, shard_tokens=4000)
    return out


@pytest.fixture(scope="module")
def small_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _small_folder(tmp_path_factory.mktemp("small"))


def test_resume_yields_the_same_batches(small_folder: Path) -> None:
    ds = WindowDataset(read_index(small_folder), split="train", seq_len=32)
    make = lambda: DistributedBatchLoader(ds, micro_batch_size=4, seed=7)  # noqa: E731
    reference = make()
    expected = [reference.next_batch()[0] for _ in range(3 * reference.batches_per_epoch // 2)]
    first = make()
    k = reference.batches_per_epoch - 3  # stop near the end of an epoch, resume across the boundary
    for _ in range(k):
        first.next_batch()
    state = {key: value.clone() for key, value in first.state_dict().items()}
    resumed = make()
    resumed.load_state_dict(state)
    for i in range(k, len(expected)):
        assert torch.equal(resumed.next_batch()[0], expected[i]), i


def test_ranks_partition_each_epoch(small_folder: Path) -> None:
    ds = WindowDataset(read_index(small_folder), split="train", seq_len=32)
    loaders = [DistributedBatchLoader(ds, micro_batch_size=3, seed=1, dp_rank=r, dp_world_size=2) for r in range(2)]
    assert loaders[0].batches_per_epoch == loaders[1].batches_per_epoch
    seen = [
        np.concatenate([lo.window_ids(type(lo.position)(0, b)) for b in range(lo.batches_per_epoch)]) for lo in loaders
    ]
    assert not set(seen[0]) & set(seen[1])
    together = np.concatenate(seen)
    assert len(together) == len(set(together)) == loaders[0].batches_per_epoch * 6
    assert len(together) > ds.num_windows - 6  # at most one global micro-batch is dropped
    # The next epoch is a different order.
    assert not np.array_equal(loaders[0].window_ids(type(loaders[0].position)(1, 0)), seen[0][:3])


def test_windows_are_inputs_and_shifted_targets(small_folder: Path) -> None:
    index = read_index(small_folder)
    ds = WindowDataset(index, split="train", seq_len=16)
    inputs, targets = ds.batch([0, 5])
    raw = np.fromfile(small_folder / index.splits["train"].shards[0].file, dtype=index.np_dtype).astype(np.int64)
    assert torch.equal(inputs[0], torch.from_numpy(raw[:16]))
    assert torch.equal(targets[0], torch.from_numpy(raw[1:17]))
    assert torch.equal(inputs[1], torch.from_numpy(raw[80:96]))


def test_validation_batches_are_fixed(small_folder: Path) -> None:
    ds = WindowDataset(read_index(small_folder), split="val", seq_len=16)
    a = fixed_batches(ds, micro_batch_size=2, num_batches=3)
    b = fixed_batches(ds, micro_batch_size=2, num_batches=3)
    assert len(a) == 3 and all(torch.equal(x[0], y[0]) for x, y in zip(a, b))


def test_resume_with_other_world_size_is_refused(small_folder: Path) -> None:
    ds = WindowDataset(read_index(small_folder), split="train", seq_len=32)
    state = DistributedBatchLoader(ds, micro_batch_size=2, seed=0, dp_world_size=2).state_dict()
    with pytest.raises(DataError, match="2 data-parallel ranks and this run has 1"):
        DistributedBatchLoader(ds, micro_batch_size=2, seed=0).load_state_dict(state)


def test_bad_data_is_one_clear_line(tmp_path: Path) -> None:
    folder = _small_folder(tmp_path, docs=60)
    with pytest.raises(DataError, match="does not exist"):
        read_index(tmp_path / "nope")
    with pytest.raises(DataError, match="no index.json"):
        read_index(tmp_path / "tok")
    index = read_index(folder)
    with pytest.raises(DataError, match="longer than the data"):
        WindowDataset(index, split="val", seq_len=100_000)
    shard = folder / index.splits["train"].shards[0].file
    data = bytearray(shard.read_bytes())
    data[10] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(DataError, match="fails its sha256 check"):
        verify_shards(index, split="train", checksums=True)
    shard.write_bytes(bytes(data[:-2]))
    with pytest.raises(DataError, match="truncated"):
        WindowDataset(index, split="train", seq_len=8)
    raw = json.loads((folder / "index.json").read_text())
    del raw["splits"]
    (folder / "index.json").write_text(json.dumps(raw))
    with pytest.raises(DataError, match="malformed"):
        read_index(folder)
