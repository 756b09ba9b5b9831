"""Rough edges of the training entry point that used to end in a traceback (issue 25, item 8): each is one line on
stderr and exit code 2 (130 for Ctrl-C), with nothing written. In process through ``megatron_pept.train.main``
where that is the same path as the CLI; real processes where a signal, a full disk or a second process is part of
the case. Faults are injected on observed progress (megatron_pept.faults), never after a sleep."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest

from launch import ENV, TRAIN, run, small_run, start, train_command
from megatron_pept import train
from megatron_pept.checkpoint import list_checkpoints, newest_complete
from megatron_pept.faults import ENV_VAR, FAULT_FROZEN_LINE


def args(data: Path, run_dir: Path, *extra: str) -> list[str]:
    """The arguments of a small run: ``train.main(args(...))`` in process, ``[*TRAIN, *args(...)]`` for the CLI."""
    return train_command(*small_run(data, run_dir, "train.steps=4", *extra), launcher=())


def one_line(capsys: pytest.CaptureFixture[str], code: int, expected: int = 2) -> str:
    err = capsys.readouterr().err
    assert code == expected, err[-3000:]
    lines = [line for line in err.strip().splitlines() if line.startswith("megatron_pept: ")]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    return lines[0]


ALIAS_BOMB = "\n".join(
    [
        'l0: &l0 ["x", "x", "x", "x", "x", "x", "x", "x", "x", "x"]',
        *(f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 10)}]" for i in range(1, 9)),
        "method:",
        "  target_modules: *l8",
    ]
)


def test_a_yaml_alias_bomb_is_one_line(capsys, tmp_path: Path) -> None:
    """Ten lines of anchors standing for 10^9 strings: refused at once (it used to run out of memory formatting
    the type error of method.target_modules)."""
    config = tmp_path / "bomb.yaml"
    config.write_text(ALIAS_BOMB + "\n")
    error = one_line(capsys, train.main(["--config", str(config), f"run_dir={tmp_path / 'run'}"]))
    assert "alias bomb" in error and str(config) in error
    assert not (tmp_path / "run").exists()


def test_a_yaml_tag_in_the_deepspeed_config_is_refused_with_the_config(capsys, tmp_path: Path) -> None:
    """Refused while the config is validated (it used to pass validation and fail after the model was built, with
    a ConstructorError traceback); the tag is never constructed."""
    marker = tmp_path / "pwned"
    ds = tmp_path / "ds.yaml"
    ds.write_text(f'zero_optimization:\n  offload: !!python/object/apply:os.system ["touch {marker}"]\n')
    code = train.main(
        [
            "--print-config",
            f"run_dir={tmp_path / 'run'}",
            "data.path=unused",
            "parallel.backend=deepspeed",
            f"parallel.deepspeed_config={ds}",
        ]
    )
    error = one_line(capsys, code)
    assert "uses the YAML tag !!python/object/apply:os.system (line 2" in error, error
    assert not marker.exists() and not (tmp_path / "run").exists()
    # Invalid syntax and a list instead of a mapping are one line too.
    for text, expected in (("a: [1,\n", "is not valid YAML"), ("- 1\n", "must hold a mapping")):
        ds.write_text(text)
        code = train.main(
            ["--print-config", "data.path=x", "parallel.backend=deepspeed", f"parallel.deepspeed_config={ds}"]
        )
        assert expected in one_line(capsys, code)


@pytest.mark.parametrize("value", ["inf", "-inf", "nan", ".inf"])
def test_non_finite_numbers_are_refused_with_the_config(capsys, value: str) -> None:
    """optim.lr=inf passed every range check and ended, after a few skipped steps, in a misleading 'set
    checkpoint.interval'."""
    error = one_line(capsys, train.main(["--print-config", "data.path=x", f"optim.lr={value}"]))
    assert "config key 'optim.lr' expects a finite number" in error
    error = one_line(capsys, train.main(["--print-config", "data.path=x", f"train.max_grad_norm={value}"]))
    assert "train.max_grad_norm" in error


def test_overrides_after_a_flag(capsys) -> None:
    """Overrides before and after --print-config are all read (argparse used to stop at the flag: 'unrecognized
    arguments' after a usage block)."""
    code = train.main(["data.path=x", "train.steps=5", "--print-config", "train.steps=7", "model.name=60m"])
    out = capsys.readouterr().out
    assert code == 0 and "steps: 7" in out and "name: 60m" in out
    error = one_line(capsys, train.main(["train.steps=5", "--print-config", "model.foo=1", "data.path=x"]))
    assert "unknown config key 'model.foo'" in error
    with pytest.raises(SystemExit) as exit_:
        train.main(["--print-config", "--no-such-flag"])
    error = one_line(capsys, exit_.value.code)
    assert "unrecognized arguments: --no-such-flag" in error


def test_a_rollback_with_no_checkpoint_yet_does_not_ask_for_checkpoints(capsys, monkeypatch, quickstart_data, tmp_path):
    """Non-finite steps before the first checkpoint with checkpoint.interval set: the error says none was saved
    yet (it used to say 'set checkpoint.interval', which was set)."""
    import megatron_pept.trainer as trainer_module

    monkeypatch.setattr(trainer_module, "cross_entropy_loss", lambda logits, targets: logits.sum() * float("nan"))
    code = train.main(args(quickstart_data, tmp_path / "run", "checkpoint.interval=3", "guard.rollback_after=2"))
    error = one_line(capsys, code)
    assert "none saved yet: the first is due at step 3" in error and "set checkpoint.interval" not in error


def _sigint_as_a_terminal_gives_it() -> None:
    """In the child before it runs: SIGINT with its default action and not blocked, whatever the test process that
    starts it inherited (Python installs its KeyboardInterrupt handler only over the default action)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def test_ctrl_c_during_a_save_is_an_interruption(quickstart_data: Path, tmp_path: Path) -> None:
    """Ctrl-C while DCP writes the shards of step 4 (DCP wraps the KeyboardInterrupt in its own exception): the
    run says it was interrupted (exit 130) instead of blaming the disk, and the checkpoint of step 2 stays the
    latest, with no partial folder left."""
    run_dir = tmp_path / "run"
    proc = start(
        [*TRAIN, *args(quickstart_data, run_dir, "checkpoint.interval=2")],
        env={**ENV, ENV_VAR: "save.state@4"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        preexec_fn=_sigint_as_a_terminal_gives_it,
    )
    try:
        for line in proc.stderr:
            if FAULT_FROZEN_LINE in line:
                break
        else:
            pytest.fail("the run never reached the fault point")
        # The run prints the line, then stops itself: a SIGCONT sent before it has stopped would be lost and leave it
        # stopped for ever (the SIGINT pending). Wait until it has stopped (it is our child).
        _, status = os.waitpid(proc.pid, os.WUNTRACED)
        assert os.WIFSTOPPED(status)
        masks = [line for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines() if line.startswith("Sig")]
        proc.send_signal(signal.SIGINT)
        proc.send_signal(signal.SIGCONT)
        rest = proc.stderr.read()
        assert proc.wait(timeout=300) == 130, (masks, rest[-3000:])
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "megatron_pept: interrupted" in rest and "free space" not in rest, rest[-3000:]
    root = run_dir / "checkpoints"
    assert [f.step for f in list_checkpoints(root)] == [2] and newest_complete(root).step == 2
    assert not list(root.glob(".tmp-*"))


def test_a_full_disk_under_tensorboard_saves_and_stops_with_one_line(quickstart_data: Path, tmp_path: Path) -> None:
    """run_dir on a disk that fills up while TensorBoard writes (checkpoints elsewhere): the run saves the step it
    reached, then stops with one line (it used to print two tracebacks), and resumes from that checkpoint."""
    if os.geteuid() != 0:
        pytest.skip("needs root for a tmpfs mount")
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("tmpfs mounts are not allowed here")
    try:
        (disk / "filler").write_bytes(b"\0" * 200_000)  # about 50 kB left: filled by TensorBoard within the run
        checkpoints = tmp_path / "checkpoints"
        cmd = args(quickstart_data, disk / "run", "metrics.tensorboard=true", "train.steps=400")
        cmd += ["train.global_batch_size=4", "train.log_interval=100", "checkpoint.interval=1000"]
        proc = run([*TRAIN, *cmd, f"checkpoint.dir={checkpoints}"])
        assert proc.returncode == 2, proc.stderr[-3000:]
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and "cannot write TensorBoard events" in lines[0], proc.stderr[-3000:]
        assert "No space left on device" in lines[0]
        found = newest_complete(checkpoints)
        assert found is not None and f"newest checkpoint: step {found.step}" in lines[0]
        assert 0 < found.step < 400
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def test_a_study_spec_is_read_as_safely_as_a_config(tmp_path: Path) -> None:
    """The same YAML rules for megatron-pept-study's spec: an object tag is named, an alias bomb refused."""
    from megatron_pept.study.spec import StudyError, load_spec

    spec = tmp_path / "spec.yaml"
    spec.write_text('config: !!python/object/apply:os.system ["true"]\nsteps: 1\nmethods: []\n')
    with pytest.raises(StudyError, match=r"study spec .* uses the YAML tag !!python/object/apply:os.system"):
        load_spec(spec)
    spec.write_text(ALIAS_BOMB.replace("method:\n  target_modules: *l8", "config: x\nsteps: 1\nmethods: *l8") + "\n")
    with pytest.raises(StudyError, match="alias bomb"):
        load_spec(spec)
