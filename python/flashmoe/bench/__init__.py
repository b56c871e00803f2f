"""flashmoe-bench: the benchmark command line (see bench/README.md).

configs   named layer shapes, FLOP and byte counts
problem   random weights and rotating inputs
routing   uniform and skewed (Zipf router bias) routing
baselines HF-style expert loop, torch._grouped_mm, dense-matmul and copy floors
backends  --backend names -> runners
timing    perf_counter / CUDA-event timers
memory    will a configuration fit
report    header, table, JSON
cli       argument parsing and the sweep
targets   bench/README.md's performance targets, read off the JSON
model     the performance model of the CUDA kernel: predictions, and predicted beside measured
"""

from .cli import main

__all__ = ["main"]
