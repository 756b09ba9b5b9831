"""The spec of a method study (what :mod:`megatron_pept.study.runner` runs): its format, reading and checking it.

A study is a YAML spec (see ``configs/studies/cpu_pydocs.yaml``)::

    config: quickstart            # the base run config (a file, relative to the spec, or a shipped name)
    overrides: [train.seed=0]     # applied to every run
    steps: 1500                   # the token budget of a final run, in optimizer steps
    grid_steps: 250               # budget of a learning-rate grid run (default: steps, the grid is the study)
    checkpoint_interval: 100      # every run saves this often, so an interrupted study resumes mid-run
    probe_steps: 8                # steps of the speed probe (the memory probe runs 3 of them under MemTracker)
    baseline: full                # the label the ratios divide by
    methods:
      - name: relora              # method.name; label defaults to the name
        label: relora
        lrs: [1.0e-3, 2.0e-3, 4.0e-3]
        overrides: [method.rank=64]
        probe_overrides: [method.warm_start_steps=0]    # probe memory and speed in the low-rank phase
        grid_overrides: [method.warm_start_steps=25]    # scale step counts to the shorter grid runs
        seeds: [1, 2]             # optional: the final run again with each train.seed, at the same lr (no grid)
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from megatron_pept.config import read_yaml_file
from megatron_pept.errors import ConfigError, UserError


class StudyError(UserError):
    """A study spec that cannot be run as written."""


@dataclass(frozen=True)
class MethodSpec:
    name: str
    label: str
    lrs: tuple[float, ...]
    overrides: tuple[str, ...] = ()
    probe_overrides: tuple[str, ...] = ()
    grid_overrides: tuple[str, ...] = ()
    seeds: tuple[int, ...] = ()  # extra final runs at the grid's best lr, one per train.seed


@dataclass(frozen=True)
class StudySpec:
    config: str
    methods: tuple[MethodSpec, ...]
    steps: int
    grid_steps: int
    overrides: tuple[str, ...] = ()
    checkpoint_interval: int = 100
    probe_steps: int = 8
    baseline: str = "full"
    source: Path = field(default=Path("."))


def _strings(value: Any, what: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) and "=" in v for v in value):
        raise StudyError(f"{what} must be a list of KEY=VALUE strings, got {value!r}")
    return tuple(value)


def load_spec(path: str | os.PathLike[str]) -> StudySpec:
    path = Path(path)
    if not path.is_file():
        raise StudyError(f"no study spec at {path}: give a YAML file (configs/study_cpu.yaml is an example)")
    try:
        raw = read_yaml_file(path, what="study spec")  # no object tags, no alias bombs
    except ConfigError as err:
        raise StudyError(str(err)) from None
    if not isinstance(raw, dict):
        raise StudyError(f"{path} must be a mapping with config, steps and methods")
    known = {"config", "overrides", "steps", "grid_steps", "checkpoint_interval", "probe_steps", "baseline", "methods"}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise StudyError(f"{path}: unknown key(s) {', '.join(unknown)}; the keys are {', '.join(sorted(known))}")
    for key in ("config", "steps", "methods"):
        if key not in raw:
            raise StudyError(f"{path}: missing {key!r}")
    steps = raw["steps"]
    grid_steps = raw.get("grid_steps", steps)
    for key, value in (("steps", steps), ("grid_steps", grid_steps), ("probe_steps", raw.get("probe_steps", 8))):
        if not isinstance(value, int) or value < 1:
            raise StudyError(f"{path}: {key} must be a positive integer, got {value!r}")
    if grid_steps > steps:
        raise StudyError(f"{path}: grid_steps ({grid_steps}) is larger than steps ({steps}); a grid run is a proxy")
    methods = []
    for i, entry in enumerate(raw["methods"] or []):
        if not isinstance(entry, dict) or "name" not in entry or "lrs" not in entry:
            raise StudyError(f"{path}: methods[{i}] needs a name and a list of lrs")
        lrs = entry["lrs"]
        if not isinstance(lrs, list) or not lrs or not all(isinstance(x, (int, float)) and x > 0 for x in lrs):
            raise StudyError(f"{path}: methods[{i}].lrs must be a non-empty list of positive numbers, got {lrs!r}")
        extra = sorted(set(entry) - {"name", "label", "lrs", "overrides", "probe_overrides", "grid_overrides", "seeds"})
        if extra:
            raise StudyError(f"{path}: methods[{i}] has unknown key(s) {', '.join(extra)}")
        label = str(entry.get("label", entry["name"]))
        if not label.replace("_", "").replace("-", "").isalnum():
            raise StudyError(f"{path}: methods[{i}].label {label!r} must be letters, digits, - and _ (a folder name)")
        seeds = entry.get("seeds") or []
        if (
            not isinstance(seeds, list)
            or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in seeds)
            or len(set(seeds)) != len(seeds)
        ):
            raise StudyError(f"{path}: methods[{i}].seeds must be a list of distinct integers >= 0, got {seeds!r}")
        methods.append(
            MethodSpec(
                name=str(entry["name"]),
                label=label,
                lrs=tuple(float(x) for x in lrs),
                overrides=_strings(entry.get("overrides"), f"methods[{i}].overrides"),
                probe_overrides=_strings(entry.get("probe_overrides"), f"methods[{i}].probe_overrides"),
                grid_overrides=_strings(entry.get("grid_overrides"), f"methods[{i}].grid_overrides"),
                seeds=tuple(seeds),
            )
        )
    if not methods:
        raise StudyError(f"{path}: methods is empty")
    labels = [m.label for m in methods]
    dupes = sorted({x for x in labels if labels.count(x) > 1})
    if dupes:
        raise StudyError(f"{path}: label(s) {', '.join(dupes)} used twice; give each method entry its own label")
    folders = {f"{m.label}_seed{seed}": m.label for m in methods for seed in m.seeds}
    clash = sorted(set(folders) & set(labels))
    if clash:
        raise StudyError(
            f"{path}: label {clash[0]} is also the folder of {folders[clash[0]]}'s seed run; rename the label"
        )
    baseline = str(raw.get("baseline", "full"))
    if baseline not in labels:
        raise StudyError(f"{path}: baseline {baseline!r} is not one of the methods ({', '.join(labels)})")
    config = str(raw["config"])
    if (path.parent / config).is_file():
        config = str(path.parent / config)
    return StudySpec(
        config=config,
        methods=tuple(methods),
        steps=steps,
        grid_steps=grid_steps,
        overrides=_strings(raw.get("overrides"), "overrides"),
        checkpoint_interval=int(raw.get("checkpoint_interval", 100)),
        probe_steps=int(raw.get("probe_steps", 8)),
        baseline=baseline,
        source=path,
    )
