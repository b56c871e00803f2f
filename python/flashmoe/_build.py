"""What the native module was compiled with."""

from __future__ import annotations

from . import _C


def build_info() -> dict:
    """Returns a dict describing the compiled backends.

    Keys: ``version``, ``cpu`` (always True), ``cpu_isa`` (the tile-GEMM instruction set in use),
    ``cuda`` and ``nvshmem`` (whether those backends are compiled in), ``cuda_archs``.
    """
    from . import __version__

    return {
        "version": __version__,
        "cpu": True,
        "cpu_isa": _C.cpu_isa(),
        "cuda": False,
        "nvshmem": False,
        "cuda_archs": [],
    }
