#!/usr/bin/env python3
"""Build-time register-spill check of the CUDA backend.

Reads the ``ptxas -v`` reports that ``tools/nvcc_launcher.py`` saved beside each object file
(``<object>.ptxas.log``), prints one table row per kernel (arch, registers, shared memory, stack,
spill bytes), and exits non-zero when a *hot* kernel -- one whose mangled or demangled name
matches a ``--hot`` regular expression -- spills (spill stores or loads > 0 bytes).

Why ptxas and not ``cuobjdump --dump-resource-usage``: cuobjdump's per-function line
(``REG:32 STACK:1808 SHARED:0 LOCAL:0 CONSTANT[0]:544 ...``) has no spill counts at all (spills live
in the stack frame, and LOCAL stays 0), its STACK is 0 for relocatable device code until the
device link, and the CUDA pip wheels that provide nvcc do not ship cuobjdump.

The ptxas report parsed here (CUDA 12.x / 13.x):

    ptxas info    : Compiling entry function '_Z21moe_persistent_kernelv' for 'sm_90a'
    ptxas info    : Function properties for _Z21moe_persistent_kernelv
        8 bytes stack frame, 4 bytes spill stores, 4 bytes spill loads
    ptxas info    : Used 168 registers, used 1 barriers, 32 bytes smem, 400 bytes cmem[0]

Non-entry functions (relocatable device code) have a "Function properties" block without a
"Compiling entry function" line; they take the arch of the next entry function of the same log.

Usage:
    check_spills.py [--hot REGEX]... [--report FILE] (--objects OBJ... | --logs LOG...)
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import shutil
import subprocess
import sys
from typing import Iterable

LOG_SUFFIX = ".ptxas.log"

_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '([^']+)'")
_PROPS = re.compile(r"Function properties for (\S+)")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"ptxas\s+info\s*:\s*Used (\d+) registers")
_SMEM = re.compile(r"(\d+) bytes smem")
_BARRIERS = re.compile(r"used (\d+) barriers")


@dataclasses.dataclass
class Usage:
    """Resources of one function compiled for one arch, from one ptxas report."""

    name: str                  # mangled, as ptxas prints it
    arch: str | None = None    # "sm_90a"; None until known
    entry: bool = False        # a __global__ kernel (not a device function)
    registers: int | None = None
    smem: int = 0              # static shared memory bytes
    barriers: int | None = None
    stack: int = 0             # stack frame bytes
    spill_stores: int = 0
    spill_loads: int = 0
    source: str = ""           # the log it came from
    demangled: str = ""

    @property
    def spills(self) -> bool:
        return self.spill_stores > 0 or self.spill_loads > 0


def parse_ptxas(text: str, source: str = "") -> list[Usage]:
    """Parses one ptxas -v report (one compile, any number of archs) into Usage records."""
    records: list[Usage] = []
    current: Usage | None = None       # the record the next frame/"Used" line belongs to
    pending: list[Usage] = []          # device functions whose arch is not known yet
    last_arch: str | None = None
    for line in text.splitlines():
        m = _ENTRY.search(line)
        if m:
            name, arch = m.group(1), m.group(2)
            last_arch = arch
            for record in pending:
                record.arch = arch
            pending.clear()
            current = Usage(name=name, arch=arch, entry=True, source=source)
            records.append(current)
            continue
        m = _PROPS.search(line)
        if m:
            name = m.group(1)
            if current is not None and current.entry and current.name == name:
                continue  # the properties block of the entry function just announced
            current = Usage(name=name, source=source)
            records.append(current)
            pending.append(current)
            continue
        m = _FRAME.search(line)
        if m and current is not None:
            current.stack, current.spill_stores, current.spill_loads = (int(g) for g in m.groups())
            continue
        m = _USED.search(line)
        if m and current is not None:
            current.registers = int(m.group(1))
            smem = _SMEM.search(line)
            current.smem = int(smem.group(1)) if smem else 0
            barriers = _BARRIERS.search(line)
            current.barriers = int(barriers.group(1)) if barriers else None
            continue
    for record in pending:
        record.arch = last_arch  # a trailing run of device functions: best guess
    return records


def demangle(names: Iterable[str]) -> dict[str, str]:
    """Mangled -> demangled, through c++filt when it is installed (identity otherwise)."""
    names = sorted(set(names))
    tool = shutil.which("cu++filt") or shutil.which("c++filt")
    if not names or tool is None:
        return {n: n for n in names}
    try:
        proc = subprocess.run([tool], input="\n".join(names) + "\n", capture_output=True, text=True,
                              timeout=60, check=True)
        out = proc.stdout.splitlines()
    except (OSError, subprocess.SubprocessError):
        return {n: n for n in names}
    if len(out) != len(names):
        return {n: n for n in names}
    return dict(zip(names, out))


def is_hot(record: Usage, patterns: Iterable[str]) -> str | None:
    """The first pattern matching the record's mangled or demangled name, or None."""
    for pattern in patterns:
        if re.search(pattern, record.name) or (record.demangled and re.search(pattern, record.demangled)):
            return pattern
    return None


def _short(name: str, width: int = 110) -> str:
    if name.startswith("void "):
        name = name[5:]
    return name if len(name) <= width else name[: width - 3] + "..."


def format_table(records: list[Usage], patterns: list[str]) -> str:
    """Kernels (entry functions) and any spilling device function, one row each."""
    rows = [r for r in records if r.entry or r.spills]
    lines = [f"flashmoe CUDA resource usage (ptxas -v): {len(rows)} function(s); '*' marks hot kernels "
             f"(patterns: {', '.join(patterns) if patterns else 'none'})",
             f"  {'arch':<8} {'regs':>5} {'smem':>7} {'stack':>6} {'spill st':>8} {'spill ld':>8}  kernel"]
    for r in sorted(rows, key=lambda r: (r.demangled or r.name, r.arch or "")):
        mark = "*" if is_hot(r, patterns) else " "
        regs = "-" if r.registers is None else str(r.registers)
        kind = "" if r.entry else "  [device fn]"
        lines.append(f"{mark} {r.arch or '?':<8} {regs:>5} {r.smem:>7} {r.stack:>6} {r.spill_stores:>8} "
                     f"{r.spill_loads:>8}  {_short(r.demangled or r.name)}{kind}")
    return "\n".join(lines)


def check(records: list[Usage], patterns: list[str]) -> list[str]:
    """One error message per (hot function, arch) that spills."""
    errors = []
    for r in records:
        pattern = is_hot(r, patterns)
        if pattern is not None and r.spills:
            errors.append(f"hot kernel '{r.demangled or r.name}' ({r.arch or 'unknown arch'}) spills "
                          f"{r.spill_stores} bytes of stores and {r.spill_loads} bytes of loads "
                          f"[pattern '{pattern}', mangled {r.name}, from {os.path.basename(r.source)}]")
    return errors


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hot", action="append", default=[],
                        help="regex of a hot kernel name (mangled or demangled); repeatable; "
                             "';'-separated lists are split")
    parser.add_argument("--report", help="also write the table here")
    parser.add_argument("--stamp", help="touch this file when the check passes")
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--objects", nargs="*", help=f"object files; reads <object>{LOG_SUFFIX}")
    group.add_argument("--logs", nargs="*", help="ptxas -v logs")
    args = parser.parse_args(argv)

    if args.stamp and os.path.exists(args.stamp):
        os.remove(args.stamp)
    patterns = [p for arg in args.hot for p in arg.split(";") if p.strip()]
    logs = args.logs if args.logs is not None else [o + LOG_SUFFIX for o in args.objects if o.strip()]
    missing = [log for log in logs if not os.path.isfile(log)]
    if missing:
        print("flashmoe spill check: ERROR: no ptxas report for:\n  " + "\n  ".join(missing) +
              "\n  (objects must be compiled through tools/nvcc_launcher.py with -Xptxas=-v; "
              "a clean rebuild regenerates them)", file=sys.stderr)
        return 2

    records: list[Usage] = []
    for log in logs:
        with open(log, encoding="utf-8", errors="replace") as f:
            records.extend(parse_ptxas(f.read(), source=log))
    names = demangle(r.name for r in records)
    for r in records:
        r.demangled = names.get(r.name, r.name)

    table = format_table(records, patterns)
    print(table)
    if args.report:
        with open(args.report, "w", encoding="utf-8") as f:
            f.write(table + "\n")
    for pattern in patterns:
        if not any(is_hot(r, [pattern]) for r in records):
            print(f"flashmoe spill check: warning: no compiled function matches hot pattern '{pattern}'")

    errors = check(records, patterns)
    if errors:
        print("flashmoe spill check: FAILED -- register spills in hot kernels:\n  " + "\n  ".join(errors) +
              "\n  Reduce register pressure (or, while developing, configure with "
              "-DFLASHMOE_HOT_KERNELS=<other patterns>).", file=sys.stderr)
        return 1
    if args.stamp:
        with open(args.stamp, "w", encoding="utf-8") as f:
            f.write("ok\n")
    print(f"flashmoe spill check: ok ({sum(1 for r in records if is_hot(r, patterns))} hot function(s), no spills)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
