"""localize: make the graph compute on this rank's shards.

Runs each chosen strategy's ``localize`` hook (a view's target shape becomes the local shape,
a vocab-parallel embedding becomes a masked local lookup, ...), then *checks* the result:
the graph is run on fake tensors of the local shapes and every node's shape must equal its
global shape with the sharded dim divided by the world size.  A rule that forgot an argument
fails here, at compile time, naming the node, instead of computing a wrong number later.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import DataDependentOutputException, DynamicOutputShapeException, FakeTensorMode

from autotp import comm
from autotp.placement import fmt, local_shape
from autotp.passes.context import AutoTPError, PassContext, where
from autotp.passes.rules import val


@dataclasses.dataclass
class LocalContext:
    world: int
    rank: int


def expected_local_shape(node: fx.Node, world: int):
    v, p = val(node), node.meta.get("autotp", {}).get("placement")
    if isinstance(v, torch.Tensor):
        return tuple(local_shape(v.shape, p, world)) if p is not None else tuple(v.shape)
    if isinstance(v, (tuple, list)) and isinstance(p, tuple):
        return tuple(tuple(local_shape(x.shape, q, world)) if isinstance(x, torch.Tensor) and q is not None
                     else None for x, q in zip(v, p))
    return None


def localize(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    lctx = LocalContext(ctx.world, ctx.rank)
    for node in gm.graph.nodes:
        strategy = node.meta.get("autotp", {}).get("strategy")
        if strategy is not None and strategy.localize is not None and node.op == "call_function":
            strategy.localize(node, strategy, lctx)
    gm.graph.lint()
    gm.recompile()
    check_local_shapes(gm, ctx.world)
    return gm


class _ShapeCheck(fx.Interpreter):
    def __init__(self, gm, world):
        super().__init__(gm)
        self.world = world

    def call_function(self, target, args, kwargs):
        node = self._node
        if target in comm.COLLECTIVES:
            shape = expected_local_shape(node, self.world)
            return torch.empty(shape, dtype=val(node).dtype, device=args[0].device)
        try:
            return super().call_function(target, args, kwargs)
        except (DataDependentOutputException, DynamicOutputShapeException):
            # the local op reads tensor values (expert row ranges): its output shape is the
            # rule's claim, checked by the ops that consume it
            shape = expected_local_shape(node, self.world)
            return torch.empty(shape, dtype=val(node).dtype, device=args[0].device)

    def run_node(self, node):
        self._node = node
        try:
            out = super().run_node(node)
        except AutoTPError:
            raise
        except Exception as e:  # noqa: BLE001
            ins = ", ".join(f"{a.name}: {fmt(a.meta.get('autotp', {}).get('placement'))}" for a in node.all_input_nodes)
            raise AutoTPError(f"local shape check failed at {where(node)}: the op rejects the local shapes "
                              f"({type(e).__name__}: {str(e).splitlines()[0]}); inputs {ins}, output "
                              f"{fmt(node.meta.get('autotp', {}).get('placement'))}. A sharding rule is wrong "
                              f"for this op; please report it.") from None
        want = expected_local_shape(node, self.world)
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else (
            tuple(tuple(o.shape) if isinstance(o, torch.Tensor) else None for o in out)
            if isinstance(out, (tuple, list)) and isinstance(want, tuple) and want and isinstance(want[0], (tuple, type(None)))
            else None)
        if want is not None and got is not None and got != want:
            p = node.meta.get("autotp", {}).get("placement")
            raise AutoTPError(
                f"local shape check failed at {where(node)}: placement {fmt(p)} means local shape "
                f"{list(want)}, but the rewritten op gives {list(got)}. The sharding rule for "
                f"{node.target} is missing a localize step; please report this (or run this op replicated "
                f"with overrides / strict=False).")
        return out


def check_local_shapes(gm: fx.GraphModule, world: int) -> None:
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    with mode:
        inputs = []
        for node in gm.graph.nodes:
            if node.op != "placeholder":
                continue
            v = val(node)
            if isinstance(v, torch.Tensor):
                device = node.meta["val"].device
                inputs.append(torch.empty(expected_local_shape(node, world), dtype=v.dtype, device=device))
            else:
                inputs.append(v)
        _ShapeCheck(gm, world).run(*inputs)
