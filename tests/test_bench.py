"""flashmoe-bench: the command line runs in-process on tiny shapes, and its baselines are fair."""

import json
import math
import subprocess
import sys

import pytest
import torch

import flashmoe
from flashmoe import reference
from flashmoe.bench import baselines, cli, configs, memory, routing

TINY_SHAPE = ["--hidden", "32", "--ffn", "16", "--experts", "8", "--top-k", "2"]
FAST = ["--tokens", "1,5", "--iters", "2", "--warmup", "1", "--budget", "0", "--threads", "1"]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny shapes run fastest on one thread, and a busy machine stalls OpenMP barriers."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


ROW_KEYS = {"config", "shape", "dtype", "tokens", "routing", "backend", "status", "error", "median_ms",
            "p10_ms", "p90_ms", "min_ms", "max_ms", "samples_ms", "iterations", "tokens_per_s", "tflops",
            "flops", "speedup_vs_reference", "speedup_vs_grouped_mm", "dense_fraction", "weight_floor_ms",
            "over_weight_floor", "weight_bytes_touched", "routing_stats", "rel_err"}


def run_cli(tmp_path, capsys, *flags):
    json_path = tmp_path / "out" / "bench.json"
    exit_code = cli.main([*TINY_SHAPE, *FAST, "--json", str(json_path), *flags])
    captured = capsys.readouterr()
    results = json.loads(json_path.read_text()) if json_path.exists() else None
    return exit_code, captured, results


def assert_ok_rows(rows):
    for row in rows:
        assert ROW_KEYS <= set(row), ROW_KEYS - set(row)
        assert row["status"] == "ok", row["error"]
        assert len(row["samples_ms"]) == row["iterations"] == 2
        rates = ("copy_gbps",) if row["backend"] == "d2d-copy-floor" else ("tokens_per_s", "tflops")
        for key in ("median_ms", "p10_ms", "p90_ms") + rates:
            assert math.isfinite(row[key]) and row[key] > 0, (key, row)
        assert row["p10_ms"] <= row["median_ms"] <= row["p90_ms"]


def test_cli_reference_and_expert_loop(tmp_path, capsys):
    exit_code, captured, results = run_cli(tmp_path, capsys, "--backend", "reference,expert-loop",
                                           "--dtype", "fp32,bf16", "--floors")
    assert exit_code == 0, captured.err
    rows = results["rows"]
    assert len(rows) == 2 * 2 * 4  # dtypes x tokens x (2 backends + 2 floors)
    assert_ok_rows(rows)
    assert {row["backend"] for row in rows} == {"reference", "expert-loop", "dense-matmul-floor", "d2d-copy-floor"}
    assert all(row["speedup_vs_reference"] == 1.0 for row in rows if row["backend"] == "reference")
    assert all(row["dense_fraction"] == 1.0 for row in rows if row["backend"] == "dense-matmul-floor")
    for row in rows:
        assert row["weight_floor_ms"] > 0 and row["over_weight_floor"] > 0
        assert row["speedup_vs_grouped_mm"] is None  # grouped-mm did not run
    for row in (row for row in rows if row["backend"] == "d2d-copy-floor"):
        assert row["tflops"] is None and row["bytes_copied"] == row["weight_bytes_touched"]
        # bandwidth = bytes read + written / median, and the weight floor is the touched bytes at it
        assert math.isclose(row["copy_gbps"], 2 * row["bytes_copied"] / (row["median_ms"] / 1e3) / 1e9)
        assert math.isclose(row["over_weight_floor"], 2.0)
    assert rows[0]["flops"] == configs.useful_flops(configs.custom_shape(32, 16, 8, 2), rows[0]["tokens"])
    for key in ("torch", "device", "device_name", "threads", "argv", "timestamp", "flashmoe"):
        assert key in results["environment"]
    # the table: header row, then one line per row
    assert "median ms" in captured.out and "TFLOP/s" in captured.out and "vs ref" in captured.out
    assert "%dense" in captured.out and "x wfloor" in captured.out and "GB/s" in captured.out
    assert "rel err" in captured.out
    for row in rows:  # the accuracy column: every layer backend against float64, none for the floors
        if row["backend"] in ("dense-matmul-floor", "d2d-copy-floor"):
            assert row["rel_err"] is None
        else:
            assert 0 < row["rel_err"] <= (1e-5 if row["dtype"] == "fp32" else 2e-2), row
    assert captured.out.count("H32-I16-E8-k2") >= len(rows)


def test_weight_bytes_touched():
    shape = configs.custom_shape(32, 16, 8, 2)
    per_expert = (2 * 16 * 32 + 32 * 16) * 4
    assert configs.expert_weight_bytes(shape, torch.float32) == per_expert
    assert configs.touched_weight_bytes(shape, torch.float32, 3) == 8 * 32 * 4 + 3 * per_expert
    router_weight = torch.randn(8, 32, generator=torch.Generator().manual_seed(0))
    one_token = [torch.randn(1, 32, generator=torch.Generator().manual_seed(1))]
    assert routing.mean_experts_hit(shape, one_token, router_weight, None) == 2.0
    many = [torch.randn(500, 32, generator=torch.Generator().manual_seed(2))] * 2
    assert routing.mean_experts_hit(shape, many, router_weight, None) == 8.0


def test_baseline_max_tokens_skips_slow_baselines(tmp_path, capsys):
    exit_code, captured, results = run_cli(tmp_path, capsys, "--backend", "reference,expert-loop,grouped-mm",
                                           "--baseline-max-tokens", "2")
    assert exit_code == 0, captured.err
    by_key = {(row["backend"], row["tokens"]): row for row in results["rows"]}
    for backend in ("reference", "expert-loop"):
        assert by_key[(backend, 1)]["status"] == "ok"
        assert by_key[(backend, 5)]["status"] == "skipped"
        assert "baseline-max-tokens" in by_key[(backend, 5)]["skip_reason"]
    if baselines.grouped_mm_available():
        assert by_key[("grouped-mm", 5)]["status"] == "ok"
        assert by_key[("grouped-mm", 5)]["speedup_vs_reference"] is None
    assert "skipped: T > --baseline-max-tokens 2" in captured.out


def test_cli_skewed_plain_sigmoid(tmp_path, capsys):
    exit_code, captured, results = run_cli(tmp_path, capsys, "--backend", "reference,expert-loop",
                                           "--routing", "skewed", "--plain", "--activation", "gelu",
                                           "--scoring", "sigmoid", "--no-normalize")
    assert exit_code == 0, captured.err
    assert_ok_rows(results["rows"])
    assert all("hot_pick_fraction" in row["routing_stats"] for row in results["rows"])
    assert "plain gelu sigmoid" in results["rows"][0]["shape"]


@pytest.mark.skipif(not hasattr(flashmoe, "moe"), reason="flashmoe.moe is not written yet")
def test_cli_native_backend(tmp_path, capsys):
    exit_code, captured, results = run_cli(tmp_path, capsys, "--backend", "native,reference")
    assert exit_code == 0, captured.out + captured.err
    assert_ok_rows(results["rows"])


def test_failing_backend_is_reported_and_the_run_continues(tmp_path, capsys):
    exit_code, captured, results = run_cli(tmp_path, capsys, "--backend", "expert-loop,reference",
                                           "--capacity-factor", "1.0")
    assert exit_code == 1
    failed = [row for row in results["rows"] if row["status"] != "ok"]
    assert {row["backend"] for row in failed} == {"expert-loop"}
    assert "capacity_factor=None" in failed[0]["error"]
    assert_ok_rows([row for row in results["rows"] if row["backend"] == "reference"])
    assert "error: NotImplementedError" in captured.out
    assert "rows failed" in captured.err


@pytest.mark.parametrize("flags, flag_name", [
    (["--config", "no-such-model"], "--config"),
    (["--dtype", "fp8"], "--dtype"),
    (["--tokens", "0"], "--tokens"),
    (["--tokens", "4,-1"], "--tokens"),
    (["--backend", "cutlass"], "--backend"),
    (["--routing", "zipf"], "--routing"),
    (["--hidden", "64"], "--ffn"),
    (["--config", "olmoe", "--top-k", "99"], "--top-k"),
])
def test_bad_flags_exit_nonzero_naming_the_flag(capsys, flags, flag_name):
    assert cli.main(flags) != 0
    assert flag_name in capsys.readouterr().err


def test_refuses_shapes_that_do_not_fit(capsys, monkeypatch):
    monkeypatch.setattr(memory, "available_bytes", lambda device: 2**30)
    assert cli.main(["--config", "olmoe", "--dtype", "fp32", "--tokens", "1"]) == 2
    err = capsys.readouterr().err
    assert "not enough memory" in err and "olmoe fp32" in err and "--experts" in err


def test_deepseek_fp32_weight_estimate():
    size = configs.weight_bytes(configs.NAMED_CONFIGS["deepseek-v3"], torch.float32)
    assert 44e9 < size < 46e9


def test_python_dash_m_help():
    result = subprocess.run([sys.executable, "-m", "flashmoe.bench", "--help"], capture_output=True, text=True,
                            timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    assert "olmoe" in result.stdout and "skewed" in result.stdout


def _random_layer(generator, *, tokens, hidden, ffn, experts, gated, dtype=torch.float32):
    def normal(*size, std):
        return (torch.randn(*size, generator=generator) * std).to(dtype)

    w1_rows = 2 * ffn if gated else ffn
    return (normal(tokens, hidden, std=1.0), normal(experts, hidden, std=hidden ** -0.5),
            normal(experts, w1_rows, hidden, std=hidden ** -0.5), normal(experts, hidden, ffn, std=ffn ** -0.5))


BASELINE_CASES = [
    dict(gated=True, activation="silu", scoring="softmax", normalize=True, bias=False),
    dict(gated=True, activation="silu", scoring="softmax", normalize=False, bias=True),
    dict(gated=True, activation="gelu_tanh", scoring="sigmoid", normalize=True, bias=True),
    dict(gated=False, activation="gelu", scoring="softmax", normalize=True, bias=False),
    dict(gated=False, activation="relu", scoring="sigmoid", normalize=False, bias=False),
]
BASELINES = [baselines.expert_loop_moe] + ([baselines.grouped_mm_moe] if baselines.grouped_mm_available() else [])


@pytest.mark.parametrize("baseline", BASELINES, ids=lambda function: function.__name__)
@pytest.mark.parametrize("case", BASELINE_CASES, ids=str)
def test_baselines_match_reference_fp32(baseline, case):
    generator = torch.Generator().manual_seed(1234)
    x, router_weight, w1, w2 = _random_layer(generator, tokens=37, hidden=48, ffn=24, experts=16,
                                             gated=case["gated"])
    router_bias = torch.randn(16, generator=generator) if case["bias"] else None
    options = dict(top_k=4, gated=case["gated"], activation=case["activation"], scoring=case["scoring"],
                   normalize=case["normalize"], router_bias=router_bias)
    expected = reference.moe(x, router_weight, w1, w2, **options)
    actual = baseline(x, router_weight, w1, w2, **options)
    assert actual.dtype == x.dtype and actual.shape == x.shape
    rel_err = ((actual - expected).norm() / expected.norm()).item()
    assert rel_err <= 1e-5, rel_err


def test_baselines_refuse_capacity():
    generator = torch.Generator().manual_seed(0)
    x, router_weight, w1, w2 = _random_layer(generator, tokens=4, hidden=8, ffn=4, experts=4, gated=True)
    with pytest.raises(NotImplementedError, match="capacity_factor=None"):
        baselines.expert_loop_moe(x, router_weight, w1, w2, top_k=2, capacity_factor=1.0)


def test_skewed_bias_puts_about_half_the_picks_on_the_hot_experts():
    shape = configs.custom_shape(64, 16, 32, 2)
    router_weight = torch.randn(32, 64, generator=torch.Generator().manual_seed(3)) / 8
    skew = routing.skewed_router_bias(shape, router_weight, torch.Generator().manual_seed(4))
    assert int(skew.hot_experts.sum()) == routing.hot_expert_count(shape) == 4
    fresh_tokens = torch.randn(4096, 64, generator=torch.Generator().manual_seed(5))
    stats = routing.routing_stats(shape, fresh_tokens, router_weight, skew.router_bias, skew.hot_experts)
    assert 0.4 <= stats["hot_pick_fraction"] <= 0.6, stats
    uniform = routing.routing_stats(shape, fresh_tokens, router_weight, None, skew.hot_experts)
    assert uniform["hot_pick_fraction"] < 0.3, uniform


def test_targets_read_the_bench_json(tmp_path, capsys):
    from flashmoe.bench import targets

    def row(config, tokens, backend="native", **values):
        return dict(config=config, dtype="bf16", tokens=tokens, routing="uniform", backend=backend, status="ok",
                    **values)

    rows = [row("mixtral", 4096, dense_fraction=0.75, speedup_vs_grouped_mm=1.1, median_ms=3.0),
            row("mixtral", 4096, backend="grouped-mm", dense_fraction=0.5, speedup_vs_grouped_mm=1.0),
            row("qwen3-30b-a3b", 1, over_weight_floor=1.2), row("qwen3-30b-a3b", 16, over_weight_floor=1.4),
            row("qwen3-30b-a3b", 128, over_weight_floor=9.0)]
    path = tmp_path / "bench.json"
    path.write_text(json.dumps({"environment": {"device_name": "NVIDIA H100"}, "rows": rows}))
    verdicts = {result["metric"]: result["verdict"] for result in targets.evaluate(targets.load_rows([str(path)]))}
    assert verdicts == {"dense_fraction": "MET", "speedup_vs_grouped_mm": "MISSED", "over_weight_floor": "MET",
                        "median_ms": "NO DATA"}
    assert targets.main([str(path)]) == 0
    assert targets.main([str(path), "--strict"]) == 1
    out = capsys.readouterr().out
    assert "MISSED   Mixtral bf16 T=4096: >= 1.2x" in out and "T=4096: 75%" in out and "T=16: 1.40x" in out


def test_hf_backends_run_the_real_blocks_on_shared_weights(tmp_path, capsys):
    """hf-eager / hf-grouped-mm are transformers' own blocks, on flashmoe's tensors, as accurate as flashmoe."""
    pytest.importorskip("transformers")
    from flashmoe import hf

    calls = hf.call_count()
    exit_code, captured, results = run_cli(tmp_path, capsys, "--backend",
                                           "native,hf-eager,hf-grouped-mm,hf-flashmoe,hf-sonicmoe",
                                           "--dtype", "fp32,bf16")
    assert exit_code == 0, captured.out + captured.err
    assert hf.call_count() > calls  # hf-flashmoe ran flashmoe's op inside HF's block
    rows = results["rows"]
    assert_ok_rows([row for row in rows if row["backend"] != "hf-sonicmoe"])
    for row in rows:
        if row["backend"] == "hf-sonicmoe":  # CUDA-only: a skip that says why, not an error
            assert row["status"] == "skipped" and "CUDA" in row["skip_reason"]
        else:
            assert 0 < row["rel_err"] <= (1e-5 if row["dtype"] == "fp32" else 2e-2), row
    assert "rel err" in captured.out and "skipped: experts_implementation='sonicmoe' runs only on CUDA" in captured.out


@pytest.mark.parametrize("config, block_class", [("olmoe", "OlmoeSparseMoeBlock"),
                                                 ("qwen3-30b-a3b", "Qwen3MoeSparseMoeBlock"),
                                                 ("mixtral", "MixtralSparseMoeBlock"),
                                                 (None, "Qwen3MoeSparseMoeBlock")])
def test_hf_block_is_the_named_shapes_own_class_and_shares_the_weights(config, block_class):
    pytest.importorskip("transformers")
    from flashmoe.bench import hf_blocks, problem

    base = configs.NAMED_CONFIGS[config] if config else configs.custom_shape(32, 16, 8, 2)
    shape = base.override(hidden_size=32, ffn_size=16, num_experts=8, top_k=2)
    weights = problem.make_weights(shape, torch.float32, torch.device("cpu"), seed=0)
    inputs = problem.make_inputs(shape, 5, torch.float32, torch.device("cpu"), seed=1, count=2)
    the_problem = problem.MoEProblem(shape, weights, None, inputs)
    block = hf_blocks.build_block(the_problem, "grouped_mm")
    assert type(block).__name__ == block_class
    assert block.experts.gate_up_proj.data_ptr() == weights.w1.data_ptr()
    assert block.experts.down_proj.data_ptr() == weights.w2.data_ptr()
    assert block.gate.weight.data_ptr() == weights.router_weight.data_ptr()
    assert block.experts.config._experts_implementation == "grouped_mm"
    output = hf_blocks.runner("hf-eager")(the_problem)(1)
    assert output.shape == inputs[1].shape
    expected = reference.moe(inputs[1], weights.router_weight, weights.w1, weights.w2, **the_problem.moe_options())
    assert ((output - expected).norm() / expected.norm()).item() <= 1e-5


def test_hf_backends_skip_what_the_hf_block_cannot_run(tmp_path, capsys):
    pytest.importorskip("transformers")
    exit_code, captured, results = run_cli(tmp_path, capsys, "--backend", "reference,hf-eager", "--plain",
                                           "--routing", "skewed")
    assert exit_code == 0, captured.err
    skipped = [row for row in results["rows"] if row["backend"] == "hf-eager"]
    assert skipped and all(row["status"] == "skipped" for row in skipped)
    assert "non-gated experts" in skipped[0]["skip_reason"] and "router bias" in skipped[0]["skip_reason"]


# ---- issue 12: today's families ----

def _hf_config_numbers():
    """Each new named config next to the transformers config class its model loads with (defaults are the
    flagship checkpoint's numbers; the variants set theirs explicitly here, from their hub config.json)."""
    transformers = pytest.importorskip("transformers")
    deepseek = transformers.DeepseekV3Config()
    kimi = transformers.DeepseekV3Config(n_routed_experts=384, n_group=1, topk_group=1, routed_scaling_factor=2.827)
    gpt_oss = transformers.GptOssConfig()
    qwen3_next = transformers.Qwen3NextConfig()
    scout = transformers.Llama4TextConfig()

    def deepseek_like(config):
        return dict(hidden_size=config.hidden_size, ffn_size=config.moe_intermediate_size,
                    num_experts=config.n_routed_experts, top_k=config.num_experts_per_tok, num_groups=config.n_group,
                    topk_groups=config.topk_group, routed_scaling_factor=config.routed_scaling_factor,
                    shared_ffn_size=config.n_shared_experts * config.moe_intermediate_size,
                    normalize=config.norm_topk_prob, scoring="sigmoid", selection_bias=True, router_fp32=True)

    def gpt_oss_like(experts):
        return dict(hidden_size=gpt_oss.hidden_size, ffn_size=gpt_oss.intermediate_size, num_experts=experts,
                    top_k=gpt_oss.num_experts_per_tok, activation="swiglu_oai", scoring="softmax_topk",
                    expert_bias=True)

    return {
        "deepseek-v3": deepseek_like(deepseek),
        "kimi-k2": deepseek_like(kimi),
        "gpt-oss-120b": gpt_oss_like(gpt_oss.num_local_experts),
        "gpt-oss-20b": gpt_oss_like(32),
        "qwen3-next-80b": dict(hidden_size=qwen3_next.hidden_size, ffn_size=qwen3_next.moe_intermediate_size,
                               num_experts=qwen3_next.num_experts, top_k=qwen3_next.num_experts_per_tok,
                               shared_ffn_size=qwen3_next.shared_expert_intermediate_size, shared_gate=True,
                               normalize=qwen3_next.norm_topk_prob),
        "llama4-scout": dict(hidden_size=scout.hidden_size, ffn_size=scout.intermediate_size,
                             num_experts=scout.num_local_experts, top_k=scout.num_experts_per_tok, scoring="sigmoid",
                             normalize=False, weight_on="input", shared_ffn_size=scout.intermediate_size),
    }


def test_issue12_configs_match_the_hf_configs():
    expected = _hf_config_numbers()
    for name, numbers in expected.items():
        shape = configs.NAMED_CONFIGS[name]
        assert shape.source, name
        for key, value in numbers.items():
            assert getattr(shape, key) == value, (name, key, getattr(shape, key), value)
    assert configs.NAMED_CONFIGS["deepseek-v3"].num_groups == 8 and configs.NAMED_CONFIGS["kimi-k2"].num_groups == 1


def test_weight_floor_counts_the_shared_expert_and_the_fp32_router():
    shape = configs.LayerShape("t", 32, 16, 8, 2, shared_ffn_size=24, shared_gate=True, router_fp32=True,
                               selection_bias=True, expert_bias=True)
    per_expert = (2 * 16 * 32 + 32 * 16 + 2 * 16 + 32) * 2
    shared = (2 * 24 * 32 + 32 * 24 + 32) * 2
    router = 8 * 32 * 4 + 8 * 4
    assert configs.expert_weight_bytes(shape, torch.bfloat16) == per_expert
    assert configs.touched_weight_bytes(shape, torch.bfloat16, 3) == router + shared + 3 * per_expert
    assert configs.weight_bytes(shape, torch.bfloat16) == router + shared + 8 * per_expert
    plain = configs.custom_shape(32, 16, 8, 2)
    assert configs.useful_flops(shape, 5) - configs.useful_flops(plain, 5) == 2 * 5 * (2 * 24 * 32 + 32 * 24 + 32)


def test_group_limited_pick_ids_stay_in_the_top_groups():
    shape = configs.LayerShape("g", 8, 4, 16, 4, scoring="sigmoid", num_groups=4, topk_groups=2)
    logits = torch.randn(64, 16, generator=torch.Generator().manual_seed(3))
    bias = torch.randn(16, generator=torch.Generator().manual_seed(4)) * 0.5
    ids = routing.pick_ids(shape, logits, bias)
    biased = logits.sigmoid() + bias
    group_scores = biased.view(64, 4, 4).topk(2, dim=-1).values.sum(-1)
    top_groups = group_scores.topk(2, dim=-1).indices
    assert ((ids // 4).unsqueeze(-1) == top_groups.unsqueeze(1)).any(-1).all()
    assert ids.unique().numel() > 4  # not a degenerate routing


def test_experts_override_is_named_and_peers_are_skipped(tmp_path, capsys):
    json_path = tmp_path / "bench.json"
    exit_code = cli.main(["--config", "deepseek-v3", "--experts", "16", "--hidden", "64", "--ffn", "32", *FAST,
                          "--backend", "expert-loop", "--floors", "--json", str(json_path)])
    captured = capsys.readouterr()
    assert exit_code == 0, captured.err
    rows = json.loads(json_path.read_text())["rows"]
    assert all(row["config"] == "deepseek-v3[H=64,I=32,E=16]" for row in rows)
    assert "deepseek-v3[H=64,I=32,E=16]" in captured.out and "groups=4/8" in captured.out
    loop = [row for row in rows if row["backend"] == "expert-loop"]
    assert all(row["status"] == "skipped" and "group-limited routing" in row["skip_reason"] for row in loop)
    shape = configs.NAMED_CONFIGS["deepseek-v3"].override(hidden_size=64, ffn_size=32, num_experts=16)
    for row in rows:
        assert row["flops"] == configs.useful_flops(shape, row["tokens"])
        assert row["weight_bytes_touched"] > configs.always_read_bytes(shape, torch.bfloat16)


def test_shape_deepseek_v3_runs_its_routing_and_shared_expert_against_the_weight_floor(tmp_path, capsys):
    """The issue's own command, `flashmoe-bench --shape deepseek-v3`, shrunk to fit a test."""
    json_path = tmp_path / "bench.json"
    exit_code = cli.main(["--shape", "deepseek-v3", "--experts", "16", "--hidden", "64", "--ffn", "32", *FAST,
                          "--backend", "native", "--floors", "--json", str(json_path)])
    captured = capsys.readouterr()
    assert exit_code == 0, captured.err
    assert "groups=4/8" in captured.out and "shared=" in captured.out
    native = [row for row in json.loads(json_path.read_text())["rows"] if row["backend"] == "native"]
    assert native and all(row["status"] == "ok" for row in native)
    assert all(row["over_weight_floor"] > 0 and row["rel_err"] < 2e-2 for row in native)


@pytest.mark.parametrize("experts", ["12", "8"])
def test_experts_override_must_fit_the_groups(capsys, experts):
    assert cli.main(["--config", "deepseek-v3", "--experts", experts, "--tokens", "1"]) == 2
    assert "--experts" in capsys.readouterr().err


FAMILY_BLOCKS = [("deepseek-v3", "DeepseekV3MoE"), ("kimi-k2", "DeepseekV3MoE"), ("gpt-oss-20b", "GptOssMLP"),
                 ("qwen3-next-80b", "Qwen3NextSparseMoeBlock"), ("llama4-scout", "Llama4TextMoe")]


@pytest.mark.parametrize("config, block_class", FAMILY_BLOCKS)
def test_hf_family_blocks_run_their_own_routing_on_the_problems_weights(config, block_class):
    pytest.importorskip("transformers")
    from flashmoe.bench import hf_blocks, problem

    shape = configs.NAMED_CONFIGS[config].override(hidden_size=32, ffn_size=16, num_experts=16)
    weights = problem.make_weights(shape, torch.float32, torch.device("cpu"), seed=0)
    inputs = problem.make_inputs(shape, 7, torch.float32, torch.device("cpu"), seed=1, count=2)
    the_problem = problem.MoEProblem(shape, weights, None, inputs)
    block = hf_blocks.build_block(the_problem, "eager")
    assert type(block).__name__ == block_class
    output = hf_blocks.runner("hf-eager")(the_problem)(1)
    assert output.shape == inputs[1].shape
    expected = reference.moe(inputs[1], weights.router_weight, weights.w1, weights.w2, **the_problem.moe_options())
    assert ((output - expected).norm() / expected.norm()).item() <= 1e-5
    skewed = problem.MoEProblem(shape, weights, torch.ones(16), inputs)
    with pytest.raises(hf_blocks.HFBlockUnavailable, match="router bias"):
        hf_blocks.build_block(skewed, "eager")
    with pytest.raises(hf_blocks.HFBlockUnavailable, match="scoring"):
        other = shape.override(scoring="sigmoid" if shape.scoring == "softmax" else "softmax")
        hf_blocks.build_block(problem.MoEProblem(other, weights, None, inputs), "eager")
