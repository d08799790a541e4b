"""How one placement becomes another: the collectives, and their cost.

``steps(src, dst)`` is the list of ``autotp.comm`` functions that turn a tensor placed
``src`` into one placed ``dst`` (forward), with the collective each runs forward and
backward.  ``None`` means impossible: nothing becomes ``Partial`` except a partial sum, and a
token-local tensor (``L``) changes placement only between the expert dispatch and combine
(``L`` sorted by expert <-> ``X``, an all-to-all with split sizes from the routing).
"""
from __future__ import annotations

import dataclasses

from autotp import comm
from autotp.cost import ALL_GATHER, ALL_REDUCE, ALL_TO_ALL, REDUCE_SCATTER, collective_time
from autotp.placement import D, P, R, X, Blocks, ExpertRows, Grid, Placement, TokenLocal, group_replicated, split_factor


@dataclasses.dataclass(frozen=True)
class Step:
    fn: object              # autotp.comm function the graph calls
    args: tuple             # its extra arguments (dims, factor); the group is appended
    forward: str | None     # collective kind run forward
    backward: str | None    # collective kind run backward (when gradients flow)
    groups: int | None = None   # a grid dispatch/combine: each row goes to all N/groups ranks of its group

    def volume(self, world: int) -> int:
        """Bytes moved / the tensor's (ring model): N/groups copies for a grid dispatch, else 1."""
        return world // self.groups if self.groups else 1


def steps(src: Placement, dst: Placement) -> list[Step] | None:
    if src == dst:
        return []
    if isinstance(src, TokenLocal) and isinstance(dst, Grid) and dst.outer == X and dst.inner == R:
        # rows sorted by expert -> the rows of this rank's group of experts, on each of its ranks
        if src.kind != "s":
            return None
        return [Step(comm.moe_dispatch, (dst.groups,), ALL_TO_ALL, ALL_TO_ALL, groups=dst.groups)]
    if isinstance(src, Grid) and src.outer == X and src.inner == P and isinstance(dst, TokenLocal):
        # each rank's partial sums of its group's rows back to their tokens' ranks, copies added
        if dst.kind != "s":
            return None
        return [Step(comm.moe_combine, (src.groups,), ALL_TO_ALL, ALL_TO_ALL, groups=src.groups)]
    if group_replicated(src) and src.outer == dst:
        # kv heads replicated over a group -> this rank's query heads' share: a local slice
        return [Step(comm.group_slice, (dst.dim, split_factor(dst), src.groups), None, None)]
    if group_replicated(src) and src.groups == 1 and dst == R:
        # whole on every rank already (MQA's kv head of a fused [q|k|v]) -> plainly replicated
        return [Step(comm.group_whole, (src.groups,), None, None)]
    if isinstance(src, Grid) or isinstance(dst, Grid):
        return None                   # other EP x TP pieces leave the expert block only through ops
    if any(isinstance(p, Blocks) and p.grouped for p in (src, dst)):
        return None                   # fused blocks whole on groups of ranks (kv heads) leave only by cuts at the blocks
    if isinstance(src, TokenLocal) and dst == X:
        # rows sorted by expert on each rank's tokens -> the rows of this rank's experts
        return [Step(comm.moe_dispatch, (), ALL_TO_ALL, ALL_TO_ALL)] if src.kind == "s" else None
    if src == X and isinstance(dst, TokenLocal):
        return [Step(comm.moe_combine, (), ALL_TO_ALL, ALL_TO_ALL)] if dst.kind == "s" else None
    if isinstance(dst, TokenLocal) and dst.kind == "o" and dst.origin is not None:
        args = (dst.dim, dst.origin)  # rows in token order: this rank's slice of the merged dims
        if src == R:
            return [Step(comm.scatter_tokens, args, None, ALL_GATHER)]
        if src in (P, D):
            return [Step(comm.reduce_scatter_tokens, args, REDUCE_SCATTER, ALL_GATHER)]
    if isinstance(src, TokenLocal) and src.kind == "o" and src.origin is not None and dst == R:
        return [Step(comm.gather_tokens, (src.dim, src.origin), ALL_GATHER, None)]
    if isinstance(src, (TokenLocal, ExpertRows)) or isinstance(dst, (TokenLocal, ExpertRows)):
        return None                   # other token-local tensors leave their region only through ops
    if src == D and dst == P:
        return []                     # a disjoint partial sum is a partial sum as it stands
    if dst in (P, D):
        return None
    if src in (P, D):
        if dst == R:
            return [Step(comm.all_reduce, (), ALL_REDUCE, None)]
        return [Step(comm.reduce_scatter, (dst.dim, split_factor(dst)), REDUCE_SCATTER, ALL_GATHER)]
    if src == R:
        return [Step(comm.scatter, (dst.dim, split_factor(dst)), None, ALL_GATHER)]
    gather = Step(comm.all_gather, (src.dim, split_factor(src)), ALL_GATHER, None)
    if dst == R:
        return [gather]
    if split_factor(src) == 1 and split_factor(dst) == 1 and src.dim != dst.dim:
        return [Step(comm.all_to_all, (src.dim, dst.dim), ALL_TO_ALL, ALL_TO_ALL)]
    return [gather, Step(comm.scatter, (dst.dim, split_factor(dst)), None, ALL_GATHER)]


def transition_time(src: Placement, dst: Placement, nbytes: float, world: int, link, grad: bool) -> float | None:
    """Forward (+ backward when ``grad``) seconds to redistribute; None if impossible."""
    plan = steps(src, dst)
    if plan is None:
        return None
    t = 0.0
    for s in plan:
        if s.forward:
            t += collective_time(s.forward, nbytes * s.volume(world), world, link)
        if grad and s.backward:
            t += collective_time(s.backward, nbytes * s.volume(world), world, link)
    return t


def reduce_grad_time(nbytes: float, world: int, link) -> float:
    """Backward all-reduce of a replicated tensor used inside a sharded op (Megatron's f)."""
    return collective_time(ALL_REDUCE, nbytes, world, link)
