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

import operator

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


ATTENTION_OPS = {"aten.scaled_dot_product_attention.default", "autotp.attention.default"}   # str(node.target)


def _kv_groups(node: fx.Node, world: int) -> int | None:
    """The kv head count ``H_kv`` when attention ``node`` has fewer kv heads than ``world`` ranks,
    ``H_kv`` divides ``world`` and ``world`` divides the query heads; else None."""
    if node.op != "call_function" or str(node.target) not in ATTENTION_OPS:
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
    ``H_kv * n_rep`` heads that divide by N) or as ``repeat_interleave(k, n_rep, dim=1)``, given to the parameters that compute its k and v: those
    met walking back from k and v up to and including the first weight matmul (``params``: the
    graph's parameter placeholders by name)."""
    out: dict[str, set[int]] = {}
    for name, g, _ in _kv_projections(gm, world, params):
        out.setdefault(name, set()).add(g)
    return out


def kv_head_rows(gm: fx.GraphModule, world: int, params) -> dict[str, set[tuple]]:
    """Parameter name -> ``(g, size, start, end)``: rows ``[start, end)`` of a fused dim of ``size``
    compute the k or v of an attention whose kv heads are kept whole on ``g`` groups of ranks
    (``kv_head_groups``) — k and v cut out of a fused ``[q | k | v]`` projection's output by a
    split or slices, the cuts met walking back from k and v composed.  Those blocks of the fused
    weight may be split over the ``g`` groups and whole inside each (``placement.Sizes``) while the
    others are split over every rank."""
    out: dict[str, set[tuple]] = {}
    for name, g, cut in _kv_projections(gm, world, params):
        if cut is not None:
            out.setdefault(name, set()).add((g, *cut))
    return out


def _kv_projections(gm: fx.GraphModule, world: int, params) -> list[tuple]:
    """``(parameter name, H_kv, cut)`` for every parameter computing the k or v of an attention with
    fewer kv heads than ranks (see ``kv_head_groups``); ``cut``: the rows of k or v in a fused dim
    (``_projection_params``), or None."""
    found: list = []
    weight_like = None
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
        elif g is None and n.op == "call_function" and n.target == aten.repeat_interleave.self_int \
                and isinstance(n.args[1], int) and (n.args[2] if len(n.args) > 2 else n.kwargs.get("dim")) in (1, -3) \
                and val(n).ndim == 4:
            # (B, H_kv, L, D) -> (B, H_kv * n_rep, L, D): litgpt's k/v repeat per query group
            hkv, hq = int(val(n.args[0]).shape[1]), int(val(n).shape[1])
            if hkv < world and world % hkv == 0 and hq % world == 0:
                g, sources = hkv, n.args[:1]
        if g is not None:                      # (g = 1: MQA, whose k and v projections are replicated)
            weight_like = _weight_like(gm, params) if weight_like is None else weight_like
            found += [(name, g, cut) for name, cut in _projection_params(sources, params, weight_like)]
    return found


def _cut(n: fx.Node) -> tuple | None:
    """``(size, start, end)`` when ``n`` is one piece of a dim cut by a split (a getitem of it) or a
    slice: the piece's rows in the dim it was cut from."""
    from autotp.passes.rules.views import slice_bounds, split_dim
    if n.op != "call_function":
        return None
    if n.target is operator.getitem and isinstance(n.args[0], fx.Node) and n.args[0].op == "call_function" \
            and n.args[0].target in (aten.split.Tensor, aten.split_with_sizes.default):
        x, pieces = val(n.args[0].args[0]), val(n.args[0])
        d = split_dim(n.args[0]) % x.ndim
        start = sum(int(p.shape[d]) for p in pieces[:n.args[1]])
        return int(x.shape[d]), start, start + int(pieces[n.args[1]].shape[d])
    if n.target == aten.slice.Tensor and (bounds := slice_bounds(n)) is not None:
        return int(val(n.args[0]).shape[bounds[0]]), bounds[1], bounds[2]
    return None


def _compose(outer: tuple, inner: tuple | None) -> tuple | None:
    """Rows ``inner`` of a piece that is rows ``outer[1:]`` of a dim of ``outer[0]``: rows of that dim."""
    if inner is None:
        return outer
    size, start, end = outer
    return (size, start + inner[1], start + inner[2]) if inner[0] == end - start else None


def _projection_params(sources, params, weight_like: set) -> list[tuple]:
    """The parameters that compute ``sources``: walking back through ops until (and including) the
    first op that reads a weight matrix (``weight_like``: parameters of >= 2 dims and what is
    computed from them alone); each with the rows of the fused dim the walk cut (``_cut``,
    composed), or None."""
    found, seen = [], set()
    stack = [(a, None) for a in sources if isinstance(a, fx.Node)]
    while stack:
        n, cut = stack.pop()
        if (n, cut) in seen:
            continue
        seen.add((n, cut))
        if n.op == "placeholder":
            if n.name in params:
                found.append((n.name, cut))
            continue
        if (piece := _cut(n)) is not None:
            cut = _compose(piece, cut)
        ins = n.all_input_nodes
        if n not in weight_like and any(a in weight_like for a in ins):
            ins = [a for a in ins if a.op == "placeholder" or a in weight_like]   # its weight (and bias)
        stack += [(a, cut) for a in ins]
    return list(dict.fromkeys(found))


def _weight_like(gm: fx.GraphModule, params) -> set:
    """Parameters of >= 2 dims, and the nodes computed from them alone (a transpose, a cast)."""
    out: set = set()
    for n in gm.graph.nodes:
        if n.op == "placeholder" and n.name in params and val(n).ndim >= 2:
            out.add(n)
        elif n.op == "call_function" and n.all_input_nodes and all(a in out for a in n.all_input_nodes):
            out.add(n)
    return out
