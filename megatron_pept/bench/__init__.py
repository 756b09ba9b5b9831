"""The benchmark suites behind ``tools/bench.py``: model throughput (:mod:`.model`), data loading (:mod:`.data`),
collectives per backend (:mod:`.comm`), checkpoint save/load (:mod:`.checkpoint`) and optimizer steps
(:mod:`.optim`). Each prints ratios against a baseline run in the same process or script."""

from megatron_pept.bench.model import (
    DEVICES,
    DTYPES,
    HF_ATTENTION,
    BenchSettings,
    format_result,
    run_benchmark,
)

__all__ = ["DEVICES", "DTYPES", "HF_ATTENTION", "BenchSettings", "format_result", "run_benchmark"]
