"""The README's "fits on" table: for each named size and each of four memory-minded recipes, the smallest of one
24 GB, 40 GB and 80 GB GPU, or 8 x 80 GB under FSDP2, that the planner says the run fits (with the allowance of
:mod:`megatron_pept.plan.fit`), at micro-batch 1 x 256 tokens (the papers' sequence length).

  python -m megatron_pept.plan.table --sizes 60m,130m,350m,1b,7b --output docs/results/fits_on.json

Each cell is planned from scratch (a 7B plan takes about two minutes on a 2-core CPU); the markdown goes to stdout.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

RANKS = {"60m": 128, "130m": 256, "250m": 256, "350m": 256, "1b": 512, "7b": 1024}
"""The GaLore paper's rank per size (galore_8bit, q_galore). ReLoRA's adapters get hidden / 16 (its 1.3B run's 128;
the GPU check's d/r = 16): the GaLore ranks as adapters would train a third of a 7B model."""

COMMON = ["model.vocab_size=32000", "data.seq_len=256", "train.micro_batch_size=1"]
RECIPES: dict[str, list[str]] = {
    "full": ["method.name=full"],
    "relora (NF4 base)": ["method.name=relora", "method.base_dtype=nf4"],
    "galore_8bit": [
        "method.name=galore_8bit",
        "optim.per_layer=true",
        "train.param_dtype=bf16",
        "train.activation_checkpointing=true",
    ],
    "q_galore": [
        "method.name=q_galore",
        "optim.per_layer=true",
        "train.param_dtype=bf16",
        "train.activation_checkpointing=true",
    ],
}
GPUS = (24.0, 40.0, 80.0)
FSDP2_RANKS = 8


def fits_on(size: str, recipe: str) -> dict[str, Any]:
    """The smallest option the recipe fits at ``size``: ``{"fits_on": "24 GB" | ... | None, "peak_gb": ...}``."""
    from megatron_pept import registry
    from megatron_pept.errors import ConfigError
    from megatron_pept.models import llama_args
    from megatron_pept.plan import plan
    from megatron_pept.plan.fit import fits

    shape = llama_args(registry.load_config("quickstart", [f"model.name={size}"]).model)
    rank = [f"method.rank={RANKS[size]}"] if size in RANKS and recipe != "full" else []
    if recipe.startswith("relora"):
        rank = [f"method.rank={shape.hidden_size // 16}"]
    group = []
    if recipe == "q_galore":  # int8 groups lie within a row: a size dividing both the width and the MLP width
        common = math.gcd(shape.hidden_size, shape.intermediate_size)
        g = max((2**k for k in range(9) if common % 2**k == 0), default=1)
        if g < 8:
            return {"fits_on": None, "peak_gb": None, "why": f"no int8 group size of 8 or more divides {common}"}
        group = [f"method.weight_group_size={g}"]
    base = [f"model.name={size}", *COMMON, *RECIPES[recipe], *rank, *group]
    one = plan(registry.load_config("quickstart", [*base, "train.global_batch_size=1"]))
    for gb in GPUS:
        if fits(one, gb):
            return {"fits_on": f"{gb:g} GB", "peak_gb": one.peak_gb, "single_peak_gb": one.peak_gb}
    sharded = [*base, "parallel.backend=fsdp2", f"train.global_batch_size={FSDP2_RANKS}"]
    try:
        cfg = registry.load_config("quickstart", sharded)
    except ConfigError:  # q_galore's per-layer updates run on one process: shard without them
        cfg = registry.load_config("quickstart", [*sharded, "optim.per_layer=false"])
    many = plan(cfg, ranks=FSDP2_RANKS)
    where = f"{FSDP2_RANKS} x 80 GB FSDP2" if fits(many, 80.0) else None
    return {"fits_on": where, "peak_gb": many.peak_gb, "single_peak_gb": one.peak_gb}


def markdown(cells: dict[str, dict[str, dict[str, Any]]]) -> str:
    recipes = list(RECIPES)
    lines = ["| size | " + " | ".join(recipes) + " |", "|---|" + "---|" * len(recipes)]
    for size, row in cells.items():
        out = []
        for recipe in recipes:
            c = row[recipe]
            out.append("n/a" if c["peak_gb"] is None else f"{c['fits_on'] or 'none'} ({c['peak_gb']:.1f})")
        lines.append(f"| {size} | " + " | ".join(out) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="60m,130m,350m,1b,7b")
    parser.add_argument("--output", type=Path, help="also write every cell as JSON (resumable: cells there are kept)")
    args = parser.parse_args(argv)
    cells: dict[str, dict[str, dict[str, Any]]] = {}
    if args.output is not None and args.output.is_file():
        cells = json.loads(args.output.read_text())
    for size in args.sizes.split(","):
        for recipe in RECIPES:
            if recipe in cells.get(size, {}):
                continue
            cells.setdefault(size, {})[recipe] = fits_on(size, recipe)
            print(f"{size} {recipe}: {cells[size][recipe]}", flush=True)
            if args.output is not None:
                args.output.parent.mkdir(parents=True, exist_ok=True)
                args.output.write_text(json.dumps(cells, indent=2) + "\n")
    print(markdown({s: cells[s] for s in args.sizes.split(",")}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
