"""Mixture-of-experts ops: the grouped matmul over stacked expert weights.

``grouped_mm(x (M, K), W (E, K, N), offs (E,))``: rows of ``x`` are sorted by expert and
``offs`` holds each expert's end row; row block ``e`` is multiplied by ``W[e]``.  Within every
expert it is a plain matmul ``"mk,ekn->mn"``, so the Megatron splits apply per expert
(tensor parallelism inside each expert): split ``N`` (column) or ``K`` (row, partial sum).

The routing around it (softmax, top-k, sort, histc, cumsum, index) is ordinary ATen and
stays replicated on the few bytes of router logits.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from autotp.passes.rules import RuleContext, Strategy, dedupe, register_rule, replicate_strategy, val
from autotp.placement import P, R, S, is_shard, split_factor

aten = torch.ops.aten


@register_rule("transformers::grouped_mm_fallback", aten._grouped_mm.default)
def grouped_mm_rule(node: fx.Node, ctx: RuleContext) -> list[Strategy]:
    x, w = node.args[0], node.args[1]
    xv, wv = val(x), val(w)
    strategies = [replicate_strategy(node)]
    if xv.ndim != 2 or wv.ndim != 3:
        return strategies
    n_tensor_args = len([a for a in node.args[2:] if isinstance(a, fx.Node)]) + \
        len([a for a in node.kwargs.values() if isinstance(a, fx.Node)])
    rest = tuple(R for _ in range(n_tensor_args))                 # offs (and bias) replicated
    k, n = wv.shape[1], wv.shape[2]
    factors_n = {1} | {split_factor(p) for p in ctx.candidates(w) if is_shard(p) and p.dim % 3 == 2}
    for f in sorted(factors_n):
        if ctx.shardable(n, f):
            strategies.append(Strategy((R, S(2, f)) + rest, S(1, f)))       # column-parallel experts
    factors_k = {1} | {split_factor(p) for p in ctx.candidates(x) if is_shard(p) and p.dim % 2 == 1}
    for f in sorted(factors_k):
        if ctx.shardable(k, f):
            strategies.append(Strategy((S(1, f), S(1, f)) + rest, P))      # row-parallel experts
    if xv.is_floating_point():
        strategies.append(Strategy((P, R) + rest, P))
    return dedupe(strategies)
