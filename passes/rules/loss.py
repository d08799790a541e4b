"""Log-softmax and the classification losses over a *sharded class dim* (vocab-parallel loss).

A language model's head is column-parallel: its logits come split along the vocabulary.  A
softmax needs the whole class dim, but its two reductions are cheap to make global:

    log_softmax(x) = x - lse,   lse = m + log sum_r sum_{c in r} exp(x_c - m),   m = max_r max_{c in r} x_c

so a rank's slice of ``log_softmax(x)`` is its slice of ``x`` minus ``lse``: ``S(d) -> S(d)``,
given an all-reduce (max) of the local maxima and one (sum) of the local sums of exp, both of
(batch, seq) size (``comm.sharded_amax``, ``comm.sharded_logsumexp``).  ``lse`` is replicated
and feeds the sharded subtraction, so its gradient there is a partial sum: ``reduce_grad``
all-reduces it in backward (the "sum(grad) over the full class dim" of log-softmax's backward).

``nll_loss`` of a log-probability split along the classes picks each target on the rank that
owns it and 0 elsewhere: a ``Partial`` sum, with ``mean`` dividing by the number of
non-ignored targets, which every rank counts alike (``autotp.loss.vocab_parallel_nll``).
``cross_entropy_loss`` is both.  The losses come out *replicated*: the rewrite all-reduces the
partial loss (a scalar for mean/sum), so a loss returned with ``sharded_outputs=True`` is the
same number on every rank and ``loss.item()`` means what it says.

Each rewrite's collectives are nodes of the graph with their reason, as the collectives pass
makes them, so the plan lists and the report prices them.  The solver does not see them (a
strategy has no cost of its own): two (batch, seq)-sized all-reduces forward, one backward
and one of the loss, about vocab/4 times fewer bytes than the gather of the logits they replace.

Not sharded over the classes (they run replicated, or sharded on another dim): class weights,
``label_smoothing``, probability targets, a log-softmax that casts (``dtype=`` /
``half_to_float``), and strided (fused-layout) class shards.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from autotp import comm
from autotp.cost import ALL_REDUCE
from autotp.loss import REDUCTIONS, vocab_parallel_nll
from autotp.passes.rules import RuleContext, Strategy, arg, register_rule, replicate_strategy, tensor_inputs, val
from autotp.passes.rules.reductions import _along_dim_rule
from autotp.placement import P, R, S, is_shard, split_factor

aten = torch.ops.aten


def _class_shard(node: fx.Node, ctx: RuleContext, dim: int) -> bool:
    """Whether the producer of ``node.args[0]`` can deliver it split (plainly) along ``dim``."""
    x = val(node.args[0])
    return any(is_shard(p) and p.dim % x.ndim == dim and split_factor(p) == 1 for p in ctx.candidates(node.args[0]))


# ---- the rewrite: new nodes carry the meta the later passes and the plan read ----

def _add(graph: fx.Graph, at: fx.Node, fn, args: tuple, like: tuple, placement, collective: dict | None = None):
    """Insert ``fn(*args)`` before ``at``; ``like`` = (symbolic value, concrete value) of its result.
    ``meta["autotp"]["sharded_classes"]`` names the op the node computes (the report groups by it)."""
    with graph.inserting_before(at):
        new = graph.call_function(fn, args)
    new.meta["val"], new.meta["autotp_val"] = like
    for key in ("stack_trace", "nn_module_stack"):
        if key in at.meta:
            new.meta[key] = at.meta[key]
    new.meta["autotp"] = {"placement": placement, "sharded_classes": at.name, **(collective or {})}
    return new


def _global_lse(node: fx.Node, x: fx.Node, dim: int, lctx) -> fx.Node:
    """``lse = logsumexp(x, dim, keepdim=True)`` of ``x`` split along ``dim``, replicated, its
    gradient all-reduced (it feeds the sharded ``x - lse``)."""
    graph, what = node.graph, f"{node.name} over the sharded class dim {dim} of {x.name}"
    like = (x.meta["val"].amax(dim, keepdim=True), val(x).amax(dim, keepdim=True))
    shift = _add(graph, node, comm.sharded_amax, (x, dim, lctx.group), like, R,
                 dict(collective="sharded_amax", forward=ALL_REDUCE, backward=None,
                      reason=f"{what}: the max of the local maxima"))
    lse = _add(graph, node, comm.sharded_logsumexp, (x, shift, dim, lctx.group), like, R,
               dict(collective="sharded_logsumexp", forward=ALL_REDUCE, backward=None,
                    reason=f"{what}: the sum of the local sums of exp"))
    return _add(graph, node, comm.reduce_grad, (lse, lctx.group), like, R,
                dict(collective="reduce_grad", forward=None, backward=ALL_REDUCE,
                     reason=f"{lse.name} is R and feeds the sharded {x.name} - {lse.name}: its gradient is a "
                            f"partial sum, all-reduced in backward"))


def _localize_log_softmax(node: fx.Node, strategy: Strategy, lctx) -> None:
    x, dim = node.args[0], node.args[1] % val(node.args[0]).ndim
    node.target, node.args, node.kwargs = aten.sub.Tensor, (x, _global_lse(node, x, dim, lctx)), {}


def _localize_loss(node: fx.Node, strategy: Strategy, lctx) -> None:
    """``node`` (cross_entropy_loss / nll_loss over the sharded classes) becomes the all-reduce of
    this rank's partial loss; the log-softmax (cross entropy) and the pick go before it."""
    x, target = node.args[0], node.args[1]
    xv = val(x)
    dim = 1 if xv.ndim > 1 else 0
    logp = x
    if node.target == aten.cross_entropy_loss.default:
        logp = _add(node.graph, node, aten.sub.Tensor, (x, _global_lse(node, x, dim, lctx)),
                    (x.meta["val"], xv), strategy.inputs[0])
    local_classes = xv.shape[dim] // lctx.world
    pick = _add(node.graph, node, vocab_parallel_nll,
                (logp, target, lctx.rank * local_classes, xv.shape[dim], dim, _reduction(node), _ignore_index(node)),
                (node.meta["val"], val(node)), P)
    node.target, node.args, node.kwargs = comm.all_reduce, (pick, lctx.group), {}
    node.meta["autotp"].update(collective="all_reduce", forward=ALL_REDUCE, backward=None, sharded_classes=node.name,
                               reason=f"{pick.name} is P (each rank's targets in its classes), the loss is R")


# ---- the rules ----

def _reduction(node) -> int:
    return arg(node, 3, "reduction", REDUCTIONS["mean"])


def _ignore_index(node) -> int:
    return arg(node, 4, "ignore_index", -100)


@register_rule(aten._log_softmax.default, aten.log_softmax.int)
def log_softmax_rule(node: fx.Node, ctx: RuleContext) -> list[Strategy]:
    """Any other dim may be sharded (rows are independent); the softmax dim too, by the rewrite."""
    x = val(node.args[0])
    dim = node.args[1] % x.ndim
    strategies = _along_dim_rule(node, ctx, dim)
    casts = node.args[2] if len(node.args) > 2 else node.kwargs.get("dtype")
    if not casts and _class_shard(node, ctx, dim):
        strategies.append(Strategy((S(dim),), S(dim), localize=_localize_log_softmax))
    return strategies


@register_rule(aten.cross_entropy_loss.default, aten.nll_loss_nd.default, aten.nll_loss.default)
def loss_rule(node: fx.Node, ctx: RuleContext) -> list[Strategy]:
    """(input split along the classes, target replicated) -> the loss, replicated."""
    x, target = val(node.args[0]), val(node.args[1])
    strategies = [replicate_strategy(node)]
    weighted = arg(node, 2, "weight") is not None
    smoothing = node.target == aten.cross_entropy_loss.default and arg(node, 5, "label_smoothing", 0.0)
    if weighted or smoothing or target.is_floating_point() or len(tensor_inputs(node)) != 2:
        return strategies
    dim = 1 if x.ndim > 1 else 0
    if _class_shard(node, ctx, dim):
        strategies.append(Strategy((S(dim), R), R, localize=_localize_loss))
    return strategies
