"""MoE.from_hf for today's HF families (issue 12): DeepSeek-V3 / Kimi-K2, GLM-4.5, dots.llm1, GPT-OSS,
Qwen3-Next, Qwen2-MoE and Llama 4. Each HF block is built from a tiny config with random weights, read by
flashmoe.hf_families, and (where the op has the family's features) compared with the block itself."""

import warnings

import pytest
import torch
from torch import nn

import flashmoe
from flashmoe import hf_families

transformers = pytest.importorskip("transformers")

H, I, E, K, S = 48, 40, 16, 4, 24


def _configs():
    deepseek = dict(hidden_size=H, moe_intermediate_size=I, n_routed_experts=E, num_experts_per_tok=K, n_group=4,
                    topk_group=2, n_shared_experts=1, routed_scaling_factor=2.5, norm_topk_prob=True)
    return {
        "deepseek-v3": ("deepseek_v3", "DeepseekV3Config", "DeepseekV3MoE", deepseek),
        "kimi-k2": ("deepseek_v3", "DeepseekV3Config", "DeepseekV3MoE",
                    dict(deepseek, n_group=1, topk_group=1, routed_scaling_factor=2.827)),
        "glm4-moe": ("glm4_moe", "Glm4MoeConfig", "Glm4MoeMoE", dict(deepseek, routed_scaling_factor=1.0)),
        "dots1": ("dots1", "Dots1Config", "Dots1MoE", dict(deepseek, norm_topk_prob=False)),
        "gpt-oss": ("gpt_oss", "GptOssConfig", "GptOssMLP",
                    dict(hidden_size=H, intermediate_size=I, num_local_experts=E, num_experts_per_tok=K)),
        "qwen3-next": ("qwen3_next", "Qwen3NextConfig", "Qwen3NextSparseMoeBlock",
                       dict(hidden_size=H, moe_intermediate_size=I, num_experts=E, num_experts_per_tok=K,
                            shared_expert_intermediate_size=S, norm_topk_prob=True)),
        "qwen2-moe": ("qwen2_moe", "Qwen2MoeConfig", "Qwen2MoeSparseMoeBlock",
                      dict(hidden_size=H, moe_intermediate_size=I, num_experts=E, num_experts_per_tok=K,
                           shared_expert_intermediate_size=S, norm_topk_prob=False)),
        "llama4": ("llama4", "Llama4TextConfig", "Llama4TextMoe",
                   dict(hidden_size=H, intermediate_size=I, num_local_experts=E, num_experts_per_tok=1)),
    }


FAMILIES = tuple(_configs())
DEEPSEEK_LIKE = ("deepseek-v3", "kimi-k2", "glm4-moe", "dots1")


def make_block(kind: str, dtype=torch.float32, seed: int = 0) -> nn.Module:
    """The family's own HF block with random weights (none zero), in ``dtype``; DeepSeek-like gates
    and their e_score_correction_bias stay float32, as HF loads them (``_keep_in_fp32_modules_strict``)."""
    model_type, config_name, block_name, values = _configs()[kind]
    config = getattr(transformers, config_name)(**values)
    module = getattr(getattr(transformers.models, model_type), f"modeling_{model_type}")
    block = getattr(module, block_name)(config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in [*block.named_parameters(), *block.named_buffers()]:
            std = 0.3 if name.startswith(("gate.", "router.")) else 0.15
            if name.endswith("e_score_correction_bias"):
                std = 0.1  # enough to change picks, so a bias used for the weights would show
            tensor.copy_(torch.randn(tensor.shape, generator=generator) * std)
    block = block.to(dtype)
    if kind in DEEPSEEK_LIKE:
        block.gate.float()
    return block


# --------------------------------------------------------------------------- reading

EXPECTED_OPTIONS = {
    "deepseek-v3": dict(scoring="sigmoid", normalize=True, selection_bias=True, num_groups=4, topk_groups=2,
                        routed_scaling_factor=2.5, shared_ffn_size=I),
    "kimi-k2": dict(scoring="sigmoid", normalize=True, selection_bias=True, num_groups=1, topk_groups=1,
                    routed_scaling_factor=2.827, shared_ffn_size=I),
    "glm4-moe": dict(scoring="sigmoid", normalize=True, num_groups=4, routed_scaling_factor=1.0),
    "dots1": dict(scoring="sigmoid", normalize=False, num_groups=4),
    "gpt-oss": dict(scoring="softmax_topk", activation="swiglu_oai", swiglu_limit=7.0, swiglu_alpha=1.702,
                    router_bias=True, expert_bias=True),
    "qwen3-next": dict(scoring="softmax", normalize=True, shared_ffn_size=S, shared_gate=True),
    "qwen2-moe": dict(scoring="softmax", normalize=False, shared_ffn_size=S, shared_gate=True),
    "llama4": dict(scoring="sigmoid", normalize=False, weight_on="input", shared_ffn_size=I),
}


@pytest.mark.parametrize("kind", FAMILIES)
def test_reads_each_family(kind):
    block = make_block(kind, torch.bfloat16)
    reading = hf_families.read(block)
    assert (reading.hidden_size, reading.ffn_size, reading.num_experts) == (H, I, E)
    assert reading.top_k == (1 if kind == "llama4" else K) and reading.dtype == torch.bfloat16
    for key, value in EXPECTED_OPTIONS[kind].items():
        assert reading.options[key] == value, key
    assert reading.options.get("router_dtype") == (torch.float32 if kind in DEEPSEEK_LIKE else None)
    # the block's own tensors where the op reads HF's layout; a copy otherwise
    owned = {id(tensor) for tensor in [*block.parameters(), *block.buffers()]}
    assert all(id(tensor) in owned for tensor in reading.shared.values())
    assert not any(id(tensor) in owned for tensor in reading.copied.values())
    expected_copies = {"gpt-oss": {"w1", "w2", "b1"}, "llama4": {"w1", "w2", "shared_w1"}}.get(kind, {"shared_w1"})
    assert set(reading.copied) == expected_copies


def test_gpt_oss_interleaved_experts_become_gate_rows_then_up_rows():
    block = make_block("gpt-oss")
    reading = hf_families.read(block)
    gate_up, bias = block.experts.gate_up_proj.detach(), block.experts.gate_up_proj_bias.detach()
    w1, b1 = reading.copied["w1"], reading.copied["b1"]
    assert w1.shape == (E, 2 * I, H) and w1.is_contiguous()
    assert torch.equal(w1[:, :I], gate_up[:, :, 0::2].transpose(1, 2))
    assert torch.equal(w1[:, I:], gate_up[:, :, 1::2].transpose(1, 2))
    assert torch.equal(b1[:, :I], bias[:, 0::2]) and torch.equal(b1[:, I:], bias[:, 1::2])
    assert torch.equal(reading.copied["w2"], block.experts.down_proj.detach().transpose(1, 2))
    assert reading.shared["b2"] is block.experts.down_proj_bias


def test_shared_expert_is_gate_then_up_rows():
    block = make_block("qwen3-next")
    reading = hf_families.read(block)
    mlp = block.shared_expert
    assert torch.equal(reading.copied["shared_w1"], torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]))
    assert reading.shared["shared_w2"] is mlp.down_proj.weight
    assert reading.shared["shared_gate"] is block.shared_expert_gate.weight


# --------------------------------------------------------------------------- guards

def test_unknown_block_is_a_type_error_naming_it():
    class SomeOtherMoE(nn.Module):
        pass

    with pytest.raises(TypeError, match="SomeOtherMoE"):
        hf_families.read(SomeOtherMoE())
    with pytest.raises(TypeError, match="block"):
        flashmoe.MoE.from_hf(SomeOtherMoE())
    # A block of an unknown family that looks like a sparse-MoE block but has a shared expert:
    renamed = type("DeepseekV2Moe", (nn.Module,), {})()
    for name, module in make_block("deepseek-v3").named_children():
        renamed.add_module(name, module)
    with pytest.raises(ValueError, match="DeepseekV2Moe has shared_experts"):
        flashmoe.MoE.from_hf(renamed)


@pytest.mark.parametrize("kind, change, error, match", [
    ("deepseek-v3", lambda b: setattr(b, "shared_experts", None), TypeError, "shared_experts"),
    ("deepseek-v3", lambda b: setattr(b.gate, "num_group", 3), ValueError, "num_group"),
    ("deepseek-v3", lambda b: setattr(b.gate, "routed_scaling_factor", "2.5"), TypeError, "routed_scaling_factor"),
    ("deepseek-v3", lambda b: setattr(b.gate, "norm_topk_prob", 1), TypeError, "norm_topk_prob"),
    ("deepseek-v3", lambda b: setattr(b.experts, "act_fn", nn.Tanh()), ValueError, "act_fn"),
    ("deepseek-v3", lambda b: setattr(b.shared_experts, "act_fn", nn.ReLU()), ValueError, "shared_experts"),
    ("deepseek-v3", lambda b: setattr(b.gate, "e_score_correction_bias", torch.zeros(E + 1)), ValueError,
     "e_score_correction_bias"),
    ("deepseek-v3", lambda b: b.gate.double(), TypeError, "gate.weight"),
    ("qwen3-next", lambda b: setattr(b.shared_expert_gate, "bias", nn.Parameter(torch.zeros(1))), ValueError,
     "shared_expert_gate"),
    ("qwen3-next", lambda b: setattr(b.shared_expert.up_proj, "weight", nn.Parameter(torch.zeros(S + 1, H))),
     ValueError, "up_proj"),
    ("qwen2-moe", lambda b: setattr(b.gate, "top_k", 2.0), TypeError, "top_k"),
    ("gpt-oss", lambda b: setattr(b.experts, "gate_up_proj_bias", None), TypeError, "gate_up_proj_bias"),
    ("gpt-oss", lambda b: setattr(b.router, "bias", nn.Parameter(torch.zeros(E + 1))), ValueError, "router.bias"),
    ("llama4", lambda b: setattr(b.router, "bias", nn.Parameter(torch.zeros(E))), ValueError, "router"),
    ("llama4", lambda b: setattr(b.experts, "down_proj", nn.Parameter(torch.zeros(E, H, I))), ValueError,
     "down_proj"),
])
def test_known_block_with_an_unknown_option_or_layout_is_refused_by_name(kind, change, error, match):
    block = make_block(kind)
    change(block)
    with pytest.raises(error, match=match):
        flashmoe.MoE.from_hf(block)


def test_options_the_block_defines_cannot_be_passed():
    with pytest.raises(ValueError, match="top_k"):
        flashmoe.MoE.from_hf(make_block("qwen3-next"), top_k=2)
    with pytest.raises(ValueError, match="scoring"):
        flashmoe.MoE.from_hf(make_block("deepseek-v3"), scoring="softmax")


# --------------------------------------------------------------------------- parity with the HF block

# Every family through the op's reference backend and through the native kernels.
NATIVE_FAMILIES = FAMILIES
PARITY_CASES = [(kind, "reference") for kind in FAMILIES] + [(kind, "native") for kind in NATIVE_FAMILIES]
TOKENS = (2, 9)  # 18 tokens: every tiny family hits most of its 16 experts


def _hf_output(output, x):
    """GptOssMLP and Llama4TextMoe return (y, router output); Llama 4's y is [T, H]."""
    return (output[0] if isinstance(output, tuple) else output).reshape(x.shape)


def _hf_ids(kind, block, x):
    """The experts HF's own router picks, ``[T, k]`` sorted."""
    tokens = x.reshape(-1, H)
    if kind == "llama4":
        _, logits = block.router(tokens)
        ids = logits.topk(block.router.top_k, dim=-1).indices
    else:
        ids = (block.router if kind == "gpt-oss" else block.gate)(tokens)[2]
    return ids.sort(dim=-1).values


def _layer(block, backend):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the copy warning has its own test
        return flashmoe.MoE.from_hf(block, backend=backend)


def _scale(tensor):
    return tensor.double().abs().max().item()


@pytest.mark.parametrize("kind, backend", PARITY_CASES)
def test_fp32_matches_the_block_with_gradients(kind, backend):
    block = make_block(kind, torch.float32, seed=1)
    layer = _layer(block, backend)
    x = torch.randn(*TOKENS, H, generator=torch.Generator().manual_seed(2))
    probe = torch.randn(*TOKENS, H, generator=torch.Generator().manual_seed(3))

    hf_x = x.clone().requires_grad_()
    expected = _hf_output(block(hf_x), x)
    (expected * probe).sum().backward()
    hf_grads = {name: tensor.grad.clone() for name, tensor in block.named_parameters()}
    block.zero_grad(set_to_none=True)

    our_x = x.clone().requires_grad_()
    y, routing = layer(our_x, return_routing=True)
    assert y.shape == expected.shape and y.dtype == torch.float32
    assert torch.equal(routing.topk_ids.long().sort(dim=-1).values, _hf_ids(kind, block, x))
    assert (y - expected).abs().max().item() <= 1e-5 * _scale(expected)
    (y * probe).sum().backward()
    assert (our_x.grad - hf_x.grad).abs().max().item() <= 1e-5 * _scale(hf_x.grad)
    grads = _grads_in_hf_layout(kind, block, layer)
    assert set(grads) == set(hf_grads), set(grads) ^ set(hf_grads)
    for name, hf_grad in hf_grads.items():
        assert (grads[name] - hf_grad).abs().max().item() <= 1e-5 * _scale(hf_grad), name


def _grads_in_hf_layout(kind, block, layer) -> dict:
    """Every HF Parameter's gradient after the MoE's backward: the shared Parameters carry it themselves;
    the copies' gradients are converted back to HF's layout."""
    from flashmoe.hf import _to_hf_layout

    grads = {name: tensor.grad for name, tensor in block.named_parameters() if tensor.grad is not None}
    shared_mlp = {"gpt-oss": None, "qwen3-next": "shared_expert", "qwen2-moe": "shared_expert",
                  "llama4": "shared_expert"}.get(kind, "shared_experts")
    if shared_mlp is not None:
        gate, up = layer.shared_w1.grad.chunk(2, dim=0)
        grads[f"{shared_mlp}.gate_proj.weight"], grads[f"{shared_mlp}.up_proj.weight"] = gate, up
    if kind in ("gpt-oss", "llama4"):
        interleaved = kind == "gpt-oss"
        grads["experts.gate_up_proj"] = _to_hf_layout(layer.w1.grad, True, interleaved)
        grads["experts.down_proj"] = _to_hf_layout(layer.w2.grad, True, False)
    if kind == "gpt-oss":
        grads["experts.gate_up_proj_bias"] = _to_hf_layout(layer.b1.grad, False, True)
    return grads


BF16_TOLERANCE = 2e-2  # the contract's bf16 bound on ||y - ref|| / ||ref||


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("kind, backend", PARITY_CASES)
def test_bf16_matches_the_block_with_gradients(kind, backend):
    block = make_block(kind, torch.bfloat16, seed=5)
    layer = _layer(block, backend)
    x = torch.randn(*TOKENS, H, generator=torch.Generator().manual_seed(6)).to(torch.bfloat16)
    probe = torch.randn(*TOKENS, H, generator=torch.Generator().manual_seed(7)).to(torch.bfloat16)

    hf_x = x.clone().requires_grad_()
    expected = _hf_output(block(hf_x), x)
    (expected.float() * probe.float()).sum().backward()
    hf_grads = {name: tensor.grad.clone() for name, tensor in block.named_parameters()}
    block.zero_grad(set_to_none=True)

    our_x = x.clone().requires_grad_()
    y, routing = layer(our_x, return_routing=True)
    assert y.dtype == torch.bfloat16
    # HF rounds bf16 router logits (and Qwen's and GPT-OSS's weights) to bf16; these seeds have no near tie.
    assert torch.equal(routing.topk_ids.long().sort(dim=-1).values, _hf_ids(kind, block, x))
    assert _rel(y, expected) <= BF16_TOLERANCE
    (y.float() * probe.float()).sum().backward()
    assert _rel(our_x.grad, hf_x.grad) <= BF16_TOLERANCE
    grads = _grads_in_hf_layout(kind, block, layer)
    for name, hf_grad in hf_grads.items():
        assert _rel(grads[name], hf_grad) <= 2 * BF16_TOLERANCE, name


@pytest.mark.parametrize("kind", ("deepseek-v3", "qwen3-next"))
def test_shares_the_blocks_parameters(kind):
    block = make_block(kind, seed=7)
    layer = _layer(block, "reference")
    router = block.gate
    assert layer.router_weight is router.weight and layer.w1 is block.experts.gate_up_proj
    assert layer.w2 is block.experts.down_proj
    if kind == "deepseek-v3":
        assert layer.selection_bias is router.e_score_correction_bias  # HF's updates outside autograd reach the MoE
        assert layer.shared_w2 is block.shared_experts.down_proj.weight
    else:
        assert layer.shared_gate is block.shared_expert_gate.weight
    copy = flashmoe.MoE.from_hf(block, share_parameters=False)
    assert copy.w1 is not block.experts.gate_up_proj and torch.equal(copy.w1, block.experts.gate_up_proj)


@pytest.mark.parametrize("kind", ("gpt-oss", "llama4", "qwen2-moe"))
def test_copies_are_announced(kind):
    block = make_block(kind)
    with pytest.warns(UserWarning, match="copied once"):
        flashmoe.MoE.from_hf(block)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        flashmoe.MoE.from_hf(block, share_parameters=False)  # everything is a copy there: nothing to announce
