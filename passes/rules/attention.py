"""``scaled_dot_product_attention``: heads are independent, so q/k/v split on the heads dim
(dim 1 of ``(B, H, L, D)``) gives the local heads' output; batch splits likewise.  A mask
that spans heads (or batch) is split with them, one that broadcasts stays replicated.
With ``enable_gqa`` the kv heads split with the query heads when both divide."""
from __future__ import annotations

import torch
import torch.fx as fx

from autotp.passes.rules import RuleContext, Strategy, register_rule, replicate_strategy, tensor_inputs, val
from autotp.placement import R, S

aten = torch.ops.aten


@register_rule(aten.scaled_dot_product_attention.default)
def sdpa_rule(node: fx.Node, ctx: RuleContext) -> list[Strategy]:
    ins = tensor_inputs(node)
    q, k = val(node.args[0]), val(node.args[1])
    strategies = [replicate_strategy(node)]
    if q.ndim != 4:
        return strategies
    for dim in (1, 0):
        sizes = [val(a).shape[dim] for a in ins[:3]]
        if not all(ctx.shardable(n) for n in sizes):
            continue
        if dim == 1 and q.shape[1] != k.shape[1] and not node.kwargs.get("enable_gqa", False):
            continue
        placements = [S(dim)] * 3
        for extra in ins[3:]:                             # attn_mask (B|1, H|1, L, S)
            m = val(extra)
            d = dim - (4 - m.ndim)
            spans = d >= 0 and m.shape[d] == q.shape[dim] and m.shape[d] != 1
            placements.append(S(d) if spans else R)
        strategies.append(Strategy(tuple(placements), S(dim)))
    return strategies
