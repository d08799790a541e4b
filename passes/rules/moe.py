"""Mixture-of-experts ops: the grouped matmul over stacked expert weights.

``grouped_mm(x (M, K), W (E, K, N), offs (E,))``: rows of ``x`` are sorted by expert and
``offs`` holds each expert's end row; row block ``e`` is multiplied by ``W[e]``.  Within every
expert it is a plain matmul ``"mk,ekn->mn"``, so the Megatron splits apply per expert
(tensor parallelism inside each expert): split ``N`` (column) or ``K`` (row, partial sum).

Expert parallelism is the other strategy: split the stacked weights on ``E`` (``S(0)``), so a
rank holds E/N whole experts.  Inside a tensor-parallel group every rank already has every token,
so no dispatch is needed: each rank runs the rows of its experts and leaves the others zero,
a *disjoint* partial sum (``D``) that silu, the gate product, the routing-weight product and
the un-permuting gather keep; the sum over the top-k then makes it an ordinary partial sum, and
one all-reduce of (tokens, d_model) combines — the bytes of one dense MLP's all-reduce.

Both at once on a 2-D view of the mesh (``Grid``, EP x TP): E/a experts per group of N/a ranks,
each split column/row inside its group; the row matmul's output is again a partial sum over all
N ranks.  With tokens split by sequence the rows reach their experts by all-to-all instead
(``X``; on the grid, a copy to each rank of the group).  The strategies need 16-byte strides of
the local pieces (``aligned``).

The routing around it (softmax, top-k, sort, histc, cumsum, index) is ordinary ATen and
stays replicated on the few bytes of router logits.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from autotp.passes.rules import RuleContext, Strategy, dedupe, register_rule, replicate_strategy, val
from autotp import comm
from autotp.placement import D, P, R, S, X, Grid, TokenLocal, factor_key, is_shard, split_factor

aten = torch.ops.aten


def expert_parallel_grouped_mm(x: torch.Tensor, w_local: torch.Tensor, offs: torch.Tensor, rank: int,
                               world: int, op) -> torch.Tensor:
    """This rank's experts only: rows of x are sorted by expert and ``offs`` ends each expert's
    block; rank r owns experts [r*E/N, (r+1)*E/N), i.e. one contiguous block of rows.  Other
    rows come out zero, so the result is a disjoint partial sum (``D``) over ranks."""
    n_experts = offs.shape[0]
    per_rank = n_experts // world
    lo, hi = rank * per_rank, (rank + 1) * per_rank
    start = int(offs[lo - 1]) if lo > 0 else 0
    end = int(offs[hi - 1])
    local_offs = (offs[lo:hi] - start).to(offs.dtype)
    y = op(x[start:end], w_local, local_offs)                  # (rows of my experts, N)
    return torch.nn.functional.pad(y, (0, 0, start, x.shape[0] - end))   # (M, N), zeros elsewhere


def _localize_expert_parallel(node: fx.Node, strategy: Strategy, lctx) -> None:
    """This rank's expert group runs its rows: the group is the rank itself under expert
    parallelism, ``rank // (N/groups)`` of ``groups`` on an EP x TP grid."""
    x, w, offs = node.args[:3]
    wp = strategy.inputs[1]
    groups = wp.groups if isinstance(wp, Grid) else lctx.world
    op = node.target
    node.target = expert_parallel_grouped_mm
    node.args = (x, w, offs, lctx.rank // (lctx.world // groups), groups, op)
    node.kwargs = {}


def partition_key(node: fx.Node, limit: int = 40):
    """The ``offs`` tensors of the grouped matmuls upstream of ``node``: two disjoint partial
    sums may be multiplied elementwise only when their rows are owned by the same ranks."""
    seen, stack, keys = set(), [node], set()
    while stack and len(seen) < limit:
        n = stack.pop()
        if n in seen or not isinstance(n, fx.Node):
            continue
        seen.add(n)
        if n.op == "call_function" and _is_grouped_mm(n.target):
            keys.add(n.args[2])
            continue
        stack.extend(n.all_input_nodes)
    return frozenset(keys)


def _is_grouped_mm(target) -> bool:
    name = target.name() if isinstance(target, torch._ops.OpOverload) else ""
    return name.startswith("transformers::grouped_mm_fallback") or name.startswith("aten::_grouped_mm")


def aligned(local_size: int, w: torch.Tensor) -> bool:
    """torch's grouped matmul needs every stride a multiple of 16 bytes ("strides should be
    multiple of 16 bytes"): a split whose local width breaks that would fail at run time."""
    return local_size * w.element_size() % 16 == 0


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
    for f in sorted(factors_n, key=factor_key):
        if ctx.shardable(n, f) and aligned(n // ctx.world, wv):
            strategies.append(Strategy((R, S(2, f)) + rest, S(1, f)))       # column-parallel experts
    factors_k = {1} | {split_factor(p) for p in ctx.candidates(x) if is_shard(p) and p.dim % 2 == 1}
    for f in sorted(factors_k, key=factor_key):
        if ctx.shardable(k, f) and aligned(k // ctx.world, wv):
            strategies.append(Strategy((S(1, f), S(1, f)) + rest, P))      # row-parallel experts
    if xv.is_floating_point():
        strategies.append(Strategy((P, R) + rest, P))
    if n_tensor_args == 1:
        strategies += _grid_strategies(x, w, ctx)
    if n_tensor_args == 1 and ctx.shardable(wv.shape[0]):
        # expert parallelism: E/N whole experts per rank; the tokens are already on every rank
        # (replicated activations), each rank runs its experts' rows, the rest stay zero (D)
        strategies.append(Strategy((R, S(0), R), D, localize=_localize_expert_parallel))
        strategies.append(Strategy((D, S(0), R), D, localize=_localize_expert_parallel))
        if any(isinstance(p, TokenLocal) and p.kind == "s" for p in ctx.candidates(x)) or X in ctx.candidates(x):
            # token-local routing (tokens split by sequence, see tokens.py): the rows sorted by
            # expert are dispatched to their experts' ranks (L -> X, an all-to-all), offs is the
            # partial (this rank's) cumsum of expert counts the dispatch reads its split sizes from
            strategies.append(Strategy((X, S(0), P), X, localize=_localize_dispatched))
    return dedupe(strategies)


def _grid_strategies(x: fx.Node, w: fx.Node, ctx: RuleContext) -> list[Strategy]:
    """Expert parallelism over ``a`` groups x tensor parallelism inside each expert over the
    ``N/a`` ranks of a group (``Grid``): group ``i`` runs the rows of its E/a experts, each rank
    of the group one column slice (gate/up) or row slice (down) of them.  The column matmul
    leaves ``Grid(D, S(1))``: the group's rows, this rank's columns; the row matmul sums over the
    group's ranks and the groups' rows are disjoint, so its output is ``Partial`` over all N
    ranks — one all-reduce, the same as either pure form."""
    out = []
    wv = val(w)
    xs = ctx.candidates(x)
    routed = any(isinstance(p, TokenLocal) and p.kind == "s" for p in xs)    # token-local rows (tokens.py)
    for p in ctx.candidates(w):
        if not isinstance(p, Grid) or not is_shard(p.inner) \
                or not aligned(wv.shape[p.inner.dim] // (ctx.world // p.groups), wv):
            continue
        f, a = split_factor(p.inner), p.groups
        if p.inner.dim == 2:
            out.append(Strategy((R, p, R), Grid(D, S(1, f), a), localize=_localize_expert_parallel))
            if routed:
                # each rank's rows dispatched to their group of experts, all of them on each of its
                # ranks (comm.moe_dispatch with groups); offs is this rank's cumsum, as for EP
                out.append(Strategy((Grid(X, R, a), p, P), Grid(X, S(1, f), a), localize=_localize_dispatched))
        elif p.inner.dim == 1:
            if Grid(D, S(1, f), a) in xs:
                out.append(Strategy((Grid(D, S(1, f), a), p, R), P, localize=_localize_expert_parallel))
            if Grid(X, S(1, f), a) in xs:   # partial inside the group; the combine adds the copies
                out.append(Strategy((Grid(X, S(1, f), a), p, P), Grid(X, P, a), localize=_localize_dispatched))
    return out


def _localize_dispatched(node: fx.Node, strategy: Strategy, lctx) -> None:
    x, w, offs = node.args[:3]
    node.args = (x, w, offs, node.target)
    node.kwargs = {}
    node.target = comm.expert_grouped_mm
