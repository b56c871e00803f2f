"""flashmoe.bench.model: the performance model's arithmetic, its agreement with configs.py, and the
committed bench/perf_model.tsv (which --write must reproduce byte for byte, so it cannot go stale)."""

import dataclasses
import json
import os
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from flashmoe.bench import model
from flashmoe.bench.configs import NAMED_CONFIGS, custom_shape, touched_weight_bytes, useful_flops

COMMITTED_TSV = Path(__file__).resolve().parents[1] / "bench" / "perf_model.tsv"


def test_scheduler_cost_is_the_counted_round_trips_and_fences():
    # 9 dependent L2 round trips and 3 fences per GEMM task, as counted from actors.cuh.
    device = dataclasses.replace(model.DEVICES["h100-sxm"], l2_latency_us=0.1, fence_us=0.5)
    costs = model.scheduler_costs(device)
    assert (costs["round_trips"], costs["fences"]) == (9, 3)
    assert costs["per_task"] == pytest.approx(9 * 0.1 + 3 * 0.5)
    assert costs["token_per_task"] == pytest.approx(7 * 0.1 + 3 * 0.5)
    assert costs["receive_message"] == pytest.approx(2 * 0.1 + 2 * 0.5)


def test_tile_ceilings_by_hand():
    device = model.DEVICES["h100-sxm"]
    # 64x64, K-block 64: 2·64·64·64 FLOP over (64 + 64)·64·2 bytes = 32 FLOP/B; the GLU pair 42.7.
    assert model.TILES["reference-64x64"].intensity() == pytest.approx(32.0)
    assert model.TILES["reference-64x64-glu"].intensity() == pytest.approx(2 * 64 * 128 / (192 * 2))
    # L2 ceiling: 32 FLOP/B x 7 TB/s over 989 TFLOP/s (per SM both sides divide by 132).
    assert model.TILES["reference-64x64"].peak_fraction(device) == pytest.approx(32 * 7000e9 / 989e12)
    # Multicast of the weight tile over 2 CTAs: (128 + 256/2) bytes-rows per 128x256 tile.
    assert model.TILES["hopper-128x256-ws4-mc2"].intensity() == pytest.approx(2 * 128 * 256 / (256 * 2))
    assert model.TILES["hopper-128x256-ws4-mc2"].peak_fraction(device) == device.cublas_fraction
    # A slower L2 lowers every ceiling it binds.
    slow = dataclasses.replace(device, l2_sm_gbps=3500.0)
    assert model.TILES["hopper-128x128-ws4"].peak_fraction(slow) == pytest.approx(
        model.TILES["hopper-128x128-ws4"].peak_fraction(device) / 2)


def test_experts_hit_and_tasks_by_hand():
    shape = custom_shape(256, 384, 4, 2)
    assert model.expected_experts_hit(shape, 2) == pytest.approx(4 * (1 - 0.5 ** 2))  # 3 experts
    call = model.Call(shape, 2)
    assert call.picks == 4 and call.rows_per_cell == pytest.approx(4 / 3)
    # One row tile per cell; GEMM0 over ceil(384/128) = 3 column tiles, GEMM1 over ceil(256/128) = 2.
    assert call.tasks_today() == dict(gate=1, route=1, dispatch=1, gemm0=9, gemm1=6, combine=1)
    # T=1 hits exactly k experts.
    assert model.expected_experts_hit(NAMED_CONFIGS["olmoe"], 1) == pytest.approx(8)


def test_weight_floor_agrees_with_configs():
    # OLMoE at T=1 touches the router (64·2048 bf16) and 8 experts of (2·1024·2048 + 2048·1024) bf16.
    shape = NAMED_CONFIGS["olmoe"]
    by_hand = 64 * 2048 * 2 + 8 * (2 * 1024 * 2048 + 2048 * 1024) * 2
    assert touched_weight_bytes(shape, torch.bfloat16, 8) == by_hand
    for name, device in model.DEVICES.items():
        floor = model.Call(shape, 1).weight_floor_us(device)
        assert floor == pytest.approx(by_hand / (device.hbm_gbps * device.hbm_efficiency * 1e3))
        rows = {row.case: row.value for row in model.predictions(device)}
        for config in model.DECODE_CONFIGS:
            for tokens in model.DECODE_TOKENS:
                hit = model.expected_experts_hit(NAMED_CONFIGS[config], tokens)
                expected = touched_weight_bytes(NAMED_CONFIGS[config], torch.bfloat16, hit) / (
                    device.hbm_gbps * device.hbm_efficiency * 1e3)
                assert rows[f"decode/{config}/T={tokens}/weight_floor"] == pytest.approx(expected), (name, config)


def test_ep_cost_by_hand():
    device = model.DEVICES["h100-sxm"]
    shape = NAMED_CONFIGS["paper"]
    costs = model.ep_costs(device, shape, 4096, 8, model.TILES["hopper-128x256-ws4"])
    off_rank = 4096 * 2 * 2048 * 2 * 7 / 8  # bytes each way per phase
    assert costs["bytes_per_rank"] == pytest.approx(2 * off_rank)
    assert costs["communication_ms"] == pytest.approx(2 * off_rank / (450e9 * 0.8) * 1e3)
    fraction = model.TILES["hopper-128x256-ws4"].peak_fraction(device)
    assert costs["compute_ms"] == pytest.approx(useful_flops(shape, 4096) / (fraction * 989e12) * 1e3)
    assert costs["overlapped_ms"] == max(costs["communication_ms"], costs["compute_ms"])
    assert model.ep_costs(device, shape, 4096, 1, model.TILES["hopper-128x256-ws4"])["communication_ms"] == 0


def test_today_is_scheduler_bound_where_the_issue_says():
    device = model.DEVICES["h100-sxm"]
    detail = {}
    model.today_call_us(device, model.Call(NAMED_CONFIGS["deepseek-v3"], 16), detail)
    # Issue 10: DeepSeek-V3 at T=16 is about 7,300 tasks, 15-20 ms through one scheduler thread.
    assert 7000 < detail["tasks"] < 7600
    assert 15e3 < detail["scheduler_bound"] < 20e3
    # More tokens never predict a faster call.
    shape = NAMED_CONFIGS["qwen3-30b-a3b"]
    times = [model.today_call_us(device, model.Call(shape, t)) for t in (1, 16, 128, 1024)]
    assert times == sorted(times)


def test_every_prediction_is_finite_and_labelled():
    for device in model.DEVICES.values():
        rows = model.predictions(device)
        assert len({row.case for row in rows}) == len(rows)
        for row in rows:
            assert math.isfinite(row.value) and row.value >= 0, row
            assert row.unit and row.basis and "\t" not in row.basis, row
    assert model.render_tsv().startswith("# flashmoe performance model: PREDICTIONS")


def test_write_reproduces_the_committed_tsv(tmp_path):
    path = tmp_path / "perf_model.tsv"
    assert model.main(["--write", str(path)]) == 0
    assert path.read_bytes() == COMMITTED_TSV.read_bytes(), \
        "bench/perf_model.tsv is stale: run `python -m flashmoe.bench.model --write` and commit it"
    header = COMMITTED_TSV.read_text().splitlines()[1].split("\t")
    assert tuple(header) == model.TSV_HEADER


def test_compare_puts_measured_beside_predicted(tmp_path, capsys):
    rows = [dict(config="olmoe", tokens=1, backend="native", dtype="bf16", routing="uniform", status="ok",
                 median_ms=0.5, weight_floor_ms=0.03, over_weight_floor=16.0),
            dict(config="mixtral", tokens=4096, backend="grouped-mm", dtype="bf16", status="ok", median_ms=6.0)]
    path = tmp_path / "bench.json"
    path.write_text(json.dumps({"environment": {"device_name": "NVIDIA H200"}, "rows": rows}))
    assert model.main(["--compare", str(path)]) == 0
    out = capsys.readouterr().out
    predicted = {row.case: row.value for row in model.predictions(model.DEVICES["h200"])}
    line = next(line for line in out.splitlines() if line.startswith("decode/olmoe/T=1/today "))
    assert f"{500.0 / predicted['decode/olmoe/T=1/today']:.2f}" in line
    assert "NVIDIA H200 SXM" in out.splitlines()[0]
    missing = next(line for line in out.splitlines() if line.startswith("decode/olmoe/T=16/today "))
    assert "no data" in missing


def test_device_for_names():
    assert model.device_for("NVIDIA H200")[0] == "h200"
    assert model.device_for("NVIDIA H100 80GB HBM3") == ("h100-sxm", "")
    assert model.device_for("NVIDIA H100 PCIe")[1].startswith("note:")
    assert model.device_for("NVIDIA A100-SXM4-80GB")[1].startswith("note: no model")


def test_cli_help_and_bad_device(capsys):
    result = subprocess.run([sys.executable, "-m", "flashmoe.bench.model", "--help"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert "PREDICTIONS" in result.stdout and "--write" in result.stdout and "--compare" in result.stdout
    with pytest.raises(SystemExit) as error:
        model.main(["--device", "a100"])
    assert error.value.code == 2
    assert "--device" in capsys.readouterr().err


SUITE = Path(__file__).resolve().parents[1] / "bench" / "gpu_suite.sh"


def test_gpu_suite_model_step_without_a_gpu(tmp_path):
    assert subprocess.run(["bash", "-n", str(SUITE)]).returncode == 0
    # The suite's fixed-cost run is the model's fixed-cost shape.
    shape = model.FIXED_COST_SHAPE
    assert (f"--hidden {shape.hidden_size} --ffn {shape.ffn_size} --experts {shape.num_experts} "
            f"--top-k {shape.top_k} --tokens 1") in SUITE.read_text()
    env = dict(os.environ, FLASHMOE_SUITE_STEPS="model", FLASHMOE_RESULTS_DIR=str(tmp_path),
               PYTHON=sys.executable, CUDA_VISIBLE_DEVICES="")
    result = subprocess.run(["bash", str(SUITE)], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    (tsv,) = tmp_path.glob("*-model-predictions.tsv")
    assert tsv.read_bytes() == COMMITTED_TSV.read_bytes()
    (side_by_side,) = tmp_path.glob("*-model-vs-measured.txt")
    assert "PREDICTIONS" in side_by_side.read_text()
    (summary,) = tmp_path.glob("*-summary.txt")
    assert "# every step passed" in summary.read_text()


def test_the_docs_table_is_the_models():
    doc = (Path(__file__).resolve().parents[1] / "docs" / "cuda_kernel.md").read_text()
    assert model.render_markdown() in doc, \
        "docs/cuda_kernel.md's predicted table is stale: replace it with `python -m flashmoe.bench.model --markdown`"
