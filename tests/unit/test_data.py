"""Built-in corpus, shard folders and the resumable, blended, distributed loader."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from megatron_pept.data.corpus import generate_stories
from megatron_pept.data.loader import (
    DistributedBatchLoader,
    WindowDataset,
    blend_assignment,
    feistel_permutation,
    fixed_batches,
)
from megatron_pept.data.prepare import PrepareOptions, prepare_dataset
from megatron_pept.data.shards import (
    DataIndex,
    ShardWriter,
    VerifiedShards,
    read_index,
    verify_shards,
)
from megatron_pept.data.tokenizer import load_tokenizer, train_sentencepiece
from megatron_pept.errors import DataError


def test_corpus_is_deterministic_and_varied() -> None:
    a, b = list(generate_stories(50, seed=3)), list(generate_stories(50, seed=3))
    assert a == b
    assert len(set(a)) == 50
    assert list(generate_stories(5, seed=4)) != a[:5]


def test_builtin_dataset_is_complete_and_decodes(quickstart_data: Path) -> None:
    index = read_index(quickstart_data)
    tok = load_tokenizer(quickstart_data)
    assert index.vocab_size == tok.vocab_size == 1024
    assert index.tokenizer_sha256 == tok.sha256
    assert index.splits["train"].documents > 10 * index.splits["val"].documents > 0
    verify_shards(index, split="train", checksums=True)
    first = np.fromfile(quickstart_data / index.splits["train"].shards[0].file, dtype=index.np_dtype)
    docs = np.split(first, np.flatnonzero(first == index.eos_id) + 1)[:-1]
    assert len(docs) == index.splits["train"].shards[0].documents
    assert tok.decode(docs[0][:-1].tolist()).endswith(".")


def make_folder(root: Path, *, docs: int = 400, seed: int = 0, shard_tokens: int = 4000) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    corpus = root / "corpus.jsonl"
    texts = list(generate_stories(docs, seed=seed))
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    if not (root / "tok").exists():
        train_sentencepiece(iter(texts), output_dir=root / "tok", vocab_size=400)
    out = root / f"data{seed}"
    prepare_dataset(
        PrepareOptions(
            inputs=(str(corpus),),
            tokenizer=str(root / "tok"),
            output=str(out),
            shard_tokens=shard_tokens,
            val_fraction=0.1,
            workers=1,
        ),
        show_progress=False,
    )
    return out


def counting_folder(root: Path, *, tokens: int, start: int = 0, shard_tokens: int = 1000) -> Path:
    """A shard folder whose tokens are start, start+1, ...: every window is told apart by its first token."""
    root.mkdir(parents=True)
    writer = ShardWriter(root, split="train", dtype=np.dtype("<u2"), shard_tokens=shard_tokens)
    ids = np.arange(start, start + tokens)
    for chunk in np.array_split(ids, 37):  # 37 "documents"
        writer.add(chunk)
    DataIndex(
        root=root,
        dtype="<u2",
        vocab_size=65536,
        eos_id=0,
        bos_id=None,
        tokenizer_sha256="x",
        splits={"train": writer.close()},
    ).write()
    return root


@pytest.fixture(scope="module")
def small_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_folder(tmp_path_factory.mktemp("small"))


def test_feistel_is_a_seeded_permutation() -> None:
    for n in (1, 2, 3, 7, 64, 1000, 4097):
        assert sorted(feistel_permutation(np.arange(n), n=n, key=5).tolist()) == list(range(n))
    a = feistel_permutation(np.arange(100), n=100, key=1)
    assert not np.array_equal(a, feistel_permutation(np.arange(100), n=100, key=2))
    assert np.array_equal(a, feistel_permutation(np.arange(100), n=100, key=1))
    assert np.array_equal(a[37:50], feistel_permutation(np.arange(37, 50), n=100, key=1))  # random access


def test_blend_assignment_follows_the_weights() -> None:
    owners = blend_assignment(np.arange(10_000), weights=np.array([7.0, 2.0, 1.0]))
    assert np.bincount(owners).tolist() == pytest.approx([7000, 2000, 1000], abs=3)
    assert np.bincount(owners[:100]).tolist() == pytest.approx([70, 20, 10], abs=2)  # every prefix too


def test_resume_yields_the_same_batches(small_folder: Path) -> None:
    ds = WindowDataset(read_index(small_folder), split="train", seq_len=32)
    make = lambda: DistributedBatchLoader(ds, micro_batch_size=4, seed=7)  # noqa: E731
    reference = make()
    steps = 3 * ds.num_windows // 8
    expected = [reference.next_batch()[0] for _ in range(steps)]
    first = make()
    k = ds.num_windows // 4 - 1  # stop just before an epoch boundary and resume across it
    for _ in range(k):
        first.next_batch()
    state = {key: value.clone() for key, value in first.state_dict().items()}
    resumed = make()
    resumed.load_state_dict(state)
    for i in range(k, steps):
        assert torch.equal(resumed.next_batch()[0], expected[i]), i


def first_tokens(batch: tuple[torch.Tensor, torch.Tensor]) -> list[int]:
    return batch[0][:, 0].tolist()


def test_two_ranks_see_every_window_exactly_once_per_epoch(tmp_path: Path) -> None:
    ds = WindowDataset(read_index(counting_folder(tmp_path / "c", tokens=20_000)), split="train", seq_len=32)
    to_window = {int(ds.window(i)[0]): i for i in range(ds.num_windows)}
    ranks = [DistributedBatchLoader(ds, micro_batch_size=3, seed=1, dp_rank=r, dp_world_size=2) for r in range(2)]
    n = ds.num_windows
    seen: list[int] = []  # the global stream, reassembled: rank 0's block then rank 1's, step after step
    for _ in range(2 * n // 6 + 2):
        for loader in ranks:
            seen.extend(to_window[t] for t in first_tokens(loader.next_batch()))
    assert n % 6 != 0  # the epoch boundary falls inside a step, and still:
    assert sorted(seen[:n]) == list(range(n))  # epoch 0: each window exactly once
    assert sorted(seen[n : 2 * n]) == list(range(n))  # epoch 1 too, in another order
    assert seen[:n] != seen[n : 2 * n]
    assert seen[:n] != sorted(seen[:n])


def test_reshard_is_refused_unless_allowed_then_continues_the_stream(small_folder: Path) -> None:
    ds = WindowDataset(read_index(small_folder), split="train", seq_len=32)
    one = DistributedBatchLoader(ds, micro_batch_size=4, seed=0)
    for _ in range(5):
        one.next_batch()
    state = one.state_dict()
    expected = [one.next_batch()[0] for _ in range(4)]  # 4 x 4 samples on one rank
    with pytest.raises(DataError, match="1 data-parallel ranks x micro-batch 4 and this run has 2 x 2"):
        DistributedBatchLoader(ds, micro_batch_size=2, seed=0, dp_world_size=2).load_state_dict(state)
    two = [
        DistributedBatchLoader(ds, micro_batch_size=2, seed=0, dp_rank=r, dp_world_size=2, allow_reshard=True)
        for r in range(2)
    ]
    for loader in two:
        loader.load_state_dict(state)
    got = []
    for _ in range(4):  # each step of the two ranks consumes the 4 samples one rank took before
        got.extend(loader.next_batch()[0] for loader in two)
    assert torch.equal(torch.cat(got), torch.cat(expected))


def test_blended_loader(tmp_path: Path) -> None:
    a = WindowDataset(read_index(counting_folder(tmp_path / "a", tokens=16_000)), split="train", seq_len=16)
    b = WindowDataset(read_index(counting_folder(tmp_path / "b", tokens=3000, start=40_000)), split="train", seq_len=16)
    loader = DistributedBatchLoader([a, b], weights=[3.0, 1.0], micro_batch_size=8, seed=0)
    from_a, from_b = [], []
    for _ in range(100):
        for token in first_tokens(loader.next_batch()):
            (from_a if token < 40_000 else from_b).append(token)
    assert (len(from_a), len(from_b)) == pytest.approx((600, 200), abs=3)
    # Each dataset keeps its own epoch: b (186 windows) wraps around once, a never repeats.
    assert len(set(from_a)) == len(from_a)
    assert len(set(from_b[: b.num_windows])) == b.num_windows
    state = loader.state_dict()
    assert state["per_dataset_seen"].tolist() == [len(from_a), len(from_b)]
    other = DistributedBatchLoader([a, b], weights=[1.0, 1.0], micro_batch_size=8, seed=0)
    with pytest.raises(DataError, match="blend weights differ"):
        other.load_state_dict(state)


def test_windows_are_inputs_and_shifted_targets(small_folder: Path) -> None:
    index = read_index(small_folder)
    ds = WindowDataset(index, split="train", seq_len=16)
    inputs, targets = ds.batch([0, 5])
    raw = np.fromfile(small_folder / index.splits["train"].shards[0].file, dtype=index.np_dtype).astype(np.int64)
    assert torch.equal(inputs[0], torch.from_numpy(raw[:16]))
    assert torch.equal(targets[0], torch.from_numpy(raw[1:17]))
    assert torch.equal(inputs[1], torch.from_numpy(raw[80:96]))


def test_validation_batches_are_fixed_and_split_over_ranks(small_folder: Path) -> None:
    ds = WindowDataset(read_index(small_folder), split="val", seq_len=16)
    a = fixed_batches(ds, micro_batch_size=2, num_batches=3)
    b = fixed_batches(ds, micro_batch_size=2, num_batches=3)
    assert len(a) == 3 and all(torch.equal(x[0], y[0]) for x, y in zip(a, b))
    assert all(torch.equal(w, torch.ones(2)) for _, _, w in a)  # one process: no padding
    whole = sorted(tuple(row.tolist()) for x in a for row in x[0])
    for world in (2, 4, 5):  # the same six windows on any number of ranks, each once
        shares = [
            fixed_batches(ds, micro_batch_size=2, num_batches=3, dp_rank=r, dp_world_size=world) for r in range(world)
        ]
        assert len({len(share) for share in shares}) == 1  # as many forward passes on every rank
        real = [tuple(row.tolist()) for share in shares for x, _, w in share for row, keep in zip(x, w) if keep]
        assert sorted(real) == whole, world


def test_bad_data_is_one_clear_line(tmp_path: Path) -> None:
    folder = make_folder(tmp_path, docs=80)
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
        WindowDataset(index, split="train", seq_len=8, verify_checksums=True)
    shard.write_bytes(bytes(data[:-2]))
    with pytest.raises(DataError, match="truncated"):
        WindowDataset(index, split="train", seq_len=8)
    raw = json.loads((folder / "index.json").read_text())
    del raw["splits"]
    (folder / "index.json").write_text(json.dumps(raw))
    with pytest.raises(DataError, match="malformed"):
        read_index(folder)


def test_checksum_cache_skips_verified_shards_but_not_changed_ones(tmp_path: Path) -> None:
    folder = make_folder(tmp_path, docs=80)
    index = read_index(folder)
    cache = tmp_path / "cache.json"
    verify_shards(index, split="train", checksums=True, cache=cache)
    assert len(json.loads(cache.read_text())) == len(index.splits["train"].shards)
    shard = folder / index.splits["train"].shards[0].file
    data = bytearray(shard.read_bytes())
    data[3] ^= 0x01
    shard.write_bytes(bytes(data))  # same size, new content
    # The cache keys on size and modification time; filesystems stamp times in ticks of a few milliseconds, so a
    # rewrite this soon after the check may keep the old time. Say what the test means: a later modification time.
    stat = shard.stat()
    os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    with pytest.raises(DataError, match="sha256"):
        verify_shards(index, split="train", checksums=True, cache=cache)


def folder_state(folder: Path) -> dict[str, bytes | str]:
    """Every entry under ``folder``: a file's bytes, a symlink's target."""
    return {
        str(p.relative_to(folder)): (os.readlink(p) if p.is_symlink() else p.read_bytes() if p.is_file() else "dir")
        for p in sorted(folder.rglob("*"))
    }


def name_outside(data: Path, entry: str, how: str) -> Path:
    """Make ``data``'s index name, at ``entry`` (``tokenizer`` or ``shard``: the first train shard), a copy of that
    file outside the folder: through ``..``, by an absolute path, or through a symlink in the folder. The copy is
    a valid file (so only its place is wrong); returned."""
    raw = json.loads((data / "index.json").read_text())
    inside = raw["tokenizer"]["file"] if entry == "tokenizer" else raw["splits"]["train"]["shards"][0]["file"]
    outside = data.parent / "elsewhere" / f"outside-{entry}"
    outside.parent.mkdir(exist_ok=True)
    outside.write_bytes((data / inside).read_bytes())
    if how == "dotdot":
        name = os.path.relpath(outside, data)
    elif how == "absolute":
        name = str(outside)
    else:
        name = f"link-{entry}"
        (data / name).symlink_to(outside)
    if entry == "tokenizer":
        raw["tokenizer"]["file"] = name
    else:
        raw["splits"]["train"]["shards"][0]["file"] = name
    (data / "index.json").write_text(json.dumps(raw))
    return outside


@pytest.mark.parametrize("how", ["dotdot", "absolute", "symlink"])
@pytest.mark.parametrize("entry", ["tokenizer", "shard"])
def test_index_names_must_stay_inside_the_folder(small_folder: Path, tmp_path: Path, entry: str, how: str) -> None:
    """An index naming a file outside its folder (the trainer copies the tokenizer into every checkpoint under the
    recorded name: '../..' wrote outside the run, an absolute path or a symlink copied any file into it) is one
    line naming the index and the entry; the folder is left as it was."""
    data = tmp_path / "data"
    shutil.copytree(small_folder, data)
    name_outside(data, entry, how)
    before = folder_state(tmp_path)
    with pytest.raises(DataError) as err:
        read_index(data)
    message = str(err.value)
    where = "tokenizer.file" if entry == "tokenizer" else "splits.train.shards[0].file"
    reason = {"dotdot": "goes up out of the folder", "absolute": "is an absolute path", "symlink": "leads out of"}[how]
    assert str(data / "index.json") in message and where in message and reason in message, message
    assert "\n" not in message
    assert folder_state(tmp_path) == before


def test_names_inside_the_folder_are_read(small_folder: Path, tmp_path: Path) -> None:
    """A symlink to a file of the folder, a subfolder, and the folder reached through a symlink are all inside."""
    data = tmp_path / "data"
    shutil.copytree(small_folder, data)
    raw = json.loads((data / "index.json").read_text())
    first = raw["splits"]["train"]["shards"][0]["file"]
    (data / "alias.bin").symlink_to(first)
    (data / "sub").mkdir()
    os.replace(data / raw["splits"]["train"]["shards"][1]["file"], data / "sub" / "moved.bin")
    raw["splits"]["train"]["shards"][0]["file"] = "alias.bin"
    raw["splits"]["train"]["shards"][1]["file"] = "sub/moved.bin"
    (data / "index.json").write_text(json.dumps(raw))
    (tmp_path / "via").symlink_to(data)
    index = read_index(tmp_path / "via")
    WindowDataset(index, split="train", seq_len=8, verify_checksums=True)


@pytest.mark.parametrize("content", ["[1, 2]", '"text"', "3", "null"])
def test_an_index_that_is_not_an_object_is_one_line(tmp_path: Path, content: str) -> None:
    (tmp_path / "index.json").write_text(content)
    with pytest.raises(DataError, match="not an object"):
        read_index(tmp_path)


@pytest.mark.parametrize("content", [b'{"format": "\xff"}', b"\x00\x01 binary", b'{"splits": {"train": [1]}}'])
def test_an_index_that_is_not_json_text_is_one_line(tmp_path: Path, content: bytes) -> None:
    (tmp_path / "index.json").write_bytes(content)
    with pytest.raises(DataError, match="is malformed|is not a megatron_pept shard index"):
        read_index(tmp_path)


def test_a_data_path_that_is_a_file_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "shards.bin").write_bytes(b"\0" * 8)
    with pytest.raises(DataError, match="is a file, not a folder"):
        read_index(tmp_path / "shards.bin")


def test_shards_record_their_largest_id(small_folder: Path, tmp_path: Path) -> None:
    """prepare_data and ShardWriter record each shard's largest id (checked against numpy on the written bytes),
    and the index keeps it through a write and a read."""
    from megatron_pept.data.shards import largest_id

    folder = counting_folder(tmp_path / "counting", tokens=5000, start=100, shard_tokens=700)
    for root in (small_folder, folder):
        index = read_index(root)
        for split in index.splits.values():
            for shard in split.shards:
                assert shard.max_id == int(np.fromfile(root / shard.file, dtype=index.np_dtype).max()), shard
        assert largest_id(index, split="train") == max(s.max_id for s in index.splits["train"].shards)
    assert largest_id(read_index(folder), split="train") == 5099
    assert all("max_id" in s for s in json.loads((folder / "index.json").read_text())["splits"]["train"]["shards"])


def test_the_largest_id_of_an_old_index_is_read_once(small_folder: Path, tmp_path: Path) -> None:
    """An index written before max_id was recorded still reads; its largest id comes from the shards, and the
    checksum cache remembers it (by size and modification time) in a file that older versions read too."""
    from megatron_pept.data.shards import largest_id

    data = tmp_path / "data"
    shutil.copytree(small_folder, data)
    raw = json.loads((data / "index.json").read_text())
    recorded = max(s.pop("max_id") for s in raw["splits"]["train"]["shards"])
    (data / "index.json").write_text(json.dumps(raw))
    index = read_index(data)
    assert all(s.max_id is None for s in index.splits["train"].shards)
    cache = VerifiedShards(tmp_path / "cache.json")
    assert largest_id(index, split="train", cache=cache) == recorded
    verify_shards(index, split="train", checksums=True, cache=cache)
    cache.save()
    again = VerifiedShards(tmp_path / "cache.json")
    assert again.entries == cache.entries and len(again.max_ids) == len(index.splits["train"].shards)
    key = str((data / index.splits["train"].shards[0].file).resolve())
    again.max_ids[key][2] = 60000  # what the cache says is what counts: the shard is not read again
    assert largest_id(index, split="train", cache=again) == 60000
    shard = data / index.splits["train"].shards[0].file
    stat = shard.stat()
    os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))  # modified since: read again
    assert largest_id(index, split="train", cache=again) == recorded
    old_format = {k: v for k, v in json.loads((tmp_path / "cache.json").read_text()).items() if k != "max_ids"}
    (tmp_path / "old.json").write_text(json.dumps(old_format))
    assert VerifiedShards(tmp_path / "old.json").entries == cache.entries
