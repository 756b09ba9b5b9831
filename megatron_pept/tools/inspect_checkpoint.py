"""Print what a checkpoint holds: step, tokens, method and phase, backend and ranks, sizes, and whether it is
complete (marker present and every file's size and sha256 as recorded). Exits 1 if any checkpoint shown is
incomplete or damaged, 2 on a usage error.

  megatron-pept-inspect-checkpoint runs/quickstart            # every checkpoint of the run
  megatron-pept-inspect-checkpoint runs/quickstart/checkpoints/step_00000300
  (python tools/inspect_checkpoint.py ... in a checkout)
"""

from __future__ import annotations

import argparse
from pathlib import Path

from megatron_pept.cli import run_cli

PROG = "megatron-pept-inspect-checkpoint"


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    parser.add_argument("path", help="a checkpoint folder, a checkpoints folder or a run_dir")
    parser.add_argument("--no-checksums", action="store_true", help="check sizes only (fast on large checkpoints)")
    return parser


def describe(folder: Path, *, checksums: bool) -> tuple[str, bool]:
    """The report of one checkpoint folder, and whether it is complete and intact."""
    from megatron_pept.checkpoint import verify
    from megatron_pept.checkpoint.export import read_meta
    from megatron_pept.errors import UserError

    problem = verify(folder, checksums=checksums)
    try:
        meta = read_meta(folder)
    except UserError as err:
        meta, problem = {}, problem or str(err)
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    phase = {None: "-", 0: "warm start (full rank)", 1: "low rank"}.get(meta.get("phase"), str(meta.get("phase")))
    lines = [
        f"{folder}",
        f"  complete   {'yes' if problem is None else 'NO: ' + problem}",
        f"  step       {meta.get('step', '?')} of {meta.get('total_steps', '?')}",
        f"  tokens     {meta.get('tokens_seen', '?'):,}"
        if isinstance(meta.get("tokens_seen"), int)
        else "  tokens     ?",
        f"  method     {meta.get('method', '?')} (phase: {phase})",
        f"  model      {meta.get('model', '?')}",
        f"  backend    {meta.get('backend', '?')} on {meta.get('world_size', '?')} rank(s)",
        f"  size       {size / 1e6:.1f} MB in {sum(1 for p in folder.rglob('*') if p.is_file())} files",
        f"  saved      {meta.get('created', '?')}",
    ]
    return "\n".join(lines), problem is None


def main(argv: list[str] | None = None, *, prog: str = PROG) -> int:
    args = build_parser(prog).parse_args(argv)

    def run() -> int:
        from megatron_pept.errors import UserError
        from megatron_pept.safe_paths import existing

        path = existing(args.path)  # before torch loads: a wrong path answers at once
        from megatron_pept.checkpoint import list_checkpoints

        folders = [path] if (path / "meta.json").exists() or (path / "state").exists() else []
        for candidate in (path, path / "checkpoints"):
            folders = folders or [f.path for f in list_checkpoints(candidate)]
        if not folders:
            raise UserError(f"no checkpoint in {path}")
        latest = None
        for root in {f.parent for f in folders}:
            if (root / "latest").is_file():
                latest = (root / "latest").read_text().strip()
        intact = True
        for folder in folders:
            report, ok = describe(folder, checksums=not args.no_checksums)
            print(report + ("\n  latest     yes" if folder.name == latest else ""))
            intact = intact and ok
        return 0 if intact else 1  # a damaged or incomplete checkpoint is a failed check

    return run_cli(run, prog=prog)


if __name__ == "__main__":
    raise SystemExit(main())
