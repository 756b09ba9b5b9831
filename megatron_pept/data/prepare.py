"""Tokenize a text corpus into a shard folder, with worker processes, a validation split and resume.

Documents are read in a fixed order (see :mod:`megatron_pept.data.sources`), numbered from 0, and sent to the
validation split by a hash of their number (so the split does not depend on batching or worker count). Each
document becomes ``[BOS] ids EOS``. Shards close at document boundaries once they reach ``shard_tokens``.

Interruption and resume: every finished shard is renamed into place and recorded in ``.prepare_state.json``
(with, per split, the number of the first document not yet in a finished shard). Re-running the same command
re-reads the input from the earliest unfinished document, skips documents already in finished shards without
tokenizing them, and produces byte-identical shards to an uninterrupted run. The state also records each input
file's size and a sampled sha256 (:func:`input_content`): input that changed since is refused, as resuming would
mix shards of old and new text. ``index.json`` is written last; a folder without it is incomplete and the trainer
refuses it.

Bad input: a record of a text or JSON file that cannot be read (invalid UTF-8, a NUL byte, a malformed JSON line,
a missing or non-text field) stops the preparation with one line naming the file and line; with
``skip_bad_records`` it is skipped and counted instead (the count is kept in the index as
``bad_records_skipped``). An output folder that cannot be written (read-only, full, a file size limit) is one
line too: it is tried before any tokenizing, and a write that fails later keeps the finished shards for a resume
and removes the partial one.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import multiprocessing as mp
import os
import shutil
import signal
import sys
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from megatron_pept.data.shards import (
    INDEX_FILE,
    SPLITS,
    DataIndex,
    ShardInfo,
    ShardWriter,
    SplitInfo,
    token_dtype,
)
from megatron_pept.data.sources import BadRecords, iter_corpus, resolve_source
from megatron_pept.data.tokenizer import HF_FILE, MODEL_FILE, HFTokenizer, load_tokenizer
from megatron_pept.errors import DataError
from megatron_pept.faults import fault_point
from megatron_pept.orphans import signal_on_parent_death
from megatron_pept.safe_paths import outside_reason

logger = logging.getLogger(__name__)

STATE_FILE = ".prepare_state.json"
_MASK64 = (1 << 64) - 1


@dataclass(frozen=True)
class PrepareOptions:
    inputs: tuple[str, ...]
    tokenizer: str
    output: str
    text_field: str = "text"
    split: str = "train"
    shard_tokens: int = 1 << 27
    val_fraction: float = 0.005
    add_bos: bool = False
    seed: int = 0
    dtype: str = "auto"
    workers: int = 2
    batch_documents: int = 256
    skip_bad_records: bool = False
    """Skip (and count) records that cannot be read instead of stopping at the first. Not in the fingerprint: a
    preparation that stops at a bad record has written only what one that skips it writes too, so either may
    resume the other."""

    def fingerprint(self, tokenizer_sha256: str) -> dict:
        """Everything that decides the output bytes (not the worker count or batch size)."""
        return {
            "inputs": list(self.inputs),
            "tokenizer_sha256": tokenizer_sha256,
            "text_field": self.text_field,
            "split": self.split,
            "shard_tokens": self.shard_tokens,
            "val_fraction": self.val_fraction,
            "add_bos": self.add_bos,
            "seed": self.seed,
            "dtype": self.dtype,
        }


@dataclass
class PrepareResult:
    index: DataIndex
    documents: int
    text_bytes: int
    seconds: float
    resumed: bool
    already_complete: bool = False
    skipped_documents: int = 0
    bad_records: int = 0
    """Records skipped as unreadable (``skip_bad_records``); the first few are in ``bad_record_examples``."""
    bad_record_examples: list[str] = field(default_factory=list)

    @property
    def mb_per_sec(self) -> float:
        return self.text_bytes / 1e6 / max(self.seconds, 1e-9)


def splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def is_validation_document(doc_number: int, *, seed: int, val_fraction: float) -> bool:
    """Whether document ``doc_number`` is held out: a seeded hash of its number, below ``val_fraction``."""
    if val_fraction <= 0:
        return False
    return splitmix64(splitmix64(seed) ^ doc_number) / 2.0**64 < val_fraction


# ----------------------------------------------------------------------------------------------------------
# Worker side: one SentencePiece processor per process.

_WORKER_TOKENIZER = None
_WORKER_THREADS = -1


def _worker_init(model_path: str, threads: int, parent: int | None = None) -> None:
    global _WORKER_TOKENIZER, _WORKER_THREADS
    if parent is not None:  # a worker process: it dies with the tool (killed -9, it would block here for ever)
        signal_on_parent_death(signal.SIGKILL, parent)
    _WORKER_TOKENIZER = load_tokenizer(model_path)
    _WORKER_THREADS = threads


def _encode_batch(job: tuple[int, list[str], bool, str]) -> tuple[np.ndarray, np.ndarray, int]:
    """Encode documents into one flat array plus per-document lengths (cheap to send between processes)."""
    batch, texts, add_bos, dtype = job
    fault_point("prepare.encode", step=batch, rank=0)
    tok = _WORKER_TOKENIZER
    assert tok is not None
    pieces = tok.encode(texts, num_threads=_WORKER_THREADS)
    extra = 2 if add_bos else 1
    lengths = np.fromiter((len(ids) + extra for ids in pieces), dtype=np.int64, count=len(pieces))
    flat = np.empty(int(lengths.sum()), dtype=dtype)
    start = 0
    for ids, length in zip(pieces, lengths.tolist()):
        if add_bos:
            flat[start] = tok.bos_id
        flat[start + extra - 1 : start + length - 1] = ids
        flat[start + length - 1] = tok.eos_id
        start += length
    return flat, lengths, sum(len(t.encode("utf-8")) for t in texts)


def _kill_workers(pool: ProcessPoolExecutor) -> None:
    """SIGKILL the executor's worker processes (they hold nothing but a tokenizer; a stopped one ignores SIGTERM)."""
    for proc in list((pool._processes or {}).values()):  # Python < 3.14 has no public terminate_workers()
        proc.kill()


# ----------------------------------------------------------------------------------------------------------


@dataclass
class _SplitProgress:
    next_document: int = 0  # first document number not yet inside a finished shard
    shards: list[dict] = field(default_factory=list)


def _sampled_sha256(path: Path, *, block: int = 1 << 16, samples: int = 16) -> str:
    """sha256 of a file's size, its first and last MiB and ``samples`` blocks spread over it: catches an edited,
    replaced, truncated or appended input without reading a large corpus in full at every resume."""
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with path.open("rb") as f:
        offsets = [0, max(0, size - (1 << 20))] + [size * i // (samples + 1) for i in range(1, samples + 1)]
        for offset, length in zip(offsets, [1 << 20, 1 << 20] + [block] * samples):
            f.seek(offset)
            h.update(f.read(length))
    return h.hexdigest()


def input_content(specs: tuple[str, ...]) -> dict[str, dict]:
    """What the inputs hold, file by file (size and a sampled sha256); a ``datasets`` hub name is recorded by name
    only (its content cannot be checked offline)."""
    content = {}
    for spec in specs:
        source = resolve_source(spec)
        files = [Path(f) for f in source.files]
        if source.builder == "disk":
            files = sorted(p for p in files[0].rglob("*") if p.is_file())
        for path in files:
            content[str(path)] = {"bytes": path.stat().st_size, "sha256_sampled": _sampled_sha256(path)}
        if source.builder == "hub":
            content[spec] = {"hub": True}
    return content


def _load_state(path: Path, fingerprint: dict, content: dict) -> dict[str, _SplitProgress] | None:
    if not path.is_file():
        return None
    try:
        raw = json.loads(path.read_text())
        saved_fingerprint, saved_content = raw.get("fingerprint", {}), raw.get("inputs")
        progress = {s: _SplitProgress(**raw["splits"][s]) for s in SPLITS}
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise DataError(
            f"{path} is unreadable ({type(err).__name__}: {err}); delete {path.parent} and start the preparation again"
        ) from None
    for split, p in progress.items():
        for shard in p.shards:
            name = shard.get("file") if isinstance(shard, dict) else shard
            reason = outside_reason(path.parent, name)
            if reason is not None:  # it would be adopted into the index, or deleted if the run ends empty
                raise DataError(
                    f"{path}: a {split} shard {name!r} {reason}; delete {path.parent} and start the preparation again"
                )
    if saved_fingerprint != fingerprint:
        changed = sorted(k for k in fingerprint if saved_fingerprint.get(k) != fingerprint[k])
        raise DataError(
            f"{path.parent} holds an interrupted preparation with different settings ({', '.join(changed)}); "
            "re-run with the same arguments to resume, or choose a new --output"
        )
    if saved_content is not None and saved_content != content:
        changed = sorted(k for k in {*content, *saved_content} if content.get(k) != saved_content.get(k))
        raise DataError(
            f"{path.parent} holds an interrupted preparation of other input: {changed[0]} changed since (size or "
            "content); resuming would mix old and new shards: restore the input or choose a new --output"
        )
    return progress


def _save_state(path: Path, fingerprint: dict, content: dict, progress: dict[str, _SplitProgress]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    splits = {s: asdict(p) for s, p in progress.items()}
    tmp.write_text(json.dumps({"fingerprint": fingerprint, "inputs": content, "splits": splits}))
    os.replace(tmp, path)


def _jobs(
    documents: Iterator[str],
    *,
    first_number: int,
    progress: dict[str, _SplitProgress],
    opts: PrepareOptions,
    dtype: str,
    counters: dict[str, int],
) -> Iterator[tuple[list[tuple[int, str]], tuple[int, list[str], bool, str]]]:
    """Batches of (document number, split) with the texts that still need tokenizing (and the batch's number)."""
    batches = 0
    batch_meta: list[tuple[int, str]] = []
    batch_texts: list[str] = []
    for number, text in enumerate(documents, start=first_number):
        split = "val" if is_validation_document(number, seed=opts.seed, val_fraction=opts.val_fraction) else "train"
        if number < progress[split].next_document:
            counters["skipped"] += 1
            continue  # already inside a finished shard
        batch_meta.append((number, split))
        batch_texts.append(text)
        if len(batch_texts) >= opts.batch_documents:
            yield batch_meta, (batches, batch_texts, opts.add_bos, dtype)
            batches += 1
            batch_meta, batch_texts = [], []
    if batch_texts:
        yield batch_meta, (batches, batch_texts, opts.add_bos, dtype)


def choose_token_dtype(vocab_size: int, requested: str) -> np.dtype:
    """The shard dtype: ``auto`` picks uint16 when the vocabulary fits; an explicit one must hold every id."""
    if requested == "auto":
        return token_dtype(vocab_size)
    if requested not in ("uint16", "uint32"):
        raise DataError(f"unknown token dtype {requested!r}; choose auto, uint16 or uint32")
    dtype = np.dtype("<u2" if requested == "uint16" else "<u4")
    if vocab_size > np.iinfo(dtype).max + 1:
        raise DataError(f"the tokenizer has {vocab_size} ids, too many for {requested} shards; use --dtype uint32")
    return dtype


def prepare_dataset(opts: PrepareOptions, *, show_progress: bool = True) -> PrepareResult:
    """Tokenize ``opts.inputs`` into the shard folder ``opts.output`` (resuming an interrupted run)."""
    started = time.perf_counter()
    for spec in opts.inputs:
        resolve_source(spec)  # fail on a missing file before any work
    if not 0.0 <= opts.val_fraction < 1.0:
        raise DataError(f"validation fraction must be in [0, 1); got {opts.val_fraction}")
    if opts.shard_tokens < 1:
        raise DataError(f"shard size must be >= 1 token; got {opts.shard_tokens}")
    tokenizer = load_tokenizer(opts.tokenizer)
    if opts.add_bos and tokenizer.bos_id is None:
        raise DataError(f"{tokenizer.path} has no beginning-of-text token; prepare without --add-bos")
    dtype = choose_token_dtype(tokenizer.vocab_size, opts.dtype)
    fingerprint = opts.fingerprint(tokenizer.sha256)
    out = Path(opts.output)
    state_path = out / STATE_FILE

    if (out / INDEX_FILE).is_file():
        try:
            existing = json.loads((out / INDEX_FILE).read_text()).get("prepared_with")
        except (OSError, ValueError, AttributeError) as err:
            raise DataError(
                f"{out / INDEX_FILE} is malformed ({type(err).__name__}: {err}); choose a new --output (or delete "
                f"{out} to prepare it again)"
            ) from None
        if existing == fingerprint:
            from megatron_pept.data.shards import read_index

            index = read_index(out)
            logger.info("%s is already complete; nothing to do", out)
            return PrepareResult(
                index=index, documents=0, text_bytes=0, seconds=0.0, resumed=False, already_complete=True
            )
        raise DataError(f"{out} already holds a prepared dataset made with other settings; choose a new --output")
    if out.exists() and not out.is_dir():
        raise DataError(f"--output {out} is a file; give a folder (a new one, or an interrupted preparation)")
    if out.exists() and not state_path.is_file() and any(p for p in out.iterdir() if not p.name.startswith(".")):
        raise DataError(f"output folder {out} exists and is not an interrupted preparation; choose a new --output")
    created = _make_output_folder(out)
    try:
        return _tokenize_into(
            out,
            opts,
            tokenizer=tokenizer,
            dtype=dtype,
            fingerprint=fingerprint,
            started=started,
            show_progress=show_progress,
        )
    except _WriteFailed as failed:
        _clean_up(out, created=created)
        raise DataError(failed.message(out)) from None
    except BaseException:
        _clean_up(out, created=created)
        raise


class _WriteFailed(Exception):
    """A write into the output folder failed (its OSError is the cause); how many shards were finished before."""

    def __init__(self, err: OSError, *, kept: int) -> None:
        super().__init__(str(err))
        self.err, self.kept = err, kept

    def message(self, out: Path) -> str:
        err = self.err
        if err.errno == errno.EFBIG:
            fix = "raise the file size limit (ulimit -f) or lower --shard-tokens"
        elif err.errno in (errno.ENOSPC, errno.EDQUOT):
            fix = "free space on its filesystem (or choose another --output)"
        elif err.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
            fix = "make it writable or choose another --output"
        else:
            fix = "fix the folder or choose another --output"
        kept = (
            f"the {self.kept} finished shard(s) are kept, so the same command resumes"
            if self.kept
            else "nothing of this preparation was kept"
        )
        return f"cannot write to {out} ({err.strerror or err}): {fix}; {kept}"


def _make_output_folder(out: Path) -> Path | None:
    """Create ``out`` (and missing parents) and check that it takes a file, before any tokenizing; the topmost
    folder created here (None: it existed), which a failed preparation with nothing to resume removes again."""
    created = None
    for folder in (out, *out.parents):
        if folder.exists():
            break
        created = folder
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-check.{os.getpid()}.tmp"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        _clean_up(out, created=created)
        raise DataError(
            f"cannot write to the output folder {out} ({err.strerror or err}): make it writable or choose another "
            "--output"
        ) from None
    return created


def _clean_up(out: Path, *, created: Path | None) -> None:
    """After a failure: remove the partial files (a shard, the state or the index being written); and when
    nothing is left to resume (no state file), the folders this preparation created."""
    with contextlib.suppress(OSError):
        for partial in out.glob(".*.tmp"):
            partial.unlink(missing_ok=True)
    if created is None or (out / STATE_FILE).exists():
        return
    with contextlib.suppress(OSError):  # rmdir: only ever an empty folder
        for folder in (out, *out.parents):
            folder.rmdir()
            if folder == created:
                break


@contextlib.contextmanager
def _writing(progress: dict[str, _SplitProgress]) -> Iterator[None]:
    """Marks writes into the output folder: their OSError becomes a :class:`_WriteFailed` (a failure to read the
    input is not one)."""
    try:
        yield
    except OSError as err:
        raise _WriteFailed(err, kept=sum(len(p.shards) for p in progress.values())) from err


def _tokenize_into(
    out: Path,
    opts: PrepareOptions,
    *,
    tokenizer: Any,
    dtype: np.dtype,
    fingerprint: dict,
    started: float,
    show_progress: bool,
) -> PrepareResult:
    """The preparation proper, into the existing, writable folder ``out``."""
    state_path = out / STATE_FILE
    for stale in out.glob(".*.tmp"):
        stale.unlink()  # a shard or state being written when the last run died

    content = input_content(opts.inputs)
    progress = _load_state(state_path, fingerprint, content)
    resumed = progress is not None
    if progress is None:
        progress = {s: _SplitProgress() for s in SPLITS}
    writers: dict[str, ShardWriter] = {}
    for split in SPLITS:
        writer = ShardWriter(out, split=split, dtype=dtype, shard_tokens=opts.shard_tokens)
        for shard in progress[split].shards:
            writer.adopt(ShardInfo(**shard))
        writers[split] = writer
    first = min(p.next_document for p in progress.values())
    if resumed:
        logger.info("resuming the preparation of %s from document %d", out, first)

    counters = {"skipped": 0}
    bad_records = BadRecords(
        skip=opts.skip_bad_records,
        hint="fix or remove it, or pass --skip-bad-records to skip such records (they are counted)",
    )
    jobs = _jobs(
        iter_corpus(
            list(opts.inputs), text_field=opts.text_field, split=opts.split, skip=first, bad_records=bad_records
        ),
        first_number=first,
        progress=progress,
        opts=opts,
        dtype=dtype.str,
        counters=counters,
    )
    # Several processes, one SentencePiece thread each; or this process alone, encoding on every core. An
    # executor, not multiprocessing.Pool: a worker that dies (the out-of-memory killer, kill -9) breaks the
    # executor and every waiting result raises, where Pool replaces the worker and waits forever for its batch.
    pool = (
        ProcessPoolExecutor(
            opts.workers,
            mp_context=mp.get_context("spawn"),
            initializer=_worker_init,
            initargs=(str(tokenizer.path), 1, os.getpid()),
        )
        if opts.workers > 1
        else None
    )
    if pool is None:
        _worker_init(str(tokenizer.path), -1)
    text_bytes = documents = 0
    bar = _progress_bar(show_progress)

    def consume(meta: list[tuple[int, str]], encoded: tuple[np.ndarray, np.ndarray, int]) -> None:
        nonlocal text_bytes, documents
        flat, lengths, nbytes = encoded
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        for (number, split), start, stop in zip(meta, offsets[:-1], offsets[1:]):
            with _writing(progress):
                closed = writers[split].add(flat[start:stop])
            if closed:
                progress[split].next_document = number + 1
                progress[split].shards = [asdict(s) for s in writers[split].info.shards]
                with _writing(progress):
                    _save_state(state_path, fingerprint, content, progress)
        documents += len(lengths)
        text_bytes += nbytes
        bar.update(nbytes)

    finished = False
    try:
        if pool is None:
            for meta, job in jobs:
                consume(meta, _encode_batch(job))
        else:
            # A bounded window of batches in flight, consumed in order: Pool.imap would read the whole corpus
            # ahead into memory.
            inflight: deque = deque()
            for meta, job in jobs:
                inflight.append((meta, pool.submit(_encode_batch, job)))
                if len(inflight) >= 4 * opts.workers:
                    head_meta, head = inflight.popleft()
                    consume(head_meta, head.result())
            while inflight:
                head_meta, head = inflight.popleft()
                consume(head_meta, head.result())
        finished = True
    except BrokenProcessPool:
        kept = sum(len(p.shards) for p in progress.values())
        raise DataError(
            f"a tokenizer worker process died (killed, or out of memory) while preparing {out}; the {kept} finished "
            "shard(s) are kept: run the same command again to resume (with fewer --workers if memory ran out)"
        ) from None
    finally:
        bar.close()
        if pool is not None:
            if not finished:  # an error or Ctrl-C: nothing waits for the batches in flight (nor for a hung worker)
                _kill_workers(pool)
            pool.shutdown(wait=True, cancel_futures=True)
    with _writing(progress):
        splits = {s: w.close() for s, w in writers.items()}
    if splits["train"].documents == 0:
        for split in SPLITS:
            for shard in splits[split].shards:
                (out / shard.file).unlink(missing_ok=True)
        state_path.unlink(missing_ok=True)
        skipped = f" ({bad_records.count} bad record(s) skipped)" if bad_records.count else ""
        raise DataError(
            f"the input holds no non-empty document for the train split{skipped}; check --input / --text-field"
        )
    if opts.val_fraction > 0 and splits["val"].documents == 0:
        logger.warning("no document fell into the validation split (%.3f%% of a small corpus)", 100 * opts.val_fraction)
    tokenizer_file = HF_FILE if isinstance(tokenizer, HFTokenizer) else MODEL_FILE
    with _writing(progress):
        shutil.copyfile(tokenizer.path, out / tokenizer_file)
    extra: dict[str, Any] = {"prepared_with": fingerprint}
    if bad_records.count:
        extra["bad_records_skipped"] = bad_records.count
    index = DataIndex(
        root=out,
        dtype=dtype.str,
        vocab_size=tokenizer.vocab_size,
        eos_id=tokenizer.eos_id,
        bos_id=tokenizer.bos_id if opts.add_bos else None,
        tokenizer_sha256=tokenizer.sha256,
        tokenizer_file=tokenizer_file,
        splits=splits,
        extra=extra,
    )
    with _writing(progress):
        index.write()
    state_path.unlink(missing_ok=True)
    return PrepareResult(
        index=index,
        documents=documents,
        text_bytes=text_bytes,
        seconds=time.perf_counter() - started,
        resumed=resumed,
        skipped_documents=counters["skipped"],
        bad_records=bad_records.count,
        bad_record_examples=bad_records.examples,
    )


class _LogProgress:
    """Progress for logs (no terminal): one line every ``interval_s`` seconds."""

    def __init__(self, *, enabled: bool, interval_s: float = 30.0) -> None:
        self.enabled, self.interval_s = enabled, interval_s
        self.started = self.last = time.perf_counter()
        self.total = 0

    def update(self, n: int) -> None:
        self.total += n
        now = time.perf_counter()
        if self.enabled and now - self.last >= self.interval_s:
            self.last = now
            logger.info(
                "tokenized %.1f MB of text (%.2f MB/s)", self.total / 1e6, self.total / 1e6 / (now - self.started)
            )

    def close(self) -> None:
        pass


def _progress_bar(enabled: bool):  # noqa: ANN202 - tqdm or a stand-in
    """A tqdm bar on a terminal; periodic log lines otherwise (SLURM logs, CI)."""
    if enabled and sys.stderr.isatty():
        from tqdm import tqdm

        return tqdm(unit="B", unit_scale=True, desc="tokenizing", mininterval=2.0)
    return _LogProgress(enabled=enabled)


__all__ = ["PrepareOptions", "PrepareResult", "SplitInfo", "is_validation_document", "prepare_dataset"]
