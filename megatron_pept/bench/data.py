"""Data-pipeline benchmark: preparation throughput and the loader's share of a training step.

The corpus is real text this machine already has: Python source files (English docstrings and comments, and
code) of the standard library and then of the installed packages, one document per file, cut to ``corpus_mb``
megabytes. A SentencePiece BPE
tokenizer is trained on it, the corpus is prepared into shards with ``workers`` processes (timed: MB of UTF-8
text per second, end to end including reading, worker start-up and writing), and then a `debug`-model trainer on
those shards times its training steps and, separately, the loader calls one step makes.
"""

from __future__ import annotations

import json
import os
import sysconfig
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from megatron_pept.errors import ConfigError


@dataclass(frozen=True)
class DataBenchSettings:
    corpus_mb: float = 20.0
    tokenizer_vocab: int = 8000
    workers: int = 2
    seq_len: int = 128
    micro_batch_size: int = 16
    grad_accum: int = 2
    steps: int = 30

    def validate(self) -> None:
        if self.corpus_mb <= 0:
            raise ConfigError(f"--corpus-mb must be > 0, got {self.corpus_mb}")
        if self.workers < 1:
            raise ConfigError(f"--workers must be at least 1, got {self.workers}")
        if self.steps < 2:
            raise ConfigError(f"--steps must be at least 2, got {self.steps}")


@dataclass
class DataBenchResult:
    settings: DataBenchSettings
    corpus_bytes: int
    documents: int
    tokens: int
    tokenizer_seconds: float
    prepare_seconds: float
    loader_seconds_per_step: float
    train_seconds_per_step: float

    @property
    def prepare_mb_per_sec(self) -> float:
        return self.corpus_bytes / 1e6 / self.prepare_seconds

    @property
    def loader_share(self) -> float:
        return self.loader_seconds_per_step / self.train_seconds_per_step

    def to_dict(self) -> dict:
        return {
            **asdict(self),
            "prepare_mb_per_sec": self.prepare_mb_per_sec,
            "loader_share": self.loader_share,
        }


def python_sources_corpus(path: Path, *, max_bytes: int) -> tuple[int, int]:
    """Write this Python's ``.py`` files (standard library first, then installed packages) as JSONL documents,
    up to ``max_bytes``; returns (bytes, documents)."""
    roots = [Path(sysconfig.get_paths()["stdlib"]), Path(sysconfig.get_paths()["purelib"])]
    files = (file for root in roots for file in sorted(root.rglob("*.py")))
    total = docs = 0
    with path.open("w") as out:
        for file in files:
            try:
                text = file.read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):
                continue
            if not text.strip():
                continue
            out.write(json.dumps({"text": text}) + "\n")
            total += len(text.encode("utf-8"))
            docs += 1
            if total >= max_bytes:
                break
    return total, docs


def run_data_benchmark(settings: DataBenchSettings) -> DataBenchResult:
    settings.validate()
    from megatron_pept.config import load_config
    from megatron_pept.data.prepare import PrepareOptions, prepare_dataset
    from megatron_pept.data.tokenizer import train_tokenizer_from_sources
    from megatron_pept.trainer import Trainer

    with tempfile.TemporaryDirectory(prefix="bench_data") as tmp_name:
        tmp = Path(tmp_name)
        corpus = tmp / "corpus.jsonl"
        corpus_bytes, documents = python_sources_corpus(corpus, max_bytes=int(settings.corpus_mb * 1e6))
        start = time.perf_counter()
        train_tokenizer_from_sources(
            [str(corpus)],
            output_dir=tmp / "tok",
            vocab_size=settings.tokenizer_vocab,
            num_threads=os.cpu_count() or 1,
            max_sentences=300_000,
        )
        tokenizer_seconds = time.perf_counter() - start
        prepared = prepare_dataset(
            PrepareOptions(
                inputs=(str(corpus),),
                tokenizer=str(tmp / "tok"),
                output=str(tmp / "data"),
                shard_tokens=1 << 22,
                val_fraction=0.01,
                workers=settings.workers,
            ),
            show_progress=False,
        )
        cfg = load_config(
            None,
            [
                f"run_dir={tmp / 'run'}",
                f"data.path={tmp / 'data'}",
                f"data.seq_len={settings.seq_len}",
                f"train.micro_batch_size={settings.micro_batch_size}",
                f"train.global_batch_size={settings.micro_batch_size * settings.grad_accum}",
                f"train.steps={settings.steps + 1}",
                "metrics.tensorboard=false",
                "metrics.peak_tflops=1",
                "train.eval_at_start=false",
            ],
        )
        trainer = Trainer(cfg)
        trainer.train_step()  # warm-up
        start = time.perf_counter()
        for _ in range(settings.steps):
            trainer.train_step()
        train_seconds = (time.perf_counter() - start) / settings.steps
        loader = trainer.loader
        start = time.perf_counter()
        for _ in range(settings.steps * settings.grad_accum):
            inputs, targets = loader.next_batch()
            inputs.to(trainer.device), targets.to(trainer.device)
        loader_seconds = (time.perf_counter() - start) / settings.steps
        del trainer
        tokens = sum(s.tokens for s in prepared.index.splits.values())
    return DataBenchResult(
        settings=settings,
        corpus_bytes=corpus_bytes,
        documents=documents,
        tokens=tokens,
        tokenizer_seconds=tokenizer_seconds,
        prepare_seconds=prepared.seconds,
        loader_seconds_per_step=loader_seconds,
        train_seconds_per_step=train_seconds,
    )


def format_data_result(result: DataBenchResult) -> str:
    s = result.settings
    return "\n".join(
        [
            f"corpus: {result.corpus_bytes / 1e6:.1f} MB of Python sources, {result.documents:,} documents, "
            f"{result.tokens:,} tokens (vocab {s.tokenizer_vocab})",
            f"tokenizer training: {result.tokenizer_seconds:.1f} s",
            f"prepare ({s.workers} workers): {result.prepare_seconds:.2f} s = {result.prepare_mb_per_sec:.2f} MB/s",
            f"debug-model step ({s.grad_accum} x {s.micro_batch_size} x {s.seq_len} tokens): "
            f"{1000 * result.train_seconds_per_step:.2f} ms; loader calls per step: "
            f"{1000 * result.loader_seconds_per_step:.3f} ms = {100 * result.loader_share:.2f}% of the step",
        ]
    )
