"""Entry point: ``python -m megatron_pept.train --config FILE [key.sub=value ...]``.

Runs unchanged on one process or under a launcher (torchrun, deepspeed). Mistakes in the input are one line on
stderr and exit code 2; a run that diverges exits 1.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import typing

from megatron_pept.errors import UserError


class _OneLineParser(argparse.ArgumentParser):
    """Command-line mistakes are one line too (argparse would print its usage block first)."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"megatron_pept: error: {message}; see python -m megatron_pept.train --help\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(
        prog="python -m megatron_pept.train",
        description="Pre-train a LLaMA model with full-rank or parameter-efficient methods.",
        epilog="Example: python -m megatron_pept.train --config configs/quickstart.yaml run_dir=runs/qs "
        "train.steps=100 optim.lr=3e-3",
    )
    parser.add_argument("--config", metavar="FILE", help="YAML run configuration (defaults when omitted)")
    parser.add_argument(
        "--help-config", action="store_true", help="list every configuration key with its default and meaning"
    )
    parser.add_argument(
        "--print-config",
        action="store_true",
        help="print the resolved configuration and exit without training",
    )
    # The deepspeed launcher appends --local_rank=N; the rank comes from the environment (LOCAL_RANK) anyway.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. optim.lr=1e-3")
    return parser


def main(argv: list[str] | None = None) -> int:
    launcher = os.getppid()  # before anything slow: a worker's launcher, if it has one (see follow_the_launcher)
    args = build_parser().parse_intermixed_args(argv)  # overrides may come before and after the flags
    # torch and the stack load after the arguments parse, so --help and an argument mistake answer at once.
    from megatron_pept.registry import describe_config, load_config

    if args.help_config:
        print(describe_config())
        return 0
    try:
        cfg = load_config(args.config, args.overrides)
        if args.print_config:
            import yaml

            from megatron_pept.config import to_dict

            print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
            return 0
        from megatron_pept.signals import caught_early, follow_the_launcher
        from megatron_pept.trainer import Trainer

        with caught_early(cfg.checkpoint.save_on_signal):  # a stop signal during the set-up is not lost
            follow_the_launcher(launcher)  # a killed launcher's workers save and stop instead of training on
            trainer = Trainer(cfg)
            result = trainer.train()
        if result.interrupted:
            _report_stop(trainer, result.steps)
        _shutdown_process_group(synchronize=True)
    except UserError as err:
        print(f"megatron_pept: error: {err}", file=sys.stderr)
        return 2
    except FloatingPointError as err:
        print(f"megatron_pept: training diverged: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("megatron_pept: interrupted", file=sys.stderr)
        return 130
    finally:
        _shutdown_process_group(synchronize=False)  # after an error: no collective, the other ranks may be gone
    return 0


def _report_stop(trainer, step: int) -> None:
    """One line from rank 0 when the run stopped on a stop signal: which signal, and what a resume starts from."""
    from megatron_pept.distributed import comm
    from megatron_pept.signals import received_signal

    if comm.rank() != 0:
        return
    name = received_signal() or "a stop signal received by another rank"
    found = trainer.checkpointer.newest_own(checksums=False)  # the marker only: the job's time is short
    saved = (
        f"checkpoint {found.path.name} saved"
        if found is not None and found.step == step
        else "no checkpoint saved at this step (see the log above)"
    )
    resume = f"resumes from step {found.step}" if found is not None else "starts from the beginning"
    print(
        f"megatron_pept: stopped at step {step} on {name}: {saved}; the same command (checkpoint.resume=auto) {resume}",
        file=sys.stderr,
        flush=True,
    )


def _shutdown_process_group(*, synchronize: bool) -> None:
    """Tear the process group down before the interpreter exits (left to interpreter shutdown, the collective
    library's threads can abort a process whose run succeeded: seen as 'terminate called without an active
    exception' and exit code -6 under torchrun)."""
    from megatron_pept.distributed import comm

    if synchronize:
        comm.barrier()
    comm.shutdown()


def cli_main() -> None:
    """``python -m megatron_pept.train`` and the ``megatron-pept-train`` console script: :func:`main`, then exit.

    A process of a multi-process job (``WORLD_SIZE`` > 1) leaves with ``os._exit`` once its output is flushed and
    its files are closed: even after the process group is destroyed, the collective library can leave a native
    thread that aborts the interpreter's shutdown ('terminate called without an active exception', exit -6 under
    torchrun, seen about once in 20 two-rank runs), which would turn a finished run into a failed job."""
    code = main()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    cli_main()
