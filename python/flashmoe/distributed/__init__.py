"""Expert parallelism across processes: ``flashmoe.distributed`` over ``torch.distributed``.

Each process (one per device, e.g. under ``torchrun``) holds its own ``L = E / W`` experts and
its own tokens. Each rank's output is bitwise equal to single-process ``flashmoe.moe`` on its
tokens. See docs/distributed.md.

    flashmoe.distributed.moe(...)                 the functional form, with autograd
    flashmoe.distributed.ExpertParallelMoE(...)   the nn.Module form (``from_moe`` shards a MoE)
    flashmoe.distributed.Context                  owner of the group's resources (heaps, epoch)

Transports: "symmetric" (CPU, one host), "nvshmem" (CUDA: the persistent kernel over NVSHMEM
heaps; not yet run on a GPU), "all_to_all" (any backend, any hosts), "auto".
"""

from .context import TRANSPORTS, Context, LayerConfig, destroy_all
from .functional import moe
from .layer import ExpertParallelMoE

__all__ = ["moe", "ExpertParallelMoE", "Context", "LayerConfig", "TRANSPORTS", "destroy_all"]
