"""Token-local strategies (placement ``L``): a region run on each rank's own tokens.

Under sequence parallelism every rank holds a slice of the sequence.  A mixture-of-experts
block treats tokens independently: it routes each token, sorts the rows by expert, runs the
experts, un-sorts and sums over the top-k.  Run that code on this rank's tokens alone (data
parallelism over tokens, as torchtitan's expert parallelism does) and the only communication
left is moving rows to the ranks that own their experts and back: one all-to-all each way
(``comm.moe_dispatch`` / ``comm.moe_combine``), ``tokens x top_k x d x (N-1)/N`` bytes per
rank instead of all-gathering and reduce-scattering every token.

``L(dim, kind, origin)`` (``autotp.placement.TokenLocal``) says a tensor *is the model's own
expression evaluated on this rank's tokens*.  Running an op on such inputs always gives the op's
expression on this rank's tokens; what needs proof is that the region's result is the rank's
slice of the full result (token separability).  The rules below only build chains for which it
holds, tracking what the rows and values of each tensor are (``kind``):

* the region starts at a view that merges a sequence-sharded dim ``S(seq)`` with others into one
  row dim (``(B, S/N, d) -> (B*S/N, d)``: ``L(0)``, rows in token order, kind ``o``) and ends
  at the view that splits it back the same way (``origin`` records the merged sizes);
* ops that act on every row alone keep ``L``: elementwise ops, matmuls by replicated weights,
  reductions / softmax / top-k along other dims, views that keep the row dim leading;
* a *sort over the rows* gives rows in sorted order (``s``) and sort indices (``sp``: positions of
  the sorted rows in the token-ordered tensor); ``x[idx]`` with ``x`` in token order and ``idx``
  sort indices (or sort indices floor-divided by the slots per token, checked from the sizes)
  gives sorted rows; ``index_put_(base, [sort indices], arange)`` gives the inverse permutation
  (``ip``); sorted rows indexed by it are back in token order.  Positions are only ever used
  to index the tensors they were made from, so local positions are right locally;
* a sum over the rows (``histc`` counts, ``sum``) is a ``Partial`` sum over ranks;
* the grouped matmul over stacked expert weights ``S(0)`` takes rows sorted by expert as ``X``
  (``ExpertRows``: the rows of this rank's experts, after the dispatch) — see ``moe.py``.

Anything else (a cumsum over tokens, a slice of the rows, positions used as values, mixing two
sorts) has no token-local strategy, so the solver keeps the region replicated or sharded by the
ordinary rules.  These strategies are offered only when the plan splits the sequence.

Each rule is registered per op where it is defined (``register_token_rule``, into
``TOKEN_RULES``) and found by ``find_rule`` as the op's sharding rule is, pointwise tag included.
"""
from __future__ import annotations

import operator
from typing import Callable

import torch
import torch.fx as fx

from autotp.placement import P, R, S, X, ExpertRows, TokenLocal, is_shard, split_factor
from autotp.passes.rules import RuleContext, arg, Strategy, dedupe, find_rule, register_rule, sym_val, \
    tensor_inputs, val
from autotp.passes.rules.moe import partition_key
from autotp.passes.rules.pointwise import _EXTRA, _dim_map
from autotp.passes.rules.reductions import _keepdim, _reduce_dims, along_dim, keeps_dim
from autotp.passes.rules.views import RESHAPES, _localize_shape, dim_groups, split_dim

aten = torch.ops.aten

DATA = ("o", "s")                    # kinds whose values are data (positions kinds: sp, op, ip)

# ops a position tensor may pass through unchanged (a copy, a cast): checked by ``_pointwise``
_ROWWISE_POSITIONS = {aten.to.dtype, aten._to_copy.default, aten.clone.default, aten.alias.default,
                      aten.contiguous.default, aten.detach.default, aten.empty_like.default}

TokenRule = Callable[[fx.Node, RuleContext, frozenset], list[Strategy]]
TOKEN_RULES: dict[object, TokenRule] = {}


def register_token_rule(*ops, opens_region: bool = False):
    """Register ``fn`` as the token-local rule of each op in ``TOKEN_RULES`` (``torch.Tag.pointwise``:
    of every op tagged pointwise that has none of its own), as ``register_rule`` fills ``RULES``.

    ``fn(node, ins, local, seq_syms)`` is asked only when an input can be token-local: ``ins``
    are the node's tensor inputs, ``local[i]`` the ``L`` / ``X`` placements ``ins[i]`` can have.
    A rule that makes ``L`` from inputs that are not (``opens_region``: the entry view from
    ``S(seq)``, ``arange``'s positions) is asked for every node, as ``fn(node, ctx, seq_syms)``."""
    def deco(fn):
        register_rule(*ops, table=TOKEN_RULES)(fn if opens_region else _on_token_inputs(fn))
        return fn
    return deco


def _on_token_inputs(fn) -> TokenRule:
    def rule(node: fx.Node, ctx: RuleContext, seq_syms: frozenset) -> list[Strategy]:
        ins = tensor_inputs(node)
        local = [[p for p in ctx.candidates(a) if isinstance(p, (TokenLocal, ExpertRows))] for a in ins]
        return fn(node, ins, local, seq_syms) if any(local) else []
    return rule


def token_strategies(node: fx.Node, ctx: RuleContext, seq_syms: frozenset) -> list[Strategy]:
    """Extra strategies for ``node`` with token-local inputs or outputs (empty if none apply):
    its op's rule in ``TOKEN_RULES``."""
    if node.op != "call_function" or not seq_syms:
        return []
    rule = find_rule(node.target, TOKEN_RULES)
    return rule(node, ctx, seq_syms) if rule is not None else []


def seq_symbols(size_names: dict) -> frozenset:
    return frozenset(s for s, name in size_names.items() if name == "seq")


def token_rows(node: fx.Node, seq_syms) -> set:
    """``L`` placements a view that merges the sequence dim into rows can deliver whatever its
    input's placement: from a sequence shard by the view itself, from a replicated tensor by
    keeping this rank's tokens (``comm.scatter_tokens``, no communication forward).  Offered as
    candidates so the ops downstream enumerate token-local strategies; the solver prices the way
    there."""
    if not seq_syms or node.op != "call_function" or node.target not in RESHAPES:
        return set()
    x, out = val(node.args[0]), val(node)
    sx = sym_val(node.args[0])
    if not (isinstance(x, torch.Tensor) and isinstance(out, torch.Tensor) and isinstance(sx, torch.Tensor)):
        return set()
    groups = dim_groups(list(x.shape), list(out.shape))
    return {q for d in range(sx.ndim) if (q := _entry(sx, groups, d, seq_syms)) is not None}


def _entry(sx: torch.Tensor, groups: list, d: int, seq_syms):
    """``L`` of a view's output when its input dim ``d`` is the sequence and the view merges it
    with others into one row dim (``(B, S, d) -> (B*S, d)``); None otherwise."""
    if not _tokens_in(sx.shape[d], seq_syms):
        return None
    gi, gj = next(g for g in groups if d in g[0])
    if len(gi) > 1 and len(gj) == 1 and all(_plain(sx.shape[k]) for k in gi):
        return TokenLocal(gj[0], "o", (tuple(_expr(sx.shape[k]) for k in gi), gi.index(d)))
    return None


# ---- helpers ----

def _tokens_in(size, seq_syms) -> bool:
    return isinstance(size, torch.SymInt) and bool(size.node.expr.free_symbols & seq_syms)


def _token_free(node: fx.Node, seq_syms) -> bool:
    """A tensor with no sequence-sized dim: the same for every token (weights, constants)."""
    v = sym_val(node)
    return isinstance(v, torch.Tensor) and not any(_tokens_in(s, seq_syms) for s in v.shape)


def _plain(size) -> bool:
    """A size given by one symbol or a constant (its run-time value is easy to read back)."""
    return not isinstance(size, torch.SymInt) or size.node.expr.is_Symbol or size.node.expr.is_number


def _expr(size) -> str:
    return str(size.node.expr) if isinstance(size, torch.SymInt) else str(size)


def sort_key(node: fx.Node, limit: int = 200) -> frozenset:
    """The sort(s) nearest upstream of ``node`` (breadth first): the sort whose order its rows
    follow.  Sorted rows and positions are paired only when this is one and the same sort, so
    rows from two different sorts are never matched up."""
    frontier, seen = [node], {node}
    while frontier and len(seen) < limit:
        found = frozenset(n for n in frontier if n.op == "call_function"
                          and n.target in (aten.sort.default, aten.sort.stable))
        if found:
            return found
        nxt = []
        for n in frontier:
            for a in n.all_input_nodes:
                if a not in seen:
                    seen.add(a)
                    nxt.append(a)
        frontier = nxt
    return frozenset()


# ---- views: the region's entry and exit, and views inside it ----

@register_token_rule(*RESHAPES, opens_region=True)
def _views(node: fx.Node, ctx: RuleContext, seq_syms) -> list[Strategy]:
    x, out = val(node.args[0]), val(node)
    sx, so = sym_val(node.args[0]), sym_val(node)
    if not (isinstance(x, torch.Tensor) and isinstance(sx, torch.Tensor) and isinstance(so, torch.Tensor)):
        return []
    hook = _localize_shape if node.target in (aten.view.default, aten.reshape.default, aten._unsafe_view.default) \
        else None
    groups = dim_groups(list(x.shape), list(out.shape))
    strategies = []
    for p in ctx.candidates(node.args[0]):
        if is_shard(p) and split_factor(p) == 1:                          # entry: S(seq) merged into rows
            q = _entry(sx, groups, p.dim % x.ndim, seq_syms)
            if q is not None:
                strategies.append(Strategy((p,), q, localize=hook))
        elif isinstance(p, TokenLocal):
            i = p.dim
            gi, gj = next(g for g in groups if i in g[0])
            fixed = all(not isinstance(sx.shape[k], torch.SymInt) for k in gi if k != i) and \
                all(not isinstance(so.shape[k], torch.SymInt) for k in gj[1:])
            if p.kind == "o" and p.origin is not None and gi == [i] and len(gj) > 1 and \
                    tuple(_expr(so.shape[k]) for k in gj) == p.origin[0]:
                # exit: split the rows back into the dims they were merged from
                strategies.append(Strategy((p,), S(gj[p.origin[1]]), localize=hook))
            elif gi[0] == i and fixed and _tokens_in(so.shape[gj[0]], seq_syms) and \
                    (p.kind == "o" or (len(gi) == 1 and len(gj) == 1)):
                origin = _reorigin(p.origin, [x.shape[k] for k in gi[1:]], [out.shape[k] for k in gj[1:]])
                strategies.append(Strategy((p,), TokenLocal(gj[0], p.kind, origin), localize=hook))
        elif p == X and node.target in (aten.unsqueeze.default, aten.squeeze.dim):
            gi, gj = next(g for g in groups if 0 in g[0])
            if gi == [0] and gj == [0]:
                strategies.append(Strategy((p,), X))
    return dedupe(strategies)


def _reorigin(origin, merged: list, split: list):
    """The origin of rows after a view merged the constant dims ``merged`` into them (``(T, k)
    -> (T*k,)``: the rows are now the flatten of the origin's dims and k) or split the constant
    dims ``split`` off them (back); None where the rows no longer match a flatten of the origin."""
    if origin is None:
        return None
    sizes = list(origin[0]) + [str(c) for c in merged if c != 1]
    tail = [str(c) for c in split if c != 1]
    if tail:
        if len(sizes) - len(tail) <= origin[1] or sizes[-len(tail):] != tail:
            return None
        sizes = sizes[:-len(tail)]
    return (tuple(sizes), origin[1])


def _same_tokens(a, b) -> bool:
    """Two origins over the same tokens (one may have extra per-token slots after them)."""
    if a is None or b is None or a[1] != b[1]:
        return False
    n = min(len(a[0]), len(b[0]))
    return a[0][:n] == b[0][:n] and n > a[1]


@register_token_rule(aten.split.Tensor, aten.chunk.default, aten.split_with_sizes.default)
def _split(node: fx.Node, ins, local, seq_syms) -> list[Strategy]:
    x = val(node.args[0])
    dim = split_dim(node) % x.ndim
    outs = val(node)
    return [Strategy((p,), tuple(p for _ in outs)) for p in local[0] if p.dim != dim]


@register_token_rule(aten.slice.Tensor, aten.select.int)
def _slice(node: fx.Node, ins, local, seq_syms) -> list[Strategy]:
    """A slice or select along another dim than the rows (a full-range slice of the rows too)."""
    x, out = val(node.args[0]), val(node)
    dim = arg(node, 1, "dim", 0) % x.ndim
    strategies = []
    for p in local[0]:
        if not isinstance(p, TokenLocal):
            continue
        if p.dim != dim:
            d = p.dim if node.target == aten.slice.Tensor or p.dim < dim else p.dim - 1
            strategies.append(Strategy((p,), TokenLocal(d, p.kind, p.origin)))
        elif node.target == aten.slice.Tensor and out.shape[dim] == x.shape[dim] and _from_start(node):
            strategies.append(Strategy((p,), p))
    return strategies


def _from_start(node: fx.Node) -> bool:
    args = list(node.args) + [None] * 4
    return (args[2] in (None, 0)) and (args[4] in (None, 1))


# ---- row-wise compute ----

@register_token_rule(aten.floor_divide.default, aten.div.Tensor_mode, *_EXTRA, torch.Tag.pointwise)
def _pointwise(node: fx.Node, ins, local, seq_syms) -> list[Strategy]:
    out = val(node)
    if not isinstance(out, torch.Tensor) or out.ndim == 0:
        return []
    target = node.target
    maps = [_dim_map(val(a), out) for a in ins]
    strategies = []
    for a_idx, cands in enumerate(local):
        inv = {j: d for d, j in maps[a_idx].items()}
        for p in cands:
            if p.dim not in inv:
                continue
            d = inv[p.dim]
            placements = []
            for b, m in zip(ins, maps):
                if d in m:
                    placements.append(TokenLocal(m[d], p.kind, p.origin) if isinstance(p, TokenLocal) else p)
                elif _token_free(b, seq_syms):
                    placements.append(R)
                else:
                    placements = None
                    break
            if placements is None:
                continue
            if p == X:
                if d != 0 or not _same_routing([b for b, q in zip(ins, placements) if q == X]):
                    continue
                strategies.append(Strategy(tuple(placements), X))
                continue
            if p.kind not in DATA:                   # positions: only copies, or slots -> tokens
                if not (target in _ROWWISE_POSITIONS or (p.kind == "sp" and _slots_to_tokens(node))):
                    continue
            if p.kind not in ("o", "op") and not _same_sort([b for b, q in zip(ins, placements) if q != R]):
                continue
            strategies.append(Strategy(tuple(placements), TokenLocal(d, p.kind, p.origin)))
    return dedupe(strategies)


@register_token_rule(aten.histc.default)
def _histc(node: fx.Node, ins, local, seq_syms) -> list[Strategy]:
    """Counts (``histc`` with a fixed range): a sum over the tokens."""
    if not _fixed_range(node):
        return []
    return [Strategy((p,), P) for p in local[0] if isinstance(p, TokenLocal) and p.kind in DATA]


def _fixed_range(node: fx.Node) -> bool:
    """``histc`` with its range given (``min < max``): with ``min == max`` it takes the range
    from the data, which differs between ranks' tokens."""
    args = list(node.args) + [None] * 4
    lo = args[2] if args[2] is not None else node.kwargs.get("min", 0)
    hi = args[3] if args[3] is not None else node.kwargs.get("max", 0)
    return lo < hi


def _slots_to_tokens(node: fx.Node) -> bool:
    """``floor_divide(positions, k)``: slot positions to token positions (checked where used)."""
    return node.target in (aten.floor_divide.default,) and isinstance(node.args[1], int) and node.args[1] > 0


def _same_sort(nodes) -> bool:
    keys = {sort_key(n) for n in nodes}
    return len(keys) == 1 and len(next(iter(keys))) == 1


def _same_routing(nodes) -> bool:
    keys = {partition_key(n) for n in nodes}
    return len(keys) == 1 and len(next(iter(keys))) == 1


@register_token_rule(aten.linear.default, aten.mm.default, aten.matmul.default, aten.addmm.default)
def _matmul(node: fx.Node, ins, local, seq_syms) -> list[Strategy]:
    """``x @ W`` with replicated, token-free weights: every row of x alone (the router)."""
    strategies = []
    x_pos = 1 if node.target == aten.addmm.default else 0
    x = ins[x_pos] if len(ins) > x_pos else None
    if x is None or node.args[x_pos] is not x:
        return []
    xv = val(x)
    for p in local[x_pos]:
        if not isinstance(p, TokenLocal) or p.kind not in DATA or p.dim >= xv.ndim - 1:
            continue
        if node.target == aten.mm.default and p.dim != 0:
            continue
        if not all(_token_free(b, seq_syms) for k, b in enumerate(ins) if k != x_pos):
            continue
        placements = tuple(p if k == x_pos else R for k in range(len(ins)))
        strategies.append(Strategy(placements, p))
    return strategies


@register_token_rule(aten.sum.dim_IntList, aten.mean.dim, aten.amax.default, aten.amin.default)
def _reduce(node: fx.Node, ins, local, seq_syms) -> list[Strategy]:
    x = val(node.args[0])
    dims, keep = _reduce_dims(node, x.ndim), _keepdim(node)
    strategies = []
    for p in local[0]:
        if not isinstance(p, TokenLocal) or p.kind not in DATA:
            continue
        if p.dim in dims:
            if node.target == aten.sum.dim_IntList and x.is_floating_point():
                strategies.append(Strategy((p,), P))              # a sum over tokens: partial
            continue
        nd = p.dim if keep else p.dim - sum(1 for r in dims if r < p.dim)
        strategies.append(Strategy((p,), TokenLocal(nd, p.kind, p.origin)))
    return strategies


@register_token_rule(aten._softmax.default, aten.softmax.int, aten._log_softmax.default, aten.log_softmax.int,
                     aten.topk.default, aten.sort.default, aten.sort.stable, aten.argmax.default,
                     aten.argmin.default)
def _along(node: fx.Node, ins, local, seq_syms) -> list[Strategy]:
    """Softmax / top-k / sort along a dim: along another dim, every row alone; a sort along the
    rows themselves gives sorted rows and their positions."""
    x = val(node.args[0])
    dim = along_dim(node)
    if dim is None:
        return []
    dim %= max(x.ndim, 1)
    outs = val(node)
    keep = keeps_dim(node)
    strategies = []
    for p in local[0]:
        if not isinstance(p, TokenLocal) or p.kind not in DATA:
            continue
        if p.dim != dim:
            if not keep:
                continue
            out = tuple(p for _ in outs) if isinstance(outs, (tuple, list)) else p
            strategies.append(Strategy((p,), out))
        elif node.target in (aten.sort.default, aten.sort.stable) and p.kind == "o" and x.ndim == 1:
            strategies.append(Strategy((p,), (TokenLocal(0, "s", p.origin), TokenLocal(0, "sp", p.origin))))
    return strategies


# ---- the permutation: sorted rows, their inverse ----

@register_token_rule(aten.index.Tensor)
def _index(node: fx.Node, ins, local, seq_syms) -> list[Strategy]:
    src, indices = node.args[0], node.args[1]
    if len(indices) != 1 or not isinstance(indices[0], fx.Node) or len(ins) != 2:
        return []
    idx = indices[0]
    ssrc, sidx = sym_val(src), sym_val(idx)
    if sidx.ndim != 1:
        return []
    strategies = []
    for q in local[1]:
        if not isinstance(q, TokenLocal):
            continue
        if q.kind in DATA and _token_free(src, seq_syms):              # a table looked up by token data
            strategies.append(Strategy((R, q), TokenLocal(0, q.kind, q.origin)))
            continue
        for p in local[0]:
            if not isinstance(p, TokenLocal) or p.dim != 0:
                continue
            if p.kind == "o" and q.kind == "sp" and _same_tokens(p.origin, q.origin) and \
                    _positions_into(idx, ssrc.shape[0]):
                strategies.append(Strategy((p, q), TokenLocal(0, "s", q.origin)))       # rows in sorted order
            elif p.kind == "s" and q.kind == "ip" and _same_sort([src, idx]) and \
                    _expr(ssrc.shape[0]) == _expr(sidx.shape[0]):
                strategies.append(Strategy((p, q), TokenLocal(0, "o", q.origin)))       # back in token order
    return strategies


def _positions_into(idx: fx.Node, rows) -> bool:
    """``idx`` holds positions of rows of a token-ordered tensor of ``rows`` rows: sort indices
    of such a tensor, or sort indices of one with k slots per row, floor-divided by k."""
    sort_rows = _sort_rows(idx)
    if sort_rows is not None:
        return _expr(sort_rows) == _expr(rows)
    if idx.op == "call_function" and idx.target == aten.floor_divide.default and isinstance(idx.args[1], int):
        inner = _sort_rows(idx.args[0])
        if inner is not None and isinstance(rows, torch.SymInt) and isinstance(inner, torch.SymInt):
            return bool((inner.node.expr - idx.args[1] * rows.node.expr).expand() == 0)
    return False


def _sort_rows(idx: fx.Node):
    """Rows of the 1-D tensor ``idx`` sorts, if ``idx`` is a sort's indices output."""
    if idx.op == "call_function" and idx.target is operator.getitem and idx.args[1] == 1:
        s = idx.args[0]
        if isinstance(s, fx.Node) and s.target in (aten.sort.default, aten.sort.stable):
            return sym_val(s.args[0]).shape[0]
    return None


@register_token_rule(aten.index_put_.default, aten.index_put.default)
def _index_put(node: fx.Node, ins, local, seq_syms) -> list[Strategy]:
    """``base[perm] = arange(n)``: the inverse of the sort ``perm`` (every row written, since a
    sort's indices are a permutation)."""
    base, indices, values = node.args[0], node.args[1], node.args[2]
    accumulate = arg(node, 3, "accumulate", False)
    if accumulate or len(indices) != 1 or len(ins) != 3 or _sort_rows(indices[0]) is None:
        return []
    if values.op != "call_function" or values.target not in (aten.arange.default, aten.arange.start):
        return []
    n = _expr(sym_val(base).shape[0])
    if not (n == _expr(sym_val(indices[0]).shape[0]) == _expr(sym_val(values).shape[0])):
        return []
    strategies = []
    for q in local[1]:
        if isinstance(q, TokenLocal) and q.kind == "sp":
            for b in local[0]:
                if isinstance(b, TokenLocal) and b.dim == 0:
                    strategies.append(Strategy((b, q, TokenLocal(0, "op")), TokenLocal(0, "ip", q.origin)))
    return dedupe(strategies)


@register_token_rule(aten.arange.default, aten.arange.start, opens_region=True)
def _arange(node: fx.Node, ctx: RuleContext, seq_syms) -> list[Strategy]:
    """``arange(n)`` over token rows: this rank's row positions, 0 .. n/N - 1."""
    args = node.args
    if node.target == aten.arange.start and args[0] != 0:
        return []
    end = args[-1] if node.target == aten.arange.default else args[1]
    if not (isinstance(end, fx.Node) and _tokens_in(end.meta.get("val"), seq_syms)):
        return []
    return [Strategy((), TokenLocal(0, "op"), localize=_localize_arange)]


def _localize_arange(node: fx.Node, strategy: Strategy, lctx) -> None:
    args = list(node.args)
    k = 0 if node.target == aten.arange.default else 1
    with node.graph.inserting_before(node):
        local = node.graph.call_function(operator.floordiv, (args[k], lctx.world))
    local.meta["val"] = args[k].meta.get("val")
    args[k] = local
    node.args = tuple(args)
