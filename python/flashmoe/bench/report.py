"""What a run reports: the environment header, the results table, the JSON file."""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import sys
from pathlib import Path
from typing import List, Optional

import torch

TABLE_COLUMNS = ("config", "dtype", "T", "routing", "backend", "median ms", "p10-p90 ms", "n",
                 "tokens/s", "TFLOP/s", "vs ref", "vs gmm", "%dense", "x wfloor", "rel err")
NUMERIC_COLUMNS = frozenset(TABLE_COLUMNS[2:3] + TABLE_COLUMNS[5:])


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _flashmoe_info() -> dict:
    try:
        import flashmoe
    except ImportError as error:  # the bench lives inside flashmoe, but be explicit
        return {"error": str(error)}
    info = {"version": getattr(flashmoe, "__version__", None)}
    build_info = getattr(flashmoe, "build_info", None)
    if callable(build_info):
        try:
            info["build_info"] = build_info()
        except Exception as error:  # a broken build must not stop the benchmark
            info["build_info"] = f"error: {type(error).__name__}: {error}"
    try:
        from flashmoe import _C
        if getattr(_C, "cuda_compiled", False):
            info["cuda_build_info"] = dict(_C.cuda_build_info())
    except Exception as error:
        info["cuda_build_info"] = f"error: {type(error).__name__}: {error}"
    return info


def _load_average() -> Optional[float]:
    try:
        return round(os.getloadavg()[0], 2)
    except (OSError, AttributeError):
        return None


def busy_machine_warning(env: dict) -> Optional[str]:
    """A line to print when other processes hold the CPU cores before the run starts.

    On a busy machine every OpenMP barrier waits for a descheduled thread, and a
    2-thread torch GEMM can take 50x its quiet time.
    """
    load, cores = env.get("load_average_1min"), env.get("cpu_count")
    if load is None or not cores or load <= 0.5 * cores:
        return None
    return (f"# WARNING: load average {load:.2f} on {cores} cores before the run: other processes are "
            f"running and CPU times will be inflated (fewer --threads helps)")


def environment(device: torch.device, argv: List[str]) -> dict:
    env = {
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "argv": list(argv),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "device": str(device),
        "device_name": device_name(device),
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "load_average_1min": _load_average(),
        "flashmoe": _flashmoe_info(),
    }
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        env["cuda"] = torch.version.cuda
        env["device_capability"] = ".".join(map(str, torch.cuda.get_device_capability(device)))
        env["device_multiprocessors"] = properties.multi_processor_count
        env["device_memory_bytes"] = properties.total_memory
        env["cuda_driver"] = _cuda_driver_version()
        env["allow_tf32"] = bool(torch.backends.cuda.matmul.allow_tf32)
    return env


def _cuda_driver_version() -> Optional[str]:
    """The driver's CUDA version (e.g. "13.0"), read through the CUDA runtime torch loaded."""
    try:
        import ctypes
        version = ctypes.c_int()
        for name in ("libcuda.so.1", "libcuda.so"):
            try:
                library = ctypes.CDLL(name)
            except OSError:
                continue
            if library.cuDriverGetVersion(ctypes.byref(version)) == 0:
                return f"{version.value // 1000}.{version.value % 1000 // 10}"
    except Exception:  # informational only
        pass
    return None


def header_lines(env: dict, shapes, timing_note: str) -> List[str]:
    lines = [
        f"# flashmoe-bench  {env['timestamp']}",
        f"# torch {env['torch']}  python {env['python']}  device {env['device']} ({env['device_name']})"
        f"  threads {env['threads']}",
    ]
    flashmoe_info = env["flashmoe"]
    lines.append(f"# flashmoe {flashmoe_info.get('version')}  build_info "
                 f"{flashmoe_info.get('build_info', 'not available')}")
    if "cuda" in env:
        lines.append(f"# CUDA {env['cuda']} (driver {env.get('cuda_driver')})  sm_{env['device_capability'].replace('.', '')}  "
                     f"{env.get('device_multiprocessors')} SMs  cuda_build_info "
                     f"{flashmoe_info.get('cuda_build_info', 'not compiled')}")
    for shape in shapes:
        note = "; ".join(part for part in (shape.note, shape.source and f"HF config {shape.source}") if part)
        note = f"  ({note})" if note else ""
        lines.append(f"# {shape.name}: {shape.describe()}{note}")
    lines.append(f"# {timing_note}")
    warning = busy_machine_warning(env)
    if warning and env["device"] == "cpu":
        lines.append(warning)
    return lines


def _number(value: Optional[float], digits: int = 3) -> str:
    if value is None or not math.isfinite(value):
        return "-"
    return f"{value:.{digits}g}" if abs(value) < 10**digits else f"{value:.0f}"


def _ratio(value: Optional[float], suffix: str = "x") -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.2f}{suffix}"


def _cells(row: dict) -> List[str]:
    leading = [row["config"], row["dtype"], str(row["tokens"]), row["routing"], row["backend"]]
    if row["status"] == "skipped":
        return leading + [f"skipped: {row.get('skip_reason', '')}"]
    if row["status"] != "ok":
        return leading + [f"error: {row['error'].splitlines()[0][:160]}"]
    dense_fraction = row.get("dense_fraction")
    if "copy_gbps" in row:  # the copy floor: its bandwidth stands in the TFLOP/s column
        throughput = f"{_number(row['copy_gbps'])} GB/s"
    else:
        throughput = _number(row["tflops"])
    return leading + [
        f"{row['median_ms']:.3f}",
        f"{row['p10_ms']:.3f}-{row['p90_ms']:.3f}",
        str(row["iterations"]),
        _number(row["tokens_per_s"]),
        throughput,
        _ratio(row.get("speedup_vs_reference")),
        _ratio(row.get("speedup_vs_grouped_mm")),
        "-" if dense_fraction is None else f"{100 * dense_fraction:.0f}%",
        _ratio(row.get("over_weight_floor")),
        "-" if row.get("rel_err") is None else f"{row['rel_err']:.1e}",
    ]


def format_table(rows: List[dict]) -> str:
    table = [list(TABLE_COLUMNS)] + [_cells(row) for row in rows]
    widths = [0] * len(TABLE_COLUMNS)
    for cells in table:
        # a short (error) row's last cell is a message, not a column value
        sized = cells if len(cells) == len(TABLE_COLUMNS) else cells[:-1]
        for i, cell in enumerate(sized):
            widths[i] = max(widths[i], len(cell))

    def render(cells: List[str]) -> str:
        out = []
        for i, cell in enumerate(cells):
            if len(cells) < len(TABLE_COLUMNS) and i == len(cells) - 1:
                out.append(cell)  # an error message runs to the end of the line
            elif TABLE_COLUMNS[i] in NUMERIC_COLUMNS:
                out.append(cell.rjust(widths[i]))
            else:
                out.append(cell.ljust(widths[i]))
        return "  ".join(out).rstrip()

    lines = [render(table[0]), "  ".join("-" * width for width in widths)]
    previous_group = None
    for row, cells in zip(rows, table[1:]):
        group = (row["config"], row["dtype"], row["routing"])
        if previous_group is not None and group != previous_group:
            lines.append("")
        previous_group = group
        lines.append(render(cells))
    return "\n".join(lines)


def write_json(path: str, env: dict, settings: dict, rows: List[dict]) -> Path:
    target = Path(path)
    if target.parent != Path(""):
        target.parent.mkdir(parents=True, exist_ok=True)
    with open(target, "w") as out:
        json.dump({"environment": env, "settings": settings, "rows": rows}, out, indent=1)
        out.write("\n")
    return target


def print_lines(lines: List[str], stream=None) -> None:
    stream = stream or sys.stdout
    for line in lines:
        print(line, file=stream)
