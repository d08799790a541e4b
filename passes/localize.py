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
from torch._subclasses.fake_tensor import (DataDependentOutputException, DynamicOutputShapeException, FakeTensor,
                                          FakeTensorMode)

from autotp import comm
from autotp.placement import fmt, local_shape
from autotp.passes.context import AutoTPError, PassContext, where
from autotp.passes.rules import val


@dataclasses.dataclass
class LocalContext:
    world: int
    rank: int
    group: str = "tp"          # the collectives' process group (a hook that inserts collectives)


def expected_local_shape(node: fx.Node, world: int):
    v, p = val(node), node.meta.get("autotp", {}).get("placement")
    if isinstance(v, torch.Tensor):
        return tuple(local_shape(v.shape, p, world)) if p is not None else tuple(v.shape)
    if isinstance(v, (tuple, list)) and isinstance(p, tuple):
        return tuple(tuple(local_shape(x.shape, q, world)) if isinstance(x, torch.Tensor) and q is not None
                     else None for x, q in zip(v, p))
    return None


def localize(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    lctx = LocalContext(ctx.world, ctx.rank, ctx.group)
    for node in gm.graph.nodes:
        strategy = node.meta.get("autotp", {}).get("strategy")
        if strategy is not None and strategy.localize is not None and node.op == "call_function":
            strategy.localize(node, strategy, lctx)
    gm.graph.lint()
    gm.recompile()
    check_local_shapes(gm, ctx.world)
    return gm


class _NoKey(Exception):
    pass


_PLAIN = (int, float, bool, str, type(None), torch.dtype, torch.device, torch.layout, torch.memory_format)


def _meta_key(a):
    """What a fake op's result can depend on: tensor metadata (never values), plain arguments
    tagged with their type (``2`` and ``2.0`` differ).  Raises ``_NoKey`` for anything else: a
    real tensor or a fake one carrying a constant (whose value an op could read)."""
    if isinstance(a, FakeTensor):
        if a.constant is not None:
            raise _NoKey
        return (a.shape, a.stride(), a.storage_offset(), a.dtype, a.device, a.requires_grad)
    if isinstance(a, (tuple, list)):
        return (type(a), tuple(_meta_key(x) for x in a))
    if isinstance(a, _PLAIN):
        return (type(a), a)
    raise _NoKey


def _op_key(target, args, kwargs):
    """Memo key of one op call, or None where the result may not be a function of the key: a
    Python callable, an op that mutates (in place or out=), a real tensor, an unusual argument."""
    if not isinstance(target, torch._ops.OpOverload) or target._schema.is_mutable:
        return None
    try:
        key = (target, _meta_key(args), _meta_key(tuple(kwargs.items())))
        hash(key)
    except (_NoKey, TypeError):
        return None
    return key


def _memoizable(out) -> bool:
    if isinstance(out, (tuple, list)):
        return all(_memoizable(o) for o in out)
    return not isinstance(out, torch.Tensor) or (isinstance(out, FakeTensor) and out.constant is None)


class _ShapeCheck(fx.Interpreter):
    """Runs the graph on fake tensors of the local shapes.  The decoder layers of a model are
    the same ops on the same shapes, so each distinct (op, input metadata, arguments) is run
    once and its (fake, read-only) result reused: a fake op's output metadata depends on
    nothing else.  Graphs with mutating ops are run op by op (a mutation could change a
    shared result)."""

    def __init__(self, gm, world):
        super().__init__(gm)
        self.world = world
        mutates = any(n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload)
                      and n.target._schema.is_mutable for n in gm.graph.nodes)
        self._memo = None if mutates else {}

    def call_function(self, target, args, kwargs):
        node = self._node
        if target in comm.COLLECTIVES:
            shape = expected_local_shape(node, self.world)
            return torch.empty(shape, dtype=val(node).dtype, device=args[0].device)
        key = _op_key(target, args, kwargs) if self._memo is not None else None
        if key is not None and key in self._memo:
            return self._memo[key]
        try:
            out = super().call_function(target, args, kwargs)
        except (DataDependentOutputException, DynamicOutputShapeException):
            # the local op reads tensor values (expert row ranges): its output shape is the
            # rule's claim, checked by the ops that consume it
            shape = expected_local_shape(node, self.world)
            return torch.empty(shape, dtype=val(node).dtype, device=args[0].device)
        if key is not None and _memoizable(out):
            self._memo[key] = out
        return out

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
