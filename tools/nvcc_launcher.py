#!/usr/bin/env python3
"""CUDA compiler launcher: runs the compile, echoes its output, and keeps a copy of it.

CMake prepends this to every nvcc command of the ``flashmoe_cuda`` target (CUDA_COMPILER_LAUNCHER):

    python tools/nvcc_launcher.py -- nvcc ... -o obj/moe.cu.o -c moe.cu

The compiler's stdout and stderr are passed through unchanged (so ninja prints the
``ptxas info`` resource report in the build log), and, when the compile succeeds, both are also
written to ``<object>.ptxas.log`` for ``tools/check_spills.py``. A failed compile removes any
stale log, so the spill check never reads the report of an older object.
"""

from __future__ import annotations

import os
import subprocess
import sys

LOG_SUFFIX = ".ptxas.log"


def output_path(args: list[str]) -> str | None:
    """The path after ``-o`` / ``--output-file`` (or joined forms), or None."""
    for i, arg in enumerate(args):
        if arg in ("-o", "--output-file") and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith("--output-file="):
            return arg.split("=", 1)[1]
        if arg.startswith("-o") and len(arg) > 2 and not arg.startswith("-odir"):
            return arg[2:]
    return None


def main(argv: list[str]) -> int:
    if argv and argv[0] == "--":
        argv = argv[1:]
    if not argv:
        print("nvcc_launcher.py: no command given", file=sys.stderr)
        return 2
    obj = output_path(argv)
    proc = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    sys.stdout.buffer.write(proc.stdout)
    sys.stdout.flush()
    sys.stderr.buffer.write(proc.stderr)
    sys.stderr.flush()
    if obj is not None:
        log = obj + LOG_SUFFIX
        if proc.returncode == 0:
            tmp = log + ".tmp"
            with open(tmp, "wb") as f:
                f.write(proc.stdout)
                f.write(proc.stderr)
            os.replace(tmp, log)
        elif os.path.exists(log):
            os.remove(log)
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
