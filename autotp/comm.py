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
=====================  ===========================  ===========================

The collectives are torch's functional collectives (``_c10d_functional``), so
``CommDebugMode`` counts them and ``torch.compile`` can trace them.
"""
from __future__ import annotations

import torch

_c10d = torch.ops._c10d_functional


def _wait(t: torch.Tensor) -> torch.Tensor:
    return _c10d.wait_tensor(t)


def _group_name(group) -> str:
    return group if isinstance(group, str) else group.group_name


# ---- raw (non-autograd) collectives along an arbitrary dim, with strided-shard layout ----

def _ar(x: torch.Tensor, group) -> torch.Tensor:
    return _wait(_c10d.all_reduce(x.contiguous(), "sum", _group_name(group)))


def _ag(x: torch.Tensor, dim: int, factor: int, group, n: int) -> torch.Tensor:
    """Gather shards along ``dim``: local (.., f*b, ..) per rank -> (.., f*N*b, ..)."""
    xm = x.movedim(dim, 0).contiguous()                       # (f*b, *rest)
    g = _wait(_c10d.all_gather_into_tensor(xm, n, _group_name(group)))  # (N*f*b, *rest), rank-major
    if factor > 1:
        rest = xm.shape[1:]
        b = xm.shape[0] // factor
        g = g.reshape(n, factor, b, *rest).transpose(0, 1).reshape(n * factor * b, *rest)
    return g.movedim(0, dim).contiguous()     # consumers may .view() it


def _rs(x: torch.Tensor, dim: int, factor: int, group, n: int) -> torch.Tensor:
    """Reduce-scatter a full-size partial tensor along ``dim`` into this rank's shard."""
    xm = x.movedim(dim, 0)
    rest = xm.shape[1:]
    if factor > 1:
        b = xm.shape[0] // (factor * n)
        xm = xm.reshape(factor, n, b, *rest).transpose(0, 1).reshape(n * factor * b, *rest)
    out = _wait(_c10d.reduce_scatter_tensor(xm.contiguous(), "sum", n, _group_name(group)))
    return out.movedim(0, dim).contiguous()


def _chunk(x: torch.Tensor, dim: int, factor: int, n: int, r: int) -> torch.Tensor:
    if factor == 1:
        return x.chunk(n, dim=dim)[r].contiguous()
    return torch.cat([blk.chunk(n, dim=dim)[r] for blk in x.chunk(factor, dim=dim)], dim=dim)


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
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return _ar(g, ctx.group), None


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


# ---- the functions the rewritten graph calls (names show in dumps and goldens) ----

def all_reduce(x: torch.Tensor, group: str) -> torch.Tensor:
    """P -> R (Megatron's g): all-reduce forward, identity backward."""
    return _AllReduce.apply(x, group)


def reduce_grad(x: torch.Tensor, group: str) -> torch.Tensor:
    """R used inside a sharded op (Megatron's f): identity forward, all-reduce backward."""
    return _ReduceGrad.apply(x, group)


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


COLLECTIVES = (all_reduce, reduce_grad, all_gather, all_gather_rs, scatter, reduce_scatter, all_to_all)
