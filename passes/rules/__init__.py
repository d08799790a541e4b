"""The rule table: one entry per ATen op, saying how the op may be sharded.

A rule is a function ``rule(node, ctx) -> list[Strategy]``.  A ``Strategy`` is a valid way to
run the op on rank-local shards: the placement each tensor input must have and the placement
the output then has.  *Valid* means: running the op on the local pieces yields the local piece
of the true output under that output placement.  The solver picks one strategy per node; it
never needs to know what an op does.

Where a rule lives:

=================  ============================================================
``pointwise.py``   elementwise ops and dtype casts (any op tagged ``pointwise``)
``views.py``       view/reshape/expand/transpose/permute/slice/split/cat/...
``matmul.py``      linear, mm, bmm, matmul, baddbmm, einsum (einsum-style specs)
``reductions.py``  sum/mean/amax, softmax, layer_norm, rms_norm, cumsum, topk, sort
``embedding.py``   embedding (vocab-parallel and hidden-parallel)
``loss.py``        log_softmax, cross_entropy, nll_loss over a sharded class dim (vocab-parallel loss)
``attention.py``   scaled_dot_product_attention (heads / batch split)
``moe.py``         grouped matmul over stacked expert weights
``indexing.py``    index_copy (a static KV cache's update)
``tokens.py``      token-local strategies (``L``), per op in their own table beside its rule's:
                   a MoE block routed on each rank's own tokens, experts reached by all-to-all
``grid.py``        strategies on the 2-D (EP x TP) view of the mesh, for any op: its own
                   rule asked once per mesh dim, paired — no rule handles ``Grid`` itself
=================  ============================================================

An op with no rule runs replicated (all inputs gathered first); the plan lists every such op
so nothing is replicated silently, and ``parallelize(..., strict=True)`` turns it into an error.
To add a rule see ``docs/adding-a-rule.md``.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Iterable

import torch
import torch.fx as fx
from torch.utils import _pytree as pytree

from autotp.placement import D, P, R, S, ExpertRows, Placement, TokenLocal, can_shard, factor_key, split_factor

aten = torch.ops.aten


@dataclasses.dataclass(frozen=True)
class Strategy:
    """One way to run a node on shards.

    inputs: placement required for each tensor input, in ``tensor_inputs(node)`` order.
    output: placement of the output (a tuple for ops that return several tensors).
    localize: optional hook ``(node, strategy, lctx) -> None`` (lctx has ``world`` and ``rank``) that rewrites the node's
        non-tensor arguments for the local shapes (e.g. a view's target shape).
    """
    inputs: tuple
    output: object
    localize: Callable | None = None

    @property
    def replicated(self) -> bool:
        outs = self.output if isinstance(self.output, tuple) else (self.output,)
        return all(p == R for p in self.inputs) and all(p == R or p is None for p in outs)


RuleFn = Callable[[fx.Node, "RuleContext"], list[Strategy]]
RULES: dict[object, RuleFn] = {}


def register_rule(*ops, table: dict = RULES) -> Callable[[RuleFn], RuleFn]:
    """Register ``fn`` as the sharding rule of each ATen ``OpOverload`` (or overload packet, or
    a custom op's ``"namespace::name"`` string, for ops that may not be loaded yet) in ``table``
    (``tokens.py`` fills its table of token-local rules the same way)."""
    def deco(fn: RuleFn) -> RuleFn:
        for op in ops:
            table[op] = fn
        return fn
    return deco


def find_rule(target, table: dict = RULES) -> RuleFn | None:
    """``table``'s rule for ``target``: by overload, custom op name, overload packet, then, for an
    op tagged pointwise, the table's ``torch.Tag.pointwise`` entry (``RULES``: the elementwise
    rule, imported here since ``pointwise.py`` imports this module)."""
    if target in table:
        return table[target]
    name = target.name() if isinstance(target, torch._ops.OpOverload) else None
    if name is not None:                  # custom ops are registered by "namespace::name"
        if name in table:
            return table[name]
        if name.split(".")[0] in table:
            return table[name.split(".")[0]]
    packet = getattr(target, "overloadpacket", None)
    if packet is not None and packet in table:
        return table[packet]
    if isinstance(target, torch._ops.OpOverload) and torch.Tag.pointwise in target.tags:
        if table is not RULES:
            return table.get(torch.Tag.pointwise)
        from autotp.passes.rules.pointwise import pointwise_rule
        return pointwise_rule
    return None


def tensor_inputs(node: fx.Node) -> list[fx.Node]:
    """The node's tensor-valued inputs, args before kwargs, duplicates kept."""
    flat, _ = pytree.tree_flatten((node.args, node.kwargs))
    return [a for a in flat if isinstance(a, fx.Node) and isinstance(a.meta.get("val"), torch.Tensor)]


def arg(node: fx.Node, index: int, name: str, default=None):
    """The op's argument ``name`` (position ``index`` in its schema), wherever the call put it."""
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def val(node) -> torch.Tensor | None:
    """The node's value with concrete shapes (meta tensors): the example's batch and sequence
    sizes stand in for the symbolic ones, so rules do plain integer arithmetic."""
    if not isinstance(node, fx.Node):
        return None
    return node.meta["autotp_val"] if "autotp_val" in node.meta else node.meta.get("val")


def sym_val(node):
    """The node's value as export traced it: batch/sequence dims are ``SymInt``s."""
    return node.meta.get("val") if isinstance(node, fx.Node) else None


@dataclasses.dataclass
class RuleContext:
    """What a rule may ask about the graph while enumerating strategies."""
    world: int
    factors: tuple[int, ...]                      # strided-shard factors the graph can use
    _candidates: dict                              # node -> set of placements it can output

    def candidates(self, node: fx.Node) -> list[Placement]:
        """Placements the producer of ``node`` can deliver cheaply (its outputs, plus R), in a
        fixed order so every rank enumerates the same strategies."""
        return sorted(self._candidates.get(node, {R}) | {R}, key=placement_key)

    def shardable(self, size: int, factor: int = 1) -> bool:
        return can_shard(size, factor, self.world)


def placement_key(p) -> tuple:
    """Deterministic order: R, P, then shards by (dim, factor: equal blocks, then unequal ones)."""
    if p == R:
        return (0, 0, (0,))
    if p == P:
        return (1, 0, (0,))
    if p == D:
        return (1, 1, (0,))
    if isinstance(p, TokenLocal):
        return (3, p.dim, (p.kind, str(p.origin)))
    if isinstance(p, ExpertRows):
        return (4, 0, (0,))
    return (2, p.dim, factor_key(split_factor(p)))


def replicate_strategy(node: fx.Node) -> Strategy:
    """Always valid: every input replicated, every output replicated."""
    outs = val(node)
    out = tuple(R if isinstance(o, torch.Tensor) else None for o in outs) if isinstance(outs, (tuple, list)) else R
    return Strategy(tuple(R for _ in tensor_inputs(node)), out)


def dedupe(strategies: Iterable[Strategy]) -> list[Strategy]:
    seen, out = set(), []
    for s in strategies:
        key = (s.inputs, s.output)
        if key not in seen:
            seen.add(key)
            out.append(s)
    return out


# import the rule modules so their @register_rule calls run
from autotp.passes.rules import pointwise, views, matmul, reductions, embedding, attention, moe, indexing  # noqa: E402,F401
from autotp.passes.rules import loss  # noqa: E402,F401

__all__ = ["Strategy", "RuleContext", "register_rule", "find_rule", "tensor_inputs", "RULES",
           "replicate_strategy", "dedupe", "val", "R", "P", "S", "D"]
