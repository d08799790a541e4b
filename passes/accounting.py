"""What the solver's objective counts, per rank, at the planning sizes (``ctx.plan_sizes``): the
bytes of weights (``fraction`` of each under a placement; ``large_weights``, the ones weight
memory is minimised over) and of activations (``activation_bytes``, ``activation_mib``).
``passes/flops.py`` counts what the nodes compute."""
from __future__ import annotations

import numpy as np
import torch
import torch.fx as fx

from autotp.passes.context import PassContext
from autotp.passes.flops import planned_shape
from autotp.passes.rules import tensor_inputs, val
from autotp.passes.rules.views import WEIGHT_VIEWS
from autotp.placement import R, local_shape, splits

SMALL_WEIGHT = 0.1   # matrices under this fraction of the median matrix are not memory-critical


def fraction(v: torch.Tensor, p, world: int) -> float:
    """The part of ``v`` one rank holds under placement ``p`` (1/N for a shard, 1/a for kv heads
    replicated over groups of N/a ranks, 1 when replicated)."""
    if p is None or not v.ndim:
        return 1.0
    local = local_shape(v.shape, p, world)
    return float(np.prod(local) / max(1, np.prod(list(v.shape))))


def nbytes(t) -> int:
    """Bytes of ``t`` at its own (example) sizes; 0 for anything not a tensor."""
    return t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0


def planned_bytes(node: fx.Node, ctx: PassContext) -> float:
    """Bytes of ``node``'s tensor at the planning sizes (``ctx.plan_sizes``): symbolic batch
    and sequence dims take those values, so costs reflect a training step, not the example."""
    v = node.meta.get("val")
    if not isinstance(v, torch.Tensor):
        return float(nbytes(val(node)))
    return tensor_bytes(v, ctx)


def tensor_bytes(v: torch.Tensor, ctx: PassContext) -> float:
    """Bytes of tensor value ``v`` at the planning sizes."""
    return float(np.prod(planned_shape(v, ctx.plan_sizes), dtype=np.float64) * v.element_size())


def weights(gm: fx.GraphModule, ctx: PassContext) -> set[fx.Node]:
    """Parameters and views of them (a transposed expert weight is still the weight): tensor
    parallelism never moves these; only activations are communicated."""
    out = set()
    for n in gm.graph.nodes:
        if n.op == "placeholder" and n.name in ctx.params:
            out.add(n)
        elif n.op == "call_function" and str(n.target) in WEIGHT_VIEWS:
            ins = n.all_input_nodes
            if ins and all(a in out for a in ins):
                out.add(n)
    return out


def activation_bytes(node: fx.Node, output, ctx: PassContext) -> float:
    """MiB per rank of ``node``'s floating outputs at the planning sizes under placement(s)
    ``output``: a shard holds 1/N, anything else (R, P, D) the whole tensor."""
    v = node.meta.get("val")
    vs, ps = (v, output) if isinstance(v, (tuple, list)) else ((v,), (output,))
    if not isinstance(ps, tuple):
        ps = (ps,) * len(vs)
    total = 0.0
    for t, p in zip(vs, ps):
        if isinstance(t, torch.Tensor) and t.is_floating_point():
            total += tensor_bytes(t, ctx) / (ctx.world if p is not None and splits(p) else 1)
    return total / 2**20


def is_activation(node: fx.Node, weight_like: set, carries_grad: bool) -> bool:
    """A tensor that counts as activation memory: computed (not a weight or a view of one),
    allocated (not a view or no-op cast), and, when training, part of the autograd graph
    (what backward keeps alive; position tables and masks are not)."""
    return node.op == "call_function" and node not in weight_like and carries_grad and not _aliases_input(node)


def activation_mib(gm: fx.GraphModule, ctx: PassContext) -> float:
    """Activation MiB per rank of a solved graph at the planning sizes, counted as the solver
    counts it: every activation tensor once, plus the output of every redistribution (a
    gathered copy is memory too).  An upper bound on what backward keeps."""
    weight_like = weights(gm, ctx)
    total, moved = 0.0, set()
    for n in gm.graph.nodes:
        info = n.meta.get("autotp", {})
        if n.op == "output" and not ctx.sharded_outputs:          # outputs come back replicated
            for i, t in enumerate(tensor_inputs(n)):
                have = t.meta.get("autotp", {}).get("placement")
                if have not in (None, R) and i not in ctx.state_outputs and (t, R) not in moved:
                    moved.add((t, R))
                    total += planned_bytes(t, ctx) / 2**20
        if "strategy" not in info:
            continue
        if is_activation(n, weight_like, info.get("grad", True)):
            total += activation_bytes(n, info["strategy"].output, ctx)
        if n.op == "placeholder":
            continue
        for t, need in zip(tensor_inputs(n), info["strategy"].inputs):
            have = t.meta.get("autotp", {}).get("placement")
            if have is not None and have != need and t not in weight_like and (t, need) not in moved:
                moved.add((t, need))
                total += planned_bytes(t, ctx) / (ctx.world if splits(need) else 1) / 2**20
    return total


def _aliases_input(node: fx.Node) -> bool:
    """Views and no-op casts allocate nothing: they are not activation memory of their own."""
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        if any(r.alias_info is not None for r in target._schema.returns):
            return True
        if target in (torch.ops.aten.to.dtype, torch.ops.aten._to_copy.default, torch.ops.aten.to.dtype_layout):
            src, out = val(node.args[0]) if node.args else None, val(node)
            return isinstance(src, torch.Tensor) and isinstance(out, torch.Tensor) and src.dtype == out.dtype
    return False


def large_weights(nodes: list[fx.Node], ctx: PassContext) -> set[fx.Node]:
    """The weights whose memory the plan minimises first: matrices (>= 2 dims) of at least a
    tenth of the median matrix size.  Vectors (norm scales, biases) and small matrices (a MoE
    router, E x d) are O(d) next to the rest and may stay replicated when that saves a collective."""
    mats = [n for n in nodes if n.op == "placeholder" and n.name in ctx.params and val(n).ndim >= 2]
    if not mats:
        return set()
    sizes = sorted(nbytes(val(n)) for n in mats)
    median = sizes[len(sizes) // 2]
    return {n for n in mats if nbytes(val(n)) >= SMALL_WEIGHT * median}
