"""``scaled_dot_product_attention``: heads are independent, so q/k/v split on the heads dim
(dim 1 of ``(B, H, L, D)``) gives the local heads' output; batch splits likewise.  A mask
that spans heads (or batch) is split with them, one that broadcasts stays replicated.
With ``enable_gqa`` the kv heads split with the query heads when both divide.

With fewer kv heads than ranks (GQA, ``H_kv < N`` dividing N) query head i reads kv head
``i * H_kv / H_q``, so the ``N / H_kv`` ranks holding the query heads of one kv head all need
that head whole: k and v are ``Grid(S(1), R, H_kv)`` — one kv head per group of ranks,
replicated inside it (vLLM's and Megatron's kv-head replication; ``kv_head_groups`` tells
propagation which group counts to offer the k/v projections).  Each rank then runs its
``H_q / N`` query heads against its one kv head, locally.  MQA (``H_kv = 1``) is the extreme
case: k and v replicated."""
from __future__ import annotations

import torch
import torch.fx as fx

from autotp.passes.rules import RuleContext, Strategy, register_rule, replicate_strategy, tensor_inputs, val
from autotp.placement import Grid, R, S

aten = torch.ops.aten


# autotp.attention (passes/lower_attention.py) takes the same arguments, so a graph that already holds
# it — a model calling it, or a lowered graph planned again — plans too
@register_rule(aten.scaled_dot_product_attention.default, "autotp::attention")
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
    groups = _kv_groups(node, ctx.world)
    if groups is not None:                                # each rank's query heads read one kv head
        kv = Grid(S(1), R, groups) if groups > 1 else R   # MQA: the one kv head, replicated
        masks = []
        for extra in ins[3:]:
            m = val(extra)
            d = 1 - (4 - m.ndim)
            masks.append(S(d) if d >= 0 and m.shape[d] == q.shape[1] and m.shape[d] != 1 else R)
        strategies.append(Strategy((S(1), kv, kv, *masks), S(1)))
    return strategies


_ATTENTION = {aten.scaled_dot_product_attention.default, "autotp.attention.default"}


def _kv_groups(node: fx.Node, world: int) -> int | None:
    """The kv head count ``H_kv`` when attention ``node`` has fewer kv heads than ``world`` ranks,
    ``H_kv`` divides ``world`` and ``world`` divides the query heads; else None."""
    if node.op != "call_function" or (node.target not in _ATTENTION and str(node.target) not in _ATTENTION):
        return None
    q, k, v = (val(a) for a in node.args[:3])
    if q.ndim != 4 or k.ndim != 4 or not node.kwargs.get("enable_gqa", False):
        return None
    hq, hkv = q.shape[1], k.shape[1]
    if v.shape[1] != hkv or not (hkv < world and world % hkv == 0 and hq % world == 0 and hq % hkv == 0):
        return None
    return int(hkv)


def kv_head_groups(gm: fx.GraphModule, world: int, params) -> dict[str, set[int]]:
    """Parameter placeholder name -> the kv-head group counts to offer it ``Grid(S(d), R, g)`` for:
    ``H_kv`` of every attention with fewer kv heads than ranks (``enable_gqa``), or of a GQA written
    as ``repeat_kv`` (a head dim of ``H_kv < N`` broadcast ``n_rep`` times, merged into
    ``H_kv * n_rep`` heads that divide by N), given to the parameters that compute its k and v: those
    met walking back from k and v up to and including the first weight matmul (``params``: the
    graph's parameter placeholders by name)."""
    out: dict[str, set[int]] = {}
    for n in gm.graph.nodes:
        g, sources = _kv_groups(n, world), n.args[1:3]
        if g is None and n.op == "call_function" and n.target == aten.expand.default \
                and isinstance(val(n), torch.Tensor):
            src, e = val(n.args[0]), val(n)
            # (B, H_kv, 1, L, D) -> (B, H_kv, n_rep, L, D): the broadcast of repeat_kv
            if e.ndim == 5 and src.ndim == 5 and src.shape[2] == 1 and e.shape[2] > 1:
                hkv, hq = int(e.shape[1]), int(e.shape[1] * e.shape[2])
                if hkv < world and world % hkv == 0 and hq % world == 0:
                    g, sources = hkv, n.args[:1]
        if g is not None:                      # (g = 1: MQA, whose k and v projections are replicated)
            for name in _projection_params(sources, params):
                out.setdefault(name, set()).add(g)
    return out


def _projection_params(sources, params) -> set[str]:
    """The parameters that compute ``sources``: walking back through ops until (and including) the
    first op that reads a weight matrix — a parameter of >= 2 dims, or a view of one only."""
    weight_like: dict = {}

    def is_weight(a: fx.Node) -> bool:
        if a not in weight_like:
            ins = a.all_input_nodes
            weight_like[a] = (a.op == "placeholder" and a.name in params and val(a).ndim >= 2) or (
                a.op == "call_function" and bool(ins) and all(is_weight(x) for x in ins))
        return weight_like[a]

    found, seen = set(), set()
    stack = [a for a in sources if isinstance(a, fx.Node)]
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.op == "placeholder":
            if n.name in params:
                found.add(n.name)
            continue
        ins = n.all_input_nodes
        weights = [a for a in ins if is_weight(a)]
        if weights and not is_weight(n):      # a matmul with a weight: its weight (and bias) end the walk
            stack += [a for a in ins if a.op == "placeholder" or is_weight(a)]
        else:
            stack += ins
    return found
