"""flashmoe.bench.ep_model: the EP layer's cost model (predictions): its byte counts by hand, its
guards, its orderings, and docs/performance.md's tables, which must equal --markdown byte for byte."""

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from flashmoe.bench import ep_model, model
from flashmoe.bench.configs import NAMED_CONFIGS, custom_shape

DOC = Path(__file__).resolve().parents[1] / "docs" / "performance.md"
H100 = model.DEVICES["h100-sxm"]
PAPER = NAMED_CONFIGS["paper"]


def test_bytes_per_rank_by_hand():
    # H = 64 bf16: 128-byte rows. T = 10, k = 2: 20 picks; W = 2: half go to the other rank (10 rows),
    # plus one SignalWord per (peer owner, local expert): L = 2 dispatch flags and 2 return flags.
    shape = custom_shape(64, 32, 4, 2)
    moved = ep_model.ep_bytes(shape, 10, 2)
    assert moved["nvlink_rows"] == 10 and moved["rdma_rows"] == 0
    assert moved["dispatch"] == 10 * 128 + 2 * 8
    assert moved["combine"] == 10 * 128 + 2 * 8
    assert moved["per_direction"] == 2 * (10 * 128 + 16)
    # W = 4 in nodes of 2 (E = 4, L = 1): 1 peer over NVLink (5 rows), 2 over the NIC (10 rows).
    moved = ep_model.ep_bytes(shape, 10, 4, gpus_per_node=2)
    assert (moved["nvlink_rows"], moved["rdma_rows"]) == (5, 10)
    assert moved["rdma_dispatch"] == 10 * 128 + 2 * 8 and moved["nvlink_dispatch"] == 5 * 128 + 8
    assert moved["cross_node_fraction"] == 0.5
    # fp32 rows (the paper's precision) are twice as wide.
    assert ep_model.ep_bytes(shape, 10, 2, element=4)["dispatch"] == 10 * 256 + 16


def test_paper_layer_link_time_by_hand():
    parts = ep_model.ep_layer(H100, PAPER, 8192, 8, "planned")
    rows = 8192 * 2 * 7 / 8
    per_direction = 2 * (rows * 2048 * 2 + 4 * 7 * 8)
    assert parts["bytes_per_direction"] == pytest.approx(per_direction)
    assert parts["link"] == pytest.approx(per_direction / (450e3 * 0.8))  # bytes per us
    # The planned tile's compute: the expert FLOPs at its ceiling on the 131 processor SMs.
    fraction = model.TILES[model.PLANNED_TILE].peak_fraction(H100) * 131 / 132
    flops = 2 * 8192 * 2 * (2048 * 2048 * 2)
    assert parts["compute"] == pytest.approx(flops / (fraction * 989e6))
    assert parts["experts"] == max(parts["compute"], parts["scheduler"])


def test_world_of_one_moves_no_bytes():
    moved = ep_model.ep_bytes(PAPER, 4096, 1)
    assert moved["per_direction"] == 0 and moved["cross_node_fraction"] == 0
    for design in ep_model.DESIGNS:
        parts = ep_model.ep_layer(H100, PAPER, 4096, 1, design)
        assert parts["link"] == parts["head"] == parts["tail"] == parts["copy"] == 0
        assert parts["bytes_per_direction"] == 0


def test_overlapped_never_exceeds_serialized_and_more_work_is_never_faster():
    for device in model.DEVICES.values():
        for topology in ep_model.TOPOLOGIES.values():
            for design in ep_model.DESIGNS:
                previous = 0.0
                for tokens in (0, 1, 64, 512, 4096, 16384):
                    times = [ep_model.ep_layer(device, PAPER, tokens, topology.world, design,
                                               topology.gpus_per_node, hot_factor=f) for f in (1.0, 1.5, 2.0)]
                    for parts in times:
                        assert parts["overlapped"] <= parts["serialized"], (topology.name, design, tokens)
                        assert all(value >= 0 for value in parts.values())
                    assert [p["overlapped"] for p in times] == sorted(p["overlapped"] for p in times)
                    assert times[0]["overlapped"] >= previous
                    previous = times[0]["overlapped"]


def test_hot_rank_share_by_hand():
    # E = 32, W = 8 (L = 4): the hot expert at 2x the mean, the other 31 share the rest evenly.
    assert ep_model.hot_rank_share(PAPER, 8, 2.0) == pytest.approx((2 + 3 * 30 / 31) / 4)
    assert ep_model.hot_rank_share(PAPER, 8, 1.0) == pytest.approx(1.0)
    # One expert per rank: the hottest rank is the hot expert.
    assert ep_model.hot_rank_share(PAPER, 32, 1.5) == pytest.approx(1.5)


def test_guards_name_the_argument():
    with pytest.raises(ValueError, match="world_size=3 must divide num_experts=32"):
        ep_model.ep_layer(H100, PAPER, 4096, 3)
    with pytest.raises(ValueError, match="world_size=3"):
        ep_model.ep_bytes(PAPER, 4096, 3)
    with pytest.raises(ValueError, match="world_size must be a positive int"):
        ep_model.ep_layer(H100, PAPER, 4096, 0)
    with pytest.raises(ValueError, match="tokens"):
        ep_model.ep_layer(H100, PAPER, -1, 8)
    with pytest.raises(ValueError, match="gpus_per_node=3"):
        ep_model.ep_layer(H100, PAPER, 4096, 16, gpus_per_node=3)
    with pytest.raises(ValueError, match="hot_factor"):
        ep_model.ep_layer(H100, PAPER, 4096, 8, hot_factor=0.5)
    with pytest.raises(ValueError, match="hot_factor"):
        ep_model.ep_layer(H100, PAPER, 4096, 8, hot_factor=17.0)  # E/k = 16
    with pytest.raises(ValueError, match="design"):
        ep_model.ep_layer(H100, PAPER, 4096, 8, "tomorrow")


def test_rdma_is_slower_and_its_bytes_cross_nodes():
    for tokens in ep_model.PAPER_TOKENS:
        nvlink = ep_model.ep_layer(H100, PAPER, tokens, 8, "planned")
        one_per_node = ep_model.ep_layer(H100, PAPER, tokens, 8, "planned", gpus_per_node=1)
        assert one_per_node["cross_node_fraction"] == pytest.approx(7 / 8)
        assert one_per_node["link"] > nvlink["link"] and one_per_node["overlapped"] > nvlink["overlapped"]
        two_nodes = ep_model.ep_layer(H100, PAPER, tokens, 16, "planned", gpus_per_node=8)
        assert two_nodes["cross_node_fraction"] == pytest.approx(0.5)
    # A faster NIC shortens the cross-node link time in proportion.
    fast = dataclasses.replace(H100, rdma_gbps=2 * H100.rdma_gbps)
    slow_link = ep_model.ep_layer(H100, PAPER, 8192, 8, "planned", gpus_per_node=1)["link"]
    fast_link = ep_model.ep_layer(fast, PAPER, 8192, 8, "planned", gpus_per_node=1)["link"]
    assert fast_link < 0.51 * slow_link


def test_the_docs_tables_are_the_models():
    doc = DOC.read_text()
    assert ep_model.render_markdown() in doc, \
        "docs/performance.md's tables are stale: replace them with `python -m flashmoe.bench.ep_model --markdown`"
    assert doc.count(ep_model.MARKDOWN_BEGIN) == 1 and doc.count(ep_model.MARKDOWN_END) == 1


def test_cli(capsys):
    assert ep_model.main([]) == 0
    out = capsys.readouterr().out
    assert "PREDICTIONS" in out and "FlashMoE 3.7 / Megatron 18.9 ms" in out
    assert ep_model.main(["--markdown", "--device", "h200"]) == 0
    assert "H200" in capsys.readouterr().out
    result = subprocess.run([sys.executable, "-m", "flashmoe.bench.ep_model", "--help"], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0 and "PREDICTIONS" in result.stdout
