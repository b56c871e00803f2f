"""The ``symmetric`` transport on the CPU: the protocol of docs/protocol.md across processes.

Each rank's symmetric heap is one POSIX shared-memory segment laid out by ``HeapLayout``
(``_C.SharedMemoryHeaps``); every rank maps every peer's segment, and the native dataflow
runtime (``_C.Cluster`` with that transport, running this rank alone) does the one-sided copies
and release-stored SignalWords exactly as the simulated ranks do. Segment names cross processes
once, at setup; addresses never do. Each rank unlinks its segment as soon as every rank has mapped
it, so nothing stays in /dev/shm, whatever happens to the processes later.

Epochs carry across calls inside the cluster: no barrier per call and no flag clearing. The heap
is sized for ``max_tokens`` per rank. A rank that brings more announces it in its control page
(in front of its heap: [call number, tokens]) and runs the epoch with no tokens; every rank reads
the control pages after the epoch (each rank's dispatch signals were acquired by then), and if
any rank asked, all rebuild larger heaps together and the askers run their call again.
"""

from __future__ import annotations

import ctypes
import os
import uuid

import torch
import torch.distributed as dist

from .. import _C, reference
from ..ops import _address, _empty_outputs, _shared_addresses, problem_shape, selection_bias_values
from .context import _bucket


class SymmetricHeaps:
    def __init__(self, context) -> None:
        self.context = context
        self.calls = 0
        self._heaps = None
        self._cluster = None
        self._build(context.max_tokens)

    @property
    def heap_bytes(self) -> int:
        return self._cluster.heap_bytes if self._cluster is not None else 0

    def epoch(self) -> int:
        return self._cluster.epoch(self.context.rank) if self._cluster is not None else 0

    def _build(self, max_tokens: int) -> None:
        """Collective: create this rank's segment, map every peer's, unlink once all are mapped."""
        context, config = self.context, self.context.config
        self.close()
        element_size = torch.empty((), dtype=config.dtype).element_size()
        layout = _C.HeapLayout(_C.ExpertPlacement(context.world_size, config.num_experts), max_tokens, config.top_k,
                               config.hidden_size, element_size)
        if layout.region_rows() > _C.SignalWord.max_rows:
            raise ValueError(f"max_tokens={max_tokens} is too large for one SignalWord's row fields")
        name = f"/flashmoe-{os.getpid()}-{uuid.uuid4().hex[:12]}-r{context.rank}"
        error = None
        try:
            heaps = _C.SharedMemoryHeaps(world_size=context.world_size, local_rank=context.rank,
                                         heap_bytes=layout.total_bytes(), name=name)
        except Exception as failure:  # every rank must still reach the exchange below
            heaps, error = None, f"rank {context.rank}: {failure}"
        names: list = [None] * context.world_size
        dist.all_gather_object(names, (name, error), group=context.group)
        errors = [e for _, e in names if e]
        if not errors:
            try:
                for peer, (peer_name, _) in enumerate(names):
                    heaps.map_peer(peer, peer_name)
            except Exception as failure:
                errors.append(f"rank {context.rank}: {failure}")
        mapped: list = [None] * context.world_size
        dist.all_gather_object(mapped, errors, group=context.group)
        if heaps is not None:
            heaps.unlink_own()  # every rank has mapped it, or failed: nothing may outlive the processes
        errors = sorted({e for rank_errors in mapped for e in rank_errors})
        if errors:
            raise RuntimeError("flashmoe.distributed: setting up the symmetric heaps failed: " + "; ".join(errors))
        shape = problem_shape(config.hidden_size, config.ffn_size, config.num_experts, config.top_k,
                              gated=config.gated, activation=config.activation, normalize=config.normalize,
                              scoring=config.scoring, dtype=config.dtype, has_router_bias=config.router_bias,
                              has_b1=config.expert_bias_b1, has_b2=config.expert_bias_b2,
                              shared_ffn=config.shared_ffn_size, has_shared_gate=config.shared_gate,
                              **config.routing_options(), **config.activation_options())
        self._heaps = heaps
        self._cluster = _C.Cluster(shape=shape, world_size=context.world_size, max_tokens=max_tokens,
                                   threads_per_rank=context.threads, watchdog_seconds=context.watchdog_seconds,
                                   transport=heaps)
        context.max_tokens = max_tokens
        self.max_tokens = max_tokens

    def close(self) -> None:
        self._cluster = None
        self._heaps = None

    def _control(self, rank: int):
        base = self._heaps.control_address(rank)
        return ctypes.c_int64.from_address(base), ctypes.c_int64.from_address(base + 8)

    def _run(self, x, router_weight, w1, w2, router_bias, b1, b2, capacity, selection_bias, shared):
        if self._cluster is None:
            raise RuntimeError("flashmoe.distributed: the symmetric heaps of this Context are gone "
                               "(destroyed, or a failed call broke them)")
        outputs = _empty_outputs(x, router_weight, self.context.config.top_k)
        y, topk_ids, topk_weights, expert_counts, router_logits, dropped = outputs
        rank_tuple = (_address(x), x.shape[0], -1 if capacity is None else capacity, _address(y), _address(topk_ids),
                      _address(topk_weights), _address(expert_counts), _address(router_logits), _address(dropped))
        weights = dict(router_weight=_address(router_weight), router_bias=_address(router_bias), w1=_address(w1),
                       b1=_address(b1), w2=_address(w2), b2=_address(b2), selection_bias=_address(selection_bias),
                       **_shared_addresses(*shared))
        try:
            self._cluster.forward(**weights, calls=[[rank_tuple]],
                                  first_expert=self.context.rank * self.context.local_experts)
        except RuntimeError as error:
            self.close()  # its heaps hold a half-finished epoch: the Context cannot run again
            raise RuntimeError(f"flashmoe.distributed: rank {self.context.rank} gave up waiting for its peers "
                               f"(symmetric transport; a peer died, raised or stopped calling): {error}") from error
        return outputs

    def forward(self, x, router_weight, w1, w2, router_bias, b1, b2, capacity_factor, selection_bias, shared):
        config = self.context.config
        selection_bias = selection_bias_values(selection_bias, x)  # held until the calls return
        self.calls += 1
        tokens = x.shape[0]
        capacity = reference.expert_capacity(capacity_factor, tokens, config.top_k, config.num_experts)
        oversized = tokens > self.max_tokens
        if oversized:
            call_word, tokens_word = self._control(self.context.rank)
            tokens_word.value = tokens
            call_word.value = self.calls  # published by this epoch's release-stored dispatch signals
        outputs = self._run(x[:0] if oversized else x, router_weight, w1, w2, router_bias, b1, b2, capacity,
                            selection_bias, shared)
        # Every rank acquired every peer's dispatch signals of this epoch, so their requests are visible.
        requests = []
        for peer in range(self.context.world_size):
            call_word, tokens_word = self._control(peer)
            if call_word.value == self.calls:
                requests.append(tokens_word.value)
        if not requests:
            return outputs
        self._build(_bucket(max(requests)))
        self.calls = 0  # the new heaps' control pages start at zero
        self.calls += 1
        rerun = self._run(x if oversized else x[:0], router_weight, w1, w2, router_bias, b1, b2, capacity,
                          selection_bias, shared)
        return rerun if oversized else outputs
