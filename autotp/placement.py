"""Placement helpers over torch's own placement types.

A tensor's placement on the 1-D "tp" mesh is one of torch's
``Replicate()``, ``Partial()``, ``Shard(d)`` or ``_StridedShard(d, split_factor=f)``.

``_StridedShard(d, f)`` is the layout a *fused* dimension needs: view dim ``d`` (size ``n``)
as ``(f, n/f)`` and shard the inner part, so rank ``r`` holds the ``r``-th slice of every
one of the ``f`` blocks.  A fused ``[q|k|v]`` projection sharded per head is ``_S(d, 3)``;
splitting it into three chunks gives three ordinary ``Shard(d)`` tensors.  ``Shard(d)`` is
the same thing with ``f = 1``.  torch's DTensor uses the same semantics on a 1-D mesh, so a
parameter placed this way is an ordinary DTensor and ``full_tensor()`` is right.
"""
from __future__ import annotations

import torch
from torch.distributed.tensor.placement_types import Partial, Placement, Replicate, Shard, _StridedShard

__all__ = ["Placement", "Replicate", "Partial", "Shard", "R", "P", "S", "D", "DisjointPartial", "shard_dim", "split_factor",
           "is_shard", "fmt", "local_shape", "local_chunk", "normalize"]

R = Replicate()
P = Partial()


class DisjointPartial:
    """``D``: a partial sum whose terms never overlap — every element is nonzero on at most one
    rank (the rows of the experts a rank owns under expert parallelism).  Summing over ranks
    gives the true value, like ``Partial``; unlike it, ops with f(0) = 0 (silu, mul, views,
    row gathers) may run on it locally.  Activations only, never a parameter."""

    def __eq__(self, other):
        return isinstance(other, DisjointPartial)

    def __hash__(self):
        return hash("DisjointPartial")

    def __repr__(self):
        return "DisjointPartial()"


D = DisjointPartial()


def S(dim: int, factor: int = 1) -> Placement:
    """Shard on ``dim``; ``factor > 1`` gives the strided layout of a fused dimension."""
    return Shard(dim) if factor == 1 else _StridedShard(dim, split_factor=factor)


def is_shard(p: Placement) -> bool:
    return isinstance(p, (Shard, _StridedShard))


def shard_dim(p: Placement) -> int | None:
    return p.dim if is_shard(p) else None


def split_factor(p: Placement) -> int:
    return p.split_factor if isinstance(p, _StridedShard) else 1


def normalize(p: Placement, ndim: int) -> Placement:
    """Make a negative shard dim positive."""
    if is_shard(p) and p.dim < 0:
        return S(p.dim + ndim, split_factor(p))
    return p


def fmt(p: Placement | tuple | None) -> str:
    """DTensor's short form: ``R``, ``P``, ``S(0)``; strided shards print as ``S(0)x3``."""
    if p is None:
        return "-"
    if isinstance(p, tuple):
        return "(" + ", ".join(fmt(q) for q in p) + ")"
    if isinstance(p, Replicate):
        return "R"
    if isinstance(p, Partial):
        return "P"
    if isinstance(p, DisjointPartial):
        return "D"
    f = split_factor(p)
    return f"S({p.dim})" + (f"x{f}" if f > 1 else "")


def can_shard(size: int, factor: int, world: int) -> bool:
    return size % (factor * world) == 0 and size > 0


def local_shape(shape, p: Placement, world: int) -> list[int]:
    shape = list(shape)
    if is_shard(p):
        shape[p.dim] = shape[p.dim] // world
    return shape


def local_chunk(t: torch.Tensor, p: Placement, rank: int, world: int) -> torch.Tensor:
    """Rank ``rank``'s piece of the full tensor ``t`` under placement ``p`` (R/S only)."""
    if not is_shard(p):
        return t
    d, f = p.dim, split_factor(p)
    blocks = t.chunk(f, dim=d)                      # f blocks of n/f
    return torch.cat([b.chunk(world, dim=d)[rank] for b in blocks], dim=d)
