"""propagate_placements: enumerate, for every node, the strategies its rule allows.

Writes ``node.meta["autotp"]["strategies"]`` (a list of ``Strategy``).  Candidates flow
forward: a rule sees which placements each input's producer can deliver, so a fused dim's
strided layout (``S(d)x3``) reaches the ops that can use it.  Parameters may take any
placement their shape divides into; user inputs and buffers start replicated.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

from autotp.passes.context import AutoTPError, PassContext, where
from autotp.passes.rules import RuleContext, Strategy, find_rule, replicate_strategy, tensor_inputs, val
from autotp.placement import R, S, can_shard

aten = torch.ops.aten

# Ops whose output is a fresh tensor built from scalars: always replicated, never worth a note.
_SPLITTING_OPS = (aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default)


def split_factors(gm: fx.GraphModule) -> tuple[int, ...]:
    """Strided-shard factors worth trying: the equal-split counts that occur in the graph."""
    factors = {1}
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.target in _SPLITTING_OPS and isinstance(val(n), (list, tuple)):
            outs = val(n)
            if len({o.shape for o in outs}) == 1:
                factors.add(len(outs))
    return tuple(sorted(factors))


def meta(node: fx.Node) -> dict:
    return node.meta.setdefault("autotp", {})


def propagate_placements(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    factors = split_factors(gm)
    candidates: dict[fx.Node, set] = {}
    rctx = RuleContext(world=ctx.world, factors=factors, _candidates=candidates)
    unknown: dict[str, list[fx.Node]] = {}
    for node in gm.graph.nodes:
        if node.op == "output":
            continue
        v = val(node)
        if node.op == "placeholder":
            strategies = _placeholder_strategies(node, ctx, factors)
        elif node.op == "call_function" and node.target is operator.getitem:
            meta(node)["alias_of"] = (node.args[0], node.args[1])
            src = meta(node.args[0]).get("strategies")
            if src is None or not isinstance(val(node.args[0]), (tuple, list)):
                continue
            outs = {s.output[node.args[1]] for s in src if isinstance(s.output, tuple)}
            candidates[node] = {p for p in outs if p is not None}
            continue
        elif node.op == "call_function":
            if not _has_tensor(v):
                continue
            rule = find_rule(node.target)
            if rule is None:
                strategies = [replicate_strategy(node)]
                # only worth saying when the op could have received something sharded
                if any(p != R for a in tensor_inputs(node) for p in candidates.get(a, ())):
                    unknown.setdefault(str(node.target), []).append(node)
            else:
                strategies = rule(node, rctx)
        else:
            continue
        meta(node)["strategies"] = strategies
        outs = set()
        for s in strategies:
            outs |= set(s.output) if isinstance(s.output, tuple) else {s.output}
        candidates[node] = {p for p in outs if p is not None}
    _report_unknown(unknown, ctx)
    _report_dropout(gm, ctx)
    return gm


def _report_dropout(gm: fx.GraphModule, ctx: PassContext) -> None:
    drops = [n for n in gm.graph.nodes if n.op == "call_function" and n.target == aten.dropout.default
             and len(n.args) > 2 and n.args[1] > 0 and n.args[2]]
    if drops:
        ctx.note(f"{len(drops)} dropout op(s) with p>0 were captured in training mode (first `{drops[0].name}`, "
                 f"p={drops[0].args[1]}): their masks differ from one device's; for exact equivalence "
                 f"call model.eval() or set the dropout probabilities to 0 before parallelize")


def _report_unknown(unknown: dict[str, list[fx.Node]], ctx: PassContext) -> None:
    for op, nodes in unknown.items():
        if ctx.strict:
            raise AutoTPError(
                f"autotp has no sharding rule for {op}, used by {where(nodes[0])}\n"
                f"  ({len(nodes)} node(s) in all). What to do: register a rule with "
                f"@autotp.register_rule({op}) (see docs/adding-a-rule.md), or call parallelize(..., "
                f"strict=False) to run this op replicated (its inputs are gathered first).")
        ctx.note(f"no sharding rule for {op} ({len(nodes)} node(s), first {nodes[0].name}): runs replicated")


def _has_tensor(v) -> bool:
    if isinstance(v, torch.Tensor):
        return True
    return isinstance(v, (tuple, list)) and any(isinstance(x, torch.Tensor) for x in v)


def _placeholder_strategies(node: fx.Node, ctx: PassContext, factors) -> list[Strategy]:
    v = val(node)
    if not isinstance(v, torch.Tensor):
        return []
    name = ctx.params.get(node.name)
    if name is None or not v.is_floating_point():
        return [Strategy((), R)]
    if name in ctx.pins:
        return [Strategy((), ctx.pins[name])]
    options = [Strategy((), R)]
    for d in range(v.ndim):
        for f in factors:
            if can_shard(v.shape[d], f, ctx.world):
                options.append(Strategy((), S(d, f)))
    return options
