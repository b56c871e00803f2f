"""The standalone C++ tests of the CPU backend, built with the system C++ compiler and run here.

- ``tests/cpp/test_tile_gemm.cpp``: the tile GEMM (accuracy, determinism, every ISA tier).
- ``tests/cpp/test_dataflow.cpp``: W simulated ranks of the dataflow runtime against single-rank
  runs, a float64 reference and injected faults; built normally and under ThreadSanitizer, where
  any report fails the test (DESIGN.md: "A ThreadSanitizer build runs them too").
- ``tests/cpp/test_cuda_emulation.cpp``: the persistent CUDA kernel's own actors, tasks and signals
  (csrc/cuda) compiled for the host, each CTA a team of threads, against the CPU backend; also
  under ThreadSanitizer, which checks every hand-off between the kernel's actors.
- ``tests/cpp/test_cute_staging.cpp``: the kernel's own 16-byte staging into shared memory agrees,
  element by element, with the CuTe GMMA layout its MMAs read (needs the CUTLASS headers of the
  nvidia-cutlass wheel and the CUDA toolkit's headers; CuTe's host side includes them).

Binaries are cached under ``build/test_cpp/`` by a hash of the compiler, the flags and every source
and header, so a rerun with nothing changed only runs them. The same builds by hand, with CMake:
``tests/cpp/CMakeLists.txt``. Skipped only when no C++ compiler or no libtsan is found, and never
under CI (``CI=true``, as ``.ci/run`` runs), where a missing tool is a failure.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import os
import platform
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
CACHE = ROOT / "build" / "test_cpp"


def _skip_or_fail(reason: str) -> None:
    """CI must run these tests; elsewhere a missing tool only skips them."""
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"{reason} (CI requires these tests to run)")
    pytest.skip(reason)

# No -march: the ISA-specific GEMM kernels carry their own target attributes.
COMMON_FLAGS = ["-std=c++17", "-pthread", "-Wall", "-Wextra", f"-I{CSRC}"]
TSAN_FLAGS = ["-fsanitize=thread", "-O1", "-g"]
# halt_on_error: the first report ends the run with exitcode (66), so a report can never pass.
TSAN_OPTIONS = "halt_on_error=1 second_deadlock_stack=1 exitcode=66"

# AddressSanitizer + UndefinedBehaviorSanitizer: out-of-bounds and use-after-free accesses, signed
# overflow, misaligned or null accesses. Every UBSan finding is fatal (-fno-sanitize-recover), and
# the first ASan report ends the run, so no report can pass.
# -fPIC: the same objects also go into the sanitized Python extension.
ASAN_FLAGS = ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined", "-fno-omit-frame-pointer", "-O1",
              "-g", "-fPIC"]
ASAN_ENV = {"ASAN_OPTIONS": "halt_on_error=1 detect_leaks=1 abort_on_error=0 exitcode=67",
            "UBSAN_OPTIONS": "halt_on_error=1 print_stacktrace=1 exitcode=68"}
ASAN_MARKERS = ("AddressSanitizer", "runtime error:", "LeakSanitizer")

RUN_TIMEOUT_S = 900


def _tail(text: str, limit: int = 6000) -> str:
    return text if len(text) <= limit else "...\n" + text[-limit:]


@pytest.fixture(scope="module")
def cxx() -> str:
    for candidate in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if candidate and shutil.which(candidate):
            return shutil.which(candidate)
    _skip_or_fail("no C++ compiler found (tried $CXX, g++, c++, clang++)")


def _compiler_id(cxx: str) -> str:
    return subprocess.run([cxx, "--version"], capture_output=True, text=True, check=True).stdout


def _headers_digest() -> str:
    digest = hashlib.sha256()
    for path in sorted({*CSRC.rglob("*.h"), *CSRC.rglob("*.cuh")}):
        digest.update(str(path.relative_to(ROOT)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def _object(cxx: str, source: Path, flags: list[str], headers: str) -> Path:
    """One compiled object, cached by compiler, flags, source and every header: binaries built with
    the same flags (test_dataflow_asan, test_cuda_emulation_asan) share the runtime's objects."""
    digest = hashlib.sha256()
    for part in (_compiler_id(cxx), "\0".join(flags), str(source.relative_to(ROOT)), headers):
        digest.update(part.encode())
    digest.update(source.read_bytes())
    obj = CACHE / "objects" / f"{source.stem}-{digest.hexdigest()[:16]}.o"
    if obj.exists():
        os.utime(obj)  # in use: the stale sweep below keeps it
        return obj
    obj.parent.mkdir(parents=True, exist_ok=True)
    fd, partial = tempfile.mkstemp(dir=obj.parent, prefix=f".{source.stem}-", suffix=".o")
    os.close(fd)
    try:
        result = subprocess.run([cxx, *flags, "-c", str(source), "-o", partial], capture_output=True, text=True)
        assert result.returncode == 0, f"compiling {source} failed:\n{_tail(result.stderr)}"
        os.replace(partial, obj)  # atomic: a concurrent run never sees half an object
    finally:
        Path(partial).unlink(missing_ok=True)
    return obj


def _build(cxx: str, name: str, sources: list[Path], flags: list[str], test_flags: tuple = (),
           link_flags: tuple = ()) -> Path:
    """Compiles sources (one process per core; objects cached and shared between binaries) and links
    them; the binary is cached by content. ``test_flags`` apply to the first source (the test) only."""
    headers = _headers_digest()
    with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        objects = list(pool.map(lambda i_source: _object(cxx, i_source[1], [*flags, *(test_flags if i_source[0] == 0
                                                                                  else ())], headers),
                                enumerate(sources)))
    digest = hashlib.sha256("\0".join([*flags, *link_flags, *(str(o.name) for o in objects)]).encode())
    binary = CACHE / f"{name}-{digest.hexdigest()[:16]}"
    if binary.exists():
        return binary
    with tempfile.TemporaryDirectory(dir=CACHE, prefix=f".{name}-") as work:
        linked = Path(work) / name
        result = subprocess.run([cxx, *flags, *link_flags, *map(str, objects), "-o", str(linked)], capture_output=True,
                                text=True)
        assert result.returncode == 0, f"linking {name} failed:\n{_tail(result.stderr)}"
        os.replace(linked, binary)
    now = time.time()
    # Builds of older sources: binaries of this name not made in the last 10 minutes (a concurrent
    # run's are spared), objects no build has used for a day.
    for stale in CACHE.glob(f"{name}-*"):
        if stale != binary and now - stale.stat().st_mtime > 600:
            stale.unlink(missing_ok=True)
    for stale in (CACHE / "objects").glob("*.o"):
        if now - stale.stat().st_mtime > 86400:
            stale.unlink(missing_ok=True)
    return binary


def _run(command: list[str], env_extra: dict | None = None, unset: tuple = ()) -> subprocess.CompletedProcess:
    env = {name: value for name, value in os.environ.items() if name not in unset}
    env.update(env_extra or {})
    try:
        return subprocess.run(command, capture_output=True, text=True, env=env, timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired as error:
        output = (error.stdout or b"").decode(errors="replace") + (error.stderr or b"").decode(errors="replace")
        pytest.fail(f"{command[-1]} ran past {RUN_TIMEOUT_S} s:\n{_tail(output)}")


def _output(result: subprocess.CompletedProcess) -> str:
    return result.stdout + result.stderr


_RACY = """
#include <thread>
int shared = 0;
int main() {
  std::thread writer([] { shared = 1; });
  shared = 2;
  writer.join();
  return 0;
}
"""


@pytest.fixture(scope="module")
def tsan_launcher(cxx, tmp_path_factory) -> list[str]:
    """The prefix that runs a TSan binary here: [] or, on kernels whose ASLR layout this libtsan
    rejects ("unexpected memory mapping"), setarch -R. Proves that TSan reports a planted race."""
    work = tmp_path_factory.mktemp("tsan_probe")
    source, binary = work / "racy.cpp", work / "racy"
    source.write_text(_RACY)
    built = subprocess.run([cxx, *TSAN_FLAGS, "-pthread", str(source), "-o", str(binary)], capture_output=True,
                           text=True)
    if built.returncode != 0:
        _skip_or_fail(f"{cxx} cannot build with -fsanitize=thread (libtsan missing?):\n{_tail(built.stderr, 2000)}")
    launchers = [[]]
    if shutil.which("setarch"):
        launchers.append(["setarch", platform.machine(), "-R"])
    attempts = []
    for launcher in launchers:
        result = _run([*launcher, str(binary)], {"TSAN_OPTIONS": TSAN_OPTIONS})
        if "WARNING: ThreadSanitizer: data race" in result.stderr and result.returncode == 66:
            return launcher
        attempts.append(f"$ {' '.join([*launcher, str(binary)])}  (exit {result.returncode})\n{_tail(_output(result), 2000)}")
    pytest.fail("ThreadSanitizer did not report the planted race in a probe program:\n" + "\n".join(attempts))


_OVERFLOW = """
#include <cstdio>
#include <cstdlib>
#include <cstring>
int main(int argc, char**) {
  const char source[64] = "sixteen bytes...and more";
  char* cells = static_cast<char*>(std::malloc(16));
  std::memcpy(cells, source, 16 + size_t(argc));  // one byte past the end
  std::printf("%c\\n", cells[3]);
  std::free(cells);
  return 0;
}
"""


@pytest.fixture(scope="module")
def asan(cxx, tmp_path_factory) -> None:
    """Proves that this compiler's ASan build reports a planted heap overflow, or skips."""
    work = tmp_path_factory.mktemp("asan_probe")
    source, binary = work / "overflow.cpp", work / "overflow"
    source.write_text(_OVERFLOW)
    built = subprocess.run([cxx, *ASAN_FLAGS, str(source), "-o", str(binary)], capture_output=True, text=True)
    if built.returncode != 0:
        _skip_or_fail(f"{cxx} cannot build with -fsanitize=address,undefined (libasan/libubsan missing?):\n"
                      f"{_tail(built.stderr, 2000)}")
    result = _run([str(binary)], ASAN_ENV)
    assert "heap-buffer-overflow" in result.stderr and result.returncode == 67, \
        f"AddressSanitizer did not report the planted overflow (exit {result.returncode}):\n{_tail(_output(result), 2000)}"


def _assert_clean_asan(result: subprocess.CompletedProcess) -> None:
    output = _output(result)
    assert not any(marker in output for marker in ASAN_MARKERS), \
        f"a sanitizer reported (exit {result.returncode}):\n{_tail(output, 12000)}"


def _assert_summary(result: subprocess.CompletedProcess, pattern: str) -> re.Match:
    output = _output(result)
    match = re.search(pattern, result.stdout)
    assert result.returncode == 0 and match, f"exit code {result.returncode}; output tail:\n{_tail(output)}"
    return match


def test_tile_gemm(cxx):
    binary = _build(cxx, "test_tile_gemm",
                    [ROOT / "tests/cpp/test_tile_gemm.cpp", *sorted((CSRC / "cpu").glob("tile_gemm*.cpp"))],
                    [*COMMON_FLAGS, "-O3"])
    # Without FLASHMOE_CPU_ISA it also re-runs itself under every ISA tier.
    result = _run([str(binary)], unset=("FLASHMOE_CPU_ISA",))
    match = _assert_summary(result, r"tile_gemm: (\d+) checks, 0 failures")
    assert int(match.group(1)) > 0


def _dataflow_sources() -> list[Path]:
    return [ROOT / "tests/cpp/test_dataflow.cpp", *sorted((CSRC / "cpu").glob("*.cpp"))]


def test_dataflow(cxx):
    binary = _build(cxx, "test_dataflow", _dataflow_sources(), [*COMMON_FLAGS, "-O2"])
    # Cheap without the sanitizer: more chaos seeds per variant.
    result = _run([str(binary), "--rounds", "4"])
    match = _assert_summary(result, r"dataflow: (\d+) passed, 0 failed")
    assert int(match.group(1)) > 0


def test_dataflow_tsan(cxx, tsan_launcher):
    binary = _build(cxx, "test_dataflow_tsan", _dataflow_sources(), [*COMMON_FLAGS, *TSAN_FLAGS])
    # TSan runs ~5-15x slower; three chaos seeds per variant keep it well under a minute on 2 cores.
    result = _run([*tsan_launcher, str(binary), "--rounds", "3"], {"TSAN_OPTIONS": TSAN_OPTIONS})
    output = _output(result)
    assert "ThreadSanitizer" not in output, f"ThreadSanitizer reported (exit {result.returncode}):\n{_tail(output, 12000)}"
    match = _assert_summary(result, r"dataflow: (\d+) passed, 0 failed")
    assert int(match.group(1)) > 0


def test_dataflow_asan(cxx, asan):
    """Under ASan + UBSan; includes the heap of 2^62 + 1 tokens whose size once overflowed int64
    (issue 16): before the checked arithmetic of csrc/core/checked.h this run reported a
    heap-buffer-overflow in dispatch_rows."""
    binary = _build(cxx, "test_dataflow_asan", _dataflow_sources(), [*COMMON_FLAGS, *ASAN_FLAGS])
    result = _run([str(binary), "--rounds", "1"], ASAN_ENV)
    _assert_clean_asan(result)
    match = _assert_summary(result, r"dataflow: (\d+) passed, 0 failed")
    assert int(match.group(1)) > 0


def _cuda_emulation_sources() -> list[Path]:
    return [ROOT / "tests/cpp/test_cuda_emulation.cpp", *sorted((CSRC / "cpu").glob("*.cpp"))]


# Bounded waits: an actor stuck on a signal that never comes aborts the run, naming the wait.
EMULATION_FLAGS = ["-DFLASHMOE_BOUNDED_WAITS=1"]


def test_cuda_emulation(cxx):
    binary = _build(cxx, "test_cuda_emulation", _cuda_emulation_sources(), [*COMMON_FLAGS, "-O2"], EMULATION_FLAGS)
    result = _run([str(binary)])
    match = _assert_summary(result, r"cuda_emulation: (\d+) passed, 0 failed")
    assert int(match.group(1)) > 0


def test_cuda_emulation_tsan(cxx, tsan_launcher):
    binary = _build(cxx, "test_cuda_emulation_tsan", _cuda_emulation_sources(), [*COMMON_FLAGS, *TSAN_FLAGS],
                    EMULATION_FLAGS)
    result = _run([*tsan_launcher, str(binary)], {"TSAN_OPTIONS": TSAN_OPTIONS})
    output = _output(result)
    assert "ThreadSanitizer" not in output, f"ThreadSanitizer reported (exit {result.returncode}):\n{_tail(output, 12000)}"
    match = _assert_summary(result, r"cuda_emulation: (\d+) passed, 0 failed")
    assert int(match.group(1)) > 0


def test_cuda_emulation_asan(cxx, asan):
    binary = _build(cxx, "test_cuda_emulation_asan", _cuda_emulation_sources(), [*COMMON_FLAGS, *ASAN_FLAGS],
                    EMULATION_FLAGS)
    result = _run([str(binary)], ASAN_ENV)
    _assert_clean_asan(result)
    match = _assert_summary(result, r"cuda_emulation: (\d+) passed, 0 failed")
    assert int(match.group(1)) > 0


# The Python-level subset under ASan: the tests that feed the native op and the simulated cluster
# bad, empty and odd inputs. Kept small: every call runs ~3x slower instrumented.
ASAN_PYTEST_SUBSET = [*(str(ROOT / "tests" / name) for name in ("test_moe_guards.py", "test_expert_parallel.py",
                                                                  "test_checked_sizes.py", "test_validation.py",
                                                                  "test_topk.py", "test_shared_experts.py")), "-k",
                      "reject or empty or nan or non_contiguous or all_tokens or fault or caught or checked_sizes "
                      "or validation or topk or planted or writes_every_output_element or simulated_ranks_bitwise"]


def test_python_subset_asan(cxx, asan):
    """An ASan + UBSan build of flashmoe._C (the runtime objects of the harnesses above), loaded in a
    child pytest with libasan preloaded; any sanitizer report fails the run."""
    import sys
    import sysconfig

    try:
        import pybind11
    except ImportError:
        _skip_or_fail("pybind11 is not installed (the test extra brings it): no sanitized build of _C")

    # libstdc++ preloaded too: ASan's __cxa_throw interceptor must find the real one before torch
    # throws its first C++ exception, or it aborts with "CHECK failed ... asan_interceptors.cpp".
    preload = []
    for library in ("libasan.so", "libstdc++.so"):
        path = subprocess.run([cxx, f"-print-file-name={library}"], capture_output=True, text=True).stdout.strip()
        if not os.path.isabs(path) or not os.path.exists(path):
            _skip_or_fail(f"{cxx} -print-file-name={library} found nothing ({path!r})")
        preload.append(path)
    includes = [f"-I{pybind11.get_include()}", f"-I{sysconfig.get_paths()['include']}"]
    sources = [CSRC / "bindings" / "module.cpp", *sorted((CSRC / "cpu").glob("*.cpp"))]
    module = _build(cxx, "flashmoe_C_asan", sources, [*COMMON_FLAGS, *ASAN_FLAGS], tuple(includes),
                    link_flags=("-shared",))
    env = {**ASAN_ENV, "LD_PRELOAD": " ".join(preload), "FLASHMOE_SANITIZED_C": str(module),
           # torch and CPython allocate for the process's life; only this build's own errors count.
           "ASAN_OPTIONS": ASAN_ENV["ASAN_OPTIONS"].replace("detect_leaks=1", "detect_leaks=0"),
           "PYTHONFAULTHANDLER": "1", "OMP_NUM_THREADS": "2"}
    child = (f"import sys, pytest; code = pytest.main({['-q', '-x', '-p', 'no:cacheprovider', *ASAN_PYTEST_SUBSET]!r}); "
             "import flashmoe.ops; print('flashmoe._C:', flashmoe.ops._C.__file__); sys.exit(code)")
    result = _run([sys.executable, "-c", child], env)
    _assert_clean_asan(result)
    output = _output(result)
    match = re.search(r"(\d+) passed", output)
    assert result.returncode == 0 and match and int(match.group(1)) > 0, \
        f"exit code {result.returncode}; output tail:\n{_tail(output)}"
    assert f"flashmoe._C: {module}" in output, f"the child did not run the sanitized build:\n{_tail(output)}"


def _cutlass_include() -> Path | None:
    import importlib.util

    spec = importlib.util.find_spec("cutlass_library")
    if spec is None or not spec.submodule_search_locations:
        return None
    include = Path(list(spec.submodule_search_locations)[0]) / "source" / "include"
    return include if (include / "cute" / "tensor.hpp").exists() else None


def _cuda_include() -> Path | None:
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.insert(0, str(Path(os.path.realpath(nvcc)).parent.parent))
    for base in filter(None, candidates):
        include = Path(base) / "include"
        if (include / "cuda_runtime_api.h").exists():
            return include
    return None


def test_cute_staging(cxx):
    cutlass, cuda = _cutlass_include(), _cuda_include()
    if cutlass is None or cuda is None:
        missing = "the nvidia-cutlass wheel" if cutlass is None else "the CUDA toolkit headers"
        if shutil.which("nvcc") is None and cuda is None:
            pytest.skip(f"no CUDA toolkit here, so no CUDA backend to check ({missing} not found)")
        _skip_or_fail(f"{missing} not found: the CUDA backend's staging cannot be checked against CuTe")
    includes = [f"-I{cutlass}", f"-I{cuda}", f"-I{cuda / 'cccl'}"]
    binary = _build(cxx, "test_cute_staging", [ROOT / "tests/cpp/test_cute_staging.cpp"], [*COMMON_FLAGS, *includes, "-O1"])
    result = _run([str(binary)])
    _assert_summary(result, r"cute_staging: 0 failures")
