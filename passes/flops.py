"""What a node computes, for the solver's time objective: floating-point operations of
matmul-class ops (``linear``, every op ``torch.utils.flop_counter`` counts, and attention) at
the planning sizes, whole or under a strategy's placements.

The solver adds each strategy's compute time to its communication time, so that a plan which
runs a matmul whole on every rank (replicated weights, no collective) pays for the compute it
repeats.  With the default weight-memory budget this decides only among plans of equal weight
memory; with ``make_plan(memory_budget=...)`` it is what keeps the solver from replicating
every weight to save its collectives.
"""
from __future__ import annotations

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import guarding_hint_or_throw
from torch.utils.flop_counter import flop_registry, sdpa_flop_count

from autotp.passes.rules import tensor_inputs
from autotp.passes.rules.attention import ATTENTION_OPS
from autotp.placement import local_shape

aten = torch.ops.aten


def planned_shape(v: torch.Tensor, plan_sizes: dict) -> list[int]:
    """``v``'s shape with its symbolic sizes at the planning values (``ctx.plan_sizes``)."""
    shape = []
    for s in v.shape:
        if isinstance(s, torch.SymInt):
            try:
                shape.append(int(s.node.expr.xreplace(plan_sizes)) if plan_sizes else int(guarding_hint_or_throw(s)))
            except (TypeError, ValueError):
                shape.append(int(guarding_hint_or_throw(s)))
        else:
            shape.append(int(s))
    return shape


def counted(node: fx.Node) -> bool:
    """Whether ``node`` is matmul-class work the time objective weighs."""
    if node.op != "call_function":
        return False
    return node.target == aten.linear.default or str(node.target) in ATTENTION_OPS \
        or getattr(node.target, "overloadpacket", None) in flop_registry


def flops(node: fx.Node, plan_sizes: dict, placements=None, world: int = 1) -> float:
    """Forward FLOPs of ``node`` at the planning sizes; with ``placements`` (one per tensor
    input, in ``tensor_inputs`` order) what one rank computes when its inputs are placed so."""
    inputs = tensor_inputs(node)

    def shape(i: int, a: fx.Node) -> list[int]:
        full = planned_shape(a.meta["val"], plan_sizes)
        if placements is None or placements[i] is None:
            return full
        return [int(d) for d in local_shape(full, placements[i], world)]

    shapes = {a: shape(i, a) for i, a in enumerate(inputs)}
    if node.target == aten.linear.default:              # (..., K) x (N, K)^T
        x, w = shapes[node.args[0]], shapes[node.args[1]]
        rows = 1
        for d in x[:-1]:
            rows *= d
        return 2.0 * rows * x[-1] * w[0]
    if str(node.target) in ATTENTION_OPS:               # q (B, H, L, E), k (B, Hk, S, E), v (B, Hk, S, Ev)
        q, k, v = (shapes[a] for a in node.args[:3])
        return float(sdpa_flop_count(q, [q[0], q[1], *k[2:]], [q[0], q[1], *v[2:]]))
    meta = {a: torch.empty(s, dtype=a.meta["val"].dtype, device="meta") for a, s in shapes.items()}
    args = fx.node.map_arg(node.args, lambda a: meta.get(a, a))
    kwargs = fx.node.map_arg(node.kwargs, lambda a: meta.get(a, a))
    out = node.meta.get("val")
    out = torch.empty(planned_shape(out, plan_sizes), dtype=out.dtype, device="meta") \
        if isinstance(out, torch.Tensor) else None
    try:
        return float(flop_registry[node.target.overloadpacket](*args, **kwargs, out_val=out))
    except Exception:  # noqa: BLE001 — a formula that cannot read these arguments counts nothing
        return 0.0
