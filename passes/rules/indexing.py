"""Writes at positions: ``index_copy`` (a static KV cache's update, ``cache.index_copy(1, pos, k)``).

``index_copy(self, dim, index, source)`` overwrites slices ``dim = index[i]`` of ``self`` with
slices of ``source``; every other dim is carried through position by position.  So ``self``
and ``source`` split alike on any dim other than ``dim`` (the heads of a KV cache) give the
local piece of the result, with the index replicated.  A split along ``dim`` itself would need
the index translated to local positions: not offered.  Not linear in ``self`` (the written
slices replace, not add), so ``Partial`` does not pass.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from autotp.passes.rules import RuleContext, Strategy, register_rule, replicate_strategy, val
from autotp.placement import R, S

aten = torch.ops.aten


@register_rule(aten.index_copy.default)
def index_copy_rule(node: fx.Node, ctx: RuleContext) -> list[Strategy]:
    self_, source = val(node.args[0]), val(node.args[3])
    strategies = [replicate_strategy(node)]
    if source.ndim != self_.ndim or self_.ndim == 0:
        return strategies
    dim = node.args[1] % self_.ndim
    for d in range(self_.ndim):
        if d != dim and self_.shape[d] == source.shape[d] and ctx.shardable(self_.shape[d]):
            strategies.append(Strategy((S(d), R, S(d)), S(d)))
    return strategies
