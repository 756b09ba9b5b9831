"""The data tools as a user runs them: train a tokenizer, prepare shards, train on them; bad input fails cleanly."""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from launch import run, small_run, train_command
from megatron_pept.data.corpus import generate_stories

REPO = Path(__file__).resolve().parents[2]


def tool(name: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(REPO / "tools" / name), *args], cwd=REPO, capture_output=True, text=True, timeout=600
    )


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "stories.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in generate_stories(3000, seed=11)))
    return path


def test_tokenizer_prepare_train(corpus: Path, tmp_path: Path) -> None:
    tok = tool("train_tokenizer.py", "--input", str(corpus), "--vocab-size", "700", "--output", str(tmp_path / "tok"))
    assert tok.returncode == 0, tok.stderr
    assert (tmp_path / "tok" / "tokenizer.model").is_file() and (tmp_path / "tok" / "tokenizer_meta.json").is_file()
    prep = tool(
        "prepare_data.py",
        "--input",
        str(corpus),
        "--tokenizer",
        str(tmp_path / "tok"),
        "--output",
        str(tmp_path / "data"),
        "--shard-tokens",
        "20000",
        "--val-fraction",
        "0.05",
        "--workers",
        "2",
        "--no-progress",
    )
    assert prep.returncode == 0, prep.stderr
    assert "MB/s" in prep.stdout
    index = json.loads((tmp_path / "data" / "index.json").read_text())
    assert index["vocab_size"] == 700 and len(index["splits"]["train"]["shards"]) > 3
    again = tool(
        "prepare_data.py",
        "--input",
        str(corpus),
        "--tokenizer",
        str(tmp_path / "tok"),
        "--output",
        str(tmp_path / "data"),
        "--shard-tokens",
        "20000",
        "--val-fraction",
        "0.05",
        "--no-progress",
    )
    assert again.returncode == 0 and "already complete" in again.stdout
    overrides = small_run(tmp_path / "data", tmp_path / "run", "data.seq_len=64", "train.global_batch_size=4")
    train = run(train_command(*overrides, "train.steps=3", "train.eval_batches=1", config=None))
    assert train.returncode == 0, train.stderr
    assert "step 3/3" in train.stdout


@pytest.mark.parametrize(
    "args,expected",
    [
        (["--input", "{tmp}/nonexistent/x.jsonl", "--vocab-size", "100", "--output", "{tmp}/t"], "does not exist"),
        (
            ["--input", "{corpus}", "--vocab-size", "100", "--output", "{tmp}/t", "--text-field", "body"],
            "has no field 'body'",
        ),
    ],
)
def test_tokenizer_tool_errors(args: list[str], expected: str, corpus: Path, tmp_path: Path) -> None:
    proc = tool("train_tokenizer.py", *[a.format(tmp=tmp_path, corpus=corpus) for a in args])
    assert proc.returncode == 2
    assert expected in proc.stderr and proc.stderr.strip().count("\n") == 0, proc.stderr


def test_prepare_tool_errors(corpus: Path, tmp_path: Path) -> None:
    proc = tool(
        "prepare_data.py",
        "--input",
        str(corpus),
        "--tokenizer",
        str(tmp_path / "none"),
        "--output",
        str(tmp_path / "d"),
    )
    assert proc.returncode == 2 and "no tokenizer" in proc.stderr and proc.stderr.strip().count("\n") == 0
    assert not (tmp_path / "d").exists()


READ_ONLY_SHM = (  # run "$@" where /dev/shm is a read-only bind of itself, in this mount namespace only
    "mount --bind /dev/shm /dev/shm && mount -o bind,remount,ro /dev/shm || exit 97; "
    "if touch /dev/shm/.megatron-pept-ro-check 2>/dev/null; then rm -f /dev/shm/.megatron-pept-ro-check; exit 98; fi; "
    'exec "$@"'
)


def test_a_read_only_dev_shm_is_one_line(corpus: Path, quickstart_data: Path, tmp_path: Path) -> None:
    """datasets keeps a streaming dataset's counter in torch shared memory, so with /dev/shm read-only (some
    containers) every read failed: prepare-data with a torch traceback, train-tokenizer with "no text to train the
    tokenizer on" (it took any failure before the first document for an empty input). Both now say what is wrong
    in one line and exit 2. Needs a private mount namespace (root and unshare); the host's /dev/shm is untouched.
    The input is parquet: .txt and .jsonl files are read without datasets (megatron_pept.data.sources) and need
    no shared memory."""
    if shutil.which("unshare") is None:
        pytest.skip("no unshare here to give the tools a read-only /dev/shm")
    import datasets

    parquet = tmp_path / "stories.parquet"
    texts = [json.loads(line)["text"] for line in corpus.read_text().splitlines()]
    datasets.Dataset.from_dict({"text": texts}).to_parquet(str(parquet))
    runs = {
        "train_tokenizer.py": ["--input", str(parquet), "--vocab-size", "700", "--output", str(tmp_path / "tok")],
        "prepare_data.py": ["--input", str(parquet), "--tokenizer", str(quickstart_data / "tokenizer.model")]
        + ["--output", str(tmp_path / "data"), "--workers", "1", "--no-progress"],
    }
    for name, args in runs.items():
        cmd = [sys.executable, str(REPO / "tools" / name), *args]
        proc = subprocess.run(
            ["unshare", "-m", "--propagation", "private", "sh", "-c", READ_ONLY_SHM, "sh", *cmd],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=600,
        )
        if proc.returncode in (97, 98) or proc.stderr.startswith("unshare:"):
            pytest.skip(f"cannot make /dev/shm read-only in a namespace of its own here: {proc.stderr.strip()[:200]}")
        assert proc.returncode == 2, proc.stderr[-3000:]
        assert proc.stderr.strip().count("\n") == 0, proc.stderr[-3000:]
        assert "needs a writable /dev/shm" in proc.stderr and "Read-only file system" in proc.stderr, proc.stderr
    assert not (tmp_path / "tok").exists() and not list((tmp_path / "data").glob("*"))


@pytest.mark.parametrize("name", ["train_tokenizer.py", "prepare_data.py"])
def test_help(name: str) -> None:
    proc = tool(name, "--help")
    assert proc.returncode == 0 and "--input" in proc.stdout
    if name == "prepare_data.py":
        assert "--skip-bad-records" in proc.stdout


def prepare(inputs: list[Path], out: Path, tokenizer: Path, *extra: str, **kwargs) -> subprocess.CompletedProcess[str]:
    args = ["--input", *map(str, inputs), "--tokenizer", str(tokenizer), "--output", str(out)]
    cmd = [sys.executable, str(REPO / "tools" / "prepare_data.py"), *args, "--workers", "1", "--no-progress", *extra]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, **kwargs)


def one_line(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.strip().count("\n") == 0, proc.stderr[-3000:]
    return proc.stderr.strip()


def stories(n: int, seed: int = 21) -> list[str]:
    return list(generate_stories(n, seed=seed))


BAD_LINES = {  # name: (file name, its lines as bytes, the 1-based line that is bad, what the error says)
    "binary": ("blob.txt", [bytes(range(256)) * 4], 1, "holds a NUL byte"),
    "utf8_txt": ("a.txt", [b"one", b"two", b"three \xff\xfe", b"four"], 3, "is not valid UTF-8"),
    "malformed_jsonl": (
        "a.jsonl",
        [b'{"text": "one"}', b'{"text": "two', b'{"text": "three"}'],
        2,
        "is not valid JSON (Unterminated string",
    ),
    "utf8_jsonl": ("a.jsonl", [b'{"text": "one"}', b'{"text": "t\xe9"}'], 2, "is not valid UTF-8"),
    "not_an_object": ("a.jsonl", [b'{"text": "one"}', b"", b"[1, 2]"], 3, "is a JSON list, not an object"),
    "no_text": ("a.jsonl", [b'{"text": "one"}', b'{"body": "two"}'], 2, "has no field 'text' (its fields: body)"),
}


@pytest.mark.parametrize("case", list(BAD_LINES))
def test_a_bad_record_is_one_line_naming_its_file_and_line(case: str, quickstart_data: Path, tmp_path: Path) -> None:
    """A binary file, invalid UTF-8 or a malformed JSON line was a datasets/pyarrow traceback (exit 1, no line
    number); now one line with the file and line, how to skip such records, exit 2, and no output folder."""
    name, lines, bad, problem = BAD_LINES[case]
    path = tmp_path / name
    path.write_bytes(b"\n".join(lines) + b"\n")
    error = one_line(prepare([path], tmp_path / "out", quickstart_data / "tokenizer.model"))
    assert f"{path}: line {bad} {problem}" in error and "--skip-bad-records" in error, error
    assert not (tmp_path / "out").exists()


def test_train_tokenizer_names_a_bad_record_too(tmp_path: Path) -> None:
    """The tokenizer tool reads through the same code: a malformed line after good ones (SentencePiece is already
    reading them, and wrapped the failure in a RuntimeError of its own) is the same one line, no folder left."""
    path = tmp_path / "a.jsonl"
    lines = [json.dumps({"text": t}) for t in stories(40)]
    lines.insert(30, '{"text": "cut')
    path.write_text("\n".join(lines) + "\n")
    proc = tool("train_tokenizer.py", "--input", str(path), "--vocab-size", "300", "--output", str(tmp_path / "tok"))
    error = one_line(proc)
    assert f"{path}: line 31 is not valid JSON (Unterminated string" in error, error
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.jsonl"]


def test_skip_bad_records_counts_them_and_keeps_every_good_one(quickstart_data: Path, tmp_path: Path) -> None:
    """With --skip-bad-records the bad records are left out and counted (printed, and kept in index.json); the
    shards are byte for byte those of the same corpus without the bad records."""
    good = stories(300)
    clean_jsonl, dirty_jsonl = tmp_path / "clean.jsonl", tmp_path / "dirty.jsonl"
    clean_jsonl.write_text("".join(json.dumps({"text": t}) + "\n" for t in good))
    bad = [b'{"text": "cut', b'{"text": "\xff"}', b"[1]", b'{"title": "x"}', b'{"text": 7}', b'{"text": "\\ud800"}']
    lines = [json.dumps({"text": t}).encode() for t in good]
    for i, record in enumerate(bad):
        lines.insert(40 * i + 7, record)
    dirty_jsonl.write_bytes(b"\n".join(lines) + b"\n")
    clean_txt, dirty_txt = tmp_path / "clean.txt", tmp_path / "dirty.txt"
    clean_txt.write_text("\n".join(good) + "\n")
    lines = [t.encode() for t in good]
    lines.insert(11, b"caf\xe9")
    lines.insert(150, b"nul \x00 byte")
    dirty_txt.write_bytes(b"\n".join(lines) + b"\n")
    tokenizer = quickstart_data / "tokenizer.model"
    for clean, dirty, count in ((clean_jsonl, dirty_jsonl, len(bad)), (clean_txt, dirty_txt, 2)):
        common = ["--shard-tokens", "3000", "--val-fraction", "0.1"]
        reference = prepare([clean], tmp_path / f"ref-{clean.suffix}", tokenizer, *common)
        assert reference.returncode == 0, reference.stderr[-3000:]
        skipped = prepare([dirty], tmp_path / f"out-{clean.suffix}", tokenizer, *common, "--skip-bad-records")
        assert skipped.returncode == 0, skipped.stderr[-3000:]
        assert f"skipped {count} bad record(s), the first: {dirty}: line" in skipped.stdout, skipped.stdout
        index = json.loads((tmp_path / f"out-{clean.suffix}" / "index.json").read_text())
        assert index["bad_records_skipped"] == count
        ref = json.loads((tmp_path / f"ref-{clean.suffix}" / "index.json").read_text())
        assert index["splits"] == ref["splits"]  # the same shards: documents, tokens, sha256, largest ids
        for split in ref["splits"].values():
            for shard in split["shards"]:
                ours = (tmp_path / f"out-{clean.suffix}" / shard["file"]).read_bytes()
                assert ours == (tmp_path / f"ref-{clean.suffix}" / shard["file"]).read_bytes()


READ_ONLY_BIND = (  # run "$@" (after the folder "$1") where "$1" is a read-only bind of itself, in this namespace only
    'mount --bind "$1" "$1" && mount -o bind,remount,ro "$1" || exit 97; '
    'if touch "$1/.megatron-pept-ro-check" 2>/dev/null; then rm -f "$1/.megatron-pept-ro-check"; exit 98; fi; '
    'shift; exec "$@"'
)


@pytest.mark.parametrize("existing", [False, True], ids=["new_output", "empty_output"])
def test_prepare_onto_a_read_only_folder_is_one_line(
    existing: bool, corpus: Path, quickstart_data: Path, tmp_path: Path
) -> None:
    """An output folder (or its parent) that cannot be written was a PermissionError / OSError traceback, found
    only at the first shard; now one line before any tokenizing, exit 2, the folder as it was. Root writes
    through permissions, so as root the folder is a read-only bind mount in a private mount namespace (skipped
    where unshare is not allowed)."""
    read_only = tmp_path / "ro"
    read_only.mkdir()
    out = read_only / "out"
    if existing:
        out.mkdir()
    cmd = [sys.executable, str(REPO / "tools" / "prepare_data.py"), "--input", str(corpus), "--tokenizer"]
    cmd += [str(quickstart_data / "tokenizer.model"), "--output", str(out), "--workers", "1", "--no-progress"]
    if os.geteuid() == 0:
        if shutil.which("unshare") is None:
            pytest.skip("no unshare here to mount a read-only folder")
        cmd = ["unshare", "-m", "--propagation", "private", "sh", "-c", READ_ONLY_BIND, "sh", str(read_only), *cmd]
        reason = "Read-only file system"
    else:
        read_only.chmod(0o555)
        reason = "Permission denied"
    try:
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    finally:
        read_only.chmod(0o755)
    if proc.returncode in (97, 98) or proc.stderr.startswith("unshare:"):
        pytest.skip(f"cannot mount a read-only folder in a namespace of its own here: {proc.stderr.strip()[:200]}")
    error = one_line(proc)
    assert f"cannot write to the output folder {out} ({reason})" in error, error
    assert sorted(p.name for p in read_only.rglob("*")) == (["out"] if existing else [])


def file_size_limit(limit_bytes: int):
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG) instead of killing

    return apply


def test_prepare_onto_a_full_disk_is_one_line_and_resumes(quickstart_data: Path, tmp_path: Path) -> None:
    """A write that fails for want of room (a file size limit, EFBIG, here: ulimit -f needs no root) was an
    OSError traceback that left the partial shard behind. Now one line with the fix, exit 2, and no partial file:
    at the first shard nothing is left at all; later the finished shards are kept and the same command, once
    there is room, resumes to the shards of an uninterrupted preparation."""
    corpus = tmp_path / "stories.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in stories(200)))
    tokenizer = quickstart_data / "tokenizer.model"
    common = ["--shard-tokens", "400", "--val-fraction", "0.05"]
    first = prepare([corpus], tmp_path / "first", tokenizer, *common, preexec_fn=file_size_limit(300))
    error = one_line(first)
    assert f"cannot write to {tmp_path / 'first'} (File too large)" in error and "ulimit -f" in error, error
    assert "nothing of this preparation was kept" in error
    assert not (tmp_path / "first").exists()
    # shards of about 800 bytes fit; the state file, which lists every finished shard, outgrows 2000 bytes
    later = prepare([corpus], tmp_path / "later", tokenizer, *common, preexec_fn=file_size_limit(2000))
    error = one_line(later)
    assert "finished shard(s) are kept, so the same command resumes" in error, error
    assert not list((tmp_path / "later").glob(".*.tmp")) and not (tmp_path / "later" / "index.json").exists()
    resumed = prepare([corpus], tmp_path / "later", tokenizer, *common)
    assert resumed.returncode == 0 and "(resumed)" in resumed.stdout, resumed.stderr[-3000:]
    whole = prepare([corpus], tmp_path / "whole", tokenizer, *common)
    assert whole.returncode == 0, whole.stderr[-3000:]
    ours, theirs = (json.loads((tmp_path / n / "index.json").read_text()) for n in ("later", "whole"))
    assert ours["splits"] == theirs["splits"]
