"""autotp: automatic tensor parallelism for unmodified PyTorch models.

    pmodel = autotp.parallelize(model, example_inputs=(ids,))    # inside torchrun
    plan = autotp.plan(model, example_inputs=(ids,), world_size=8)  # no process group needed
    out = pmodel.generate(ids, attention_mask=mask, max_new_tokens=16)  # HF generate args, KV cache split by heads
    loss = autotp.cross_entropy(logits, labels)                   # on vocab-sharded logits, no gather

The public API is this module; everything else may change.
"""
from __future__ import annotations

import datetime

import torch
import torch.distributed as dist

from autotp.checkpoint import full_state_dict, init_empty_weights, load_checkpoint
from autotp.placement import Grid, Partial, Replicate, Shard, fmt
from autotp.plan import Plan, make_plan
from autotp.program import check_same_plan
from autotp.runtime import DEFAULT_TIMEOUT, ParallelModule, clip_grad_norm_, tp_mesh
from autotp.generation import generate
from autotp.loss import cross_entropy
from autotp.base import AutoTPError
from autotp.passes.rules import Strategy, register_rule

__all__ = ["parallelize", "plan", "generate", "Plan", "ParallelModule", "AutoTPError", "register_rule", "Strategy",
           "Shard", "Replicate", "Partial", "Grid", "fmt", "init_empty_weights", "load_checkpoint", "full_state_dict",
           "clip_grad_norm_", "cross_entropy"]
__version__ = "0.1.0"


def plan(model: torch.nn.Module, example_inputs=(), example_kwargs: dict | None = None, *, world_size: int,
         strict: bool = False, link="nvlink-h100", overrides: dict | None = None, training: bool = True,
         sharded_outputs: bool = False, sequence_parallel: bool = False, max_activation_bytes: float | None = None,
         param_dtype: torch.dtype | None = None, memory_budget: float | str | None = None, dump=None) -> Plan:
    """Plan tensor parallelism for ``model`` over ``world_size`` ranks, in this one process.

    Needs no process group and no weights: a model on the meta device plans the same way.
    ``overrides`` pins parameter placements by glob (``{"*.down_proj.weight": Replicate()}``);
    ``strict`` makes an op with no sharding rule an error instead of running replicated.
    ``param_dtype``: plan as if the parameters were in that dtype (as ``parallelize``).
    ``memory_budget``: weight bytes per rank the plan may use (as ``parallelize``).
    """
    return make_plan(model, example_inputs, example_kwargs, world_size=world_size, strict=strict, link=link,
                     overrides=overrides, training=training, sharded_outputs=sharded_outputs,
                     sequence_parallel=sequence_parallel, max_activation_bytes=max_activation_bytes,
                     param_dtype=param_dtype, memory_budget=memory_budget, dump=dump)


def parallelize(model: torch.nn.Module, example_inputs=(), example_kwargs: dict | None = None, *, mesh=None,
                strict: bool = False, link="nvlink-h100", overrides: dict | None = None,
                sharded_outputs: bool = False, timeout: datetime.timedelta = DEFAULT_TIMEOUT,
                check_plan: bool = True, check_inputs: bool = False, sequence_parallel: bool = False,
                max_activation_bytes: float | None = None, activation_checkpointing: str | None = None,
                param_dtype: torch.dtype | None = None, memory_budget: float | str | None = None,
                plan: Plan | None = None, dump=None) -> ParallelModule:
    """Shard ``model`` over the "tp" dimension of ``mesh`` (default: every rank) and return the
    rank-local module.  Outputs equal the unsharded model's (replicated on every rank, or as
    DTensors in the plan's placement with ``sharded_outputs=True``: shards or replicated, never
    partial sums, which the plan settles by the cheaper of a reduce-scatter to the last dim's
    shard and an all-reduce); gradients land in the
    parameters, which are DTensors with their original names.

    The model's parameters are replaced in place by their shards.  Every rank must call this
    with the same model and example; ``check_plan`` verifies that all ranks made the same plan.
    ``timeout`` bounds every collective when autotp starts the process group itself.
    ``dump="dir"`` (or ``AUTOTP_DUMP=dir``) writes every pass's graph as text and SVG.
    ``check_inputs=True`` (debug) checks on every call that all ranks pass the same inputs.
    ``sequence_parallel=True`` minimises activation memory before communication time: the
    norms and residual adds between sharded matmuls are split along the sequence (Megatron-SP;
    same bytes, each all-reduce becomes a reduce-scatter + all-gather); the sequence length
    must then divide by the world size.  ``max_activation_bytes`` (per rank, at the planning
    batch 4 x seq 2048, as ``Plan.activation_mib`` counts): the fastest plan within that cap —
    the solver splits the sequence only where the cap requires it.

    The returned module keeps the model's hierarchy: each decoder layer is a rank-local module
    at its path owning its shards (``pmodel.blocks()``), so ``fully_shard`` per layer,
    ``checkpoint_wrapper`` and per-layer ``torch.compile`` work as on the plain model.
    ``activation_checkpointing``: None (keep every activation), "full" (recompute each layer
    in backward) or "selective" (keep matmul, attention and collective outputs; recompute the
    pointwise ops and norms, so no collective runs twice).  A model whose own checkpointing
    flag is on (Hugging Face's ``gradient_checkpointing_enable()``) gets "full", noted in the plan.

    ``param_dtype``: plan the graph as if the floating-point parameters were in that dtype — what
    FSDP2's ``MixedPrecisionPolicy(param_dtype=...)`` feeds the forward — while the parameters
    stay in their own dtype (fp32 master weights, gradients and optimizer state).  The graph
    keeps the casts of its trace (RMSNorm's ``.to(input_dtype)``), so a plan runs only with
    parameters of the dtype it was planned in: with ``param_dtype=torch.bfloat16``, apply
    ``fully_shard(..., mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16))`` to each of
    ``pmodel.blocks()`` and to ``pmodel`` (docs/fsdp2.md, "Mixed precision").  None: the
    parameters' own dtype.

    ``memory_budget``: the weight bytes per rank the plan may use (a number, or a string such
    as "40GiB" / "12 GB"), to spend on replicating weights where that makes a step faster
    (fewer collectives, weighed against the compute it repeats); by default the least any plan
    needs, plus what keeping kv heads whole costs when there are fewer kv heads than ranks.  The
    plan's notes say what it spent and saved.  (Weights only: ``Plan.memory`` estimates a whole
    training step's peak.)

    ``plan``: a plan made beforehand (``autotp.plan`` with the same example and options, e.g.
    once for a job on the meta device) instead of planning on every rank; it must be for this
    mesh's size and this model's parameter names and shapes (checked).  The planning options
    (``strict``, ``sharded_outputs``, ``sequence_parallel``, ...) are then the plan's own.
    """
    # a mesh with other dims (FSDP2 on "dp"): only placements FSDP2 describes (PassContext.dp_sharded)
    mesh = tp_mesh(mesh, timeout)
    dp_sharded = not _whole_mesh(mesh)
    rank0 = dist.get_rank() == 0
    if plan is not None:
        plan.check_fits(model, mesh.size(), dp_sharded)
        p = plan
    else:
        p = make_plan(model, example_inputs, example_kwargs, world_size=mesh.size(), strict=strict, link=link,
                      overrides=overrides, training=True, sharded_outputs=sharded_outputs,
                      sequence_parallel=sequence_parallel, max_activation_bytes=max_activation_bytes,
                      dump=dump if rank0 else False, dp_sharded=dp_sharded, param_dtype=param_dtype,
                      memory_budget=memory_budget)
    if check_plan and mesh.size() > 1:
        check_same_plan(p, mesh)
    return ParallelModule(model, p, mesh, check_inputs=check_inputs, activation_checkpointing=activation_checkpointing)


def _whole_mesh(mesh) -> bool:
    """Whether ``mesh`` is a mesh of its own, not the "tp" dim of a larger one."""
    try:
        root = mesh._get_root_mesh()
    except (AttributeError, RuntimeError):        # a torch without it: assume a larger mesh
        return False
    return root is None or root is mesh or root.ndim == 1
