"""Elementwise ops: the output may be sharded on any dim its inputs are sharded on.

Broadcasting decides each input's placement: an input that spans the sharded output dim is
sharded the same way; one that broadcasts along it (size 1 or missing) stays replicated.
``Partial`` passes through ops that are linear in that input (sum of shards in, sum out).
"""
from __future__ import annotations

import torch
import torch.fx as fx

from autotp.passes.rules import RuleContext, Strategy, dedupe, register_rule, replicate_strategy, tensor_inputs, val
from autotp.placement import D, P, R, S, factor_key, is_shard, split_factor

aten = torch.ops.aten

# Ops linear in *every* tensor input together: f(sum x_r, sum y_r) = sum f(x_r, y_r).
_LINEAR_ALL = {aten.add.Tensor, aten.sub.Tensor}
# Ops linear in their first tensor input when the others are replicated.
_LINEAR_FIRST = {aten.mul.Tensor, aten.div.Tensor, aten.neg.default, aten.to.dtype, aten.to.device,
                 aten.to.dtype_layout, aten._to_copy.default, aten.clone.default, aten.alias.default,
                 aten.contiguous.default, aten.dropout.default, aten.detach.default,
                 aten.mul.Scalar, aten.div.Scalar, aten.type_as.default}
# mul is symmetric: either tensor input may be the partial one.
_LINEAR_ANY = {aten.mul.Tensor}

# Not tagged pointwise in ATen, but elementwise all the same.
_EXTRA = (aten.to.dtype, aten.to.device, aten.to.dtype_layout, aten._to_copy.default, aten.clone.default,
          aten.alias.default, aten.contiguous.default, aten.dropout.default, aten.detach.default,
          aten.type_as.default, aten.masked_fill.Scalar, aten.masked_fill.Tensor, aten.where.self,
          aten.where.ScalarOther, aten.where.ScalarSelf, aten.lift_fresh_copy.default, aten.copy.default,
          aten.triu.default, aten.tril.default, aten.__and__.Tensor, aten.__or__.Tensor,
          aten.bitwise_and.Tensor, aten.bitwise_or.Tensor, aten.bitwise_not.default, aten.logical_and.default,
          aten.logical_or.default, aten.logical_not.default, aten.clamp.default, aten.clamp_min.default,
          aten.clamp_max.default, aten.fill.Scalar, aten.zeros_like.default, aten.ones_like.default,
          aten.full_like.default, aten.empty_like.default)


def _dim_map(inp: torch.Tensor, out: torch.Tensor) -> dict[int, int]:
    """Output dim -> input dim for dims the input really spans (not broadcast)."""
    off = out.ndim - inp.ndim
    return {j + off: j for j in range(inp.ndim) if inp.shape[j] == out.shape[j + off] and inp.shape[j] != 1}


@register_rule(*_EXTRA)
def pointwise_rule(node: fx.Node, ctx: RuleContext) -> list[Strategy]:
    out = val(node)
    ins = tensor_inputs(node)
    strategies = [replicate_strategy(node)]
    if not isinstance(out, torch.Tensor) or out.ndim == 0:
        return strategies
    maps = [_dim_map(val(a), out) for a in ins]
    triu_like = node.target in (aten.triu.default, aten.tril.default)
    # output shardings: any candidate sharding of an input, carried to the output dim
    options = set()
    for a, m in zip(ins, maps):
        inv = {j: d for d, j in m.items()}
        for p in ctx.candidates(a):
            if is_shard(p):
                j = p.dim % val(a).ndim
                if j in inv:
                    options.add((inv[j], split_factor(p)))
    for d, f in sorted(options, key=lambda o: (o[0], factor_key(o[1]))):
        if not ctx.shardable(out.shape[d], f) or (triu_like and d >= out.ndim - 2):
            continue
        placements = tuple(S(m[d], f) if d in m else R for m in maps)
        strategies.append(Strategy(placements, S(d, f)))
    strategies += _partial_strategies(node, ins)
    strategies += _disjoint_strategies(node, ins, ctx)
    return dedupe(strategies)


# f(0) = 0: run locally on a disjoint partial sum, each element lives on one rank
_ZERO_PRESERVING = {aten.silu.default, aten.gelu.default, aten.relu.default, aten.tanh.default, aten.neg.default,
                    aten.to.dtype, aten.to.device, aten.to.dtype_layout, aten._to_copy.default, aten.clone.default,
                    aten.alias.default, aten.contiguous.default, aten.detach.default, aten.mul.Scalar,
                    aten.div.Scalar, aten.dropout.default, aten.type_as.default}


def _disjoint_strategies(node: fx.Node, ins: list[fx.Node], ctx: RuleContext) -> list[Strategy]:
    if not ins or not any(D in ctx.candidates(a) for a in ins):
        return []
    target = node.target
    if target in _ZERO_PRESERVING:
        return [Strategy(tuple(D if i == 0 else R for i in range(len(ins))), D)]
    if target == aten.div.Tensor and ins[0] is node.args[0]:
        return [Strategy(tuple(D if i == 0 else R for i in range(len(ins))), D)]
    if target == aten.mul.Tensor and len(ins) == 2:
        out = [Strategy((D, R), D), Strategy((R, D), D)]
        from autotp.passes.rules.moe import partition_key
        key = partition_key(ins[0])
        if val(ins[0]).shape == val(ins[1]).shape and key and len(key) == 1 and key == partition_key(ins[1]):
            out.append(Strategy((D, D), D))            # same rows on the same ranks: silu(gate) * up
        return out
    return []


def _partial_strategies(node: fx.Node, ins: list[fx.Node]) -> list[Strategy]:
    if not ins or not val(ins[0]).is_floating_point():
        return []
    target = node.target
    if target in _LINEAR_ALL:
        scalars = [a for a in node.args[:2] if not isinstance(a, fx.Node)]
        if not scalars and len(ins) == 2:
            return [Strategy((P, P), P)]
        return []
    if target in _LINEAR_FIRST:
        if target in (aten.div.Tensor,) and ins[0] is not node.args[0]:
            return []
        first = [Strategy(tuple(P if i == 0 else R for i in range(len(ins))), P)]
        if target in _LINEAR_ANY and len(ins) == 2:
            first.append(Strategy((R, P), P))
        return first
    return []
