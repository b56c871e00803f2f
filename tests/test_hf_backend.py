"""experts_implementation="flashmoe": real HF causal LMs from tiny configs, flashmoe against HF's eager.

Each family is built from a tiny config (2 layers, hidden 32, 8 experts, top-2) with random weights
(never zeros) and run in one process under "eager" and under "flashmoe": every experts module's
output (hooks), the logits, greedy generation, the gradients, bf16 per module on the same routing,
saving and reloading, and training steps. A call counter proves flashmoe's op ran.
"""

from __future__ import annotations

import copy
import io
import math
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402

from flashmoe import hf  # noqa: E402

hf.register()

TINY = dict(hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=8, vocab_size=96, num_experts=8,
            num_local_experts=8, n_routed_experts=8, num_experts_per_tok=2, max_position_embeddings=64,
            shared_expert_intermediate_size=16, first_k_dense_replace=0, n_group=1, topk_group=1,
            kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8,
            decoder_sparse_step=1, mlp_only_layers=[], tie_word_embeddings=False, pad_token_id=0)
LINEAR_ATTENTION = dict(layer_types=["linear_attention", "full_attention"], linear_key_head_dim=8,
                        linear_value_head_dim=8, linear_num_key_heads=2, linear_num_value_heads=4)
# family -> (model_type, config overrides). The clamped SwiGLUs get a small limit so the clamp bites.
FAMILIES = {
    "mixtral": ("mixtral", {}),
    "olmoe": ("olmoe", {}),
    "qwen3_moe": ("qwen3_moe", {}),
    "qwen2_moe": ("qwen2_moe", {}),
    "qwen3_next": ("qwen3_next", LINEAR_ATTENTION),
    "qwen3_5_moe": ("qwen3_5_moe_text", LINEAR_ATTENTION),
    "deepseek_v3": ("deepseek_v3", dict(num_key_value_heads=4)),
    "deepseek_v4": ("deepseek_v4", dict(swiglu_limit=0.3)),
    "glm4_moe": ("glm4_moe", {}),
    "gpt_oss": ("gpt_oss", dict(swiglu_limit=0.3)),
    "minimax_m2": ("minimax_m2", {}),
    "hy_v3": ("hy_v3", {}),
    "ernie4_5_moe": ("ernie4_5_moe", {}),
    "granitemoe": ("granitemoe", {}),
    "hy_v4": ("hy_v4", dict(swiglu_limit=0.3)),
    "nemotron_h": ("nemotron_h", {}),
}
# Families whose experts need a layout conversion (transposed / interleaved): the cache is exercised.
CONVERTED = ("gpt_oss",)
BF16_BOUND = 2e-2  # DESIGN.md "Checks"


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    expected = expected.double()
    return ((actual.double() - expected).norm() / expected.norm()).item()


def experts_modules(model):
    return [(name, module) for name, module in model.named_modules()
            if hasattr(module, "has_gate") and hasattr(module, "is_concatenated")]


def randomize(model, seed: int) -> None:
    """Fresh normal weights everywhere (HF's init leaves biases and some tables at zero)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            noise = torch.randn(parameter.shape, generator=generator, dtype=torch.float32)
            if parameter.dim() >= 2:
                fan_in = parameter.shape[1] if parameter.dim() == 3 and "proj" in name else parameter.shape[-1]
                value = noise / math.sqrt(fan_in)
            elif "norm" in name or name.endswith("A_log") or name.endswith(".D"):
                value = 1.0 + 0.1 * noise
            else:
                value = 0.1 * noise
            parameter.copy_(value.to(parameter.dtype))
        for name, buffer in model.named_buffers():
            if name.endswith("tid2eid"):  # DeepSeek-V4's hash routing table (repeats allowed, as HF allows)
                buffer.copy_(torch.randint(0, 8, buffer.shape, generator=generator))


_BUILT = {}


def tiny_model(family: str, dtype=torch.float32):
    """A fresh copy of the family's tiny model, eval mode, "eager" experts."""
    if family not in _BUILT:
        model_type, overrides = FAMILIES[family]
        config = AutoConfig.for_model(model_type, **{**TINY, **overrides})
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        randomize(model, seed=sum(map(ord, family)))
        assert experts_modules(model), f"{family} has no experts module"
        _BUILT[family] = model
    model = copy.deepcopy(_BUILT[family]).to(dtype).eval()
    model.set_experts_implementation("eager")
    return model


def token_ids(seed: int = 1, batch: int = 2, length: int = 7) -> torch.Tensor:
    return torch.randint(1, 96, (batch, length), generator=torch.Generator().manual_seed(seed))


def run_capturing_experts(model, implementation: str, ids: torch.Tensor):
    """(logits, {experts module name: output}) of one forward under ``implementation``."""
    model.set_experts_implementation(implementation)
    outputs, handles = {}, []
    for name, module in experts_modules(model):
        handles.append(module.register_forward_hook(
            lambda module, args, output, name=name: outputs.__setitem__(name, output.detach().clone())))
    try:
        logits = model(ids).logits
    finally:
        for handle in handles:
            handle.remove()
    return logits, outputs


@pytest.mark.parametrize("family", FAMILIES)
def test_outputs_logits_and_greedy_tokens_match_eager(family):
    model = tiny_model(family)
    ids = token_ids()
    with torch.no_grad():
        eager_logits, eager_outputs = run_capturing_experts(model, "eager", ids)
        calls = hf.call_count()
        flash_logits, flash_outputs = run_capturing_experts(model, "flashmoe", ids)
        assert hf.call_count() - calls == len(experts_modules(model)), "flashmoe's op did not run for every module"
    assert set(flash_outputs) == set(eager_outputs) and eager_outputs
    for name, expected in eager_outputs.items():
        assert torch.isfinite(flash_outputs[name]).all()
        assert rel_err(flash_outputs[name], expected) <= 1e-5, name
    assert rel_err(flash_logits, eager_logits) <= 1e-5

    prompt = token_ids(seed=2, batch=1, length=4)
    settings = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    model.set_experts_implementation("eager")
    eager_tokens = model.generate(prompt, **settings)
    model.set_experts_implementation("flashmoe")
    calls = hf.call_count()
    flash_tokens = model.generate(prompt, **settings)
    assert hf.call_count() > calls
    assert torch.equal(flash_tokens, eager_tokens)


def gradients(model, implementation: str, ids: torch.Tensor, probe: torch.Tensor):
    model.set_experts_implementation(implementation)
    model.zero_grad(set_to_none=True)
    embeds = []  # the input embeddings, kept for their gradient (input_ids still reach hash routers)

    def keep(module, args, output):
        output.retain_grad()
        embeds.append(output)

    handle = model.get_input_embeddings().register_forward_hook(keep)
    try:
        logits = model(ids).logits
    finally:
        handle.remove()
    (logits * probe).sum().backward()
    grads = {name: parameter.grad.clone() for name, parameter in model.named_parameters()
             if parameter.grad is not None}
    return embeds[0].grad.clone(), grads


@pytest.mark.parametrize("family", FAMILIES)
def test_gradients_reach_hf_parameters_and_embeddings(family):
    model = tiny_model(family)
    ids = token_ids(seed=3)
    probe = torch.randn(ids.shape + (96,), generator=torch.Generator().manual_seed(4))
    eager_embeds, eager_grads = gradients(model, "eager", ids, probe)
    calls = hf.call_count()
    flash_embeds, flash_grads = gradients(model, "flashmoe", ids, probe)
    assert hf.call_count() > calls
    assert rel_err(flash_embeds, eager_embeds) <= 1e-4
    expert_parameters = [f"{name}.{parameter_name}" for name, module in experts_modules(model)
                         for parameter_name, _ in module.named_parameters()]
    for name in expert_parameters:
        assert name in flash_grads, f"no gradient reached {name}"
        assert flash_grads[name].shape == dict(model.named_parameters())[name].shape  # HF's own layout
        if eager_grads[name].norm() > 0:
            assert rel_err(flash_grads[name], eager_grads[name]) <= 1e-4, name
        else:  # an expert no token picked
            assert flash_grads[name].norm() == 0, name
    for name, expected in eager_grads.items():  # the routers learn through top_k_weights
        if expected.norm() > 0:
            assert rel_err(flash_grads[name], expected) <= 1e-4, name


@pytest.mark.parametrize("family", FAMILIES)
def test_bf16_each_module_on_the_same_routing_is_within_the_contract(family):
    model = tiny_model(family, torch.bfloat16)
    captured = {}
    handles = [module.register_forward_pre_hook(
        lambda module, args, name=name: captured.setdefault(name, tuple(a.detach().clone() for a in args)))
        for name, module in experts_modules(model)]
    with torch.no_grad():
        model(token_ids(seed=5))
    for handle in handles:
        handle.remove()
    assert captured
    modules = dict(experts_modules(model))
    with torch.no_grad():
        for name, (hidden_states, top_k_index, top_k_weights) in captured.items():
            module = modules[name]
            truth_module = copy.deepcopy(module).double()
            truth_module.config._experts_implementation = "eager"
            # the eager module in float64 on the bf16 inputs and HF's own bf16 routing
            truth = truth_module(hidden_states.double(), top_k_index, top_k_weights.double())
            calls = hf.call_count()
            actual = hf.experts_forward(module, hidden_states, top_k_index, top_k_weights)
            assert hf.call_count() == calls + 1
            assert actual.dtype == torch.bfloat16 and torch.isfinite(actual).all()
            assert rel_err(actual, truth) <= BF16_BOUND, name


def test_the_op_really_runs_under_the_profiler():
    model = tiny_model("olmoe")
    model.set_experts_implementation("flashmoe")
    with torch.no_grad(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        model(token_ids())
    names = {event.name for event in profile.events()}
    assert any(name.startswith("flashmoe::") for name in names), sorted(names)[:50]


@pytest.mark.parametrize("family", ["olmoe", "gpt_oss"])
def test_save_pretrained_then_from_pretrained_with_flashmoe(family, tmp_path):
    model = tiny_model(family)
    ids = token_ids(seed=6)
    with torch.no_grad():
        expected = model(ids).logits
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, experts_implementation="flashmoe").eval()
    assert loaded.config._experts_implementation == "flashmoe"
    calls = hf.call_count()
    with torch.no_grad():
        actual = loaded(ids).logits
    assert hf.call_count() - calls == len(experts_modules(loaded))
    assert rel_err(actual, expected) <= 1e-5


@pytest.mark.parametrize("family", ["olmoe", "gpt_oss", "deepseek_v4"])
def test_training_steps_match_eager(family):
    """The optimizer updates the Parameters in place: a converted-weight cache that missed it would diverge."""
    losses = {}
    final = {}
    for implementation in ("eager", "flashmoe"):
        model = tiny_model(family).train()
        model.set_experts_implementation(implementation)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        losses[implementation] = []
        for step in range(3):
            ids = token_ids(seed=10 + step)
            loss = model(ids, labels=ids).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses[implementation].append(loss.item())
        final[implementation] = dict(model.named_parameters())
    for eager_loss, flash_loss in zip(losses["eager"], losses["flashmoe"]):
        assert abs(flash_loss - eager_loss) <= 1e-5 * abs(eager_loss), losses
    for name, expected in final["eager"].items():
        assert rel_err(final["flashmoe"][name].detach(), expected.detach()) <= 1e-4, name


@pytest.mark.parametrize("family", CONVERTED)
def test_converted_weights_are_cached_and_invalidated_by_an_in_place_update(family):
    model = tiny_model(family)
    model.set_experts_implementation("flashmoe")
    name, module = experts_modules(model)[0]
    ids = token_ids(seed=7)
    names = ("gate_up_proj", "down_proj", "gate_up_proj_bias")
    with torch.inference_mode():
        first = model(ids).logits
        cached = {key: hf.cached_conversion(getattr(module, key)) for key in names}
        assert all(tensor is not None for tensor in cached.values())
        again = model(ids).logits
        for key, tensor in cached.items():  # no copy per call
            assert hf.cached_conversion(getattr(module, key)) is tensor, key
    assert torch.equal(first, again)
    with torch.no_grad():
        module.gate_up_proj.mul_(1.5)  # bumps the version counter
    with torch.inference_mode():
        updated = model(ids).logits
        assert hf.cached_conversion(module.gate_up_proj) is not cached["gate_up_proj"]
        assert hf.cached_conversion(module.down_proj) is cached["down_proj"]
        model.set_experts_implementation("eager")
        expected = model(ids).logits
    assert rel_err(updated, expected) <= 1e-5
    # a copy made under inference_mode is not handed to autograd later
    model.set_experts_implementation("flashmoe")
    model(ids).logits.sum().backward()
    assert module.gate_up_proj.grad is not None and module.gate_up_proj.grad.norm() > 0
    torch.save(model, io.BytesIO())  # nothing unpicklable was left on the model
    assert not any(key.startswith("_flashmoe") and key != "_flashmoe_plan" for key in module.__dict__)


def test_repeated_picks_sum_like_eager():
    """A row that picks one expert twice (DeepSeek-V4's hash layers can) counts it twice, as HF does."""
    model = tiny_model("olmoe")
    _, module = experts_modules(model)[0]
    generator = torch.Generator().manual_seed(8)
    hidden_states = torch.randn(5, 32, generator=generator)
    top_k_index = torch.tensor([[1, 1], [2, 3], [0, 0], [7, 6], [5, 5]])
    top_k_weights = torch.rand(5, 2, generator=generator, requires_grad=True)
    expected = module(hidden_states, top_k_index, top_k_weights)
    (expected_grad,) = torch.autograd.grad(expected.sum(), top_k_weights)
    actual = hf.experts_forward(module, hidden_states, top_k_index, top_k_weights)
    (actual_grad,) = torch.autograd.grad(actual.sum(), top_k_weights)
    assert rel_err(actual, expected) <= 1e-5
    assert rel_err(actual_grad, expected_grad) <= 1e-5


def test_expert_parallel_sentinel_contributes_zero():
    model = tiny_model("qwen3_moe")
    _, module = experts_modules(model)[0]
    module._is_expert_parallel = True
    generator = torch.Generator().manual_seed(9)
    hidden_states = torch.randn(4, 32, generator=generator)
    top_k_index = torch.tensor([[1, 8], [8, 8], [2, 3], [8, 4]])  # 8 = E: an expert on another rank
    top_k_weights = torch.rand(4, 2, generator=generator)
    with torch.no_grad():
        actual = hf.experts_forward(module, hidden_states, top_k_index, top_k_weights)
        local = top_k_weights.masked_fill(top_k_index == 8, 0.0)
        expected = hf.experts_forward(module, hidden_states, top_k_index.clamp(max=7), local)
    assert actual[1].abs().max() == 0
    assert rel_err(actual, expected) <= 1e-6


def test_compiled_moe_block_runs_flashmoe():
    """torch.compile of an HF sparse-MoE block (router + experts) with the flashmoe experts."""
    model = tiny_model("olmoe")
    block = model.model.layers[0].mlp
    hidden_states = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        expected = block(hidden_states)
        model.set_experts_implementation("flashmoe")
        compiled = torch.compile(block)
        calls = hf.call_count()
        actual = compiled(hidden_states)
    assert hf.call_count() > calls
    assert rel_err(actual, expected) <= 1e-5


# --- what flashmoe cannot run: named errors, never a silent eager fallback -------------------------

def test_unknown_apply_gate_override_is_a_named_error():
    model = tiny_model("qwen3_moe")
    name, module = experts_modules(model)[0]

    class HomegrownExperts(type(module)):
        def _apply_gate(self, gate_up):
            gate, up = gate_up.chunk(2, dim=-1)
            return torch.tanh(gate) * up

    module.__class__ = HomegrownExperts
    model.set_experts_implementation("flashmoe")
    with pytest.raises(hf.UnsupportedExpertsError, match=r"HomegrownExperts \(qwen3_moe\).*_apply_gate"):
        hf.check_model(model)
    with pytest.raises(hf.UnsupportedExpertsError, match="HomegrownExperts"), torch.no_grad():
        model(token_ids())


def test_unsupported_activation_is_a_named_error():
    model_type, overrides = FAMILIES["qwen3_moe"]
    config = AutoConfig.for_model(model_type, **{**TINY, **overrides, "hidden_act": "quick_gelu"})
    model = AutoModelForCausalLM.from_config(config, experts_implementation="flashmoe")
    with pytest.raises(hf.UnsupportedExpertsError, match=r"Qwen3MoeExperts \(qwen3_moe\).*QuickGELUActivation"):
        hf.check_model(model)


def test_clamped_swiglu_around_a_non_silu_act_fn_is_a_named_error():
    model_type, overrides = FAMILIES["deepseek_v4"]
    config = AutoConfig.for_model(model_type, **{**TINY, **overrides, "hidden_act": "gelu"})
    model = AutoModelForCausalLM.from_config(config)
    with pytest.raises(hf.UnsupportedExpertsError, match=r"DeepseekV4Experts.*clamp.*gelu"):
        hf.check_model(model)


def test_a_device_without_a_native_kernel_is_a_named_error(monkeypatch):
    model = tiny_model("olmoe")
    model.set_experts_implementation("flashmoe")
    monkeypatch.setattr(hf.ops, "has_native_kernel", lambda device, dtype=None: False)
    with pytest.raises(hf.UnsupportedExpertsError, match="no native kernel.*does not\\s+fall back"), torch.no_grad():
        model(token_ids())


def test_register_is_idempotent_and_import_flashmoe_does_not_import_transformers():
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    hf.register()
    hf.register()
    assert ALL_EXPERTS_FUNCTIONS["flashmoe"] is hf.experts_forward
    code = "import sys, flashmoe; flashmoe.moe; assert 'transformers' not in sys.modules, 'imported transformers'"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("family", ["olmoe", "gpt_oss"])
def test_cuda_model_runs_the_cuda_op(family):
    model = tiny_model(family).cuda()
    ids = token_ids().cuda()
    with torch.no_grad():
        expected = model(ids).logits
        model.set_experts_implementation("flashmoe")
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                torch.profiler.ProfilerActivity.CUDA]) as profile:
            actual = model(ids).logits
    assert any(event.name.startswith("flashmoe::") for event in profile.events())
    assert actual.is_cuda and rel_err(actual, expected) <= 1e-5


# --- the other decorator flags and _apply_gate overrides, one experts module each ------------------

MODULE_CASES = {  # family -> (experts class, config overrides, picks per token)
    "muse_spark": ("MuseSparkExperts", dict(moe_hidden_size=32), 2),           # has_post_expert_norm
    "step3p7": ("Step3p7Experts", dict(swiglu_limits=[0.3, 0.3]), 2),          # clamp after the activation
    "bailing_hybrid": ("BailingHybridExperts", dict(swiglu_limits=[0.3, 0.3]), 2),
    "minimax_m3_vl": ("MiniMaxM3VLExperts", dict(swiglu_limit=0.3), 2),        # swiglu_oai, concatenated
    "openai_privacy_filter": ("OpenAIPrivacyFilterExperts", dict(swiglu_limit=0.3), 2),  # transposed, bias
    # non-gated, transposed, relu2; ErgoExperts hands its projections one route per row, weight 1
    "ergo": ("ErgoExpertProjections", {}, 1),
    "aria": ("AriaExperts", {}, 2),                                           # gated, transposed
    "glm5_next": ("Glm5NextTextExperts", dict(swiglu_limit=0.3, num_key_value_heads=4, qk_rope_head_dim=0), 2),  # swiglu_clamp
    "beam": ("BeamExperts", {}, 2),                                           # activation in fp32
    "lfm2_moe": ("Lfm2MoeExperts", {}, 2),                                    # act_fn is F.silu, a function
}


def tiny_experts_module(family: str, class_name: str, overrides: dict, model_type: str = None):
    import importlib
    import inspect

    settings = {**TINY, **overrides}
    text_config = AutoConfig.for_model(model_type or family, **settings).get_text_config()
    for key, value in settings.items():  # a composite config keeps its own text defaults
        setattr(text_config, key, value)
    module_class = getattr(importlib.import_module(f"transformers.models.{family}.modeling_{family}"), class_name)
    takes_layer = "layer_idx" in inspect.signature(module_class.__init__).parameters
    module = module_class(text_config, 0) if takes_layer else module_class(text_config)
    randomize(module, seed=sum(map(ord, family)))
    return module


@pytest.mark.parametrize("family", MODULE_CASES)
def test_each_flag_and_gate_override_matches_eager(family):
    class_name, overrides, top_k = MODULE_CASES[family]
    module = tiny_experts_module(family, class_name, overrides)
    generator = torch.Generator().manual_seed(12)
    hidden = module.config.moe_hidden_size if family == "muse_spark" else 32
    x = torch.randn(6, hidden, generator=generator, requires_grad=True)
    top_k_index = torch.stack([torch.randperm(module.num_experts, generator=generator)[:top_k] for _ in range(6)])
    if family == "ergo":  # its eager projections take unit weights and ignore them
        top_k_weights = torch.ones(6, top_k)
        inputs = [x, *module.parameters()]
    else:
        top_k_weights = torch.rand(6, top_k, generator=generator, requires_grad=True)
        inputs = [x, *module.parameters(), top_k_weights]
    module.config._experts_implementation = "eager"
    expected = module(x, top_k_index, top_k_weights)
    expected_grads = torch.autograd.grad(expected.square().sum(), inputs, allow_unused=True)
    module.config._experts_implementation = "flashmoe"
    calls = hf.call_count()
    actual = module(x, top_k_index, top_k_weights)
    assert hf.call_count() == calls + 1
    assert rel_err(actual, expected) <= 1e-5
    actual_grads = torch.autograd.grad(actual.square().sum(), inputs, allow_unused=True)
    for tensor, want, got in zip(inputs, expected_grads, actual_grads):
        if want is None or want.norm() == 0:
            assert got is None or got.norm() == 0
        else:
            assert got.shape == tensor.shape and rel_err(got, want) <= 1e-4


def test_a_two_argument_activation_is_a_named_error():
    """Inkling2's _apply_gate calls a soft-capped SwiGLU module the op does not compute."""
    module = tiny_experts_module("inkling2", "Inkling2Experts", {})
    with pytest.raises(hf.UnsupportedExpertsError, match=r"Inkling2Experts.*_apply_gate"):
        hf.plan(module)


# --- every experts class of the installed transformers (opt-in: FLASHMOE_HF_ALL_FAMILIES=1) ----------

KNOWN_UNSUPPORTED = {"Inkling2Experts", "Inkling2LoopExperts"}  # soft-capped SwiGLU act_fn(gate, up)
# Settings that let most families build a tiny config; a family whose config refuses them is skipped.
TINY_ANY = dict(TINY, num_key_value_heads=4, moe_hidden_size=32, swiglu_limit=0.3, swiglu_limits=[0.3, 0.3],
                qk_rope_head_dim=0)

ALL_FAMILIES_OVERRIDES = {"ernie4_5_vl_moe": dict(moe_intermediate_size=[16, 16])}  # text and vision experts


def decorated_experts_classes():
    import os
    import pathlib
    import re

    if os.environ.get("FLASHMOE_HF_ALL_FAMILIES") != "1":
        return [pytest.param(None, None, marks=pytest.mark.skip(reason="set FLASHMOE_HF_ALL_FAMILIES=1 to run "
                                                                       "every experts class of transformers"))]
    models = pathlib.Path(transformers.__file__).parent / "models"
    found = []
    for path in sorted(models.glob("*/modeling_*.py")):
        for class_name in re.findall(r"@use_experts_implementation(?:\([^)]*\))?\s*\nclass (\w+)\(", path.read_text()):
            found.append((path.parent.name, class_name))
    return found


@pytest.mark.parametrize("family, class_name", decorated_experts_classes())
def test_every_decorated_experts_class_runs_or_names_its_error(family, class_name):
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    variants = sorted((name for name in CONFIG_MAPPING_NAMES if name.startswith(family) and name != family
                       and "vision" not in name and "audio" not in name),
                      key=lambda name: "text" not in name)  # a composite family's text config first
    model_types = [family] + variants
    overrides = {key: value for key, value in TINY_ANY.items() if TINY.get(key, None) != value}
    overrides.update(ALL_FAMILIES_OVERRIDES.get(family, {}))
    fewer = {key: value for key, value in overrides.items() if key not in ("qk_rope_head_dim", "swiglu_limits")}
    module, errors = None, []
    for model_type in model_types:
        for settings in (overrides, fewer):
            try:
                module = tiny_experts_module(family, class_name, settings, model_type)
                break
            except Exception as error:  # the tiny config, not flashmoe
                errors.append(f"{model_type}: {type(error).__name__}: {str(error)[:80]}")
        if module is not None:
            break
    if module is None:
        pytest.skip(f"no tiny {family} config: {errors[-1]}")
    if class_name in KNOWN_UNSUPPORTED:
        with pytest.raises(hf.UnsupportedExpertsError, match=class_name):
            hf.plan(module)
        return
    options = hf.plan(module)
    up = module.gate_up_proj if options.gated else module.up_proj
    hidden = up.shape[1] if options.is_transposed else up.shape[-1]
    top_k = 1 if class_name.endswith("Projections") else 2  # Ergo's projections take one route per row
    generator = torch.Generator().manual_seed(13)
    x = torch.randn(6, hidden, generator=generator)
    top_k_index = torch.stack([torch.randperm(module.num_experts, generator=generator)[:top_k] for _ in range(6)])
    top_k_weights = torch.ones(6, 1) if top_k == 1 else torch.rand(6, top_k, generator=generator)
    with torch.no_grad():
        module.config._experts_implementation = "eager"
        expected = module(x, top_k_index, top_k_weights)
        module.config._experts_implementation = "flashmoe"
        actual = module(x, top_k_index, top_k_weights)
    assert rel_err(actual, expected) <= 1e-5
