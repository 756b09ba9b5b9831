"""Tokenizer training and corpus preparation: formats, exactness, resume after a crash, bad input."""

from __future__ import annotations

import ast
import json
import os
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm

from megatron_pept.data import prepare as prepare_mod
from megatron_pept.data.corpus import generate_stories
from megatron_pept.data.prepare import PrepareOptions, is_validation_document, prepare_dataset
from megatron_pept.data.shards import ShardWriter, read_index
from megatron_pept.data.tokenizer import train_tokenizer_from_sources
from megatron_pept.errors import DataError
from megatron_pept.faults import ENV_VAR, FAULT_FROZEN_LINE
from megatron_pept.signals import process_children


def stdlib_documents(limit: int = 300) -> list[str]:
    """Real English the tokenizer never saw: module docstrings of the standard library, read without importing."""
    docs = []
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        try:
            doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8")))
        except (SyntaxError, UnicodeDecodeError):
            continue
        if doc and len(doc) > 40:
            docs.append(doc)
        if len(docs) == limit:
            break
    return docs


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tok")
    corpus = root / "stories.txt"
    corpus.write_text("\n".join(generate_stories(2000, seed=5)) + "\n")
    tok = train_tokenizer_from_sources([str(corpus)], output_dir=root / "tokenizer", vocab_size=600)
    return tok.path.parent


def opts(tmp: Path, inputs: list[Path], tokenizer: Path, name: str = "out", **kw) -> PrepareOptions:
    return PrepareOptions(
        inputs=tuple(map(str, inputs)),
        tokenizer=str(tokenizer),
        output=str(tmp / name),
        shard_tokens=kw.pop("shard_tokens", 3000),
        val_fraction=kw.pop("val_fraction", 0.1),
        workers=kw.pop("workers", 1),
        **kw,
    )


def shard_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.bin"))}


def test_tokenizer_folder_and_metadata(tokenizer_dir: Path) -> None:
    meta = json.loads((tokenizer_dir / "tokenizer_meta.json").read_text())
    assert meta["vocab_size"] == 600 and meta["model_type"] == "bpe" and meta["byte_fallback"]
    assert (meta["bos_id"], meta["eos_id"]) == (1, 2)
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_dir / "tokenizer.model"))
    assert sp.decode(sp.encode("Zebra ünïcode ☃")) == "Zebra ünïcode ☃"  # byte fallback: nothing is <unk>
    assert meta["normalization"] == "identity" and meta["normalizer"]["name"] == "identity"
    text = "  Two\tcolumns\n\nand  a gap ﬁ\r\n"
    assert sp.decode(sp.encode(text)) == text  # kept exactly, as the shards will hold it


def test_tokenizer_training_is_reproducible(tmp_path: Path) -> None:
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n".join(generate_stories(1500, seed=8)) + "\n")
    shas = {
        train_tokenizer_from_sources(
            [str(corpus)], output_dir=tmp_path / f"t{i}", vocab_size=500, max_sentences=2000, num_threads=threads
        ).sha256
        for i, threads in enumerate((1, 2, 2))
    }
    assert len(shas) == 1  # sampled sentences, threads and temporary paths leave no trace in the model file


def test_unigram_and_refusals(tmp_path: Path) -> None:
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"body": t}) + "\n" for t in generate_stories(800, seed=1)))
    tok = train_tokenizer_from_sources(
        [str(corpus)], output_dir=tmp_path / "uni", vocab_size=500, model_type="unigram", text_field="body"
    )
    assert tok.vocab_size == 500
    with pytest.raises(DataError, match="already exists"):
        train_tokenizer_from_sources([str(corpus)], output_dir=tmp_path / "uni", vocab_size=500, text_field="body")
    with pytest.raises(DataError, match="has no field 'text'"):
        train_tokenizer_from_sources([str(corpus)], output_dir=tmp_path / "t2", vocab_size=500)
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(DataError, match="is empty"):
        train_tokenizer_from_sources([str(tmp_path / "empty.txt")], output_dir=tmp_path / "t3", vocab_size=500)
    (tmp_path / "blank.txt").write_text("\n  \n\n")
    with pytest.raises(DataError, match="no text"):
        train_tokenizer_from_sources([str(tmp_path / "blank.txt")], output_dir=tmp_path / "t4", vocab_size=500)
    with pytest.raises(DataError, match="does not exist"):
        train_tokenizer_from_sources([str(tmp_path / "none.jsonl")], output_dir=tmp_path / "t5", vocab_size=500)
    assert not any((tmp_path / n).exists() for n in ("t2", "t3", "t4", "t5"))


def test_token_counts_match_an_independent_encoding(tmp_path: Path, tokenizer_dir: Path) -> None:
    docs = stdlib_documents()
    assert len(docs) > 100
    corpus = tmp_path / "stdlib.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    result = prepare_dataset(opts(tmp_path, [corpus], tokenizer_dir), show_progress=False)
    index = result.index
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_dir / "tokenizer.model"))
    expected = {"train": [], "val": []}
    for number, doc in enumerate(docs):
        split = "val" if is_validation_document(number, seed=0, val_fraction=0.1) else "train"
        expected[split].append(sp.encode(doc) + [sp.eos_id()])
    for split in ("train", "val"):
        flat = np.concatenate(
            [np.fromfile(tmp_path / "out" / s.file, dtype=index.np_dtype) for s in index.splits[split].shards]
        )
        want = np.concatenate([np.asarray(ids) for ids in expected[split]])
        assert index.splits[split].tokens == sum(map(len, expected[split])) == flat.size
        assert index.splits[split].documents == len(expected[split])
        assert np.array_equal(flat, want)
    assert 0 < index.splits["val"].documents < index.splits["train"].documents
    assert result.text_bytes == sum(len(d.encode()) for d in docs)


def stories_as_txt(tmp_path: Path, tokenizer_dir: Path) -> list[str]:
    """600 stories in a.txt and a.jsonl, prepared from a.txt (one process) into tmp_path / "txt"."""
    docs = list(generate_stories(600, seed=9))
    (tmp_path / "a.txt").write_text("\n".join(docs) + "\n")
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(docs)))
    reference = prepare_dataset(opts(tmp_path, [tmp_path / "a.txt"], tokenizer_dir, "txt"), show_progress=False)
    assert len(reference.index.splits["train"].shards) > 3
    return docs


def test_formats_give_identical_shards(tmp_path: Path, tokenizer_dir: Path) -> None:
    import datasets

    docs = stories_as_txt(tmp_path, tokenizer_dir)
    datasets.Dataset.from_dict({"text": docs}).to_parquet(str(tmp_path / "a.parquet"))
    datasets.Dataset.from_dict({"text": docs}).save_to_disk(str(tmp_path / "saved"))
    for name, inputs in (
        ("jsonl", [tmp_path / "a.jsonl"]),
        ("parquet", [tmp_path / "a.parquet"]),
        ("from_saved", [tmp_path / "saved"]),
    ):
        prepare_dataset(opts(tmp_path, inputs, tokenizer_dir, name), show_progress=False)
        assert shard_bytes(tmp_path / name) == shard_bytes(tmp_path / "txt"), name


@pytest.mark.slow  # worker processes
def test_workers_give_identical_shards(tmp_path: Path, tokenizer_dir: Path) -> None:
    stories_as_txt(tmp_path, tokenizer_dir)
    prepare_dataset(opts(tmp_path, [tmp_path / "a.jsonl"], tokenizer_dir, "workers", workers=2), show_progress=False)
    assert shard_bytes(tmp_path / "workers") == shard_bytes(tmp_path / "txt")


def test_resume_after_a_crash_is_byte_identical(tmp_path: Path, tokenizer_dir: Path, monkeypatch) -> None:
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n".join(generate_stories(1500, seed=2)) + "\n")
    prepare_dataset(opts(tmp_path, [corpus], tokenizer_dir, "whole"), show_progress=False)

    real_flush = ShardWriter.flush
    flushes = {"n": 0}

    def crashing_flush(self: ShardWriter) -> bool:
        flushes["n"] += 1
        if flushes["n"] == 6:
            # Die while the 6th shard is half written, as a killed process would.
            (self.root / f".{self.split}-{self.next_index:05d}.bin.tmp").write_bytes(b"\x01\x02")
            raise KeyboardInterrupt
        return real_flush(self)

    monkeypatch.setattr(ShardWriter, "flush", crashing_flush)
    with pytest.raises(KeyboardInterrupt):
        prepare_dataset(opts(tmp_path, [corpus], tokenizer_dir, "crash"), show_progress=False)
    monkeypatch.setattr(ShardWriter, "flush", real_flush)
    crashed = tmp_path / "crash"
    assert not (crashed / "index.json").exists()
    with pytest.raises(DataError, match="no index.json"):
        read_index(crashed)  # the trainer refuses the incomplete folder
    state = json.loads((crashed / prepare_mod.STATE_FILE).read_text())
    assert state["splits"]["train"]["shards"]

    result = prepare_dataset(opts(tmp_path, [corpus], tokenizer_dir, "crash"), show_progress=False)
    assert result.resumed and result.skipped_documents > 0
    assert shard_bytes(crashed) == shard_bytes(tmp_path / "whole")
    assert read_index(crashed).splits == read_index(tmp_path / "whole").splits
    assert not list(crashed.glob(".*"))
    again = prepare_dataset(opts(tmp_path, [corpus], tokenizer_dir, "crash"), show_progress=False)
    assert again.already_complete


def start_frozen(cmd: list[str], fault: str) -> tuple[subprocess.Popen, int]:
    """Start the tool with the fault point ``fault`` (megatron_pept.faults) and return it with the pid of the
    worker that froze there, once that worker has said so (observed progress, not a clock)."""
    proc = subprocess.Popen(
        cmd,
        env={**os.environ, ENV_VAR: fault},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if FAULT_FROZEN_LINE in line:
            worker = int(line.rsplit("pid ", 1)[1].rstrip(")\n"))
            assert worker != proc.pid  # a worker process, not the tool
            return proc, worker
    pytest.fail(f"the tool ended (exit {proc.wait()}) before freezing at {fault}:\n{''.join(lines)}")


@pytest.mark.slow  # processes
def test_a_killed_worker_is_one_line_and_the_same_command_resumes(tmp_path: Path, tokenizer_dir: Path) -> None:
    """A tokenizer worker killed with -9 (as the out-of-memory killer does) while it holds a batch: the tool used to
    wait forever for that batch (multiprocessing.Pool replaces the worker and forgets its task). Now it exits 2 with
    one line, keeps the finished shards, and the same command resumes and ends byte-identical to an uninterrupted
    run. The worker is killed where it froze itself (fault point prepare.encode@3), not after a guessed sleep."""
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n".join(generate_stories(600, seed=4)) + "\n")
    prepare_dataset(opts(tmp_path, [corpus], tokenizer_dir, "whole"), show_progress=False)
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "megatron_pept.tools.prepare_data", "--input", str(corpus)]
    cmd += ["--tokenizer", str(tokenizer_dir), "--output", str(out), "--shard-tokens", "3000"]
    cmd += ["--val-fraction", "0.1", "--workers", "2", "--batch-documents", "40", "--no-progress"]
    proc, worker = start_frozen(cmd, "prepare.encode@3")
    # Batches 0-2 (120 documents, several shards) are encoded or being encoded by the other worker; the tool
    # writes them and then waits for batch 3. Kill once a shard is recorded (observed, so the resume below has
    # something to keep): a kill before that could also fail a batch still in the other worker.
    state, deadline = out / prepare_mod.STATE_FILE, time.monotonic() + 120
    while not (state.is_file() and json.loads(state.read_text())["splits"]["train"]["shards"]):
        assert proc.poll() is None and time.monotonic() < deadline, "no shard was recorded before batch 3"
        time.sleep(0.02)
    os.kill(worker, signal.SIGKILL)
    try:
        rest = proc.communicate(timeout=300)[0]  # a hang is the bug; this bound only turns it into a failure
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail("the tool still waits for the killed worker's batch 300 s later")
    assert proc.returncode == 2, rest
    errors = [x for x in rest.splitlines() if "error:" in x]
    assert len(errors) == 1 and errors[0] == rest.rstrip("\n").splitlines()[-1], rest
    assert "a tokenizer worker process died" in errors[0] and "run the same command again" in errors[0], errors
    assert not (out / "index.json").exists()
    kept = json.loads((out / prepare_mod.STATE_FILE).read_text())["splits"]
    assert kept["train"]["shards"], "no shard was finished before the kill: the resume below would prove nothing"
    assert f"the {len(kept['train']['shards']) + len(kept['val']['shards'])} finished shard(s)" in errors[0]

    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "(resumed)" in again.stdout, again.stdout + again.stderr
    assert shard_bytes(out) == shard_bytes(tmp_path / "whole")
    assert read_index(out).splits == read_index(tmp_path / "whole").splits


@pytest.mark.slow  # processes
def test_a_killed_tool_leaves_no_workers(tmp_path: Path, tokenizer_dir: Path) -> None:
    """kill -9 of megatron-pept-prepare-data itself: its tokenizer workers used to wait for ever on a queue whose
    other end was gone (one of them frozen at prepare.encode@3 here); they now die with it (megatron_pept.orphans),
    and so does the helper multiprocessing started. Killed on observed progress: the worker's freeze line."""
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n".join(generate_stories(600, seed=4)) + "\n")
    cmd = [sys.executable, "-m", "megatron_pept.tools.prepare_data", "--input", str(corpus), "--tokenizer"]
    cmd += [str(tokenizer_dir), "--output", str(tmp_path / "out"), "--workers", "2", "--batch-documents", "40"]
    proc, _ = start_frozen([*cmd, "--no-progress"], "prepare.encode@3")

    def running(pid: int) -> bool:  # not gone and not a zombie (PID 1 here may never reap an orphan)
        try:
            return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
        except (OSError, IndexError):
            return False

    workers = process_children().get(proc.pid, [])
    assert len(workers) >= 2, workers  # the two workers (and multiprocessing's resource tracker)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stdout.close()  # (orphaned workers would hold their copy of it open)
    deadline = time.monotonic() + 60  # a bound on an observed state, not a guessed wait: it ends when they are gone
    while any(running(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.05)
    left = [pid for pid in workers if running(pid)]
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert not left, f"processes of the killed tool still running: {left}"


def test_prepare_refusals(tmp_path: Path, tokenizer_dir: Path) -> None:
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n".join(generate_stories(100, seed=2)) + "\n")
    with pytest.raises(DataError, match="does not exist"):
        prepare_dataset(opts(tmp_path, [tmp_path / "missing.txt"], tokenizer_dir), show_progress=False)
    with pytest.raises(DataError, match="no tokenizer"):
        prepare_dataset(opts(tmp_path, [corpus], tmp_path / "nowhere"), show_progress=False)
    (tmp_path / "blank.txt").write_text("\n\n")
    with pytest.raises(DataError, match="no non-empty document"):
        prepare_dataset(opts(tmp_path, [tmp_path / "blank.txt"], tokenizer_dir, "b"), show_progress=False)
    assert not list((tmp_path / "b").glob("*.bin"))
    prepare_dataset(opts(tmp_path, [corpus], tokenizer_dir, "done"), show_progress=False)
    with pytest.raises(DataError, match="other settings"):
        prepare_dataset(opts(tmp_path, [corpus], tokenizer_dir, "done", val_fraction=0.2), show_progress=False)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("precious")
    with pytest.raises(DataError, match="not an interrupted preparation"):
        prepare_dataset(opts(tmp_path, [corpus], tokenizer_dir, "mine"), show_progress=False)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "precious"
    (tmp_path / "a-file").write_text("not a folder")
    with pytest.raises(DataError, match="is a file; give a folder"):
        prepare_dataset(opts(tmp_path, [corpus], tokenizer_dir, "a-file"), show_progress=False)
    assert (tmp_path / "a-file").read_text() == "not a folder"


def test_dtype_choice() -> None:
    assert prepare_mod.choose_token_dtype(32000, "auto").itemsize == 2
    assert prepare_mod.choose_token_dtype(70000, "auto").itemsize == 4
    assert prepare_mod.choose_token_dtype(32000, "uint32").itemsize == 4
    with pytest.raises(DataError, match="too many for uint16"):
        prepare_mod.choose_token_dtype(70000, "uint16")


def test_resume_over_changed_input_is_refused(tmp_path: Path, tokenizer_dir: Path, monkeypatch) -> None:
    """An interrupted preparation, then the input file changes (same path, other text): resuming would mix shards
    of the old and the new text, so it is refused with one line until the input is restored."""
    corpus = tmp_path / "c.txt"
    original = "\n".join(generate_stories(1500, seed=2)) + "\n"
    corpus.write_text(original)
    crash_after_shards(tmp_path, corpus, tokenizer_dir, monkeypatch, "out")
    corpus.write_text(original.replace("The", "A", 3))  # a small edit in the middle; the size changes too
    with pytest.raises(DataError, match="changed since"):
        prepare_dataset(opts(tmp_path, [corpus], tokenizer_dir, "out"), show_progress=False)
    corpus.write_text(original.replace("The", "Tha", 1))  # the same size, other bytes
    assert corpus.stat().st_size == len(original.encode())
    with pytest.raises(DataError, match="changed since"):
        prepare_dataset(opts(tmp_path, [corpus], tokenizer_dir, "out"), show_progress=False)
    corpus.write_text(original)
    assert prepare_dataset(opts(tmp_path, [corpus], tokenizer_dir, "out"), show_progress=False).resumed


def test_malformed_output_index_is_one_line(tmp_path: Path, tokenizer_dir: Path) -> None:
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n".join(generate_stories(50, seed=3)) + "\n")
    out = tmp_path / "out"
    out.mkdir()
    for garbage in ("{not json", "[1, 2]"):
        (out / "index.json").write_text(garbage)
        with pytest.raises(DataError, match="index.json is malformed"):
            prepare_dataset(opts(tmp_path, [corpus], tokenizer_dir, "out"), show_progress=False)


def test_text_and_json_files_read_as_datasets_reads_them(tmp_path: Path) -> None:
    """.txt and .jsonl/.json files are read without datasets (to name a bad record's line and skip it): for valid
    files the documents are exactly those of datasets' text and json builders, line ends, BOMs, blank lines,
    escapes and JSON arrays included."""
    import datasets

    from megatron_pept.data.sources import iter_documents, resolve_source

    files = {
        "mixed.txt": b"\xef\xbb\xbffirst\r\nsecond\rthird\n\n  \nfour\xe2\x80\xa8five\x0cx\xc2\x85y\n\r\n"
        b"\ttabbed \nlast\r",
        "plain.txt": "\n".join(generate_stories(50, seed=4)).encode(),
        "lines.jsonl": b'\xef\xbb\xbf{"text": "a\\u2028b", "n": 1}\n\n   \n{"text": "\\ud83d\\ude00 x", "n": 2}\r\n'
        b'{"text": "  "}\n{"text": "caf\xc3\xa9 \\"quoted\\" \\\\ back", "extra": [1]}\n{"text":"no newline"}',
        "objects.json": json.dumps([{"text": "one"}, {"text": "two", "id": 2}], indent=2).encode(),
        "strings.json": json.dumps(["s1", "", "s2"]).encode(),
    }
    datasets.disable_progress_bars()
    for name, content in files.items():
        path = tmp_path / name
        path.write_bytes(content)
        source = resolve_source(str(path))
        builder = "text" if name.endswith(".txt") else "json"
        rows = datasets.load_dataset(builder, data_files=[str(path)], split="train", streaming=True)
        theirs = [row["text"] for row in rows if row["text"].strip()]
        assert list(iter_documents(source)) == theirs, name
        assert theirs, name


def crash_after_shards(tmp_path: Path, corpus: Path, tokenizer_dir: Path, monkeypatch, name: str) -> Path:
    """An interrupted preparation (a Ctrl-C at the 4th shard) and its state file."""
    real_flush = ShardWriter.flush
    flushes = {"n": 0}

    def crashing_flush(self: ShardWriter) -> bool:
        flushes["n"] += 1
        if flushes["n"] == 4:
            raise KeyboardInterrupt
        return real_flush(self)

    monkeypatch.setattr(ShardWriter, "flush", crashing_flush)
    with pytest.raises(KeyboardInterrupt):
        prepare_dataset(opts(tmp_path, [corpus], tokenizer_dir, name), show_progress=False)
    monkeypatch.setattr(ShardWriter, "flush", real_flush)
    return tmp_path / name / prepare_mod.STATE_FILE


def test_a_state_file_naming_files_outside_the_folder_is_refused(tmp_path: Path, tokenizer_dir: Path, monkeypatch):
    """The interrupted preparation's state lists its finished shards, which a resume adopts into the index (and
    deletes when the input turns out empty): a name leading out of the folder is refused, the file left alone."""
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n".join(generate_stories(1500, seed=2)) + "\n")
    state_path = crash_after_shards(tmp_path, corpus, tokenizer_dir, monkeypatch, "out")
    victim = tmp_path / "victim.bin"
    state = json.loads(state_path.read_text())
    shard = state["splits"]["train"]["shards"][0]
    victim.write_bytes((state_path.parent / shard["file"]).read_bytes())
    shard["file"] = "../victim.bin"
    state_path.write_text(json.dumps(state))
    with pytest.raises(DataError, match=r"a train shard '\.\./victim\.bin' goes up out of the folder"):
        prepare_dataset(opts(tmp_path, [corpus], tokenizer_dir, "out"), show_progress=False)
    assert victim.is_file() and not (tmp_path / "out" / "index.json").exists()


def test_resuming_a_preparation_of_an_older_version_records_every_largest_id(
    tmp_path: Path, tokenizer_dir: Path, monkeypatch
) -> None:
    """Shards finished by an earlier version carry no max_id in the state: the resume reads it from them."""
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n".join(generate_stories(1500, seed=2)) + "\n")
    state_path = crash_after_shards(tmp_path, corpus, tokenizer_dir, monkeypatch, "out")
    state = json.loads(state_path.read_text())
    for split in state["splits"].values():
        for shard in split["shards"]:
            del shard["max_id"]
    state_path.write_text(json.dumps(state))
    assert prepare_dataset(opts(tmp_path, [corpus], tokenizer_dir, "out"), show_progress=False).resumed
    index = read_index(tmp_path / "out")
    for split in index.splits.values():
        for shard in split.shards:
            assert shard.max_id == int(np.fromfile(tmp_path / "out" / shard.file, dtype=index.np_dtype).max())
