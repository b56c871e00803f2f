"""flashmoe: a Mixture-of-Experts layer as one persistent kernel, with a CPU backend.

Public API:
    flashmoe.moe(...)        functional MoE forward (torch.ops.flashmoe.moe_forward underneath)
    flashmoe.MoE(...)        nn.Module, with MoE.from_hf(block)
    flashmoe.reference       the pure-PyTorch executable specification
    flashmoe.build_info()    what the native module was compiled with
    flashmoe.distributed     expert parallelism across processes (import flashmoe.distributed)
    flashmoe.hf              HF transformers' experts_implementation="flashmoe" (import it
                             explicitly; ``import flashmoe`` never imports transformers)
"""

from . import reference
from ._build import build_info
from .functional import moe
from .layer import MoE
from .ops import empty_cache
from .reference import Routing, load_balancing_loss, router_z_loss

__all__ = ["moe", "MoE", "Routing", "reference", "build_info", "empty_cache", "load_balancing_loss", "router_z_loss"]
__version__ = "0.1.0"
