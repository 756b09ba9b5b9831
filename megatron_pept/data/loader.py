"""Batches of token windows from memory-mapped shards, in a seeded order, resumable exactly.

Each shard of a split is cut into windows of ``seq_len + 1`` tokens that start every ``seq_len`` tokens (the
extra token is the last target); the tail of a shard shorter than a window is not used. An epoch visits every
window once in an order drawn from ``(seed, epoch)``. Data-parallel rank ``r`` of ``w`` takes every ``w``-th
window of that order, and the order is cut to a whole number of global micro-batches, so every rank runs the
same number of steps and no window is seen twice in an epoch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from megatron_pept.data.shards import DataIndex, open_shard, verify_shards
from megatron_pept.errors import DataError


class WindowDataset:
    """Random access to the ``seq_len + 1`` token windows of one split."""

    def __init__(self, index: DataIndex, *, split: str, seq_len: int) -> None:
        if split not in index.splits:
            raise DataError(f"{index.root} has no '{split}' split (it has: {', '.join(index.splits)})")
        verify_shards(index, split=split)
        self.index, self.split, self.seq_len = index, split, seq_len
        self._shards = [open_shard(index, s) for s in index.splits[split].shards]
        counts = [max(0, (s.tokens - 1) // seq_len) for s in index.splits[split].shards]
        self._starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        if self.num_windows == 0:
            longest = max((s.tokens for s in index.splits[split].shards), default=0)
            raise DataError(
                f"data.seq_len={seq_len} is longer than the data: the '{split}' split of {index.root} has no "
                f"window of {seq_len + 1} tokens (its longest shard has {longest}); lower data.seq_len"
            )

    @property
    def num_windows(self) -> int:
        return int(self._starts[-1])

    def window(self, i: int) -> np.ndarray:
        shard = int(np.searchsorted(self._starts, i, side="right") - 1)
        offset = (i - int(self._starts[shard])) * self.seq_len
        return self._shards[shard][offset : offset + self.seq_len + 1]

    def batch(self, window_ids: np.ndarray | list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and targets ``[len(window_ids), seq_len]`` (int64)."""
        rows = np.stack([self.window(int(i)) for i in window_ids]).astype(np.int64)
        tokens = torch.from_numpy(rows)
        return tokens[:, :-1], tokens[:, 1:]


@dataclass
class LoaderPosition:
    epoch: int = 0
    batch_in_epoch: int = 0


class DistributedBatchLoader:
    """Micro-batches for one data-parallel rank, in a seeded shuffled order, with exact resume."""

    def __init__(
        self,
        dataset: WindowDataset,
        *,
        micro_batch_size: int,
        seed: int,
        dp_rank: int = 0,
        dp_world_size: int = 1,
        shuffle: bool = True,
    ) -> None:
        global_micro = micro_batch_size * dp_world_size
        if dataset.num_windows < global_micro:
            raise DataError(
                f"the '{dataset.split}' split has {dataset.num_windows} windows of {dataset.seq_len + 1} tokens, "
                f"fewer than one micro-batch across ranks ({micro_batch_size} x {dp_world_size}); "
                "add data or lower data.seq_len / train.micro_batch_size"
            )
        self.dataset = dataset
        self.micro_batch_size = micro_batch_size
        self.seed = seed
        self.dp_rank, self.dp_world_size = dp_rank, dp_world_size
        self.shuffle = shuffle
        self.batches_per_epoch = dataset.num_windows // global_micro
        self.position = LoaderPosition()
        self._order_epoch = -1
        self._order: np.ndarray | None = None

    def _rank_order(self, epoch: int) -> np.ndarray:
        if self._order_epoch != epoch:
            n = self.dataset.num_windows
            if self.shuffle:
                gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
                order = torch.randperm(n, generator=gen).numpy()
            else:
                order = np.arange(n)
            usable = self.batches_per_epoch * self.micro_batch_size * self.dp_world_size
            self._order = order[:usable][self.dp_rank :: self.dp_world_size]
            self._order_epoch = epoch
        assert self._order is not None
        return self._order

    def window_ids(self, position: LoaderPosition) -> np.ndarray:
        order = self._rank_order(position.epoch)
        start = position.batch_in_epoch * self.micro_batch_size
        return order[start : start + self.micro_batch_size]

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        batch = self.dataset.batch(self.window_ids(self.position))
        self.position.batch_in_epoch += 1
        if self.position.batch_in_epoch == self.batches_per_epoch:
            self.position = LoaderPosition(epoch=self.position.epoch + 1)
        return batch

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {
            "epoch": torch.tensor(self.position.epoch),
            "batch_in_epoch": torch.tensor(self.position.batch_in_epoch),
            "seed": torch.tensor(self.seed),
            "dp_world_size": torch.tensor(self.dp_world_size),
            "micro_batch_size": torch.tensor(self.micro_batch_size),
            "num_windows": torch.tensor(self.dataset.num_windows),
        }

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for key, mine in (
            ("seed", self.seed),
            ("micro_batch_size", self.micro_batch_size),
            ("num_windows", self.dataset.num_windows),
        ):
            if int(state[key]) != mine:
                raise DataError(
                    f"cannot resume the data loader: the checkpoint has {key}={int(state[key])} but this run has "
                    f"{mine}; resume with the same data, train.seed and train.micro_batch_size"
                )
        if int(state["dp_world_size"]) != self.dp_world_size:
            raise DataError(
                f"cannot resume the data loader: the checkpoint was taken with {int(state['dp_world_size'])} "
                f"data-parallel ranks and this run has {self.dp_world_size}; resume on the same number of ranks"
            )
        self.position = LoaderPosition(epoch=int(state["epoch"]), batch_in_epoch=int(state["batch_in_epoch"]))


def fixed_batches(
    dataset: WindowDataset,
    *,
    micro_batch_size: int,
    num_batches: int,
    dp_rank: int = 0,
    dp_world_size: int = 1,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The validation batches: the first windows of the split in file order, the same in every run.

    Uses fewer batches than asked when the split is small (every window at most once).
    """
    per_rank = min(num_batches, dataset.num_windows // (micro_batch_size * dp_world_size))
    if per_rank == 0:
        raise DataError(
            f"the '{dataset.split}' split has {dataset.num_windows} windows, fewer than one validation micro-batch "
            f"across ranks ({micro_batch_size} x {dp_world_size}); add validation data or lower the batch size"
        )
    ids = np.arange(per_rank * micro_batch_size * dp_world_size)[dp_rank::dp_world_size]
    return [dataset.batch(ids[i : i + micro_batch_size]) for i in range(0, len(ids), micro_batch_size)]
