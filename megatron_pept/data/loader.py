"""Batches of token windows from memory-mapped shards: seeded, blended, split over ranks, resumable exactly.

**Windows.** Each shard of a split is cut into windows of ``seq_len + 1`` tokens starting every ``seq_len``
tokens (inputs plus shifted targets); a shard's tail shorter than a window is not used.

**One global stream.** All ranks agree on a single infinite stream of samples. For one dataset, sample ``j``
is window ``perm_e(j mod N)`` of epoch ``e = j // N``, where ``perm_e`` is a seeded pseudo-random permutation of
the ``N`` windows (a Feistel network with cycle walking: no ``N``-sized array, O(1) to resume). Every window is
therefore used exactly once per epoch. With several datasets (blending), sample ``g`` of the stream is assigned
to dataset ``s`` by a low-discrepancy sequence that hits each dataset in proportion to its weight; each dataset
keeps its own epoch order.

**Ranks.** Each optimizer micro-step consumes ``micro_batch_size x dp_world_size`` consecutive samples of the
stream; rank ``r`` takes the ``r``-th block of ``micro_batch_size``. All ranks run the same number of steps.

**Resume.** The loader's state is the stream position (samples consumed, per dataset). It does not depend on the
number of ranks, so a checkpoint resumes exactly on the same layout; on a different data-parallel size it is
refused unless ``allow_reshard`` is set, in which case the global stream continues exactly where it stopped and
only the assignment of samples to ranks changes (the documented re-sharding).
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch

from megatron_pept.data.shards import DataIndex, VerifiedShards, open_shard, verify_shards
from megatron_pept.errors import DataError

_GOLDEN = 0.6180339887498949  # the Weyl sequence frac(g * golden) is evenly spread for every prefix
_PERMUTATION_BLOCK = 8192  # stream positions whose window ids are computed together


class WindowDataset:
    """Random access to the ``seq_len + 1`` token windows of one split of one shard folder."""

    def __init__(
        self,
        index: DataIndex,
        *,
        split: str,
        seq_len: int,
        verify_checksums: bool = False,
        verify_cache: str | os.PathLike[str] | VerifiedShards | None = None,
    ) -> None:
        if split not in index.splits:
            raise DataError(f"{index.root} has no '{split}' split (it has: {', '.join(index.splits)})")
        verify_shards(index, split=split, checksums=verify_checksums, cache=verify_cache)
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

    def windows(self, window_ids: np.ndarray | list[int]) -> np.ndarray:
        """``[len(window_ids), seq_len + 1]`` int64 tokens."""
        return np.stack([self.window(int(i)) for i in window_ids]).astype(np.int64)

    def batch(self, window_ids: np.ndarray | list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and targets ``[len(window_ids), seq_len]`` (int64)."""
        tokens = torch.from_numpy(self.windows(window_ids))
        return tokens[:, :-1], tokens[:, 1:]


# ----------------------------------------------------------------------------------------------------------
# Seeded permutations of [0, n) without materialising them


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on uint64 arrays (wrapping arithmetic)."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def feistel_permutation(indices: np.ndarray, *, n: int, key: int, rounds: int = 6) -> np.ndarray:
    """``perm(indices)`` for a pseudo-random permutation of ``[0, n)`` chosen by ``key``.

    A balanced Feistel network permutes ``[0, 4^k)`` (the smallest power of four >= n); cycle walking (apply it
    again while the result is >= n) restricts it to a permutation of ``[0, n)``.
    """
    if n <= 1:
        return np.zeros_like(np.asarray(indices, dtype=np.int64))
    half_bits = max(1, math.ceil(math.log2(n) / 2))
    mask = np.uint64((1 << half_bits) - 1)
    shift = np.uint64(half_bits)
    round_keys = _mix64(np.arange(rounds, dtype=np.uint64) + np.uint64(key % (1 << 63)) * np.uint64(rounds + 1))

    def encrypt(x: np.ndarray) -> np.ndarray:
        left, right = x >> shift, x & mask
        for k in round_keys:
            left, right = right, left ^ (_mix64(right ^ k) & mask)
        return (left << shift) | right

    with np.errstate(over="ignore"):
        out = encrypt(np.asarray(indices, dtype=np.uint64))
        outside = out >= np.uint64(n)
        while outside.any():
            out[outside] = encrypt(out[outside])
            outside = out >= np.uint64(n)
    return out.astype(np.int64)


def blend_assignment(sample_ids: np.ndarray, *, weights: np.ndarray) -> np.ndarray:
    """The dataset each global sample comes from: dataset ``s`` owns the slice of [0, 1) of width ``weights[s]``
    and sample ``g`` goes where ``frac(g * golden)`` falls, so every prefix of the stream is close to the weights."""
    cumulative = np.cumsum(weights / weights.sum())
    cumulative[-1] = 1.0
    u = np.modf(sample_ids.astype(np.float64) * _GOLDEN)[0]
    return np.minimum(np.searchsorted(cumulative, u, side="right"), len(weights) - 1)


class DistributedBatchLoader:
    """This rank's micro-batches from the global sample stream of one or more datasets."""

    def __init__(
        self,
        datasets: WindowDataset | list[WindowDataset],
        *,
        micro_batch_size: int,
        seed: int,
        dp_rank: int = 0,
        dp_world_size: int = 1,
        weights: list[float] | None = None,
        shuffle: bool = True,
        allow_reshard: bool = False,
    ) -> None:
        self.datasets = datasets if isinstance(datasets, list) else [datasets]
        self.weights = np.asarray(weights if weights is not None else [1.0] * len(self.datasets), dtype=np.float64)
        if len(self.weights) != len(self.datasets) or (self.weights <= 0).any():
            raise DataError(f"need one positive weight per dataset; got {list(self.weights)} for {len(self.datasets)}")
        if len({d.seq_len for d in self.datasets}) != 1:
            raise DataError("blended datasets must use the same seq_len")
        if len({d.index.tokenizer_sha256 for d in self.datasets}) != 1:
            raise DataError("blended datasets were tokenized with different tokenizers; prepare them with the same one")
        self.micro_batch_size = micro_batch_size
        self.seed = seed
        self.dp_rank, self.dp_world_size = dp_rank, dp_world_size
        self.shuffle = shuffle
        self.allow_reshard = allow_reshard
        self.samples_seen = 0
        self.per_dataset_seen = np.zeros(len(self.datasets), dtype=np.int64)
        self._perm_cache_key: tuple[int, int, int, int] | None = None
        self._perm_cache = np.empty(0, dtype=np.int64)

    @property
    def global_micro_batch(self) -> int:
        return self.micro_batch_size * self.dp_world_size

    def _window_ids(self, dataset: int, positions: np.ndarray) -> np.ndarray:
        """Window ids of the dataset's own stream positions ``positions`` (consecutive, ascending)."""
        n = self.datasets[dataset].num_windows
        epochs, offsets = np.divmod(positions, n)
        if not self.shuffle:
            return offsets
        out = np.empty_like(offsets)
        for epoch in np.unique(epochs):
            sel = np.flatnonzero(epochs == epoch)
            out[sel] = self._permuted(dataset, int(epoch), offsets[sel])
        return out

    def _permuted(self, dataset: int, epoch: int, offsets: np.ndarray) -> np.ndarray:
        """``perm_epoch(offsets)``, computed a block of positions at a time: numpy's per-call overhead would
        otherwise dominate for micro-batch-sized requests."""
        block = _PERMUTATION_BLOCK
        first, last = int(offsets[0]) // block, int(offsets[-1]) // block
        key = (dataset, epoch, first, last)
        if self._perm_cache_key != key:
            n = self.datasets[dataset].num_windows
            span = np.arange(first * block, min((last + 1) * block, n), dtype=np.int64)
            seed_key = (self.seed * 1_000_003 + dataset) * 65_537 + epoch
            self._perm_cache_key, self._perm_cache = key, feistel_permutation(span, n=n, key=seed_key)
        return self._perm_cache[offsets - first * block]

    def take_global(self, count: int) -> list[tuple[int, int]]:
        """The next ``count`` samples of the global stream as (dataset, window id); advances the stream."""
        sample_ids = np.arange(self.samples_seen, self.samples_seen + count, dtype=np.int64)
        owners = blend_assignment(sample_ids, weights=self.weights) if len(self.datasets) > 1 else np.zeros(count, int)
        result: list[tuple[int, int]] = [(0, 0)] * count
        for ds in range(len(self.datasets)):
            picks = np.flatnonzero(owners == ds)
            if picks.size == 0:
                continue
            positions = self.per_dataset_seen[ds] + np.arange(picks.size, dtype=np.int64)
            for slot, window in zip(picks, self._window_ids(ds, positions)):
                result[slot] = (ds, int(window))
            self.per_dataset_seen[ds] += picks.size
        self.samples_seen += count
        return result

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's next micro-batch: inputs and targets ``[micro_batch_size, seq_len]``."""
        samples = self.take_global(self.global_micro_batch)
        mine = samples[self.dp_rank * self.micro_batch_size : (self.dp_rank + 1) * self.micro_batch_size]
        rows = np.stack([self.datasets[ds].window(w) for ds, w in mine]).astype(np.int64)
        tokens = torch.from_numpy(rows)
        return tokens[:, :-1], tokens[:, 1:]

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {
            "samples_seen": torch.tensor(self.samples_seen),
            "per_dataset_seen": torch.from_numpy(self.per_dataset_seen.copy()),
            "num_windows": torch.tensor([d.num_windows for d in self.datasets]),
            "weights": torch.from_numpy(self.weights.copy()),
            "seed": torch.tensor(self.seed),
            "dp_world_size": torch.tensor(self.dp_world_size),
            "micro_batch_size": torch.tensor(self.micro_batch_size),
        }

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        num_windows = [d.num_windows for d in self.datasets]
        if state["num_windows"].tolist() != num_windows or int(state["seed"]) != self.seed:
            raise DataError(
                "cannot resume the data loader: the checkpoint was taken on other data or another train.seed "
                f"(windows per dataset {state['num_windows'].tolist()} vs {num_windows}); resume with the same "
                "data, data.seq_len and train.seed"
            )
        if not np.allclose(state["weights"].numpy(), self.weights):
            raise DataError("cannot resume the data loader: the blend weights differ from the checkpoint's")
        old_world, old_micro = int(state["dp_world_size"]), int(state["micro_batch_size"])
        if (old_world, old_micro) != (self.dp_world_size, self.micro_batch_size) and not self.allow_reshard:
            raise DataError(
                f"cannot resume the data loader: the checkpoint was taken with {old_world} data-parallel ranks x "
                f"micro-batch {old_micro} and this run has {self.dp_world_size} x {self.micro_batch_size}; resume "
                "on the same layout, or set data.allow_reshard=true to continue the same global sample stream "
                "with samples reassigned to ranks"
            )
        self.samples_seen = int(state["samples_seen"])
        self.per_dataset_seen = state["per_dataset_seen"].numpy().astype(np.int64).copy()


def fixed_batches(
    dataset: WindowDataset, *, micro_batch_size: int, num_batches: int, dp_rank: int = 0, dp_world_size: int = 1
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """This rank's share of the validation windows: ``(inputs, targets, weights)`` micro-batches.

    The validation set is the first ``num_batches * micro_batch_size`` windows of the split in file order (fewer if
    the split is smaller; every window at most once), the same whatever the number of ranks: rank ``r`` takes
    windows ``r, r + W, ...``. Every rank gets the same number of micro-batches (a collective forward, as under
    FSDP2, needs that); places beyond a rank's share repeat its first window with weight 0. Summing
    ``weights * per-window loss`` and ``weights`` over ranks gives the mean over the set.
    """
    total = min(num_batches * micro_batch_size, dataset.num_windows)
    if total == 0:
        raise DataError(
            f"the '{dataset.split}' split has no window of seq_len + 1 tokens; add validation data or lower "
            "data.seq_len"
        )
    mine = np.arange(dp_rank, total, dp_world_size)
    per_rank = -(-total // dp_world_size)  # the largest share
    num_micro = -(-per_rank // micro_batch_size)
    ids = np.zeros(num_micro * micro_batch_size, dtype=np.int64)
    weights = torch.zeros(num_micro * micro_batch_size)
    ids[: len(mine)], weights[: len(mine)] = mine, 1.0
    if len(mine):
        ids[len(mine) :] = mine[0]
    out = []
    for i in range(num_micro):
        part = slice(i * micro_batch_size, (i + 1) * micro_batch_size)
        inputs, targets = dataset.batch(ids[part])
        out.append((inputs, targets, weights[part]))
    return out
