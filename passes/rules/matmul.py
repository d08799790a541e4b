"""Contractions, written as einsum specs (Shardy style).

For ``linear`` the spec is ``"...k,nk->...n"``.  Sharding letter ``n`` gives the
column-parallel strategy (weight ``S(0)``, output sharded on its last dim); sharding the
contracted letter ``k`` gives the row-parallel one (input and weight split on ``k``, output
``Partial``: each rank holds a partial sum).  Which letters may be split, and which split
leaves a partial sum, follows from the letters, not from hand-written cases.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from autotp.passes.rules import RuleContext, Strategy, dedupe, register_rule, replicate_strategy, val
from autotp.placement import P, R, S, Sizes, factor_key, is_shard, split_factor

aten = torch.ops.aten
_BATCH = "ABCDEFGHIJ"


def einsum_strategies(node: fx.Node, ctx: RuleContext, operands: list[fx.Node], in_specs: list[str],
                      out_spec: str) -> list[Strategy]:
    """All strategies of the contraction ``in_specs -> out_spec`` over ``operands``."""
    strategies = [replicate_strategy(node)]
    sizes = {}
    for a, spec in zip(operands, in_specs):
        for letter, n in zip(spec, val(a).shape):
            sizes[letter] = n
    for letter, n in sizes.items():
        factors = {1}
        for a, spec in zip(operands, in_specs):
            if letter in spec:
                factors |= {split_factor(p) for p in ctx.candidates(a)
                            if is_shard(p) and p.dim % len(spec) == spec.index(letter)}
        for f in sorted(factors, key=factor_key):
            if not ctx.shardable(n, f):
                continue
            ins = tuple(S(spec.index(letter), f) if letter in spec else R for spec in in_specs)
            if letter not in out_spec and isinstance(f, Sizes):
                continue          # blocks whole on groups of ranks would be summed once per rank of a group
            out = S(out_spec.index(letter), f) if letter in out_spec else P
            strategies.append(Strategy(ins, out))
    if val(node).is_floating_point():
        for i in range(len(operands)):                 # linear in each operand: partial in, partial out
            strategies.append(Strategy(tuple(P if j == i else R for j in range(len(operands))), P))
    return dedupe(strategies)


@register_rule(aten.linear.default)
def linear_rule(node: fx.Node, ctx: RuleContext) -> list[Strategy]:
    if len(node.args) > 2 and node.args[2] is not None:
        return [replicate_strategy(node)]              # capture splits the bias off (canonicalize)
    x = val(node.args[0])
    batch = _BATCH[: x.ndim - 1]
    return einsum_strategies(node, ctx, list(node.args[:2]), [batch + "k", "nk"], batch + "n")


@register_rule(aten.mm.default)
def mm_rule(node, ctx):
    return einsum_strategies(node, ctx, list(node.args[:2]), ["mk", "kn"], "mn")


@register_rule(aten.bmm.default)
def bmm_rule(node, ctx):
    return einsum_strategies(node, ctx, list(node.args[:2]), ["bmk", "bkn"], "bmn")


@register_rule(aten.matmul.default)
def matmul_rule(node: fx.Node, ctx: RuleContext) -> list[Strategy]:
    a, b = val(node.args[0]), val(node.args[1])
    if a.ndim >= 2 and b.ndim == 2:
        batch = _BATCH[: a.ndim - 2]
        return einsum_strategies(node, ctx, list(node.args[:2]), [batch + "mk", "kn"], batch + "mn")
    if a.ndim >= 3 and a.shape[:-2] == b.shape[:-2]:
        batch = _BATCH[: a.ndim - 2]
        return einsum_strategies(node, ctx, list(node.args[:2]), [batch + "mk", batch + "kn"], batch + "mn")
    return [replicate_strategy(node)]


@register_rule(aten.einsum.default)
def einsum_rule(node: fx.Node, ctx: RuleContext) -> list[Strategy]:
    equation, operands = node.args[0], list(node.args[1])
    if "..." in equation or "->" not in equation:
        return [replicate_strategy(node)]
    lhs, out_spec = equation.replace(" ", "").split("->")
    in_specs = lhs.split(",")
    if any(len(set(s)) != len(s) for s in in_specs):    # repeated letters (traces/diagonals)
        return [replicate_strategy(node)]
    return einsum_strategies(node, ctx, operands, in_specs, out_spec)
