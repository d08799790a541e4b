"""View-like ops: reshape, transpose, expand, slice, split, cat, repeat, pad, roll, ...

The heart of head sharding: ``view(B, T, H*hd) -> (B, T, H, hd)`` carries ``Shard`` of the
fused ``H*hd`` dim onto the ``H`` dim exactly when ``H`` divides by the world size.  The same
arithmetic (``view_placement``) handles merges, splits and the strided layout of fused
projections (``[q|k|v]`` is ``S(d)x3``; splitting it in three gives three ``S(d)``).
"""
from __future__ import annotations

import math
import operator

import torch
import torch.fx as fx

from autotp.passes.rules import (RuleContext, arg, Strategy, dedupe, register_rule, replicate_strategy, sym_val,
                                 tensor_inputs, val)
from autotp.placement import (D, P, R, S, Blocks, Placement, Sizes, block_sizes, factor_key, is_shard, local_extent,
                              local_shape, split_factor, splits)

aten = torch.ops.aten

# Ops that only re-shape a tensor (no data movement of their own): collectives commute with them.
# The solver's pricing of the fused gather (``comm.all_gather_rs``) and the collectives pass that
# fuses it look through exactly these.
RESHAPES = (aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.unsqueeze.default,
            aten.squeeze.dim, aten.flatten.using_ints)


def dim_groups(ishape, oshape) -> list[tuple[list[int], list[int]]]:
    """Split a reshape into independent groups of (input dims, output dims) with equal products."""
    groups, i, j = [], 0, 0
    ni, no = len(ishape), len(oshape)
    while i < ni or j < no:
        gi, gj, pi, pj = [], [], 1, 1
        if i < ni:
            gi.append(i); pi *= ishape[i]; i += 1
        if j < no:
            gj.append(j); pj *= oshape[j]; j += 1
        while pi != pj:
            if pi < pj and i < ni:
                gi.append(i); pi *= ishape[i]; i += 1
            elif j < no:
                gj.append(j); pj *= oshape[j]; j += 1
            else:
                break
        groups.append((gi, gj))
    return groups


def view_placement(ishape, oshape, p: Placement, world: int, symbolic=()) -> Placement | None:
    """Placement of ``x.view(oshape)`` when ``x`` has placement ``p``; None if the shards
    would not stay contiguous blocks (the view then needs the input replicated).  ``symbolic``:
    input dims whose size varies at run time (batch, sequence); a strided factor made from one
    would hold only at the example's size, so such views get no sharded placement."""
    if p in (R, P, D):
        return p
    if not is_shard(p):
        return None                   # token-local rows: views of them are tokens.py's
    d, f = p.dim % len(ishape), split_factor(p)
    if isinstance(f, tuple):
        return _view_blocks(ishape, oshape, d, f)
    for gi, gj in dim_groups(ishape, oshape):
        if d not in gi:
            continue
        # flatten the group: the shard is `a` outer blocks, each split contiguously across ranks
        a = math.prod(ishape[k] for k in gi if k < d) * f
        varies = any(k in symbolic for k in gi if k < d)
        before = 1
        for t in gj:
            if a % before == 0:
                f_out = a // before
                if varies and f_out != f:
                    return None
                n_t = oshape[t]
                if n_t % f_out == 0 and (n_t // f_out) % world == 0 and n_t > 0:
                    return S(t, f_out)
            before *= oshape[t]
            if before > a:
                break
        return None
    return None


def _view_blocks(ishape, oshape, d: int, sizes: tuple) -> Placement | None:
    """``view_placement`` of ``Blocks(d, sizes)`` (unequal blocks): it passes a view that keeps
    dim ``d`` as it is (merging or splitting only other dims), or merges ``d`` with dims of size 1;
    any other view of the dim would need the blocks' sizes rescaled: None."""
    for gi, gj in dim_groups(ishape, oshape):
        if d in gi:
            kept = [t for t in gj if oshape[t] == ishape[d]]
            if len(kept) == 1 and all(ishape[k] == 1 for k in gi if k != d) \
                    and all(oshape[t] == 1 for t in gj if t != kept[0]):
                return S(kept[0], sizes)
            return None
    return None


def _localize_shape(node: fx.Node, strategy: Strategy, lctx) -> None:
    """Divide the sharded dim's entry of the target-shape argument by the world size.  Other
    entries stay as traced (symbolic batch/sequence sizes keep working; -1 still infers)."""
    if not splits(strategy.output):
        return
    shape = list(node.args[1])
    d = strategy.output.dim
    if len(shape) != val(node).ndim:
        raise AssertionError(f"{node.name}: shape argument {shape} does not match the output rank")
    if isinstance(shape[d], int) and shape[d] != -1:
        out = strategy.output
        shape[d] = local_extent(out.sizes, lctx.world) if isinstance(out, Blocks) and out.grouped else shape[d] // lctx.world
    elif isinstance(shape[d], fx.Node):          # a symbolic size (e.g. batch * heads): divide at run time
        with node.graph.inserting_before(node):
            local = node.graph.call_function(operator.floordiv, (shape[d], lctx.world))
        local.meta["val"] = shape[d].meta.get("val")
        shape[d] = local
    node.args = (node.args[0], shape, *node.args[2:])


def _squeezed(node: fx.Node) -> set[int]:
    """The dims a squeeze removes where they have size 1 (locally too)."""
    nd = max(val(node.args[0]).ndim, 1)
    if node.target == aten.squeeze.default:
        return set(range(nd))
    if node.target == aten.squeeze.dim:
        return {node.args[1] % nd}
    if node.target == aten.squeeze.dims:
        return {d % nd for d in node.args[1]}
    return set()


def _localize_unflatten(node: fx.Node, strategy: Strategy, lctx) -> None:
    """``unflatten(x, dim, sizes)``: the entry of ``sizes`` that the sharded output dim is."""
    x, dim, sizes = node.args[:3]
    dim %= val(x).ndim
    k = strategy.output.dim - dim
    if 0 <= k < len(sizes) and sizes[k] != -1:
        sizes = list(sizes)
        sizes[k] //= lctx.world
        node.args = (x, dim, sizes, *node.args[3:])


@register_rule(aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.unsqueeze.default,
               aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default, aten.flatten.using_ints,
               aten.unflatten.int, aten.view_as.default, aten.reshape_as.default)
def view_rule(node: fx.Node, ctx: RuleContext) -> list[Strategy]:
    x, out = val(node.args[0]), val(node)
    needs_shape = node.target in (aten.view.default, aten.reshape.default, aten._unsafe_view.default)
    hook = _localize_shape if needs_shape else _localize_unflatten if node.target == aten.unflatten.int else None
    if node.target in (aten.view_as.default, aten.reshape_as.default):
        return [replicate_strategy(node)]
    strategies = [replicate_strategy(node)]
    traced = sym_val(node.args[0])
    symbolic = {k for k, size in enumerate(traced.shape) if isinstance(size, torch.SymInt)
                and size.node.expr.free_symbols} if isinstance(traced, torch.Tensor) else set()
    for p in ctx.candidates(node.args[0]):
        q = view_placement(list(x.shape), list(out.shape), p, ctx.world, symbolic)
        if q is not None and is_shard(p) and x.shape[p.dim] == ctx.world and p.dim % x.ndim in _squeezed(node):
            continue                  # the local size-1 shard would be squeezed away
        if q is not None and (p != R):
            strategies.append(Strategy((p,), q, localize=hook if is_shard(q) else None))
    return dedupe(strategies)


def _remap(node_in: fx.Node, ctx: RuleContext, node: fx.Node, dim_fn) -> list[Strategy]:
    """Strategies for ops that move dims around: dim_fn(input dim) -> output dim or None."""
    strategies = [replicate_strategy(node)]
    x = val(node_in)
    for p in ctx.candidates(node_in):
        if p in (P, D) and x.is_floating_point():
            strategies.append(Strategy((p,), p))
        elif is_shard(p):
            d = dim_fn(p.dim % x.ndim)
            if d is not None:
                strategies.append(Strategy((p,), S(d, split_factor(p))))
    return dedupe(strategies)


@register_rule(aten.transpose.int)
def transpose_rule(node, ctx):
    x = val(node.args[0])
    a, b = node.args[1] % x.ndim, node.args[2] % x.ndim
    return _remap(node.args[0], ctx, node, lambda d: b if d == a else a if d == b else d)


@register_rule(aten.t.default)
def t_rule(node, ctx):
    return _remap(node.args[0], ctx, node, lambda d: 1 - d if val(node.args[0]).ndim == 2 else d)


@register_rule(aten.numpy_T.default)
def numpy_t_rule(node, ctx):
    nd = val(node.args[0]).ndim
    return _remap(node.args[0], ctx, node, lambda d: nd - 1 - d)


@register_rule(aten.permute.default)
def permute_rule(node, ctx):
    x = val(node.args[0])
    dims = [d % x.ndim for d in node.args[1]]
    return _remap(node.args[0], ctx, node, lambda d: dims.index(d))


def static_dim(node: fx.Node, dim: int) -> bool:
    """Whether dim ``dim`` of ``node``'s value has one size at every call (not batch or sequence)."""
    traced = sym_val(node)
    size = traced.shape[dim] if isinstance(traced, torch.Tensor) else None
    return not (isinstance(size, torch.SymInt) and size.node.expr.free_symbols)


def slice_bounds(node: fx.Node) -> tuple[int, int, int] | None:
    """``(dim, start, end)`` of a ``slice.Tensor`` node with step 1 and int bounds on a dim of static
    size, clamped to ``[0, size]`` (``x[..., Q:]`` ends at the dim's size); None otherwise."""
    x = val(node.args[0])
    dim, start, end, step = (arg(node, 1, "dim", 0), arg(node, 2, "start"), arg(node, 3, "end"),
                             arg(node, 4, "step", 1))
    if step != 1 or not all(b is None or isinstance(b, int) for b in (start, end)):
        return None
    dim %= x.ndim
    if not static_dim(node.args[0], dim):
        return None
    start, end = slice(start, end).indices(int(x.shape[dim]))[:2]
    return dim, start, max(start, end)


def _block_slice(p: Placement, n: int, start: int, end: int):
    """A slice ``[start, end)`` of a dim of size ``n`` held as ``p`` (``S(d)xf`` or ``Blocks``):
    if it is a run of whole blocks, ``(its placement, the blocks before it, its blocks)``; else
    None.  Locally the slice is the rank's pieces of those blocks: it starts after the rank's
    pieces of the blocks before it (1/N of them, or 1/g of a block whole on groups of ranks:
    ``placement.local_extent``, the same on every rank), so ``q = qkv[..., :Q]`` of a ``[q|k|v]``
    held as ``S(-1)[Q|K|V]`` is ``S(-1)``, and its k held as ``S(-1)[Q|K·R@2|V·R@2]`` is
    ``S(-1)·R@2``."""
    blocks, at, first, last = block_sizes(p, n), 0, None, None
    for j, b in enumerate(blocks):
        if at == start:
            first = j
        at += b
        if at == end:
            last = j
            break
    if first is None or last is None or last < first:
        return None
    return S(p.dim, blocks[first:last + 1]), blocks[:first], blocks[first:last + 1]


@register_rule(aten.slice.Tensor)
def slice_rule(node, ctx):
    """A slice keeps a shard on any other dim, and on its own dim when it takes the whole dim or a
    run of whole blocks of a fused one (``_block_slice``; its bounds become the local ones)."""
    x = val(node.args[0])
    dim = arg(node, 1, "dim", 0) % x.ndim
    full = val(node).shape[dim] == x.shape[dim]
    strategies = _remap(node.args[0], ctx, node, lambda d: d if (d != dim or full) else None)
    bounds = slice_bounds(node)
    if full or bounds is None:
        return strategies
    for p in ctx.candidates(node.args[0]):
        if is_shard(p) and p.dim % x.ndim == dim and (cut := _block_slice(S(dim, split_factor(p)), x.shape[dim],
                                                                          *bounds[1:])) is not None:
            q, before, run = cut
            strategies.append(Strategy((p,), q, localize=_slice_localizer(dim, before, run)))
    return dedupe(strategies)


def _slice_localizer(dim: int, before: tuple, run: tuple):
    """The hook that rewrites a slice of whole blocks (``_block_slice``: the blocks ``before`` it,
    its own ``run``) to the local bounds."""
    def localize(node: fx.Node, strategy: Strategy, lctx) -> None:
        s = local_extent(before, lctx.world)
        node.args = (node.args[0], dim, s, s + local_extent(run, lctx.world), *node.args[4:])
        node.kwargs = {k: v for k, v in node.kwargs.items() if k not in ("dim", "start", "end")}
    return localize


@register_rule(aten.select.int)
def select_rule(node, ctx):
    x = val(node.args[0])
    dim = node.args[1] % x.ndim
    return _remap(node.args[0], ctx, node, lambda d: None if d == dim else (d if d < dim else d - 1))


@register_rule(aten.expand.default)
def expand_rule(node: fx.Node, ctx: RuleContext) -> list[Strategy]:
    x, out = val(node.args[0]), val(node)
    off = out.ndim - x.ndim
    strategies = []
    for s in _remap(node.args[0], ctx, node, lambda d: d + off):
        strategies.append(Strategy(s.inputs, s.output, localize=_localize_shape if is_shard(s.output) else None))
    # a replicated input broadcast along a new/size-1 dim may be expanded locally to a shard
    for d in range(out.ndim):
        j = d - off
        if (j < 0 or x.shape[j] == 1) and out.shape[d] != 1 and ctx.shardable(out.shape[d]):
            strategies.append(Strategy((R,), S(d), localize=_localize_shape))
    return dedupe(strategies)


def _localize_split(node: fx.Node, strategy: Strategy, lctx) -> None:
    size = node.args[1]
    p = strategy.inputs[0]
    if isinstance(p, Blocks) and p.grouped:      # each piece is its blocks' local part (a k: 1/g of it)
        d = p.dim
        size = [local_shape(o.shape, q, lctx.world)[d] for o, q in zip(val(node), strategy.output)]
    else:
        size = [s // lctx.world for s in size] if isinstance(size, (list, tuple)) else size // lctx.world
    node.args = (node.args[0], size, *node.args[2:])


def split_dim(node: fx.Node) -> int:
    """The dim a split / split_with_sizes / chunk / unbind node splits along."""
    dim = arg(node, 1, "dim", 0) if node.target == aten.unbind.int else arg(node, 2, "dim", 0)
    return 0 if dim is None else dim


@register_rule(aten.split.Tensor, aten.split_with_sizes.default, aten.unbind.int, aten.chunk.default)
def split_rule(node: fx.Node, ctx: RuleContext) -> list[Strategy]:
    x, outs = val(node.args[0]), val(node)
    unbind = node.target == aten.unbind.int
    # chunk(x, n, dim) keeps its count: local chunks shrink with the shard, no argument changes
    hook = None if node.target == aten.chunk.default else _localize_split
    dim = split_dim(node) % x.ndim
    strategies = [replicate_strategy(node)]
    for p in ctx.candidates(node.args[0]):
        if p in (P, D) and x.is_floating_point():
            strategies.append(Strategy((p,), tuple(p for _ in outs)))
        elif is_shard(p):
            d, f = p.dim % x.ndim, split_factor(p)
            if d != dim:
                nd = d if (not unbind or d < dim) else d - 1
                strategies.append(Strategy((p,), tuple(S(nd, f) for _ in outs)))
            elif not unbind and (pieces := _split_blocks([o.shape[dim] for o in outs], block_sizes(p, x.shape[dim]))):
                strategies.append(Strategy((p,), tuple(S(d, fi) for fi in pieces), localize=hook))
    return dedupe(strategies)


def _split_blocks(sizes: list[int], blocks: tuple) -> list[tuple] | None:
    """Splitting a dim held as blocks of ``blocks`` (``S(d)xf``: ``f`` equal ones; ``Blocks``: its
    sizes; each cut across the ranks) into pieces of ``sizes``: a piece made of whole blocks is
    ``S(d, its blocks)``, so ``[q|k|v]`` as ``S(d)x3`` gives three ``S(d)``, a grouped-query
    ``[q|k|v]`` as ``S(d)[Q|K|V]`` split ``(Q, K, V)`` gives three ``S(d)`` too, and a fused
    projection of ``f`` equal blocks split into unequal pieces (``[q_0 q_1 | k | v]`` as ``S(d)x4``)
    gives ``S(d)x2, S(d), S(d)``.  None if a piece would cut a block (or is empty)."""
    out, j = [], 0
    for size in sizes:
        first, at = j, 0
        while at < size and j < len(blocks):
            at += blocks[j]
            j += 1
        if at != size or j == first:
            return None
        out.append(blocks[first:j] if isinstance(blocks, Sizes) else tuple(blocks[first:j]))
    return out


@register_rule(aten.cat.default)
def cat_rule(node: fx.Node, ctx: RuleContext) -> list[Strategy]:
    ins = tensor_inputs(node)
    out = val(node)
    dim = arg(node, 1, "dim", 0) % out.ndim
    strategies = [replicate_strategy(node)]
    if not ins or any(val(a).ndim != out.ndim for a in ins):
        return strategies
    if all(val(a).is_floating_point() for a in ins):
        strategies.append(Strategy(tuple(P for _ in ins), P))
    options = {(p.dim % out.ndim, split_factor(p)) for a in ins for p in ctx.candidates(a) if is_shard(p)}
    same_size = len({val(a).shape[dim] for a in ins}) == 1
    for d, f in sorted(options, key=lambda o: (o[0], factor_key(o[1]))):
        if not all(ctx.shardable(val(a).shape[d], f) for a in ins):
            continue
        if d != dim:
            strategies.append(Strategy(tuple(S(d, f) for _ in ins), S(d, f)))
        elif same_size:
            strategies.append(Strategy(tuple(S(d, f) for _ in ins), S(d, f * len(ins))))
    return dedupe(strategies)


@register_rule(aten.stack.default)
def stack_rule(node: fx.Node, ctx: RuleContext) -> list[Strategy]:
    ins = tensor_inputs(node)
    out = val(node)
    dim = arg(node, 1, "dim", 0) % out.ndim
    strategies = [replicate_strategy(node)]
    options = {(p.dim % val(a).ndim, split_factor(p)) for a in ins for p in ctx.candidates(a) if is_shard(p)}
    for d, f in sorted(options, key=lambda o: (o[0], factor_key(o[1]))):
        if all(ctx.shardable(val(a).shape[d], f) for a in ins):
            strategies.append(Strategy(tuple(S(d, f) for _ in ins), S(d if d < dim else d + 1, f)))
    return dedupe(strategies)


@register_rule(aten.index.Tensor)
def index_rule(node: fx.Node, ctx: RuleContext) -> list[Strategy]:
    """``x[i0, i1, ...]`` with index tensors on the leading dims: the indexed dims are gathered
    (they must be whole), the trailing dims pass through; gathering is linear, so a partial
    sum stays partial."""
    x, indices = node.args[0], node.args[1]
    strategies = [replicate_strategy(node)]
    if any(i is None for i in indices):
        return strategies
    xv, out = val(x), val(node)
    k = len(indices)
    shift = out.ndim - xv.ndim                    # index dims replace the first k dims
    n_idx = len(indices)
    for p in ctx.candidates(x):
        rest = tuple(R for _ in range(n_idx))
        if p in (P, D) and xv.is_floating_point():          # a row gather keeps either kind of sum
            strategies.append(Strategy((p,) + rest, p))
        elif is_shard(p) and p.dim % xv.ndim >= k:
            strategies.append(Strategy((p,) + rest, S(p.dim % xv.ndim + shift, split_factor(p))))
    return dedupe(strategies)


@register_rule(aten.view_as_complex.default)
def view_as_complex_rule(node: fx.Node, ctx: RuleContext) -> list[Strategy]:
    """``(..., n, 2)`` real -> ``(..., n)`` complex: the last dim (real, imaginary) is dropped, every
    other dim keeps its index, so a shard on any of them passes; the view is linear, so a partial
    sum stays one.  The pair dim itself must be whole."""
    nd = val(node.args[0]).ndim
    return _remap(node.args[0], ctx, node, lambda d: d if d < nd - 1 else None)


@register_rule(aten.view_as_real.default)
def view_as_real_rule(node: fx.Node, ctx: RuleContext) -> list[Strategy]:
    """``(..., n)`` complex -> ``(..., n, 2)`` real: a new trailing (real, imaginary) dim; every dim
    of the input keeps its index."""
    return _remap(node.args[0], ctx, node, lambda d: d)


def _localize_repeat_interleave(node: fx.Node, strategy: Strategy, lctx) -> None:
    """A given ``output_size`` (the repeated dim's full size) becomes the local one."""
    if node.kwargs.get("output_size") is not None and strategy.output.dim == arg(node, 2, "dim") % val(node).ndim:
        node.kwargs = {**node.kwargs, "output_size": node.kwargs["output_size"] // lctx.world}


@register_rule(aten.repeat_interleave.self_int, aten.repeat_interleave.self_Tensor)
def repeat_interleave_rule(node: fx.Node, ctx: RuleContext) -> list[Strategy]:
    """``repeat_interleave(x, r, dim)``: row ``i`` of ``dim`` becomes rows ``i*r .. i*r+r-1``.  A shard
    on another dim passes; so does one on ``dim`` itself when ``r`` is one int: the ranks' blocks of
    ``n`` input rows become their blocks of ``n*r`` output rows (GQA's k/v repeat: a rank's kv heads
    become the copies its query heads read), strided blocks alike.  Copies are linear: a partial
    sum stays one.  Per-row counts (a tensor ``r``, replicated) pass shards on other dims only.
    Without ``dim`` the input is flattened first: replicated only."""
    x = val(node.args[0])
    dim = arg(node, 2, "dim")
    if dim is None:
        return [replicate_strategy(node)]
    dim %= x.ndim
    per_row = len(tensor_inputs(node)) == 2
    out = []
    for s in _remap(node.args[0], ctx, node, lambda d: None if per_row and d == dim else d):
        out.append(Strategy(s.inputs + (R,) * (per_row and len(s.inputs) == 1), s.output,
                            localize=_localize_repeat_interleave if is_shard(s.output) else None))
    return out


def _localize_repeat(node: fx.Node, strategy: Strategy, lctx) -> None:
    """A replicated input repeated into a shard: the sharded dim's count becomes the rank's share."""
    counts = list(node.args[1])
    counts[strategy.output.dim] //= lctx.world
    node.args = (node.args[0], counts, *node.args[2:])


@register_rule(aten.repeat.default)
def repeat_rule(node: fx.Node, ctx: RuleContext) -> list[Strategy]:
    """``repeat(x, counts)``: output dim ``k`` is ``counts[k]`` copies of input dim ``k - off`` laid end to
    end (``off`` leading new dims when ``counts`` is longer than ``x.shape``).  A rank's ``S(d)`` block
    of ``n`` rows, repeated ``r`` times, is its block of each of the ``r`` copies: ``S(d)xr`` (a fused dim
    of ``r`` equal blocks; ``S(d)xf`` becomes ``S(d)x(f*r)``), so a count of 1 keeps the shard as it is and
    the counts stay unchanged.  A count that varies at run time (the batch) would give a factor that
    varies: that dim must be whole.  A replicated input may be repeated straight into ``S(k)`` when
    ``counts[k]`` divides by N: each rank makes ``counts[k]/N`` copies (the count localized).  Copies are
    linear and keep every element on the rank that held it: ``P`` and ``D`` pass."""
    x = val(node.args[0])
    counts = list(node.args[1])
    off = len(counts) - x.ndim
    strategies = []
    for s in _remap(node.args[0], ctx, node, lambda d: d + off):
        if not is_shard(s.output):
            strategies.append(s)
        elif isinstance(r := counts[s.output.dim], int) and r > 0:            # 0 copies: an empty dim
            strategies.append(Strategy(s.inputs, S(s.output.dim, split_factor(s.output) * r)))
    for k, r in enumerate(counts):
        if isinstance(r, int) and r > 1 and r % ctx.world == 0:
            strategies.append(Strategy((R,), S(k), localize=_localize_repeat))
    return dedupe(strategies)


def _padded_dims(node: fx.Node, ndim: int) -> set[int]:
    """The dims a ``constant_pad_nd`` / ``pad`` call pads: ``pad`` holds (before, after) pairs from
    the last dim backwards; a pair of zeros leaves its dim alone."""
    pad = list(node.args[1])
    return {ndim - 1 - i // 2 for i, amount in enumerate(pad) if not (isinstance(amount, int) and amount == 0)}


def _pad_is_linear(node: fx.Node) -> bool:
    """Whether padding a sum of tensors is the sum of the padded ones: the new entries are copies of
    the input's (reflect, replicate, circular) or a constant 0."""
    if node.target == aten.constant_pad_nd.default:
        return arg(node, 2, "value", 0) == 0
    return arg(node, 2, "mode", "constant") != "constant" or arg(node, 3, "value", None) in (None, 0)


@register_rule(aten.constant_pad_nd.default, aten.pad.default)
def pad_rule(node: fx.Node, ctx: RuleContext) -> list[Strategy]:
    """``pad(x, pad, mode, value)``: each padded dim needs its whole extent (its edges move); every dim
    it leaves alone keeps its shard, and the pad list is the same on every rank.  ``P``/``D`` pass
    when the op is linear (``_pad_is_linear``): a constant 0 pads every term with zeros; a nonzero
    value would be counted N times."""
    x = val(node.args[0])
    padded = _padded_dims(node, x.ndim)
    linear = _pad_is_linear(node)
    return [s for s in _remap(node.args[0], ctx, node, lambda d: None if d in padded else d)
            if linear or s.inputs[0] not in (P, D)]


@register_rule(aten.roll.default)
def roll_rule(node: fx.Node, ctx: RuleContext) -> list[Strategy]:
    """``roll(x, shifts, dims)``: a cyclic shift along each of ``dims`` (Swin's shifted windows); the
    rolled dims must be whole, every other dim keeps its shard.  A permutation of the entries:
    ``P`` and ``D`` pass.  Without ``dims`` the tensor is rolled flattened: no dim keeps a shard."""
    x = val(node.args[0])
    dims = arg(node, 2, "dims", [])
    dims = [dims] if isinstance(dims, int) else dims
    rolled = {d % x.ndim for d in dims} if dims else set(range(x.ndim))
    return _remap(node.args[0], ctx, node, lambda d: None if d in rolled else d)


# Ops that view, cast or copy a tensor without computing with it: a weight seen through them is still
# the weight (the solver never moves it; the plan names the op that computes with it).
WEIGHT_VIEWS = {"aten.transpose.int", "aten.t.default", "aten.numpy_T.default", "aten.view.default", "aten.reshape.default",
                 "aten.permute.default", "aten.to.dtype", "aten._to_copy.default", "aten.alias.default",
                 "aten.contiguous.default", "aten.clone.default", "aten.detach.default", "aten.unsqueeze.default",
                 "aten.squeeze.dim", "aten.slice.Tensor", "aten.select.int", "aten.split.Tensor",
                 "aten.chunk.default", "aten.unbind.int", "<built-in function getitem>", "aten.expand.default"}
