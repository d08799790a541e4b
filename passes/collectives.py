"""insert_collectives: put a collective on every edge whose placements differ; then three
passes of their own that improve what it inserted (in the pipeline after it, ``passes/__init__``):
``fuse_gather_grad_reduce`` (a gather for sharded consumers reduce-scatters its gradient),
``hoist_gathers`` (above repeat_kv's views, for ``lower_attention``) and ``bucket_grad_reduces``
(one all-reduce for many small parameter gradients).

For each consumer input whose required placement differs from the producer's, insert the
redistribution (``passes.redistribute.steps``) right after the producer, shared by every
consumer that needs the same placement.  A replicated tensor used inside a sharded op (the
input of a column-parallel linear) also gets ``reduce_grad`` (Megatron's f), once per
tensor, so its gradient — a partial sum on each rank — is all-reduced in backward.

Every inserted node carries ``meta["autotp"] = {"placement", "collective", "reason"}``.
"""
from __future__ import annotations

import torch
import torch.fx as fx
from torch.utils import _pytree as pytree

from autotp import comm
from autotp.placement import Blocks, R, fmt, group_replicated, groups_of, local_shape
from autotp.passes.context import PassContext, block_path
from autotp.passes.redistribute import steps
from autotp.passes.rules import tensor_inputs, val
from autotp.passes.rules.views import RESHAPES


def _placement(node: fx.Node):
    return node.meta.get("autotp", {}).get("placement")


def _replace_input(node: fx.Node, slot: int, new: fx.Node) -> None:
    """Point tensor input number ``slot`` (``tensor_inputs`` order) of ``node`` at ``new``."""
    counter = [0]

    def swap(a):
        if isinstance(a, fx.Node) and isinstance(a.meta.get("val"), torch.Tensor):
            i = counter[0]
            counter[0] += 1
            return new if i == slot else a
        return a

    args, kwargs = pytree.tree_map(swap, (node.args, node.kwargs))
    node.args, node.kwargs = tuple(args), kwargs


def _copy_meta(src: fx.Node, dst: fx.Node) -> None:
    for key in ("stack_trace", "nn_module_stack"):
        if key in src.meta:
            dst.meta[key] = src.meta[key]


def _after(graph: fx.Graph, t: fx.Node, consumer: fx.Node):
    """Where a collective of ``t`` for ``consumer`` goes: right after ``t``, or, for a graph input
    (a parameter), right before its first consumer (nodes run in order, so the first consumer
    met is the earliest) — where its block reads it, so the block stays one run of the graph."""
    return graph.inserting_before(consumer) if t.op == "placeholder" else graph.inserting_after(t)


def insert_collectives(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    graph = gm.graph
    made: dict[tuple, fx.Node] = {}
    size_nodes: dict[str, fx.Node] = {}         # size symbol -> its sym_size node (token collectives)

    def redistributed(t: fx.Node, dst, consumer: fx.Node) -> fx.Node:
        src = _placement(t)
        key = (t, "to", dst)
        if key in made:
            return made[key]
        cur, cur_p = t, src
        route = steps(src, dst)
        for step in route:
            extra = (ctx.world, ctx.rank) if step.fn not in (comm.all_reduce,) else ()
            if step.fn in (comm.moe_dispatch, comm.moe_combine):
                # the routing's split sizes: the grouped matmul's offs (dispatch), or that of the
                # grouped matmuls the expert rows came from (combine)
                # the dispatch goes right before its grouped matmul (after both the rows and offs);
                # the combine right after the expert rows (their grouped matmul read offs before)
                if step.fn is comm.moe_dispatch:
                    offs, at = consumer.args[2], graph.inserting_before(consumer)
                else:
                    offs, at = _routing_of(cur), graph.inserting_after(cur)
                with at:
                    new = graph.call_function(step.fn, (cur, offs, ctx.group, *extra, *step.args))
            elif step.fn in comm.TOKEN_COLLECTIVES:
                dim, (exprs, k) = step.args
                sizes = [_size_node(graph, e, size_nodes) for e in exprs]
                with _after(graph, cur, consumer):
                    new = graph.call_function(step.fn, (cur, dim, k, ctx.group, *extra, *sizes))
            else:
                with _after(graph, cur, consumer):
                    new = graph.call_function(step.fn, (cur, *step.args, ctx.group, *extra))
            new.meta["val"], new.meta["autotp_val"] = t.meta["val"], val(t)
            _copy_meta(t if t.op != "placeholder" else consumer, new)   # it belongs to the producer
            new_p = dst if step is route[-1] else R
            new.meta["autotp"] = {"placement": new_p, "collective": step.fn.__name__,
                                  "forward": step.forward, "backward": step.backward,
                                  "volume": step.volume(ctx.world),
                                  "reason": f"{t.name} is {fmt(cur_p)}, {consumer.name} needs {fmt(new_p)}"}
            cur, cur_p = new, new_p
        made[key] = cur
        return cur

    def grad_reduced(t: fx.Node, consumer: fx.Node) -> fx.Node:
        key = (t, "f")
        if key not in made:
            with _after(graph, t, consumer):
                new = graph.call_function(comm.reduce_grad, (t, ctx.group))
            new.meta["val"], new.meta["autotp_val"] = t.meta["val"], val(t)
            _copy_meta(consumer, new)
            new.meta["autotp"] = {"placement": R, "collective": "reduce_grad", "forward": None,
                                  "backward": "all_reduce",
                                  "reason": f"{t.name} is R and feeds sharded {consumer.name}: its gradient "
                                            f"is a partial sum, all-reduced in backward"}
            made[key] = new
        return made[key]

    def group_grad_reduced(t: fx.Node, consumer: fx.Node) -> fx.Node:
        """A parameter whose rows a group of ranks holds whole (``Grid(S(d), R, a)``, kv heads):
        its gradient, each rank's share from its own query heads, is summed over the group."""
        key = (t, "group f")
        if key not in made:
            groups = _placement(t).groups
            with _after(graph, t, consumer):
                new = graph.call_function(comm.reduce_grad_in_group, (t, ctx.group, groups))
            new.meta["val"], new.meta["autotp_val"] = t.meta["val"], val(t)
            _copy_meta(consumer, new)
            new.meta["autotp"] = {"placement": _placement(t), "collective": "reduce_grad_in_group", "forward": None,
                                  "backward": "all_reduce", "volume": _group_volume(groups, ctx.world),
                                  "reason": f"{t.name} is {fmt(_placement(t))}: each of the {ctx.world // groups} "
                                            f"ranks holding a kv head has its query heads' share of the gradient, "
                                            f"all-reduced over them in backward"}
            made[key] = new
        return made[key]

    for node in list(graph.nodes):
        info = node.meta.get("autotp", {})
        if node.op == "output":
            settled = info.get("settled", {})        # sharded_outputs: pending sums settled (solve.settle)
            for i, t in enumerate(tensor_inputs(node)):
                want = settled.get(t.name, _placement(t)) if ctx.sharded_outputs else R
                if _placement(t) not in (None, want) and i not in ctx.state_outputs:   # carried state stays put
                    _replace_input(node, i, redistributed(t, want, node))
            continue
        strategy = info.get("strategy")
        if strategy is None or node.op == "placeholder":
            continue
        for i, t in enumerate(tensor_inputs(node)):
            need, have = strategy.inputs[i], _placement(t)
            if have is None:
                continue
            src = t if need == have else redistributed(t, need, node)
            grads = val(t) is not None and val(t).is_floating_point()
            if need == R and not strategy.replicated and grads and _carries_grad(t):
                src = grad_reduced(src, node)
            elif group_replicated(have) and t.op == "placeholder" and t.name in ctx.params and grads:
                src = group_grad_reduced(t, node)
            elif isinstance(have, Blocks) and have.grouped and t.op == "placeholder" and t.name in ctx.params and grads:
                key = (t, "rows f")
                if key not in made:
                    made[key] = _reduce_group_rows(graph, t, node, ctx)
                src = made[key]
            if src is not t:
                _replace_input(node, i, src)
    graph.lint()
    gm.recompile()
    return gm


def _reduce_group_rows(graph: fx.Graph, t: fx.Node, consumer: fx.Node, ctx: PassContext) -> fx.Node:
    """A fused parameter held as ``Blocks`` with blocks whole on groups of ranks (``placement.Sizes``:
    the k and v of a ``[q | k | v]`` replicated over the ranks whose query heads read them): the
    gradient of those rows is a partial sum over the group — each rank's share from its own query
    heads — and is summed over it (``reduce_grad_in_group``; ``reduce_grad`` over every rank for a
    block whole on all of them, MQA), while the rows split over all ranks (q: different heads on
    each rank) are left alone.  The local rows are cut into runs of blocks of one group count, the
    reduced runs joined again: ``cat([w[:q], reduce(w[q:q+k+v])])``.  Each run's reduction is an
    ordinary parameter gradient reduction, so ``bucket_grad_reduces`` buckets it with the others."""
    p = _placement(t)
    d, sizes = p.dim, p.sizes
    runs: list = []                           # (group count, local start, local end)
    at = 0
    for b, g in zip(sizes, groups_of(sizes)):
        n = b // (ctx.world if g is None else g)
        if runs and runs[-1][0] == g:
            runs[-1][2] += n
        else:
            runs.append([g, at, at + n])
        at += n
    local = val(t).new_empty(local_shape(val(t).shape, p, ctx.world))
    pieces = []
    for g, start, end in runs:
        with graph.inserting_before(consumer):
            rows = graph.call_function(torch.ops.aten.slice.Tensor, (t, d, start, end))
        rows.meta["val"] = rows.meta["autotp_val"] = local.narrow(d, start, end - start)
        rows.meta["autotp"] = {"placement": None}          # None: the value is the local one
        _copy_meta(consumer, rows)
        if g is not None:
            fn, args = (comm.reduce_grad, (ctx.group,)) if g == 1 else (comm.reduce_grad_in_group, (ctx.group, g))
            with graph.inserting_before(consumer):
                reduced = graph.call_function(fn, (rows, *args))
            reduced.meta["val"] = reduced.meta["autotp_val"] = rows.meta["val"]
            _copy_meta(consumer, reduced)
            copies = ctx.world // g
            reduced.meta["autotp"] = {
                "placement": None, "collective": fn.__name__, "forward": None, "backward": "all_reduce",
                "volume": _group_volume(g, ctx.world) * g if g > 1 else 1.0,      # of these local rows' bytes
                "reason": f"{t.name} is {fmt(p)}: each of the {copies} ranks holding rows {start}:{end} (kv heads) "
                          f"has its query heads' share of their gradient, all-reduced over them in backward"}
            rows = reduced
        pieces.append(rows)
    with graph.inserting_before(consumer):
        joined = graph.call_function(torch.ops.aten.cat.default, (pieces, d))
    joined.meta["val"], joined.meta["autotp_val"] = t.meta["val"], val(t)
    joined.meta["autotp"] = {"placement": p}
    _copy_meta(consumer, joined)
    return joined


def _group_volume(groups: int, world: int) -> float:
    """An all-reduce of a full tensor's 1/``groups`` over the ``world/groups`` ranks of a group, as a
    multiple of an all-reduce of the full tensor over all ranks (ring: 2(n-1)/n x bytes)."""
    b = world // groups
    return (1 / groups) * ((b - 1) / b) / ((world - 1) / world) if world > 1 else 0.0


def fuse_gather_grad_reduce(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    """``all_gather`` whose only user is ``reduce_grad`` (directly or through a chain of
    single-user reshapes, which commute with both): the gathered tensor feeds sharded ops only,
    so its gradient is a partial sum of the full tensor and the gather's backward can
    reduce-scatter it straight into the shard (``comm.all_gather_rs``) instead of all-reducing
    the whole tensor and keeping a chunk.  Half the backward bytes; what Megatron-SP does."""
    graph = gm.graph
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target is not comm.reduce_grad:
            continue
        gather = node.args[0]
        while isinstance(gather, fx.Node) and gather.target in RESHAPES and len(gather.users) == 1:
            gather = gather.args[0]
        fused = {comm.all_gather: comm.all_gather_rs, comm.gather_tokens: comm.gather_tokens_rs}
        if not (isinstance(gather, fx.Node) and gather.target in fused and len(gather.users) == 1):
            continue
        info = gather.meta["autotp"]
        gather.target = fused[gather.target]
        info.update(collective=gather.target.__name__, backward="reduce_scatter",
                    reason=info["reason"] + "; its consumers are sharded, so the gradient is reduce-scattered")
        node.replace_all_uses_with(node.args[0])
        graph.erase_node(node)
    return _done(gm)


def bucket_grad_reduces(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    """Replicated parameters used inside sharded ops (norm scales under sequence parallelism,
    biases added to sharded activations) each get Megatron's f: a small all-reduce of their
    gradient.  Bucket them: ``reduce_grad(cat(p1.flatten(), p2.flatten(), ...))`` and each use
    reads its slice — one all-reduce per step (when the last of these gradients is ready, at the
    end of backward), not one per parameter; the forward costs a copy of these small tensors.

    Where FSDP2 shards the parameters per layer (``ctx.dp_sharded``) a layer's parameters are
    gathered only for the layer, so a bucket cannot read them ahead of it: one bucket per block
    (``block_path``; the root's part is one more), inside the block, one all-reduce per layer."""
    graph = gm.graph
    fs = [n for n in graph.nodes if n.op == "call_function" and n.target in (comm.reduce_grad, comm.reduce_grad_in_group)
          and _parameter_rows(n.args[0], ctx)]
    groups: dict = {}
    for f in fs:                      # one bucket per collective and process group (kv weights: their group)
        groups.setdefault((block_path(f) if ctx.dp_sharded else None, f.target, f.args[2:]), []).append(f)
    for block, group in groups.items():
        if len(group) >= 2 and len({val(f.args[0]).dtype for f in group}) == 1:
            # a block's bucket sits where the block first reads one; the model's right after its inputs
            first = group[0] if ctx.dp_sharded else next(n for n in graph.nodes if n.op != "placeholder")
            _bucket(graph, group, first, ctx, inside=ctx.dp_sharded)
    return _done(gm)


def _parameter_rows(n: fx.Node, ctx: PassContext) -> bool:
    """A parameter, or a run of its local rows (``_reduce_group_rows``: a slice of one)."""
    if n.op == "call_function" and n.target == torch.ops.aten.slice.Tensor and n.meta.get("autotp", {}).get("placement", 0) is None:
        n = n.args[0]
    return n.op == "placeholder" and n.name in ctx.params


def _bucket(graph: fx.Graph, fs: list[fx.Node], first: fx.Node, ctx: PassContext, inside: bool) -> None:
    """One ``reduce_grad`` for the parameters ``fs`` reduce, placed before ``first``; ``inside``:
    the bucket belongs to the block of ``fs[0]`` (its module path), else to the model's root."""
    params = [f.args[0] for f in fs]
    # a kv weight (Grid(S(d), R, a)) is bucketed as its local rows: what its group all-reduces
    grid = fs[0].target is comm.reduce_grad_in_group
    locals_ = [val(p).new_empty(local_shape(val(p).shape, _placement(p), ctx.world)) if grid else val(p)
               for p in params]
    for p in params:                      # a run of a parameter's rows is read where the bucket is
        if p.op != "placeholder":
            first.prepend(p)
            if not inside:
                for key in ("stack_trace", "nn_module_stack"):
                    p.meta.pop(key, None)
    flats = []
    for p in params:
        with graph.inserting_before(first):
            flats.append(graph.call_function(torch.ops.aten.reshape.default, (p, [-1])))
    with graph.inserting_before(first):
        cat = graph.call_function(torch.ops.aten.cat.default, (flats,))
        bucket = graph.call_function(fs[0].target, (cat, *fs[0].args[1:]))
    total = sum(v.numel() for v in locals_)
    like = locals_[0]
    for n, v in [*zip(flats, (v.reshape(-1) for v in locals_)), (cat, like.new_empty(total)),
                 (bucket, like.new_empty(total))]:
        n.meta["val"] = n.meta["autotp_val"] = v
        n.meta["autotp"] = {"placement": None if grid else R}      # None: the value is the local one
        if inside:
            _copy_meta(fs[0], n)
    bucket.meta["autotp"].update({k: v for k, v in fs[0].meta["autotp"].items() if k not in ("placement", "reason")})
    bucket.meta["autotp"]["reason"] = (
        f"{len(params)} kv weights replicated over their groups: their gradients, partial sums over each group, "
        f"all-reduced together in one bucket" if grid else
        f"{len(params)} replicated parameters feed sharded ops: their gradients are partial sums, all-reduced "
        f"together in one bucket")
    if grid:                              # the bucket holds local rows: 1/groups of the weights' bytes
        bucket.meta["autotp"]["volume"] = _group_volume(fs[0].args[2], ctx.world) * fs[0].args[2]
    offset, cur = 0, bucket
    for f, p, v in zip(fs, params, locals_):
        n = v.numel()
        with graph.inserting_after(cur):
            piece = graph.call_function(torch.ops.aten.slice.Tensor, (bucket, 0, offset, offset + n))
        with graph.inserting_after(piece):
            view = graph.call_function(torch.ops.aten.view.default, (piece, list(v.shape)))
        piece.meta["val"] = piece.meta["autotp_val"] = like.new_empty(n)
        view.meta["val"] = view.meta["autotp_val"] = val(p)
        piece.meta["autotp"] = {"placement": None if grid else R}
        view.meta["autotp"] = {"placement": _placement(p)}
        if inside:                        # a root bucket's pieces are the root's: the blocks stay contiguous
            for node in (piece, view):
                _copy_meta(f, node)
        f.replace_all_uses_with(view)
        graph.erase_node(f)
        offset, cur = offset + n, view


def hoist_gathers(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    """Move an all-gather above the ``unsqueeze`` and full-range ``slice`` nodes that feed it
    (``x[:, :, None, :, :]``, repeat_kv's first step): the same bytes, and the chain after the
    gather is then the replicated one ``lower_attention`` recognises (it feeds un-repeated k/v
    to the attention op instead of materialising the repeat)."""
    aten = torch.ops.aten
    graph = gm.graph
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in (comm.all_gather, comm.all_gather_rs):
            continue
        x, dim, factor = node.args[0], node.args[1], node.args[2]
        moved = []
        while isinstance(x, fx.Node) and len(x.users) == 1 and x.op == "call_function":
            if x.target == aten.unsqueeze.default:
                u = x.args[1] % val(x).ndim
                if u == dim:
                    break
                dim = dim - 1 if u < dim else dim
            elif x.target == aten.slice.Tensor and _full_slice(x):
                if x.args[1] % val(x).ndim == dim:
                    break
            else:
                break
            moved.append(x)
            x = x.args[0]
        if not moved:
            continue
        # gather x along `dim`, then redo the moved views (farthest first) on the gathered tensor
        users = list(node.users)
        node.args = (x, dim, factor, *node.args[3:])
        node.meta["val"], node.meta["autotp_val"] = x.meta["val"], val(x)
        cur = node
        for view in reversed(moved):
            with graph.inserting_after(cur):
                new = graph.call_function(view.target, (cur, *view.args[1:]), dict(view.kwargs))
            new.meta = dict(view.meta)
            new.meta["autotp"] = {**view.meta.get("autotp", {}), "placement": node.meta["autotp"]["placement"],
                                  "strategy": None}
            cur = new
        for user in users:
            user.replace_input_with(node, cur)
        for view in moved:                    # nearest first: each loses its only user in turn
            graph.erase_node(view)
    return _done(gm)


def _done(gm: fx.GraphModule) -> fx.GraphModule:
    gm.graph.lint()
    gm.recompile()
    return gm


def _full_slice(node: fx.Node) -> bool:
    """``slice(x, d, 0, end)`` with ``end`` at least the dim's size: the identity."""
    args = list(node.args) + [None] * 4
    start, end, step = args[2] or 0, args[3], args[4] if args[4] is not None else 1
    size = val(node.args[0]).shape[args[1] % val(node.args[0]).ndim]
    return start == 0 and step == 1 and (end is None or (isinstance(end, int) and end >= size))


def _size_node(graph: fx.Graph, expr: str, made: dict):
    """The run-time value of a size: an int, or ``sym_size`` of the first user input that has a
    dim of exactly that size symbol (made once per symbol, right after the inputs; ``made``
    remembers it)."""
    if expr.lstrip("-").isdigit():
        return int(expr)
    if expr in made:
        return made[expr]
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    for ph in placeholders:
        v = ph.meta.get("val")
        if isinstance(v, torch.Tensor):
            for d, size in enumerate(v.shape):
                if isinstance(size, torch.SymInt) and str(size.node.expr) == expr:
                    with graph.inserting_after(placeholders[-1]):
                        node = graph.call_function(torch.ops.aten.sym_size.int, (ph, d))
                    node.meta["val"], node.meta["autotp"] = size, {}
                    made[expr] = node
                    return node
    raise AssertionError(f"no input has a dim of size {expr}")


def _routing_of(t: fx.Node) -> fx.Node:
    """The ``offs`` of the grouped matmuls that produced expert rows ``t`` (exactly one)."""
    from autotp.passes.rules.moe import partition_key
    keys = partition_key(t)
    if len(keys) != 1:
        raise AssertionError(f"{t.name}: expert rows from {len(keys)} routings")
    return next(iter(keys))


def _carries_grad(t: fx.Node) -> bool:
    """Whether a gradient can reach ``t`` (it depends on a parameter)."""
    return t.meta.get("autotp", {}).get("grad", True)
