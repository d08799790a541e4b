"""Autograd-correct collectives on the tensor-parallel group (Megatron's f and g, generalised).

Every redistribution the plan needs is one function here.  Each is a
``torch.autograd.Function`` whose backward is the *transpose* of its forward under autotp's
gradient convention (see ``docs/how-it-works.md``):

    forward placement    gradient placement
    Shard(d)             Shard(d)
    Replicate            Replicate   (consumers that use it inside a sharded op add ``f``)
    Partial              Replicate

=====================  ===========================  ===========================
function               forward                      backward
=====================  ===========================  ===========================
``all_reduce``  (g)    P -> R   all-reduce          identity
``reduce_grad`` (f)    R -> R   identity            all-reduce
``all_gather``         S -> R   all-gather          keep own chunk
``all_gather_rs``      S -> R   all-gather          reduce-scatter  (for sharded consumers: their
                                                    gradient is a partial sum; Megatron-SP's gather)
``scatter``            R -> S   keep own chunk      all-gather
``reduce_scatter``     P -> S   reduce-scatter      all-gather
``all_to_all``         S(a)->S(b) all-to-all        all-to-all back
``moe_dispatch``       L -> X   all-to-all (rows     all-to-all back
                       to their experts' ranks)
``moe_combine``        X -> L   all-to-all back      all-to-all
``scatter_tokens``     R -> L   own tokens' rows     all-gather
``gather_tokens``      L -> R   all-gather           own tokens' rows
``gather_tokens_rs``   L -> R   all-gather           reduce-scatter
``reduce_scatter_      P -> L   reduce-scatter       all-gather
tokens``
``group_slice``        Grid(S(d), R, a)  keep own    zero elsewhere (the group's
                       -> S(d)   chunk of the       gradient is a partial sum)
                       group's block
``reduce_grad_in_      Grid(S(d), R, a): identity   all-reduce over the group
group``                                             (a kv weight's gradient)
``group_whole``        Grid(S(d), R, 1) -> R:       1/N of the gradient (a
                       identity (MQA's kv head)     partial sum over all ranks)
``sharded_amax``       S(d) -> R  max over the      none (a shift: no gradient)
                       sharded dim: all-reduce max
``sharded_logsumexp``  S(d) -> R  log-sum-exp over  own slice of the softmax
                       the sharded dim: all-reduce  (local)
                       sum of exp
=====================  ===========================  ===========================

``sharded_amax`` and ``sharded_logsumexp`` are a log-softmax over a vocab-sharded dim
(``passes/rules/loss.py``, ``autotp.cross_entropy``): two all-reduces of a (batch, seq) tensor
instead of an all-gather of the (batch, seq, vocab) logits.

``moe_dispatch`` / ``moe_combine`` move rows of variable count: the split sizes come from the
routing (``offs``, each expert's end row on this rank's tokens) and are exchanged once per
dispatch with a small all-gather of the per-expert counts; the combine reuses them.  With
``groups`` (an EP x TP grid) a row goes to every rank of its group of experts, and the combine
adds the partial sums that come back.

The collectives are torch's functional collectives (``_c10d_functional``), so
``CommDebugMode`` counts them and ``torch.compile`` can trace them.
"""
from __future__ import annotations

import dataclasses

import torch
from torch._subclasses.fake_tensor import FakeTensor

from autotp.placement import S, blocks_to_rank_major, join_pieces, local_slices, rank_major_to_blocks

_c10d = torch.ops._c10d_functional


def _wait(t: torch.Tensor) -> torch.Tensor:
    return _c10d.wait_tensor(t)


def _group_name(group) -> str:
    return group if isinstance(group, str) else group.group_name


# ---- raw (non-autograd) collectives along an arbitrary dim, with strided-shard layout ----

def _ar(x: torch.Tensor, group, op: str = "sum") -> torch.Tensor:
    return _wait(_c10d.all_reduce(x.contiguous(), op, _group_name(group)))


def _ag(x: torch.Tensor, dim: int, factor: int, group, n: int) -> torch.Tensor:
    """Gather shards along ``dim``: local (.., f*b, ..) per rank -> (.., f*N*b, ..)."""
    xm = x.movedim(dim, 0).contiguous()                       # (f*b, *rest)
    g = _wait(_c10d.all_gather_into_tensor(xm, n, _group_name(group)))  # (N*f*b, *rest), rank-major
    if isinstance(factor, tuple):                             # unequal blocks (placement.Blocks)
        g = rank_major_to_blocks(g, 0, factor, n)
    elif factor > 1:
        rest = xm.shape[1:]
        b = xm.shape[0] // factor
        g = g.reshape(n, factor, b, *rest).transpose(0, 1).reshape(n * factor * b, *rest)
    return g.movedim(0, dim).contiguous()     # consumers may .view() it


def _rs(x: torch.Tensor, dim: int, factor: int, group, n: int) -> torch.Tensor:
    """Reduce-scatter a full-size partial tensor along ``dim`` into this rank's shard."""
    xm = x.movedim(dim, 0)
    rest = xm.shape[1:]
    if isinstance(factor, tuple):                             # unequal blocks (placement.Blocks)
        xm = blocks_to_rank_major(xm, 0, factor, n)
    elif factor > 1:
        b = xm.shape[0] // (factor * n)
        xm = xm.reshape(factor, n, b, *rest).transpose(0, 1).reshape(n * factor * b, *rest)
    out = _wait(_c10d.reduce_scatter_tensor(xm.contiguous(), "sum", n, _group_name(group)))
    return out.movedim(0, dim).contiguous()


def _chunk(x: torch.Tensor, dim: int, factor: int, n: int, r: int) -> torch.Tensor:
    """Rank ``r``'s piece of ``x`` split ``S(dim)xfactor`` over ``n`` ranks (``placement.local_slices``;
    a view where the piece is contiguous: a gradient need not be copied)."""
    slices = local_slices(x.shape, S(dim, factor), r, n)
    return join_pieces([x[idx] for idx in slices], slices).contiguous()


def _a2a(x: torch.Tensor, src_dim: int, dst_dim: int, group, n: int) -> torch.Tensor:
    """Shard(src_dim) -> Shard(dst_dim): split dst_dim into N pieces, exchange, concat on src_dim."""
    pieces = x.chunk(n, dim=dst_dim)                           # piece j goes to rank j
    send = torch.cat([p.contiguous().flatten() for p in pieces])
    recv = _wait(_c10d.all_to_all_single(send, [pieces[0].numel()] * n, [pieces[0].numel()] * n,
                                         _group_name(group)))
    recv = recv.view(n, *pieces[0].shape)                      # piece from rank j = its src shard
    return torch.cat(list(recv.unbind(0)), dim=src_dim)


# ---- autograd Functions ----

class _AllReduce(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        return _ar(x, group)

    @staticmethod
    def backward(ctx, g):
        return g, None


class _ReduceGrad(torch.autograd.Function):
    """Identity forward; backward, the all-reduce over ``group`` — or, with ``groups`` > 1, over
    this rank's group of the (groups, N/groups) view of it (``_in_group``)."""
    @staticmethod
    def forward(ctx, x, group, groups):
        ctx.group = (group, groups)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return _ar(g, _in_group(*ctx.group)), None, None


class _AllGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, factor, group, world, rank):
        ctx.args = (dim, factor, world, rank)
        return _ag(x, dim, factor, group, world)

    @staticmethod
    def backward(ctx, g):
        return _chunk(g, *ctx.args), None, None, None, None, None


class _AllGatherRS(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, factor, group, world, rank):
        ctx.args = (dim, factor, group, world)
        return _ag(x, dim, factor, group, world)

    @staticmethod
    def backward(ctx, g):
        return _rs(g, *ctx.args), None, None, None, None, None


class _Scatter(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, factor, group, world, rank):
        ctx.args = (dim, factor, group, world)
        return _chunk(x, dim, factor, world, rank)

    @staticmethod
    def backward(ctx, g):
        return _ag(g, *ctx.args), None, None, None, None, None


class _ReduceScatter(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, factor, group, world, rank):
        ctx.args = (dim, factor, group, world)
        return _rs(x, dim, factor, group, world)

    @staticmethod
    def backward(ctx, g):
        return _ag(g, *ctx.args), None, None, None, None, None


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, src_dim, dst_dim, group, world, rank):
        ctx.args = (src_dim, dst_dim, group, world)
        return _a2a(x, src_dim, dst_dim, group, world)

    @staticmethod
    def backward(ctx, g):
        src_dim, dst_dim, group, world = ctx.args
        return _a2a(g, dst_dim, src_dim, group, world), None, None, None, None, None


class _ShardedLogSumExp(torch.autograd.Function):
    """log(sum(exp(x))) over ``dim``, which is split over the ranks: each rank sums exp of its
    slice (shifted by the global max ``shift`` for stability) and one all-reduce adds the sums.
    Backward: d lse / d x = softmax(x), of which this rank's slice is exp(x - lse) — local, given
    the full gradient of lse (replicated, as for any R tensor; a sharded consumer's partial
    gradient is all-reduced first by ``reduce_grad``)."""
    @staticmethod
    def forward(ctx, x, shift, dim, group):
        shift = shift.masked_fill(shift.abs() == float("inf"), 0.0)   # as torch.logsumexp: all -inf
        total = _ar(torch.exp(x - shift).sum(dim, keepdim=True), group)    # (.., 1, ..)
        lse = shift + torch.log(total)
        ctx.save_for_backward(x, lse)
        ctx.dim = dim
        return lse

    @staticmethod
    def backward(ctx, g):
        x, lse = ctx.saved_tensors
        return g * torch.exp(x - lse), None, None, None


# ---- the functions the rewritten graph calls (names show in dumps and goldens) ----

def all_reduce(x: torch.Tensor, group: str) -> torch.Tensor:
    """P -> R (Megatron's g): all-reduce forward, identity backward."""
    return _AllReduce.apply(x, group)


def reduce_grad(x: torch.Tensor, group: str) -> torch.Tensor:
    """R used inside a sharded op (Megatron's f): identity forward, all-reduce backward."""
    return _ReduceGrad.apply(x, group, 1)


# The N/a ranks of each group of a 2-D (a, N/a) view of a mesh (kv heads replicated over the
# ranks that read them): (tensor-parallel group name, a) -> that rank's group's name.  Filled by
# the runtime when it builds the view (``program.mesh_for``), before any step runs.
GROUPS_OF: dict[tuple[str, int], str] = {}


def _in_group(group, groups: int) -> str:
    name = _group_name(group)
    if groups == 1:
        return name
    try:
        return GROUPS_OF[(name, groups)]
    except KeyError:
        raise RuntimeError(f"no ({groups}, N/{groups}) view of process group {name!r} was built; "
                           f"autotp.parallelize builds it for the parameters placed on it") from None


def reduce_grad_in_group(x: torch.Tensor, group: str, groups: int) -> torch.Tensor:
    """Grid(S(d), R, a), a parameter whose rows every rank of a group holds (a kv head replicated
    over the ranks of its query heads): identity forward; backward, its gradient — each rank's
    share from its own query heads — is all-reduced over the group."""
    return _ReduceGrad.apply(x, group, groups)


def group_slice(x: torch.Tensor, dim: int, factor: int, groups: int, group: str, world: int, rank: int) -> torch.Tensor:
    """Grid(S(dim, factor), R, groups) -> S(dim, factor): this rank's chunk of its group's block,
    no communication.  Backward pads with zeros: the gradient of a group-replicated tensor is a
    partial sum over the group (``placement.Grid``), summed where it reaches a parameter or a
    replicated activation."""
    b = world // groups
    return _chunk(x, dim, factor, b, rank % b)


class _GroupWhole(torch.autograd.Function):
    """Identity forward; backward, this rank's share (1/N) of the replicated gradient."""
    @staticmethod
    def forward(ctx, x, world):
        ctx.world = world
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g / ctx.world, None


def group_whole(x: torch.Tensor, groups: int, group: str, world: int, rank: int) -> torch.Tensor:
    """Grid(S(d), R, 1) -> R: a tensor whole on every rank (one group: MQA's kv head cut out of a
    fused ``[q|k|v]``) read as a plain replicated one (a KV cache's concatenation), no communication.
    Backward hands each rank 1/N of the replicated gradient: the gradient of a group-replicated
    tensor is a partial sum over its group (``placement.Grid``), summed where it reaches the weight."""
    return _GroupWhole.apply(x, world)


def sharded_amax(x: torch.Tensor, dim: int, group: str) -> torch.Tensor:
    """S(dim) -> R: the max over ``dim`` (kept, size 1) of a tensor split along it: the local
    max, all-reduced with max.  No gradient: it is only the shift of a log-sum-exp, whose value
    does not depend on it."""
    return _ar(x.detach().amax(dim, keepdim=True), group, "max")


def sharded_logsumexp(x: torch.Tensor, shift: torch.Tensor, dim: int, group: str) -> torch.Tensor:
    """S(dim) -> R: ``torch.logsumexp(x, dim, keepdim=True)`` of a tensor split along ``dim``,
    given its global max ``shift`` (``sharded_amax``): one all-reduce of the sums of exp; local
    backward (``_ShardedLogSumExp``)."""
    return _ShardedLogSumExp.apply(x, shift, dim, group)


# Shape-changing collectives take the world size and this rank as plain ints (the rewritten
# graph is per rank), so torch.compile traces them without resolving the process group.

def all_gather(x: torch.Tensor, dim: int, factor: int, group: str, world: int, rank: int) -> torch.Tensor:
    """S(dim) -> R: all-gather forward, own chunk backward."""
    return _AllGather.apply(x, dim, factor, group, world, rank)


def all_gather_rs(x: torch.Tensor, dim: int, factor: int, group: str, world: int, rank: int) -> torch.Tensor:
    """S(dim) -> R for consumers that shard something else (a column-parallel matmul): their
    gradients are partial sums, so the backward reduce-scatters them — ``all_gather`` followed
    by ``reduce_grad`` in one collective each way, at half the backward bytes."""
    return _AllGatherRS.apply(x, dim, factor, group, world, rank)


def scatter(x: torch.Tensor, dim: int, factor: int, group: str, world: int, rank: int) -> torch.Tensor:
    """R -> S(dim): own chunk forward (no communication), all-gather backward."""
    return _Scatter.apply(x, dim, factor, group, world, rank)


def reduce_scatter(x: torch.Tensor, dim: int, factor: int, group: str, world: int, rank: int) -> torch.Tensor:
    """P -> S(dim): reduce-scatter forward, all-gather backward."""
    return _ReduceScatter.apply(x, dim, factor, group, world, rank)


def all_to_all(x: torch.Tensor, src_dim: int, dst_dim: int, group: str, world: int, rank: int) -> torch.Tensor:
    """S(src_dim) -> S(dst_dim): all-to-all both ways."""
    return _AllToAll.apply(x, src_dim, dst_dim, group, world, rank)


# ---- token-local rows (placement L, passes/rules/tokens.py): a flatten of sequence-sharded dims ----
# ``x``'s dim ``dim`` is the flatten of dims of sizes ``sizes`` (the full sizes, at run time), of
# which number ``k`` is the sequence; a rank's rows are the flatten of its sequence slice.

def scatter_tokens(x: torch.Tensor, dim: int, k: int, group: str, world: int, rank: int, *sizes) -> torch.Tensor:
    """R -> L: this rank's tokens' rows (no communication), all-gather backward."""
    v = scatter(x.unflatten(dim, sizes), dim + k, 1, group, world, rank)
    return v.flatten(dim, dim + len(sizes) - 1)


def gather_tokens(x: torch.Tensor, dim: int, k: int, group: str, world: int, rank: int, *sizes) -> torch.Tensor:
    """L -> R: every rank's tokens' rows, in token order; own rows backward."""
    local = [s // world if i == k else s for i, s in enumerate(sizes)]
    v = all_gather(x.unflatten(dim, local), dim + k, 1, group, world, rank)
    return v.flatten(dim, dim + len(sizes) - 1)


def gather_tokens_rs(x: torch.Tensor, dim: int, k: int, group: str, world: int, rank: int, *sizes) -> torch.Tensor:
    """``gather_tokens`` for sharded consumers: reduce-scatter backward (as ``all_gather_rs``)."""
    local = [s // world if i == k else s for i, s in enumerate(sizes)]
    v = all_gather_rs(x.unflatten(dim, local), dim + k, 1, group, world, rank)
    return v.flatten(dim, dim + len(sizes) - 1)


def reduce_scatter_tokens(x: torch.Tensor, dim: int, k: int, group: str, world: int, rank: int,
                          *sizes) -> torch.Tensor:
    """P -> L: the sum over ranks of this rank's tokens' rows; all-gather backward."""
    v = reduce_scatter(x.unflatten(dim, sizes), dim + k, 1, group, world, rank)
    return v.flatten(dim, dim + len(sizes) - 1)


TOKEN_COLLECTIVES = (scatter_tokens, gather_tokens, gather_tokens_rs, reduce_scatter_tokens)


# ---- expert parallelism: rows to the ranks that hold their experts, and back ----

@dataclasses.dataclass
class _Route:
    """Where this rank's expert-sorted rows go and what comes back, for one routing (``offs``)."""
    send: list                # rows this rank sends to each rank (its tokens' rows for their experts)
    recv: list                # rows this rank receives from each rank (for its own experts)
    order: torch.Tensor       # received rows (by source rank) -> grouped by local expert
    inverse: torch.Tensor     # and back
    local_offs: torch.Tensor  # end row of each local expert in the grouped rows
    copies: torch.Tensor | None   # rows to send, when a group's rows go to each of its N/groups ranks
    rows: int                 # this rank's routed rows


def _route(offs: torch.Tensor, group, world: int, rank: int, groups: int) -> _Route:
    """The split sizes of one routing: ``offs`` (E,) holds each expert's end row among this
    rank's rows sorted by expert (a cumsum of counts).  The experts are split over ``groups``
    groups of ``world / groups`` consecutive ranks (expert parallelism: groups = world; an EP x TP
    grid: fewer, and every rank of a group needs all of its rows).  One all-gather of the
    per-expert counts tells every rank what it receives; the result is kept for the combine and
    the grouped matmuls in between (on the ``offs`` tensor itself, which lives for one forward)."""
    hit = getattr(offs, "_autotp_route", None)
    if hit is not None and hit[0] == (offs._version, groups):       # not written to since
        return hit[1]
    n_exp, b = offs.shape[0], world // groups
    per = n_exp // groups
    mine_group = rank // b
    ends = offs.detach().to(torch.long)
    counts = torch.diff(ends, prepend=ends.new_zeros(1))                       # (E,) rows per expert
    if world > 1:
        every = _wait(_c10d.all_gather_into_tensor(counts.contiguous(), world, _group_name(group)))
    else:
        every = counts
    mine = every.view(world, n_exp)[:, mine_group * per:(mine_group + 1) * per]   # (source rank, local expert)
    per_group = counts.view(groups, per).sum(1)                                # (groups,) my rows for each
    send = per_group.repeat_interleave(b).tolist()                             # to every rank of the group
    copies = None
    if b > 1:                          # group g's block of rows, once for each of its b ranks
        start = torch.cumsum(per_group, 0) - per_group
        copies = torch.cat([torch.arange(int(s), int(s) + int(n), device=offs.device)
                            for s, n in zip(start.repeat_interleave(b), per_group.repeat_interleave(b))])
    recv = mine.sum(1).tolist()
    # received rows are source-major (each source's rows sorted by expert); group them by expert
    start = torch.cumsum(mine.flatten(), 0) - mine.flatten()                   # block (src, e) start
    blocks, starts = mine.t().flatten(), start.view(world, per).t().flatten()  # expert-major blocks
    total = int(blocks.sum())
    order = torch.repeat_interleave(starts - (torch.cumsum(blocks, 0) - blocks), blocks) + \
        torch.arange(total, device=offs.device)
    route = _Route(send, recv, order, torch.argsort(order), torch.cumsum(mine.sum(0), 0).to(offs.dtype), copies,
                   int(counts.sum()))
    offs._autotp_route = ((offs._version, groups), route)
    return route


class _VariableAllToAll(torch.autograd.Function):
    """Rows of ``x`` (dim 0): ``send[j]`` consecutive rows to rank j, ``recv[j]`` rows from it."""
    @staticmethod
    def forward(ctx, x, send, recv, group):
        ctx.args = (send, recv, group)
        return _wait(_c10d.all_to_all_single(x.contiguous(), recv, send, _group_name(group)))

    @staticmethod
    def backward(ctx, g):
        send, recv, group = ctx.args
        return _wait(_c10d.all_to_all_single(g.contiguous(), send, recv, _group_name(group))), None, None, None


def moe_dispatch(x: torch.Tensor, offs: torch.Tensor, group: str, world: int, rank: int,
                 groups: int | None = None) -> torch.Tensor:
    """L -> X: this rank's rows, sorted by expert (``offs`` ends each expert's block), go to the
    ranks that own their experts (rank r owns experts [r E/N, (r+1) E/N)); the rows received
    come back grouped by local expert.  All-to-all forward, the reverse all-to-all backward.
    On an EP x TP grid (``groups`` < N) group g's rows go to each of its N/groups ranks (a copy
    each: their backward sums), so every rank of the group holds all of its rows."""
    groups = groups or world
    route = _route(offs, group, world, rank, groups)
    if route.copies is not None:
        x = x[route.copies]
    y = _VariableAllToAll.apply(x, route.send, route.recv, group) if world > 1 else x
    return y[route.order]


def moe_combine(y: torch.Tensor, offs: torch.Tensor, group: str, world: int, rank: int,
                groups: int | None = None) -> torch.Tensor:
    """X -> L: the expert outputs go back to the ranks whose tokens they belong to, in the
    order ``moe_dispatch`` took them (the same routing ``offs``).  On a grid each rank of a group
    returns its partial sum of the group's rows, and the copies add up."""
    groups = groups or world
    route = _route(offs, group, world, rank, groups)
    y = y[route.inverse]
    y = _VariableAllToAll.apply(y, route.recv, route.send, group) if world > 1 else y
    if route.copies is not None:
        y = y.new_zeros((route.rows,) + tuple(y.shape[1:])).index_add(0, route.copies, y)
    return y


def expert_grouped_mm(x: torch.Tensor, w_local: torch.Tensor, offs: torch.Tensor, op) -> torch.Tensor:
    """The grouped matmul on the rows ``moe_dispatch`` delivered: this rank's E/N experts, each
    expert's rows from every rank together (``offs`` is the routing the dispatch used)."""
    route = getattr(offs, "_autotp_route", (None, None))[1]
    if route is None:
        if isinstance(x, FakeTensor):                          # shape check: the output shape only
            return op(x, w_local, offs.new_zeros(w_local.shape[0]))
        raise RuntimeError("expert_grouped_mm: no moe_dispatch ran for this routing")
    return op(x, w_local, route.local_offs)


COLLECTIVES = (all_reduce, reduce_grad, all_gather, all_gather_rs, scatter, reduce_scatter, all_to_all,
               moe_dispatch, moe_combine, sharded_amax, sharded_logsumexp) + TOKEN_COLLECTIVES
