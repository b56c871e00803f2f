"""What the native module was compiled with."""

from __future__ import annotations

from . import _C


def build_info() -> dict:
    """Returns a dict describing the compiled backends and the running torch.

    Keys:
        ``version``          flashmoe's version.
        ``cpu``              always True: the CPU backend is always built.
        ``cpu_isa``          the instruction set the CPU tile GEMM uses in this process.
        ``cuda``             whether the CUDA backend is compiled in (``FLASHMOE_CUDA`` at build time).
        ``cuda_archs``       the SASS targets it was compiled for, e.g. ``["sm_90a", "sm_80"]``; ``[]`` without it.
        ``cuda_version``     the nvcc version it was compiled with, e.g. ``"13.0"``, or None.
        ``cutlass_version``  the CuTe/CUTLASS headers it was compiled with, e.g. ``"4.2.0"``, or None.
        ``nvshmem``          whether the NVSHMEM module ``flashmoe._nvshmem`` was built (``FLASHMOE_NVSHMEM``).
        ``nvshmem_version``  the NVSHMEM version it was compiled against, e.g. ``"3.8.0"``, or None.
                             Read from ``_C``: neither ``_nvshmem`` nor libnvshmem_host is loaded.
        ``torch_cuda``       ``torch.version.cuda``: the CUDA version of the running torch, None for a CPU build.
        ``gpu_available``    ``torch.cuda.is_available()``.
    """
    import torch

    from . import __version__

    cuda = bool(getattr(_C, "cuda_compiled", False))
    cuda_info = dict(_C.cuda_build_info()) if cuda else {}
    nvshmem_version = getattr(_C, "nvshmem_version", None)
    nvshmem_version = str(nvshmem_version) if nvshmem_version else None
    return {
        "version": __version__,
        "cpu": True,
        "cpu_isa": _C.cpu_isa(),
        "cuda": cuda,
        "cuda_archs": [str(arch) for arch in cuda_info.get("archs", [])],
        "cuda_version": str(cuda_info["cuda_version"]) if cuda_info.get("cuda_version") else None,
        "cutlass_version": str(cuda_info["cutlass_version"]) if cuda_info.get("cutlass_version") else None,
        "nvshmem": nvshmem_version is not None,
        "nvshmem_version": nvshmem_version,
        "torch_cuda": torch.version.cuda,
        "gpu_available": bool(torch.cuda.is_available()),
    }
