"""Will a benchmark configuration fit? Estimate its bytes before allocating them."""

from __future__ import annotations

import os
from typing import Optional

import torch

from .baselines import COPY_FLOOR_MAX_BYTES
from .configs import LayerShape, dtype_bytes, weight_bytes
from .problem import rotating_input_count

# Leave room for the allocator, the interpreter and whatever else is running.
USABLE_FRACTION = 0.9


def footprint_bytes(shape: LayerShape, dtype: torch.dtype, max_tokens: int, iters: int, floors: bool,
                    accuracy: bool = False) -> int:
    """Weights + rotating inputs + one forward's fp32 working set at the largest T (+ the floors'
    repeated inputs and copy buffers, + the float64 weights and working set of the accuracy column)."""
    element = dtype_bytes(dtype)
    count = rotating_input_count(max_tokens, shape.hidden_size, dtype, iters)
    inputs = count * max_tokens * shape.hidden_size * element
    picks = max_tokens * shape.top_k
    # gathered x, w1 output, activation, w2 output for every pick, in fp32 at worst
    working_set = picks * (2 * shape.hidden_size + shape.w1_rows + shape.ffn_size) * 4
    floor_inputs = inputs * shape.top_k if floors else 0
    weights = weight_bytes(shape, dtype)
    copy_floor = 2 * min(weights, COPY_FLOOR_MAX_BYTES) if floors else 0  # its source and destination
    float64 = (weight_bytes(shape, torch.float64) + 2 * working_set) if accuracy else 0
    return weights + inputs + floor_inputs + working_set + copy_floor + float64


def available_bytes(device: torch.device) -> Optional[int]:
    """Free memory on `device`, or None where it cannot be read."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return free
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def fits(needed: int, available: Optional[int]) -> bool:
    return available is None or needed <= USABLE_FRACTION * available


def gib(size: int) -> str:
    return f"{size / 2**30:.1f} GiB"
