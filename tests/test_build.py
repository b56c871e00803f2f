"""The build: the ptxas spill check (tools/check_spills.py), the nvcc launcher that feeds it, and
flashmoe.build_info(). None of these tests needs nvcc or a GPU; the one that needs nvcc on PATH
checks that the CUDA backend really was compiled in when it could have been."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses needs the module registered
    spec.loader.exec_module(module)
    return module


check_spills = _load("check_spills")
nvcc_launcher = _load("nvcc_launcher")

# Captured from nvcc 13.0 (-Xptxas=-v, -gencode for sm_90a and sm_80): the hot kernel is clean,
# another kernel spills, and a __noinline__ device function has a properties block of its own.
CLEAN_HOT = textwrap.dedent("""\
    ptxas info    : 4 bytes gmem
    ptxas info    : Compiling entry function '_ZN8flashmoe4cuda11smem_kernelEPf' for 'sm_90a'
    ptxas info    : Function properties for _ZN8flashmoe4cuda11smem_kernelEPf
        256 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
    ptxas info    : Used 38 registers, used 1 barriers, 256 bytes cumulative stack size, 4096 bytes smem
    ptxas info    : Compile time = 10.182 ms
    ptxas info    : Function properties for _ZN8flashmoe4cuda6helperEf
        0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
    ptxas info    : Compiling entry function '_ZN8flashmoe4cuda13spilly_kernelILi96EEEvPfPKf' for 'sm_90a'
    ptxas info    : Function properties for _ZN8flashmoe4cuda13spilly_kernelILi96EEEvPfPKf
        1808 bytes stack frame, 3528 bytes spill stores, 4644 bytes spill loads
    ptxas info    : Used 32 registers, used 0 barriers, 1808 bytes cumulative stack size
    ptxas info    : Compile time = 175.299 ms
    ptxas info    : Compiling entry function '_ZN8flashmoe4cuda21moe_persistent_kernelEPfPKfi' for 'sm_90a'
    ptxas info    : Function properties for _ZN8flashmoe4cuda21moe_persistent_kernelEPfPKfi
        0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
    ptxas info    : Used 12 registers, used 0 barriers
    ptxas info    : Compile time = 3.040 ms
    ptxas info    : 4 bytes gmem, 8 bytes cmem[4]
    ptxas info    : Compiling entry function '_ZN8flashmoe4cuda11smem_kernelEPf' for 'sm_80'
    ptxas info    : Function properties for _ZN8flashmoe4cuda11smem_kernelEPf
        256 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
    ptxas info    : Used 30 registers, used 1 barriers, 256 bytes cumulative stack size, 4096 bytes smem, 360 bytes cmem[0]
    ptxas info    : Compile time = 5.725 ms
    ptxas info    : Function properties for _ZN8flashmoe4cuda6helperEf
        0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
    ptxas info    : Compiling entry function '_ZN8flashmoe4cuda13spilly_kernelILi96EEEvPfPKf' for 'sm_80'
    ptxas info    : Function properties for _ZN8flashmoe4cuda13spilly_kernelILi96EEEvPfPKf
        1792 bytes stack frame, 3508 bytes spill stores, 4620 bytes spill loads
    ptxas info    : Used 32 registers, used 0 barriers, 1792 bytes cumulative stack size, 368 bytes cmem[0]
    ptxas info    : Compile time = 242.747 ms
    ptxas info    : Compiling entry function '_ZN8flashmoe4cuda21moe_persistent_kernelEPfPKfi' for 'sm_80'
    ptxas info    : Function properties for _ZN8flashmoe4cuda21moe_persistent_kernelEPfPKfi
        0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
    ptxas info    : Used 12 registers, used 0 barriers, 372 bytes cmem[0]
    ptxas info    : Compile time = 2.797 ms
    """)

# The same format with the persistent kernel (a template, as CuTe kernels are) spilling on sm_90a only.
SPILLING_HOT = textwrap.dedent("""\
    ptxas info    : 16 bytes gmem
    ptxas info    : Compiling entry function '_ZN8flashmoe4cuda21moe_persistent_kernelILi384EEEvNS0_12KernelParamsE' for 'sm_90a'
    ptxas info    : Function properties for _ZN8flashmoe4cuda21moe_persistent_kernelILi384EEEvNS0_12KernelParamsE
        40 bytes stack frame, 36 bytes spill stores, 28 bytes spill loads
    ptxas info    : Used 168 registers, used 16 barriers, 40 bytes cumulative stack size, 232448 bytes smem
    ptxas info    : Compile time = 91234.5 ms
    ptxas info    : 16 bytes gmem, 8 bytes cmem[4]
    ptxas info    : Compiling entry function '_ZN8flashmoe4cuda21moe_persistent_kernelILi384EEEvNS0_12KernelParamsE' for 'sm_80'
    ptxas info    : Function properties for _ZN8flashmoe4cuda21moe_persistent_kernelILi384EEEvNS0_12KernelParamsE
        0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
    ptxas info    : Used 255 registers, used 2 barriers, 166912 bytes smem, 848 bytes cmem[0]
    ptxas info    : Compile time = 60123.4 ms
    """)

# -rdc=true: device functions come before the entry function of their ptxas run.
RDC = textwrap.dedent("""\
    ptxas info    : 4 bytes gmem
    ptxas info    : Function properties for _ZN8flashmoe4cuda6helperEf
        264 bytes stack frame, 8 bytes spill stores, 8 bytes spill loads
    ptxas info    : Compile time = 5.695 ms
    ptxas info    : Compiling entry function '_ZN8flashmoe4cuda11smem_kernelEPf' for 'sm_90a'
    ptxas info    : Function properties for _ZN8flashmoe4cuda11smem_kernelEPf
        0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
    ptxas info    : Used 24 registers, used 1 barriers, 4096 bytes smem
    ptxas info    : Compile time = 2.545 ms
    """)


def _write(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_parse_clean_sample():
    records = check_spills.parse_ptxas(CLEAN_HOT, source="k.o.ptxas.log")
    entries = {(r.name, r.arch): r for r in records if r.entry}
    assert len(entries) == 6
    hot = entries[("_ZN8flashmoe4cuda21moe_persistent_kernelEPfPKfi", "sm_90a")]
    assert (hot.registers, hot.smem, hot.stack, hot.spill_stores, hot.spill_loads) == (12, 0, 0, 0, 0)
    smem = entries[("_ZN8flashmoe4cuda11smem_kernelEPf", "sm_80")]
    assert (smem.registers, smem.smem, smem.stack, smem.barriers) == (30, 4096, 256, 1)
    spilly = entries[("_ZN8flashmoe4cuda13spilly_kernelILi96EEEvPfPKf", "sm_80")]
    assert (spilly.stack, spilly.spill_stores, spilly.spill_loads) == (1792, 3508, 4620)
    helpers = [r for r in records if not r.entry]
    assert [r.arch for r in helpers] == ["sm_90a", "sm_80"]
    assert all(r.name == "_ZN8flashmoe4cuda6helperEf" and r.registers is None for r in helpers)


def test_parse_rdc_device_function_takes_next_entry_arch():
    records = check_spills.parse_ptxas(RDC)
    helper = next(r for r in records if not r.entry)
    assert (helper.arch, helper.stack, helper.spill_stores, helper.spill_loads) == ("sm_90a", 264, 8, 8)
    assert [r.arch for r in records if r.entry] == ["sm_90a"]


@pytest.mark.parametrize("pattern,hot", [
    ("moe_persistent_kernel", True),
    (r"flashmoe::cuda::moe_persistent_kernel<\d+>", True),  # demangled form (needs c++filt)
    ("spilly_kernel", False),
    ("moe_persistent_kernel_v2", False),
])
def test_hot_pattern_matching(pattern, hot):
    [record] = [r for r in check_spills.parse_ptxas(SPILLING_HOT) if r.arch == "sm_90a"]
    record.demangled = "void flashmoe::cuda::moe_persistent_kernel<384>(flashmoe::cuda::KernelParams)"
    assert (check_spills.is_hot(record, [pattern]) is not None) == hot


def test_mangled_name_matches_without_demangler(monkeypatch):
    monkeypatch.setattr(check_spills.shutil, "which", lambda name: None)
    names = check_spills.demangle(["_ZN8flashmoe4cuda21moe_persistent_kernelEPfPKfi"])
    assert names == {"_ZN8flashmoe4cuda21moe_persistent_kernelEPfPKfi": "_ZN8flashmoe4cuda21moe_persistent_kernelEPfPKfi"}
    record = check_spills.Usage(name="_ZN8flashmoe4cuda21moe_persistent_kernelEPfPKfi", spill_stores=4)
    assert check_spills.check([record], ["moe_persistent_kernel"])


def test_clean_hot_kernel_passes_although_another_kernel_spills(tmp_path, capsys):
    log = _write(tmp_path, "k.cu.o.ptxas.log", CLEAN_HOT)
    stamp = tmp_path / "ok.stamp"
    report = tmp_path / "report.txt"
    rc = check_spills.main(["--hot=moe_persistent_kernel", "--report", str(report), "--stamp", str(stamp),
                            "--logs", log])
    out = capsys.readouterr().out
    assert rc == 0
    assert stamp.exists()
    assert "spill check: ok" in out
    # The table: one row per (kernel, arch), the hot ones starred, spills shown.
    assert report.read_text().strip() in out
    rows = [line for line in out.splitlines() if "flashmoe::cuda::moe_persistent_kernel(" in line]
    assert len(rows) == 2 and all(row.startswith("*") for row in rows)
    assert any("3528" in line and "4644" in line and "sm_90a" in line for line in out.splitlines())


def test_spilling_hot_kernel_fails(tmp_path, capsys):
    obj = tmp_path / "moe_kernel.cu.o"
    _write(tmp_path, obj.name + ".ptxas.log", SPILLING_HOT)
    stamp = tmp_path / "ok.stamp"
    stamp.write_text("stale")
    rc = check_spills.main(["--hot=moe_persistent_kernel", "--stamp", str(stamp), "--objects", str(obj)])
    err = capsys.readouterr().err
    assert rc == 1
    assert not stamp.exists()
    assert "FAILED" in err and "moe_persistent_kernel" in err
    assert "(sm_90a) spills 36 bytes of stores and 28 bytes of loads" in err
    assert "sm_80" not in err  # the clean arch is not blamed


def test_spilling_kernel_that_is_not_hot_passes(tmp_path, capsys):
    log = _write(tmp_path, "a.log", SPILLING_HOT)
    assert check_spills.main(["--hot=some_other_kernel", "--logs", log]) == 0
    assert "no compiled function matches hot pattern 'some_other_kernel'" in capsys.readouterr().out
    assert check_spills.main(["--logs", log]) == 0  # no hot patterns: report only


def test_several_patterns_and_lists(tmp_path, capsys):
    log = _write(tmp_path, "a.log", CLEAN_HOT)
    assert check_spills.main(["--hot=nothing;spilly_kernel", "--logs", log]) == 1
    assert check_spills.main(["--hot=nothing", "--hot=spilly", "--logs", log]) == 1
    capsys.readouterr()


def test_missing_report_fails(tmp_path, capsys):
    rc = check_spills.main(["--hot=moe_persistent_kernel", "--objects", str(tmp_path / "missing.cu.o")])
    assert rc == 2
    assert "no ptxas report" in capsys.readouterr().err


def test_launcher_output_path():
    assert nvcc_launcher.output_path(["nvcc", "-c", "a.cu", "-o", "a.o"]) == "a.o"
    assert nvcc_launcher.output_path(["nvcc", "-c", "a.cu", "-oa.o"]) == "a.o"
    assert nvcc_launcher.output_path(["nvcc", "--output-file=b.o", "-c", "a.cu"]) == "b.o"
    assert nvcc_launcher.output_path(["nvcc", "-c", "a.cu", "--output-file", "c.o"]) == "c.o"
    assert nvcc_launcher.output_path(["nvcc", "--version"]) is None


def test_launcher_tees_and_saves_the_report(tmp_path, capfd):
    # A stand-in compiler: prints a ptxas report on stderr and creates the object.
    fake = tmp_path / "fake_nvcc.py"
    fake.write_text(textwrap.dedent("""\
        import sys
        out = sys.argv[sys.argv.index("-o") + 1]
        sys.stderr.write(open(sys.argv[sys.argv.index("--report") + 1]).read())
        open(out, "w").close()
        sys.exit(int(sys.argv[sys.argv.index("--rc") + 1]))
        """))
    report = _write(tmp_path, "sample.txt", CLEAN_HOT)
    obj = tmp_path / "k.cu.o"
    rc = nvcc_launcher.main(["--", sys.executable, str(fake), "--report", report, "--rc", "0", "-o", str(obj)])
    assert rc == 0
    assert CLEAN_HOT in capfd.readouterr().err  # still in the build log
    log = Path(str(obj) + ".ptxas.log")
    assert log.read_text() == CLEAN_HOT
    assert check_spills.main(["--hot=moe_persistent_kernel", "--objects", str(obj)]) == 0
    # A failed compile leaves no stale report behind.
    rc = nvcc_launcher.main(["--", sys.executable, str(fake), "--report", report, "--rc", "3", "-o", str(obj)])
    assert rc == 3
    assert not log.exists()
    capfd.readouterr()


# --- flashmoe.build_info() -------------------------------------------------------------------

def test_build_info_keys_and_types():
    import torch

    import flashmoe

    info = flashmoe.build_info()
    assert set(info) >= {"version", "cpu", "cpu_isa", "cuda", "cuda_archs", "cuda_version", "cutlass_version",
                         "nvshmem", "nvshmem_version", "torch_cuda", "gpu_available"}
    assert info["version"] == flashmoe.__version__
    assert info["cpu"] is True
    assert isinstance(info["cpu_isa"], str) and info["cpu_isa"]
    assert isinstance(info["cuda"], bool)
    assert isinstance(info["cuda_archs"], list) and all(isinstance(a, str) for a in info["cuda_archs"])
    assert isinstance(info["nvshmem"], bool)  # tests/test_nvshmem.py checks it against the build
    assert (info["nvshmem_version"] is None) is not info["nvshmem"]
    assert info["torch_cuda"] == torch.version.cuda
    assert info["gpu_available"] is torch.cuda.is_available()
    if info["cuda"]:
        assert info["cuda_archs"]
        assert isinstance(info["cuda_version"], str) and info["cuda_version"][0].isdigit()
        assert isinstance(info["cutlass_version"], str) and info["cutlass_version"].count(".") == 2
    else:
        assert info["cuda_archs"] == [] and info["cuda_version"] is None and info["cutlass_version"] is None


def _cuda_build_expected() -> bool:
    mode = os.environ.get("FLASHMOE_CUDA", "AUTO").strip().upper()
    return shutil.which("nvcc") is not None and mode not in ("OFF", "0", "FALSE", "NO")


@pytest.mark.skipif(not _cuda_build_expected(), reason="no nvcc on PATH, or FLASHMOE_CUDA=OFF")
def test_cuda_backend_compiled_in_when_nvcc_is_available():
    """With nvcc on PATH the AUTO build must have compiled the CUDA backend (and passed its spill check)."""
    import flashmoe

    info = flashmoe.build_info()
    assert info["cuda"] is True, "nvcc is on PATH but flashmoe was built without the CUDA backend"
    archs = os.environ.get("FLASHMOE_CUDA_ARCHS", "90a;80")
    expected = ["sm_" + a.strip().removeprefix("sm_") for a in archs.split(";") if a.strip()]
    assert info["cuda_archs"] == expected
    if "FLASHMOE_CUDA_ARCHS" not in os.environ:
        assert info["cuda_archs"] == ["sm_90a", "sm_80"]
    out = subprocess.run(["nvcc", "--version"], capture_output=True, text=True).stdout
    assert f"release {info['cuda_version']}" in out
    # The spill check's table is installed beside the module, with the persistent kernel in it.
    from importlib import resources

    table = resources.files("flashmoe").joinpath("_cuda_resource_usage.txt").read_text()
    for arch in expected:
        assert any("moe_persistent_kernel" in line and f" {arch} " in line for line in table.splitlines()), table


def test_import_with_cpu_only_torch_and_no_gpu():
    """A fresh interpreter with no visible GPU imports flashmoe (static cudart, no libcuda needed)."""
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    code = "import flashmoe, torch; i = flashmoe.build_info(); assert i['gpu_available'] is False; print(i['cuda'])"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() in ("True", "False")


# --------------------------------------------------------------------------- which GPUs the build runs on

@pytest.mark.parametrize("arch,capability,runs", [
    ("sm_80", (8, 0), True),     # A100
    ("sm_80", (8, 6), True),     # sm_80 SASS runs on later 8.x (A10, RTX 30xx)
    ("sm_80", (8, 9), True),     # L4, RTX 40xx
    ("sm_80", (9, 0), False),    # SASS never crosses a major version, and the build has no PTX
    ("sm_80", (7, 5), False),
    ("sm_90a", (9, 0), True),    # H100 / H200
    ("sm_90a", (10, 0), False),  # arch-specific code runs only on its own capability
    ("sm_90", (9, 0), True),
    ("sm_100a", (10, 0), True),
    ("sm_100a", (10, 3), False),
    ("sm_120", (12, 1), True),
    ("bogus", (9, 0), False),
])
def test_arch_runs_on(arch, capability, runs):
    from flashmoe.ops import arch_runs_on

    assert arch_runs_on(arch, capability) is runs
