"""NVSHMEM for ``flashmoe.distributed``: the lazy loader of ``flashmoe._nvshmem`` and its bootstrap.

``flashmoe._nvshmem`` is an extension module of its own, built only when nvcc and NVSHMEM were
found (``FLASHMOE_NVSHMEM``, cmake/FlashmoeNvshmem.cmake). Importing this file loads nothing:
the first call that needs NVSHMEM (:func:`load`) preloads ``libnvshmem_host`` and its unique-id
bootstrap plugin by path and imports the module, so ``import flashmoe`` and the single-GPU kernel
never need ``libnvshmem_host``.

    init(group)               NVSHMEMX_INIT_WITH_UNIQUEID, the id broadcast over ``group`` (collective)
    my_pe(), n_pes()          this process's PE and the number of PEs
    malloc(nbytes), free(a)   symmetric memory (collective); addresses are ints
    ptr(address, pe)          pe's copy of a symmetric address for load/store, 0 when unreachable
    put_signal_selftest(...)  a device put-with-signal and a bounded wait for it
    finalize()                collective

No MPI and no ``nvshmrun``: under ``torchrun`` the ranks of a ``torch.distributed`` group (NCCL or
gloo) are the PEs. NVSHMEM is initialised once per process; if something else (torch's NVSHMEM
symmetric memory, say) initialised it first, :func:`init` raises (docs/distributed.md).
"""

from __future__ import annotations

import ctypes
import importlib
import importlib.util
import os
from pathlib import Path
from typing import Optional

MODULE_NAME = "flashmoe._nvshmem"
HOST_LIBRARY = "libnvshmem_host.so.3"
UID_BOOTSTRAP_PLUGIN = "nvshmem_bootstrap_uid.so.3"

_module = None
_preloaded: list = []  # ctypes handles, kept so the libraries stay loaded


class NvshmemUnavailableError(ImportError):
    """flashmoe._nvshmem is not built, or libnvshmem_host cannot be loaded."""


def is_built() -> bool:
    """Whether this build has ``flashmoe._nvshmem`` (found without loading it)."""
    try:
        return importlib.util.find_spec(MODULE_NAME) is not None
    except (ImportError, ValueError):
        return False


def library_dir() -> Optional[Path]:
    """The directory holding libnvshmem_host: ``$NVSHMEM_HOME/lib``, else the nvidia-nvshmem wheel's."""
    home = os.environ.get("NVSHMEM_HOME")
    candidates = [Path(home) / "lib"] if home else []
    try:
        spec = importlib.util.find_spec("nvidia.nvshmem")
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.submodule_search_locations:
        candidates += [Path(location) / "lib" for location in spec.submodule_search_locations]
    for candidate in candidates:
        if (candidate / HOST_LIBRARY).exists() or (candidate / "libnvshmem_host.so").exists():
            return candidate
    return None


def loaded_host_libraries() -> list:
    """Paths of every libnvshmem_host mapped into this process (from /proc/self/maps)."""
    try:
        with open("/proc/self/maps") as maps:
            lines = maps.read().splitlines()
    except OSError:
        return []
    paths = {line.split(None, 5)[5] for line in lines if "libnvshmem_host" in line and len(line.split(None, 5)) == 6}
    return sorted(paths)


def foreign_host_libraries() -> list:
    """Copies of libnvshmem_host mapped into this process other than flashmoe's own (e.g. torch's)."""
    ours = library_dir()
    return [path for path in loaded_host_libraries() if ours is None or Path(path).resolve().parent != ours.resolve()]


def _not_built_message() -> str:
    return ("flashmoe was built without its NVSHMEM module flashmoe._nvshmem (flashmoe.build_info()['nvshmem'] "
            "is False). Build it with nvcc on PATH and the NVSHMEM wheel of nvcc's CUDA major in the build "
            "environment: pip install 'flashmoe[nvshmem-cu13]' (or nvshmem-cu12), then rebuild with "
            "FLASHMOE_NVSHMEM=ON (or set NVSHMEM_HOME); see docs/distributed.md")


def load():
    """Imports ``flashmoe._nvshmem`` on first use, with a clear error when it is not available."""
    global _module
    if _module is not None:
        return _module
    if not is_built():
        raise NvshmemUnavailableError(_not_built_message())
    libdir = library_dir()
    if libdir is not None:
        # The module's RUNPATH finds these too; preloading by path also covers builds whose
        # NVSHMEM moved, and makes the bootstrap plugin's dlopen by name find this copy.
        for name in (HOST_LIBRARY, UID_BOOTSTRAP_PLUGIN):
            path = libdir / name
            if path.exists():
                try:
                    _preloaded.append(ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL))
                except OSError as error:
                    raise NvshmemUnavailableError(f"flashmoe: cannot load {path}: {error}") from error
    try:
        _module = importlib.import_module(MODULE_NAME)
    except ModuleNotFoundError as error:
        if error.name == MODULE_NAME:
            raise NvshmemUnavailableError(_not_built_message()) from error
        raise
    except ImportError as error:  # libnvshmem_host missing or of another ABI
        raise NvshmemUnavailableError(
            f"flashmoe._nvshmem is built but cannot be loaded: {error}. Install the NVSHMEM it was built "
            f"against (NVSHMEM {_compiled_version_from_c()}: pip install nvidia-nvshmem-cuXX with the CUDA major "
            "of the build), or set NVSHMEM_HOME") from error
    return _module


def _compiled_version_from_c() -> Optional[str]:
    from .. import _C

    return getattr(_C, "nvshmem_version", None)


def version() -> dict:
    """``{"compiled": "3.8.0", "runtime": "3.8.0", "cuda_major": 13}``: the headers flashmoe._nvshmem
    was built against, the libnvshmem_host loaded now, and the CUDA major it was built for."""
    module = load()
    return {"compiled": ".".join(map(str, module.compiled_version())),
            "runtime": ".".join(map(str, module.runtime_version())),
            "cuda_major": int(module.compiled_cuda_major())}


def initialized() -> bool:
    """Whether flashmoe initialised NVSHMEM in this process (False when the module is not loaded)."""
    return _module is not None and bool(_module.initialized())


def init(group=None, device=None) -> None:
    """Initialises NVSHMEM over ``group``'s processes, one PE per rank (collective).

    Rank 0 of the group makes the unique id and broadcasts it over ``group`` (gloo or NCCL; for
    NCCL the current CUDA device carries it). ``device`` (default: the current CUDA device) becomes
    the current device first. Raises RuntimeError when NVSHMEM is already initialised in the process,
    by flashmoe or by anyone else, e.g. torch's NVSHMEM symmetric memory.
    """
    import torch
    import torch.distributed as dist

    module = load()
    if module.initialized():
        raise RuntimeError("flashmoe.distributed.nvshmem.init: NVSHMEM is already initialised by flashmoe in this "
                           "process; call finalize() first")
    foreign = foreign_host_libraries()
    if foreign:
        raise RuntimeError(f"flashmoe.distributed.nvshmem.init: another copy of libnvshmem_host is loaded in this "
                           f"process ({foreign[0]}), e.g. by torch's NVSHMEM symmetric memory; flashmoe's NVSHMEM "
                           "transport must own NVSHMEM's initialisation (see docs/distributed.md)")
    if not dist.is_initialized():
        raise RuntimeError("flashmoe.distributed.nvshmem.init: torch.distributed is not initialised "
                           "(dist.init_process_group first)")
    if device is None:
        device = torch.cuda.current_device()
    device = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
    if device.type != "cuda" or device.index is None:
        raise ValueError(f"flashmoe.distributed.nvshmem.init: device must be a CUDA device with an index (got {device})")
    torch.cuda.set_device(device)
    rank, size = dist.get_rank(group), dist.get_world_size(group)
    # Every rank takes part in the broadcast before any can fail alone: a failed id travels as its error text.
    payload = [None]
    if rank == 0:
        try:
            payload = [bytes(module.get_unique_id())]
        except RuntimeError as error:
            payload = [f"rank 0 could not make the NVSHMEM unique id: {error}"]
    dist.broadcast_object_list(payload, src=dist.get_global_rank(group, 0) if group is not None else 0, group=group)
    if not isinstance(payload[0], bytes):
        raise RuntimeError(f"flashmoe.distributed.nvshmem.init: {payload[0]}")
    module.init(payload[0], rank, size, device.index)


def _initialized_module():
    module = load()
    if not module.initialized():
        raise RuntimeError("flashmoe.distributed.nvshmem: NVSHMEM is not initialised (call init(group) first)")
    return module


def my_pe() -> int:
    return int(_initialized_module().my_pe())


def n_pes() -> int:
    return int(_initialized_module().n_pes())


def malloc(nbytes: int) -> int:
    """``nvshmem_malloc(nbytes)`` (collective): the symmetric address as an int. Raises RuntimeError
    when the symmetric heap (``NVSHMEM_SYMMETRIC_SIZE``, set before init) is full."""
    if not isinstance(nbytes, int) or isinstance(nbytes, bool) or nbytes <= 0:
        raise ValueError(f"flashmoe.distributed.nvshmem.malloc: nbytes must be a positive int (got {nbytes!r})")
    return int(_initialized_module().malloc(nbytes))


def free(address: int) -> None:
    """``nvshmem_free`` (collective)."""
    _initialized_module().free(int(address))


def ptr(address: int, pe: int) -> int:
    """``nvshmem_ptr``: ``pe``'s copy of ``address`` for loads and stores (NVLink or this GPU), 0 when
    only puts reach it."""
    return int(_initialized_module().ptr(int(address), int(pe)))


def barrier_all() -> None:
    _initialized_module().barrier_all()


def put_signal_selftest(nbytes: int = 1 << 16, timeout_seconds: float = 10.0, spins_per_check: int = 1024,
                        put: bool = True) -> dict:
    """The device self-test (collective): each PE puts ``nbytes`` with a signal to the next PE
    (itself at W = 1) from one CTA, waits for the previous PE's signal with a bounded wait and
    checks the payload. Returns ``{"target_pe", "source_pe", "signal_value", "mismatched_words"}``;
    raises RuntimeError naming the PE and the flag when the signal does not come within
    ``timeout_seconds``. ``put=False`` skips the put, to test that timeout."""
    return dict(_initialized_module().put_signal_selftest(nbytes, float(timeout_seconds), spins_per_check, put))


def finalize() -> None:
    """``nvshmem_finalize`` (collective)."""
    _initialized_module().finalize()
