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

__all__ = ["Placement", "Replicate", "Partial", "Shard", "R", "P", "S", "D", "DisjointPartial", "TokenLocal", "L", "X",
           "ExpertRows", "Grid", "grid", "group_replicated", "shard_dim", "split_factor", "is_shard", "splits", "fmt", "local_shape", "local_chunk", "local_slices", "join_pieces",
           "normalize"]

R = Replicate()
P = Partial()


class _Marker:
    """A placement of autotp's own with no arguments: equal to any instance of its class."""

    def __eq__(self, other):
        return type(other) is type(self)

    def __hash__(self):
        return hash(type(self).__name__)

    def __repr__(self):
        return f"{type(self).__name__}()"


class DisjointPartial(_Marker):
    """``D``: a partial sum whose terms never overlap — every element is nonzero on at most one
    rank (the rows of the experts a rank owns under expert parallelism).  Summing over ranks
    gives the true value, like ``Partial``; unlike it, ops with f(0) = 0 (silu, mul, views,
    row gathers) may run on it locally.  Activations only, never a parameter."""


D = DisjointPartial()


class _Keyed:
    """A placement of autotp's own with fields: equal when its class and ``_key()`` are."""
    __slots__ = ()

    def _key(self) -> tuple:
        raise NotImplementedError

    def __eq__(self, other):
        return type(other) is type(self) and self._key() == other._key()

    def __hash__(self):
        return hash((type(self).__name__,) + self._key())


class TokenLocal(_Keyed):
    """``L(dim)``: the tensor is the model's own expression evaluated on *this rank's tokens*
    (the sequence shard), with ``dim`` running over them — data parallelism over tokens inside
    a region whose ops treat tokens independently (a MoE block's router and dispatch).  Its
    local size along ``dim`` is 1/N of the full one, like ``Shard``; unlike ``Shard`` the
    local rows are not one contiguous block of the full tensor, so only the token-local rules
    (``passes/rules/tokens.py``) accept it, and it leaves the region only through the view
    that undoes the flatten it entered by (back to ``Shard(seq)``), a sum over tokens
    (``Partial``) or the expert dispatch (``X``).

    kind: what the rows and values are —
      ``o``  rows in token order (the order the flatten made), values are data;
      ``s``  rows in the order of a sort over the rows (``sort`` node: see ``tokens.sort_key``);
      ``sp`` as ``s``, values are row positions of an ``o`` tensor (sort indices);
      ``op`` rows in order, values are their own positions (``arange`` over the rows);
      ``ip`` rows in order, values are positions in the sorted order (the inverse permutation).
    origin: the sizes whose flatten the rows are (the dims the entry view merged, then any
      per-token slots merged after them: ``(batch, seq, top_k)``) and which of them is the
      sharded sequence dim: the exit view must split them back the same way, and the token
      collectives (``comm.gather_tokens``, ...) unflatten by them.
    """
    __slots__ = ("dim", "kind", "origin")

    def __init__(self, dim: int, kind: str = "o", origin: tuple | None = None):
        self.dim, self.kind, self.origin = dim, kind, origin

    def _key(self):
        return (self.dim, self.kind, self.origin)

    def __repr__(self):
        return f"TokenLocal({self.dim}, {self.kind!r}, {self.origin!r})"


def L(dim: int, kind: str = "o", origin: tuple | None = None) -> TokenLocal:
    return TokenLocal(dim, kind, origin)


class ExpertRows(_Marker):
    """``X``: the rows (dim 0) routed to *this rank's experts* from every rank's tokens, grouped
    by expert — the layout between an expert-parallel dispatch and its combine (all-to-alls
    with split sizes from the routing; ``comm.moe_dispatch``).  Its row count depends on the
    routing; 1/N of the full rows when the load is balanced (what the cost model assumes)."""

    dim = 0


X = ExpertRows()


class Grid(_Keyed):
    """``outer·inner@a×b``: a placement on the 2-D view ``(a, b)`` of the 1-D mesh (``a * b =
    N``, rank ``r`` at ``(r // b, r % b)``), one placement per mesh dim, as DTensor places a
    tensor on a 2-D mesh.  It is how the experts of a MoE layer split *both* ways — expert
    parallelism over ``a`` groups and tensor parallelism inside each expert over the ``b``
    ranks of a group (EP x TP):

    - a stacked expert weight ``(E, K, N)``: ``outer = S(0)`` (E/a whole experts per group),
      ``inner = S(1|2, f)`` (a column or row slice of each of them);
    - the activation between the two expert matmuls: ``outer = D`` (the rows of the group's
      experts, zero elsewhere), ``inner = S(1, f)`` (a column slice of them).

    After the second (row-parallel) expert matmul the pieces are partial over ``b`` and
    disjoint over ``a``: an ordinary ``Partial`` over all N ranks, so one all-reduce combines,
    exactly as for either pure form.

    The same view places the kv heads of a GQA attention with fewer kv heads than ranks
    (vLLM's and Megatron's kv-head replication): ``outer = S(d)`` (one kv head per group of
    the ``b`` ranks whose query heads read it), ``inner = R`` (the group's ranks hold it
    whole).  Such a tensor's *gradient* is a partial sum over the group — each rank's share
    comes from its own query heads — as the gradient of a replicated tensor feeding sharded
    ops is over all ranks; it is summed where it reaches a parameter (``comm.reduce_grad``
    over the group) or a replicated activation (whose ``f`` sums over every rank).  ``grid(outer, inner, a)`` builds one and folds the
    combinations that are 1-D placements.  Rules never see a ``Grid``: propagation runs an
    op's rule once per mesh dim and pairs the strategies (``passes/rules/grid.py``)."""
    __slots__ = ("outer", "inner", "groups")

    def __init__(self, outer, inner, groups: int):
        self.outer, self.inner, self.groups = outer, inner, groups

    @property
    def dim(self) -> int:              # the dim the outer placement splits (experts: 0)
        return self.outer.dim if is_shard(self.outer) else 0

    def _key(self):
        return (self.outer, self.inner, self.groups)

    def __repr__(self):
        return f"Grid({self.outer!r}, {self.inner!r}, {self.groups})"


def grid(outer, inner, groups: int):
    """The placement ``(outer, inner)`` on the ``(groups, N/groups)`` mesh, folded to a 1-D
    placement where it is one (both replicated; partial inside a group of disjoint rows), or
    None where it is neither a 1-D placement nor a ``Grid`` the runtime supports: stacked expert
    weights ``(S(0), S(d))``, and the rows of a group's experts — all its routed rows (``D``),
    or the ones dispatched to it (``X``) — whole, column-split or partial inside the group; and
    kv heads split over groups, whole inside each (``(S(d), R)``)."""
    if outer == R and inner == R:
        return R
    if outer in (D, P) and inner == P:
        return P                       # summing over every rank gives the value
    if is_shard(outer) and outer.dim == 0 and split_factor(outer) == 1 and is_shard(inner) and inner.dim != 0:
        return Grid(outer, inner, groups)
    if outer == D and is_shard(inner) and inner.dim != 0:
        return Grid(outer, inner, groups)
    if outer == X and (inner in (R, P) or is_shard(inner) and inner.dim != 0):
        return Grid(outer, inner, groups)
    if is_shard(outer) and inner == R:
        return Grid(outer, inner, groups)      # heads split over groups, whole inside each (kv heads)
    return None


def group_replicated(p) -> bool:
    """A ``Grid(S(d), R, a)``: split over the groups, whole on each rank of a group (kv heads
    replicated over the query heads' ranks); its gradient is partial inside the group."""
    return isinstance(p, Grid) and is_shard(p.outer) and p.inner == R


def S(dim: int, factor: int = 1) -> Placement:
    """Shard on ``dim``; ``factor > 1`` gives the strided layout of a fused dimension."""
    return Shard(dim) if factor == 1 else _StridedShard(dim, split_factor=factor)


def is_shard(p: Placement) -> bool:
    return isinstance(p, (Shard, _StridedShard))


def shard_dim(p: Placement) -> int | None:
    return p.dim if is_shard(p) else None


def splits(p) -> bool:
    """Whether a rank holds 1/N of the tensor along one dim (shards, token-local, expert rows)."""
    return is_shard(p) or isinstance(p, (TokenLocal, ExpertRows, Grid))


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
    if isinstance(p, TokenLocal):
        return f"L({p.dim})" + ("" if p.kind == "o" else p.kind)
    if isinstance(p, ExpertRows):
        return "X"
    if isinstance(p, Grid):
        return f"{fmt(p.outer)}·{fmt(p.inner)}@{p.groups}"
    f = split_factor(p)
    return f"S({p.dim})" + (f"x{f}" if f > 1 else "")


def can_shard(size: int, factor: int, world: int) -> bool:
    return size % (factor * world) == 0 and size > 0


def local_shape(shape, p: Placement, world: int) -> list[int]:
    shape = list(shape)
    if isinstance(p, Grid):
        if is_shard(p.outer) or isinstance(p.outer, ExpertRows):   # experts, or the rows sent to them
            shape[p.outer.dim] //= p.groups
        if is_shard(p.inner):
            shape[p.inner.dim] //= world // p.groups
    elif splits(p):
        shape[p.dim] = shape[p.dim] // world
    return shape


def local_slices(shape, p: Placement, rank: int, world: int) -> list[tuple]:
    """Rank ``rank``'s piece of a tensor of ``shape`` under ``p``, as index tuples: one per block of
    a fused (strided) dim, whose pieces concatenated along that dim (``join_pieces``) are the
    piece; one tuple of whole slices when ``p`` splits nothing.  The one definition of a rank's
    piece: the runtime and the collectives cut tensors by it (``local_chunk``), checkpoint loading
    reads exactly these slices of a file, the rule conformance harness checks rules with it."""
    full = tuple(slice(0, n) for n in shape)
    if isinstance(p, Grid):              # the group's piece (outer), then this rank's part of it (inner)
        b = world // p.groups
        outer = local_slices(shape, p.outer, rank // b, p.groups)
        if len(outer) > 1 and is_shard(p.inner) and p.inner.dim == p.outer.dim:
            raise NotImplementedError(f"{fmt(p)}: a strided outer placement split again along the same dim")
        out = []
        for o in outer:
            sizes = [s.stop - s.start for s in o]
            out += [tuple(slice(so.start + si.start, so.start + si.stop) for so, si in zip(o, i))
                    for i in local_slices(sizes, p.inner, rank % b, b)]
        return out
    if not is_shard(p):
        return [full]
    d, f = p.dim % len(shape), split_factor(p)
    block = shape[d] // f
    piece = block // world
    return [tuple(slice(b * block + rank * piece, b * block + (rank + 1) * piece) if k == d else s
                  for k, s in enumerate(full)) for b in range(f)]


def join_pieces(pieces: list, slices: list[tuple]):
    """The pieces read at ``slices`` (``local_slices``) as one tensor: several blocks concatenate
    along the dim where their slices differ."""
    if len(pieces) == 1:
        return pieces[0]
    d = next(k for k, (a, b) in enumerate(zip(slices[0], slices[1])) if a != b)
    return torch.cat(pieces, dim=d)


def local_chunk(t: torch.Tensor, p: Placement, rank: int, world: int) -> torch.Tensor:
    """Rank ``rank``'s piece of the full tensor ``t`` under placement ``p`` (``local_slices``), a
    contiguous copy (it never keeps the full tensor's storage alive); ``t`` itself when ``p``
    splits nothing."""
    if not (is_shard(p) or isinstance(p, Grid)):
        return t
    slices = local_slices(t.shape, p, rank, world)
    pieces = [t[idx] for idx in slices]
    return join_pieces(pieces, slices) if len(pieces) > 1 else pieces[0].clone(memory_format=torch.contiguous_format)
