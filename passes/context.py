"""State shared by the passes of one compilation: the world, the options, the notes."""
from __future__ import annotations

import dataclasses
from typing import Any

from autotp.base import (AutoTPError, block_path, layer_index, module_path, node_layer,  # noqa: F401 — re-exported
                         user_line, where)


@dataclasses.dataclass
class PassContext:
    """Everything a pass may read besides the graph.

    world: tensor-parallel world size.  rank: this rank (0 when only planning).
    group: process-group name the collectives use ("tp" when only planning).
    strict: an op with no sharding rule is an error instead of running replicated.
    training: count backward communication in the cost (gradients flow).
    link: cost-model link preset name or bandwidth (bytes/s).
    sharded_outputs: return outputs in the placement the plan gives them (as DTensors)
        instead of replicating them.
    pins: parameter name -> placement the user fixed (``overrides=``).
    plan_sizes: size symbol -> value at which the solver weighs communication.
    size_names: size symbol -> "batch" / "seq".
    sequence_parallel: after weight memory, minimise activation memory per rank (Megatron-SP:
        the regions between sharded matmuls split along the sequence) before communication time.
    dp_sharded: the tensor-parallel mesh is one dim of a larger mesh, and FSDP2 shards the
        parameters again over another dim (on their dim 0).  Then no placement FSDP2 cannot
        describe is offered: no EP x TP ``Grid`` of the experts (its gradients did not gather,
        torch 2.13) and no strided shard on dim 0 (``S(0)xf``, a fused bias or a kv-head-split
        ``v_proj``: FSDP2 labels the (dp, tp) shard ``_StridedShard(0)`` twice, which does not
        describe the layout, so ``full_tensor()`` and checkpoints of it were scrambled).
    state_outputs: output slot (index among the graph's tensor outputs) -> placeholder name of the
        user input it is the new value of (a KV cache carried from step to step): that input may
        be sharded, and the output keeps exactly its placement, never communicated.
    """
    world: int
    rank: int = 0
    group: str = "tp"
    strict: bool = False
    training: bool = True
    link: Any = "nvlink-h100"
    sharded_outputs: bool = False
    pins: dict = dataclasses.field(default_factory=dict)
    params: dict = dataclasses.field(default_factory=dict)      # placeholder name -> parameter name
    buffers: dict = dataclasses.field(default_factory=dict)     # placeholder name -> buffer name
    user_inputs: list = dataclasses.field(default_factory=list)  # placeholder names of user inputs
    notes: list = dataclasses.field(default_factory=list)        # what the plan wants a reader to know
    solver_stats: dict = dataclasses.field(default_factory=dict)
    # the sizes costs are evaluated at: export's size symbols -> planning values (batch 4,
    # sequence 2048 by default: a training shape, not the tiny example used for tracing)
    plan_sizes: dict = dataclasses.field(default_factory=dict)
    size_names: dict = dataclasses.field(default_factory=dict)
    sequence_parallel: bool = False
    # a cap on activation memory per rank (MiB at the planning sizes, as ``Plan.activation_mib``
    # counts it): the fastest plan within it — sequence parallelism only where the cap needs it
    max_activation_mib: float | None = None
    dp_sharded: bool = False
    # weight bytes per rank the plan may use (``make_plan(memory_budget=)``); None: the least
    # any plan needs plus what keeping kv heads whole costs (``solve``'s docstring)
    memory_budget: float | None = None
    device: str = "h100-sxm"          # the FLOP/s preset (``autotp.cost.DEVICES``) compute time is weighed at

    @property
    def activation_terms(self) -> bool:
        """Whether the plan weighs activation memory (and may split activations by sequence)."""
        return self.sequence_parallel or self.max_activation_mib is not None
    state_outputs: dict = dataclasses.field(default_factory=dict)

    def note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)
