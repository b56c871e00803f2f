"""The performance targets of bench/README.md, read off flashmoe-bench JSON files.

    python -m flashmoe.bench.targets bench/results/*.json [--strict]

Prints one line per target: the native (fused) rows it covers, their values, and MET, MISSED or
NO DATA (the sweep did not run that row, or a floor or baseline it needs did not). Exits 0, or
with --strict 1 when a target was missed or had no data.
"""

from __future__ import annotations

import argparse
import json
import operator
import sys
from dataclasses import dataclass
from typing import Callable, List, Optional

FUSED_BACKEND = "native"


@dataclass(frozen=True)
class Target:
    description: str
    config: str
    tokens: Callable[[int], bool]
    metric: str                 # a row key
    bound: Optional[float]      # None: report the value, no pass/fail
    compare: Callable[[float, float], bool] = operator.ge
    dtype: str = "bf16"
    unit: str = "x"

    def rows(self, rows: List[dict]) -> List[dict]:
        return [row for row in rows if row.get("config") == self.config and row.get("dtype") == self.dtype
                and row.get("backend") == FUSED_BACKEND and row.get("routing", "uniform") == "uniform"
                and self.tokens(row.get("tokens", -1))]


TARGETS = (
    Target("Mixtral bf16 T=4096: >= 70% of the dense-GEMM floor's TFLOP/s", "mixtral", lambda t: t == 4096,
           "dense_fraction", 0.70, unit="of dense"),
    Target("Mixtral bf16 T=4096: >= 1.2x torch._grouped_mm", "mixtral", lambda t: t == 4096,
           "speedup_vs_grouped_mm", 1.2),
    Target("Qwen3-30B-A3B bf16 T<=16: <= 1.5x the expert-weight-bytes copy floor", "qwen3-30b-a3b",
           lambda t: t <= 16, "over_weight_floor", 1.5, compare=operator.le),
    Target("FlashMoE paper layer (H=2048 I=2048 E=32 k=2) bf16 T=8192: report (paper: 3.7 ms on 8xH100, "
           "distributed)", "paper", lambda t: t == 8192, "median_ms", None, unit="ms"),
)


def _format(value: float, unit: str) -> str:
    if unit == "of dense":
        return f"{100 * value:.0f}%"
    return f"{value:.3f} ms" if unit == "ms" else f"{value:.2f}x"


def evaluate(rows: List[dict]) -> List[dict]:
    """One dict per target: description, verdict (MET / MISSED / REPORT / NO DATA), values."""
    results = []
    for target in TARGETS:
        matched = [row for row in target.rows(rows) if row.get("status") == "ok"
                   and row.get(target.metric) is not None]
        values = [(row["tokens"], row[target.metric]) for row in sorted(matched, key=lambda r: r["tokens"])]
        if not values:
            verdict = "NO DATA"
        elif target.bound is None:
            verdict = "REPORT"
        else:
            verdict = "MET" if all(target.compare(value, target.bound) for _, value in values) else "MISSED"
        results.append({"target": target.description, "verdict": verdict, "metric": target.metric,
                        "values": [{"tokens": tokens, "value": value} for tokens, value in values],
                        "text": ", ".join(f"T={tokens}: {_format(value, target.unit)}" for tokens, value in values)})
    return results


def load_rows(paths: List[str]) -> List[dict]:
    rows = []
    for path in paths:
        with open(path) as handle:
            data = json.load(handle)
        device = data.get("environment", {}).get("device_name")
        rows.extend(dict(row, device_name=device, source=path) for row in data.get("rows", []))
    return rows


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flashmoe.bench.targets",
                                     description="Check flashmoe-bench JSON files against bench/README.md's targets.")
    parser.add_argument("json", nargs="+", help="flashmoe-bench --json files")
    parser.add_argument("--strict", action="store_true", help="exit 1 when a target is missed or has no data")
    args = parser.parse_args(argv)
    rows = load_rows(args.json)
    devices = sorted({row["device_name"] for row in rows if row.get("device_name")})
    print(f"# targets over {len(rows)} rows from {len(args.json)} file(s); device(s): {', '.join(devices) or '?'}")
    results = evaluate(rows)
    for result in results:
        print(f"{result['verdict']:8s} {result['target']}" + (f"\n         {result['text']}" if result["text"] else ""))
    if args.strict and any(result["verdict"] in ("MISSED", "NO DATA") for result in results):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
