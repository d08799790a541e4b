"""Placement helpers over torch's own placement types.

A tensor's placement on the 1-D "tp" mesh is one of torch's
``Replicate()``, ``Partial()``, ``Shard(d)`` or ``_StridedShard(d, split_factor=f)``.

``_StridedShard(d, f)`` is the layout a *fused* dimension needs: view dim ``d`` (size ``n``)
as ``(f, n/f)`` and shard the inner part, so rank ``r`` holds the ``r``-th slice of every
one of the ``f`` blocks.  A fused ``[q|k|v]`` projection sharded per head is ``_S(d, 3)``;
splitting it into three chunks gives three ordinary ``Shard(d)`` tensors.  ``Shard(d)`` is
the same thing with ``f = 1``.  torch's DTensor uses the same semantics on a 1-D mesh, so a
parameter placed this way is an ordinary DTensor and ``full_tensor()`` is right.

``Blocks(d, sizes)`` (printed ``S(d)[24|8|8]``) is the same layout with *unequal* blocks: dim
``d`` is the concatenation of blocks of ``sizes`` (a grouped-query ``[q|k|v]``: ``n_head*hd``,
``n_kv*hd``, ``n_kv*hd``), each block is split evenly over the N ranks, and rank ``r`` holds
``block_j[r*b_j/N:(r+1)*b_j/N]`` of every block, concatenated.  Cutting such a dim at block
boundaries gives ordinary ``Shard(d)`` pieces (heads split), as Megatron's fused GQA projection
does by hand.  It is offered only where every block divides by N.  Everywhere a placement has a
strided *factor*, a ``Blocks`` has its tuple of sizes instead (``split_factor``), and ``S(d, f)``
builds either from it: ``S(d, (24, 8, 8))`` is ``Blocks``, equal sizes fold to ``_StridedShard``,
one block to ``Shard``.  ``Blocks`` subclasses torch's ``Shard`` and overrides the methods DTensor
calls to cut and join (``_split_tensor``, ``_to_replicate_tensor``, the local size/offset helpers),
so a parameter placed this way is a DTensor whose ``full_tensor()``, ``redistribute(..., [R])`` and
``full_state_dict`` give the original tensor.  Not offered with FSDP2 (``dp_sharded``), like the
strided shard: FSDP2 and torch.distributed.checkpoint cannot describe its pieces.

With fewer kv heads than ranks a ``Blocks``' blocks may each have their own number of pieces
(``Sizes``, printed ``S(0)[64|32·R@2|32·R@2]``): q split over the N ranks, k and v over ``g``
groups of ``N/g`` consecutive ranks and whole inside each (whole on every rank: ``S(0)[64|16·R|16·R]``,
MQA) — the kv heads replicated over the ranks whose query heads read them, inside a fused
weight.  Its local size is ``local_extent``, not 1/N of the dim; a run of its k/v blocks cut out
is ``Grid(S(d), R, g)``, what a separate k or v projection is.
"""
from __future__ import annotations

import torch
from torch.distributed.tensor.placement_types import Partial, Placement, Replicate, Shard, _StridedShard

__all__ = ["Placement", "Replicate", "Partial", "Shard", "R", "P", "S", "D", "DisjointPartial", "TokenLocal", "L", "X",
           "ExpertRows", "Blocks", "Sizes", "Grid", "grid", "group_replicated", "shard_dim", "split_factor", "is_shard", "splits", "fmt", "local_shape", "local_chunk", "local_slices", "join_pieces",
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
    if groups == 1 and is_shard(outer) and inner != R:
        return inner                   # one group holds the whole tensor: the inner placement is the 1-D one
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


class Sizes(tuple):
    """The block sizes of a fused dim (``Blocks``' factor) with, per block, the number of pieces it
    is cut into: ``None`` for a block split over all N ranks, ``g`` for one split over ``g`` groups
    of ``N/g`` ranks and whole on each rank of a group (kv heads replicated over the ranks whose
    query heads read them), ``1`` for a block whole on every rank (MQA's one kv head).  A plain
    tuple of ints is the same with every block split over all ranks.  Slicing it keeps each
    block's count, so a rule that cuts a fused dim into runs of blocks (``views._split_blocks``)
    carries them, and ``S(d, run)`` builds the run's placement (``S``)."""

    def __new__(cls, sizes, groups):
        out = super().__new__(cls, (int(b) for b in sizes))
        out.groups = tuple(groups)
        return out

    def __getitem__(self, k):
        if isinstance(k, slice):
            return Sizes(tuple(self)[k], self.groups[k])
        return tuple.__getitem__(self, k)

    def __mul__(self, r):
        return Sizes(tuple(self) * r, self.groups * r)

    def __eq__(self, other):
        return isinstance(other, tuple) and tuple(self) == tuple(other) and self.groups == groups_of(other)

    def __ne__(self, other):
        return not self == other

    def __hash__(self):
        return hash((tuple(self), self.groups))

    def __reduce__(self):
        return (Sizes, (tuple(self), self.groups))

    def __repr__(self):
        return f"Sizes({tuple(self)}, {self.groups})"


def groups_of(sizes) -> tuple:
    """Each block's group count (``Sizes``): None where the block is split over all ranks."""
    return sizes.groups if isinstance(sizes, Sizes) else (None,) * len(sizes)


def with_groups(sizes, groups) -> tuple:
    """``sizes`` with the blocks' group counts ``groups``: a plain tuple when every block is split
    over all ranks (an ordinary ``Blocks``)."""
    return tuple(sizes) if all(g is None for g in groups) else Sizes(sizes, groups)


def block_piece(block: int, group, rank: int, world: int) -> slice:
    """The part of one block of size ``block`` rank ``rank`` holds: its 1/N slice (``group`` None),
    the slice of its group (``g`` groups of ``N/g`` consecutive ranks), or all of it (1)."""
    n, i = (world, rank) if group is None else (group, rank // (world // group))
    piece = block // n
    return slice(i * piece, (i + 1) * piece)


def local_extent(sizes, world: int) -> int:
    """The local size of a fused dim held as blocks of ``sizes`` (``Sizes`` or a tuple)."""
    return sum(b // (world if g is None else g) for b, g in zip(sizes, groups_of(sizes)))


class Blocks(_StridedShard):
    """``S(d)[b0|b1|...]``: dim ``d`` is blocks of ``sizes``, each split evenly over the ranks;
    a rank holds its piece of every block, concatenated (see the module docstring).

    A subclass of torch's ``_StridedShard`` (the equal-block case) rather than of ``Shard``:
    DTensor checks a ``Shard``'s pieces against ``Shard(d)`` (its shard order) and would reject
    it, while it routes every ``_StridedShard`` through the methods overridden here (cut a full
    tensor into pieces, join gathered pieces, a piece's size and indices), so a parameter with
    this placement is an ordinary DTensor: ``full_tensor()`` and ``redistribute`` give the
    original.  torch's ``split_factor`` field holds the block count.  One torch API cannot carry
    it: ``distribute_tensor`` rebuilds a plain ``_StridedShard`` from that count (autotp makes
    its parameters with ``DTensor.from_local``, which keeps the placement as given)."""

    def __init__(self, dim: int, sizes):
        super().__init__(dim, split_factor=len(sizes))
        self.sizes = with_groups(sizes, groups_of(sizes))

    @property
    def grouped(self) -> bool:
        """Some block is whole on the ranks of a group (kv heads, ``Sizes``): its local size is not
        1/N of the dim, and the gradient of those rows is a partial sum over the group."""
        return isinstance(self.sizes, Sizes)

    def __eq__(self, other):
        return isinstance(other, Blocks) and self.dim == other.dim and self.sizes == other.sizes

    def __hash__(self):
        return hash(("Blocks", self.dim, self.sizes))

    def __repr__(self):
        return f"Blocks(dim={self.dim}, sizes={self.sizes!r})"

    def __str__(self):
        return fmt(self)

    def __reduce__(self):
        return (Blocks, (self.dim, self.sizes))

    def __deepcopy__(self, memo):
        return Blocks(self.dim, self.sizes)

    def _split_tensor(self, tensor, num_chunks, *, with_padding=True, contiguous=True):
        pieces = [local_chunk(tensor, self, r, num_chunks) for r in range(num_chunks)]
        return pieces, ([0] * num_chunks if with_padding else [])

    def _select_split_tensor(self, tensor, num_chunks, index, *, with_padding=True, contiguous=True, clone=True):
        return local_chunk(tensor, self, index, num_chunks)

    def _to_replicate_tensor(self, local_tensor, mesh, mesh_dim, current_logical_shape):
        from torch.distributed._functional_collectives import all_gather_single
        gathered = all_gather_single(local_tensor.contiguous(), gather_dim=self.dim, group=(mesh, mesh_dim))
        if self.grouped:                       # wait before slicing the gathered pieces
            from torch.distributed._functional_collectives import wait_tensor
            gathered = wait_tensor(gathered)
        return rank_major_to_blocks(gathered, self.dim, self.sizes, mesh.size(mesh_dim))

    def _replicate_to_strided_shard(self, local_tensor, mesh, mesh_dim, shard_index):
        return local_chunk(local_tensor, self, shard_index, mesh.size(mesh_dim))

    def _local_shard_size_and_offset(self, curr_local_size, num_chunks, rank, offset_mode=None):
        return self.local_shard_size_and_offset(curr_local_size, num_chunks, rank, offset_mode)

    def local_shard_size_and_offset(self, curr_local_size, num_chunks, rank, offset_mode=None):
        """The piece's size, and its indices along the dim (torch's ``ALL`` mode), the first of
        them (``FIRST``, the default) or none (``NONE``)."""
        from torch.distributed.tensor.placement_types import _StridedShardOffsetMode as Mode
        size = local_extent(self.sizes, num_chunks) if self.grouped else int(curr_local_size) // num_chunks
        mode = Mode.FIRST if offset_mode is None else offset_mode
        if mode == Mode.NONE:
            return size, None
        ranges = local_slices((int(curr_local_size),), self, int(rank), num_chunks)
        indices = [i for (s,) in ranges for i in range(s.start, s.stop)]
        return size, (indices if mode == Mode.ALL else indices[0])


def rank_major_to_blocks(t: torch.Tensor, dim: int, sizes, world: int) -> torch.Tensor:
    """The ranks' pieces of a ``Blocks(dim, sizes)`` tensor concatenated in rank order along
    ``dim`` (an all-gather's output) -> the full tensor: block ``j`` is every rank's ``j``-th
    part, in rank order (of a block whole on the ranks of a group, ``Sizes``: the first rank's of each group)."""
    k, groups = len(sizes), groups_of(sizes)
    counts = [world if g is None else g for g in groups]
    parts = torch.split(t, [b // n for b, n in zip(sizes, counts)] * world, dim=dim)   # rank r, block j: parts[r*k + j]
    return torch.cat([parts[r * k + j] for j in range(k) for r in range(0, world, world // counts[j])], dim=dim)


def blocks_to_rank_major(t: torch.Tensor, dim: int, sizes, world: int) -> torch.Tensor:
    """The inverse of ``rank_major_to_blocks``: the full tensor with rank ``r``'s piece of every
    block brought together, ranks in order (a reduce-scatter's input)."""
    if isinstance(sizes, Sizes):
        raise NotImplementedError("a reduce-scatter into blocks whole on groups of ranks")
    k = len(sizes)
    parts = torch.split(t, [b // world for b in sizes for _ in range(world)], dim=dim)   # block j, rank r
    return torch.cat([parts[j * world + r] for r in range(world) for j in range(k)], dim=dim)


def S(dim: int, factor: int | tuple = 1) -> Placement:
    """Shard on ``dim``; ``factor > 1`` gives the strided layout of a fused dimension (``f`` equal
    blocks), a tuple of block sizes the layout of unequal ones (``Blocks``; equal sizes fold to
    the strided shard, one block to ``Shard``).  Blocks whole on groups of ranks (``Sizes``) build
    ``Blocks`` when only some are, and when all are (a run of them cut out of a fused dim: the k
    of a ``[q|k|v]``) the group-replicated placement ``Grid(S(dim, sizes), R, g)``."""
    if isinstance(factor, Sizes) and set(factor.groups) == {None}:
        factor = tuple(factor)
    if isinstance(factor, Sizes):
        gs = set(factor.groups)
        if len(gs) == 1:
            return Grid(S(dim, tuple(factor)), R, gs.pop())
        return Blocks(dim, factor)
    if isinstance(factor, tuple):
        if len(set(factor)) == 1:
            factor = len(factor)
        else:
            return Blocks(dim, factor)
    return Shard(dim) if factor == 1 else _StridedShard(dim, split_factor=factor)


def block_sizes(p: Placement, size: int) -> tuple[int, ...]:
    """The sizes of the blocks a shard ``p`` of a dim of ``size`` consists of: ``Blocks``' own, ``f``
    equal ones for a strided shard, the whole dim for ``Shard``."""
    f = split_factor(p)
    return f if isinstance(f, tuple) else (size // f,) * f


def factor_key(f) -> tuple:
    """A sort key over strided factors, ints and tuples of block sizes alike (ints first)."""
    if isinstance(f, tuple):
        return (1, 0, tuple(f), tuple(0 if g is None else g for g in groups_of(f)))
    return (0, f, (), ())


def is_strided(p: Placement) -> bool:
    """A shard whose rank piece is several blocks (``_StridedShard`` or ``Blocks``)."""
    return split_factor(p) != 1


def is_shard(p: Placement) -> bool:
    return isinstance(p, (Shard, _StridedShard))


def shard_dim(p: Placement) -> int | None:
    return p.dim if is_shard(p) else None


def splits(p) -> bool:
    """Whether a rank holds 1/N of the tensor along one dim (shards, token-local, expert rows)."""
    return is_shard(p) or isinstance(p, (TokenLocal, ExpertRows, Grid))


def split_factor(p: Placement) -> int | tuple:
    """The strided factor of a shard: ``f`` for ``_StridedShard``, the block sizes of ``Blocks``
    (pass it to ``S`` to build the same layout on another dim), 1 otherwise."""
    if isinstance(p, Blocks):
        return p.sizes
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
    if isinstance(f, tuple):                   # a block whole on groups of g ranks: "b·R@g" ("b·R": g = 1)
        return f"S({p.dim})[" + "|".join(str(b) if g is None else f"{b}·R" + (f"@{g}" if g > 1 else "")
                                         for b, g in zip(f, groups_of(f))) + "]"
    return f"S({p.dim})" + (f"x{f}" if f > 1 else "")


def can_shard(size: int, factor: int | tuple, world: int) -> bool:
    if isinstance(factor, tuple):
        return sum(factor) == size and all(b > 0 and (b % world == 0 if g is None else world % g == 0 and b % g == 0)
                                           for b, g in zip(factor, groups_of(factor)))
    return size % (factor * world) == 0 and size > 0


def local_shape(shape, p: Placement, world: int) -> list[int]:
    shape = list(shape)
    if isinstance(p, Grid):
        if is_shard(p.outer) or isinstance(p.outer, ExpertRows):   # experts, or the rows sent to them
            shape[p.outer.dim] //= p.groups
        if is_shard(p.inner):
            shape[p.inner.dim] //= world // p.groups
    elif isinstance(p, Blocks) and p.grouped:
        shape[p.dim] = local_extent(p.sizes, world)
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
    d = p.dim % len(shape)
    out, start = [], 0
    blocks = block_sizes(p, shape[d])
    for block, group in zip(blocks, groups_of(blocks)):
        piece = block_piece(block, group, rank, world)
        out.append(tuple(slice(start + piece.start, start + piece.stop) if k == d else s
                         for k, s in enumerate(full)))
        start += block
    return out


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
