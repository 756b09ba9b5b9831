"""A run's data: the training datasets with their blend weights, the validation split, the checksum cache, the
loaders, the check that every token id fits the vocabulary, and the check that a resumed run reads data made with
its tokenizer."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from megatron_pept.config import Config
from megatron_pept.data.builtin import ensure_builtin_dataset
from megatron_pept.data.loader import DistributedBatchLoader, WindowDataset, fixed_batches
from megatron_pept.data.shards import INDEX_FILE, DataIndex, VerifiedShards, largest_id, read_index
from megatron_pept.distributed import ParallelDims, comm
from megatron_pept.errors import DataError

logger = logging.getLogger("megatron_pept")


@dataclass
class RunData:
    train: list[tuple[WindowDataset, float]]
    """Training datasets with their blend weights."""
    val: WindowDataset | None
    """The primary dataset's validation split (None: it has none)."""
    index: DataIndex
    """The primary dataset's index (tokenizer, vocabulary, special ids)."""
    verified_shards: VerifiedShards
    """The shard checksum cache; saved (:meth:`VerifiedShards.save`) only once the run is accepted."""
    largest_ids: list[tuple[Path, int]] = field(default_factory=list)
    """Each data folder the run reads with the largest token id it holds there (the splits it uses)."""

    def check_vocabulary(self, vocab_size: int) -> None:
        """Refuse a model of ``vocab_size`` embedding rows smaller than the data's tokenizer, or data holding an id
        it has no row for: that would fail deep in the forward pass (an IndexError on CPU, a device-side assert on
        a GPU), in training or only at the first evaluation."""
        if vocab_size < self.index.vocab_size:
            raise DataError(
                f"model.vocab_size={vocab_size} is smaller than the data's tokenizer vocabulary "
                f"({self.index.vocab_size} ids, {self.index.root}); set model.vocab_size >= {self.index.vocab_size} "
                "or null"
            )
        for root, largest in self.largest_ids:
            if largest >= vocab_size:
                raise DataError(
                    f"{root} holds token id {largest} but the model's vocabulary has {vocab_size} ids (0 to "
                    f"{vocab_size - 1}): set model.vocab_size to at least {largest + 1} (or null to take the data's), "
                    "or train on data made with this model's tokenizer"
                )

    @property
    def train_windows(self) -> int:
        return sum(ds.num_windows for ds, _ in self.train)

    def loader(self, cfg: Config, dims: ParallelDims) -> DistributedBatchLoader:
        return DistributedBatchLoader(
            [ds for ds, _ in self.train],
            weights=[w for _, w in self.train],
            micro_batch_size=cfg.train.micro_batch_size,
            seed=cfg.train.seed,
            dp_rank=dims.dp_rank,
            dp_world_size=dims.dp_world_size,
            allow_reshard=cfg.data.allow_reshard,
        )

    def val_batches(self, cfg: Config, dims: ParallelDims) -> list:
        if self.val is None:
            return []
        return fixed_batches(
            self.val,
            micro_batch_size=cfg.train.micro_batch_size,
            num_batches=cfg.train.eval_batches,
            dp_rank=dims.dp_rank,
            dp_world_size=dims.dp_world_size,
        )


def build_run_data(cfg: Config, dims: ParallelDims) -> RunData:
    """Open (and for a built-in dataset, make) the data a run trains and validates on; blends must share one
    tokenizer. Shard sizes are checked on every rank, checksums on rank 0 (shared storage)."""
    d, run_dir = cfg.data, Path(cfg.run_dir)
    primary = Path(d.path) if d.path else (Path(d.blend[0].path) if d.blend else run_dir / "data")
    for folder in [primary, *(Path(s.path) for s in d.blend)]:
        if folder.exists() and not folder.is_dir():  # on every rank, before rank 0 writes a built-in dataset
            raise DataError(
                f"data path {folder} is a file, not a folder: point data.path (or data.blend) at the folder "
                "megatron-pept-prepare-data --output wrote (the one holding index.json)"
            )
    if d.builtin is not None and dims.is_main:
        ensure_builtin_dataset(d.builtin, primary)
    comm.barrier()
    cache = VerifiedShards(run_dir / ".verified_shards.json")
    checksums = d.verify_checksums and dims.is_main
    sources = [(Path(s.path), s.weight) for s in d.blend] or [(primary, 1.0)]
    train = []
    for path, weight in sources:
        index = read_index(path)
        ds = WindowDataset(index, split="train", seq_len=d.seq_len, verify_checksums=checksums, verify_cache=cache)
        train.append((ds, weight))
    primary_index = read_index(primary)
    for ds, _ in train:
        if ds.index.tokenizer_sha256 != primary_index.tokenizer_sha256:
            raise DataError(
                f"{ds.index.root} and {primary} were tokenized with different tokenizers; blend and validate "
                "on data prepared with one tokenizer"
            )
    val = None
    if "val" in primary_index.splits and primary_index.splits["val"].tokens > 0:
        val = WindowDataset(
            primary_index, split="val", seq_len=d.seq_len, verify_checksums=checksums, verify_cache=cache
        )
    else:
        logger.warning("%s has no validation split: val/loss will not be logged", primary)
    used = [(ds.index, "train") for ds, _ in train] + ([(primary_index, "val")] if val is not None else [])
    largest_ids = _largest_ids(used, cache=cache, is_main=dims.is_main)
    return RunData(train=train, val=val, index=primary_index, verified_shards=cache, largest_ids=largest_ids)


def _largest_ids(used: list[tuple[DataIndex, str]], *, cache: VerifiedShards, is_main: bool) -> list[tuple[Path, int]]:
    """The largest id of each folder over the splits the run reads, checked against the folder's own vocabulary.
    Old indexes (without per-shard ``max_id``) make rank 0 read the shards once (:func:`largest_id`); every
    rank gets its answer, so all refuse the same data."""
    recorded = all(shard.max_id is not None for index, split in used for shard in index.splits[split].shards)
    largest: dict[str, int] = {}
    if is_main or recorded:
        for index, split in used:
            value = largest_id(index, split=split, cache=cache)
            largest[str(index.root)] = max(value, largest.get(str(index.root), -1))
    largest = comm.broadcast_object(largest)
    for index, _ in used:
        if largest[str(index.root)] >= index.vocab_size:
            raise DataError(
                f"{index.root} holds token id {largest[str(index.root)]} but its {INDEX_FILE} records a vocabulary "
                f"of {index.vocab_size} ids: the index was edited, or its shards were made with another tokenizer; "
                "prepare the data again with megatron-pept-prepare-data"
            )
    return [(Path(root), value) for root, value in largest.items()]


def check_same_tokenizer(checkpoint: Path, saved_sha256: str | None, index: DataIndex, *, allow_change: bool) -> None:
    """Resuming on data made with another tokenizer would train on ids that mean other things (and an export
    would ship the new tokenizer with the old weights): refused unless ``allow_change``
    (``data.allow_tokenizer_change``)."""
    current = index.tokenizer_sha256
    if saved_sha256 == current:
        return
    if saved_sha256 is None:
        logger.warning("%s does not record its tokenizer (an earlier version): the data cannot be checked", checkpoint)
        return
    if not allow_change:
        raise DataError(
            f"{checkpoint} was trained on data made with tokenizer {saved_sha256[:12]}, but {index.root} was made "
            f"with {current[:12]}: resume on data made with the run's tokenizer (a copy is in "
            f"{checkpoint / 'tokenizer'}), or set data.allow_tokenizer_change=true to switch on purpose"
        )
    logger.warning(
        "data.allow_tokenizer_change: resuming %s (tokenizer %s) on data made with tokenizer %s",
        checkpoint,
        saved_sha256[:12],
        current[:12],
    )
