"""Strategies on the 2-D view of the mesh (``Grid``): one rule call per mesh dim, paired.

A ``Grid(outer, inner, a)`` tensor is placed ``outer`` over ``a`` groups of ranks and ``inner``
over the ``N/a`` ranks inside each group (``autotp.placement.Grid``).  As for DTensor on an
N-D mesh, an op may run locally on such pieces when it may run locally on each mesh dim's
placement alone: the op's own rule, asked once as if the mesh were the ``a`` groups (inputs
placed ``outer``) and once as if it were the ``N/a`` ranks of a group (inputs placed
``inner``), gives strategies whose pairs are the op's Grid strategies.  So no rule needs to
know about grids: silu, the gate product, the chunk of a fused gate/up and the transpose of
an expert weight get theirs from ``pointwise.py`` and ``views.py`` unchanged.

A pair's ``localize`` hooks (a view's target shape, a split's sizes) run one after the other,
each as if its mesh dim were the whole mesh: the per-group one with ``a`` ranks and this rank's
group index, the in-group one with ``N/a`` ranks and its index inside the group.  Inputs are
replicated on both mesh dims or a Grid the producer offers, and outputs fold through
``placement.grid`` (a row-parallel result partial inside disjoint groups is an ordinary
``Partial``).  The grouped matmul's own Grid strategies are in ``moe.py``.
"""
from __future__ import annotations

import dataclasses
import functools

import torch.fx as fx

from autotp.passes.rules import RuleContext, RuleFn, Strategy, dedupe, tensor_inputs
from autotp.placement import Grid, R, grid


def _fold(pa, pb, groups: int):
    if isinstance(pa, tuple) != isinstance(pb, tuple):
        return False, None
    if isinstance(pa, tuple):
        if len(pa) != len(pb):
            return False, None
        outs = []
        for x, y in zip(pa, pb):
            ok, g = _fold(x, y, groups)
            if not ok:
                return False, None
            outs.append(g)
        return True, tuple(outs)
    if pa is None and pb is None:
        return True, None
    g = grid(pa, pb, groups)
    return g is not None, g


def _ask(node: fx.Node, rule: RuleFn, tokens, ctx: RuleContext) -> list[Strategy]:
    return rule(node, ctx) + (tokens(node, ctx) if tokens is not None else [])


def grid_strategies(node: fx.Node, rule: RuleFn, ctx: RuleContext, tokens=None) -> list[Strategy]:
    """The Grid strategies of ``node`` from its rule (``rule``), for every group count its
    inputs' producers offer; [] when no input can arrive as a Grid.  ``tokens(node, ctx)``: the
    token-local strategies (``tokens.py``), asked beside the rule — the rows dispatched to a
    group (``X`` on the group mesh dim) go through them."""
    ins = tensor_inputs(node)
    offered = {a: {p for p in ctx.candidates(a) if isinstance(p, Grid)} for a in ins}
    groups_seen = sorted({p.groups for ps in offered.values() for p in ps})
    out = []
    for groups in groups_seen:
        outer = {a: {p.outer for p in ps if p.groups == groups} for a, ps in offered.items()}
        inner = {a: {p.inner for p in ps if p.groups == groups} for a, ps in offered.items()}
        per_group = _ask(node, rule, tokens, RuleContext(world=groups, factors=ctx.factors, _candidates=outer))
        in_group = _ask(node, rule, tokens, RuleContext(world=ctx.world // groups, factors=ctx.factors,
                                                        _candidates=inner))
        for sa in per_group:
            for sb in in_group:
                if len(sa.inputs) != len(sb.inputs):
                    continue
                inputs = []
                for a, pa, pb in zip(ins, sa.inputs, sb.inputs):
                    g = R if pa == R and pb == R else Grid(pa, pb, groups)
                    if g != R and g not in offered[a]:
                        break
                    inputs.append(g)
                else:
                    ok, output = _fold(sa.output, sb.output, groups)
                    if ok and any(isinstance(p, Grid) for p in inputs):
                        hook = None if sa.localize is None and sb.localize is None else \
                            functools.partial(_localize_pair, sa, sb, groups)
                        out.append(Strategy(tuple(inputs), output, localize=hook))
    return dedupe(out)


def _localize_pair(sa: Strategy, sb: Strategy, groups: int, node: fx.Node, strategy: Strategy, lctx) -> None:
    """Run the per-group strategy's hook on the ``groups``-rank mesh of the groups, then the in-group
    one's on the ``N/groups`` ranks of this rank's group."""
    b = lctx.world // groups
    if sa.localize is not None:
        sa.localize(node, sa, dataclasses.replace(lctx, world=groups, rank=lctx.rank // b))
    if sb.localize is not None:
        sb.localize(node, sb, dataclasses.replace(lctx, world=b, rank=lctx.rank % b))
