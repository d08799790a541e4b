"""Reductions and normalisations.

A reduction over unsharded dims keeps the shard (renumbered); a *sum* over the sharded dim
leaves a ``Partial`` sum.  Softmax, norms, cumsum, sort and top-k need their own dims whole
(a log-softmax may keep its dim sharded: ``loss.py``).  Adaptive average pooling is a mean over
windows of its trailing dims: those stay whole, the leading (batch, channel) dims keep their shards.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from autotp.passes.rules import RuleContext, arg, Strategy, dedupe, register_rule, replicate_strategy, val
from autotp.placement import D, P, R, S, Sizes, is_shard, split_factor

aten = torch.ops.aten


def _reduce_dims(node: fx.Node, ndim: int) -> list[int]:
    dims = arg(node, 1, "dim")
    if dims is None or dims == []:
        return list(range(ndim))
    dims = [dims] if isinstance(dims, int) else dims
    return sorted(d % ndim for d in dims)


def _keepdim(node: fx.Node) -> bool:
    return bool(arg(node, 2, "keepdim", False))


@register_rule(aten.sum.dim_IntList, aten.sum.default, aten.mean.dim, aten.mean.default, aten.amax.default,
               aten.amin.default, aten.var.correction, aten.std.correction, aten.var_mean.correction,
               aten.linalg_vector_norm.default, aten.any.dim, aten.all.dim, aten.prod.dim_int,
               aten.logsumexp.default)
def reduction_rule(node: fx.Node, ctx: RuleContext) -> list[Strategy]:
    x = val(node.args[0])
    if node.target in (aten.linalg_vector_norm.default,):
        return [replicate_strategy(node)]
    dims = _reduce_dims(node, x.ndim) if node.target not in (aten.sum.default, aten.mean.default) \
        else list(range(x.ndim))
    keep = _keepdim(node) and node.target not in (aten.sum.default, aten.mean.default)
    is_sum = node.target in (aten.sum.dim_IntList, aten.sum.default)
    multi_out = isinstance(val(node), (tuple, list))
    strategies = [replicate_strategy(node)]
    for p in ctx.candidates(node.args[0]):
        if p in (P, D) and is_sum and x.is_floating_point():
            strategies.append(Strategy((p,), P))             # summing mixes ranks' rows: plain partial
        elif is_shard(p):
            d = p.dim % x.ndim
            if d in dims:
                if is_sum and x.is_floating_point() and not isinstance(split_factor(p), Sizes):
                    strategies.append(Strategy((p,), P))     # (blocks whole on groups: summed once per rank of one)
                continue
            nd = d if keep else d - sum(1 for r in dims if r < d)
            out = S(nd, split_factor(p))
            strategies.append(Strategy((p,), tuple(out for _ in val(node)) if multi_out else out))
    return dedupe(strategies)


def _along_dim_rule(node: fx.Node, ctx: RuleContext, dim: int) -> list[Strategy]:
    """Ops that need `dim` whole and act independently along every other dim."""
    x = val(node.args[0])
    dim %= max(x.ndim, 1)
    outs = val(node)
    strategies = [replicate_strategy(node)]
    for p in ctx.candidates(node.args[0]):
        if is_shard(p) and p.dim % x.ndim != dim:
            out = S(p.dim % x.ndim, split_factor(p))
            strategies.append(Strategy((p,), tuple(out for _ in outs) if isinstance(outs, (tuple, list)) else out))
    return dedupe(strategies)


def along_dim(node: fx.Node) -> int | None:
    """The dim a softmax / scan / sort / top-k works along (None where the call gives none)."""
    if node.target == aten.topk.default:
        return node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", -1)
    if node.target == aten.sort.stable:
        return node.kwargs.get("dim", -1)
    if node.target == aten.sort.default:
        return node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", -1)
    return node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")


def keeps_dim(node: fx.Node) -> bool:
    """Whether the op keeps the dim it works along (argmax/argmin only with keepdim)."""
    return node.target not in (aten.argmax.default, aten.argmin.default) or _keepdim(node)


@register_rule(aten._softmax.default, aten.softmax.int, aten.cumsum.default, aten.cumprod.default,
               aten.argmax.default, aten.argmin.default)
def softmax_rule(node, ctx):
    dim = along_dim(node)
    if dim is None or not keeps_dim(node):
        return [replicate_strategy(node)]
    strategies = _along_dim_rule(node, ctx, dim)
    if node.target == aten.cumsum.default and P in ctx.candidates(node.args[0]):
        strategies.append(Strategy((P,), P))             # linear: the cumsum of a partial sum is partial
    return strategies


@register_rule(aten.topk.default, aten.sort.default, aten.sort.stable)
def topk_rule(node, ctx):
    return _along_dim_rule(node, ctx, along_dim(node))


@register_rule(aten.layer_norm.default, aten.rms_norm.default)
def norm_rule(node: fx.Node, ctx: RuleContext) -> list[Strategy]:
    """Normalise over the trailing ``normalized_shape`` dims; the leading dims may be sharded."""
    x = val(node.args[0])
    n_norm = len(node.args[1])
    from autotp.passes.rules import tensor_inputs
    ins = tensor_inputs(node)
    strategies = [replicate_strategy(node)]
    for p in ctx.candidates(node.args[0]):
        if is_shard(p) and p.dim % x.ndim < x.ndim - n_norm:
            strategies.append(Strategy((p,) + tuple(R for _ in ins[1:]), S(p.dim % x.ndim, split_factor(p))))
    return dedupe(strategies)


# adaptive average pooling: op -> how many trailing dims it pools
_POOLED_DIMS = {aten.adaptive_avg_pool1d.default: 1, aten.adaptive_avg_pool2d.default: 2,
                aten._adaptive_avg_pool2d.default: 2, aten.adaptive_avg_pool3d.default: 3,
                aten._adaptive_avg_pool3d.default: 3}


@register_rule(*_POOLED_DIMS)
def adaptive_avg_pool_rule(node: fx.Node, ctx: RuleContext) -> list[Strategy]:
    """``adaptive_avg_pool{1,2,3}d(x, output_size)``: each output entry is the mean of a window of the
    pooled (last 1, 2 or 3) dims, whose bounds come from their full sizes: those dims stay whole, and
    ``output_size`` is the same on every rank.  Every leading dim (batch, channels) keeps its shard.
    A mean is linear: a partial sum stays one; a disjoint one (``D``) becomes a plain ``P`` (a window
    may mix entries of several ranks)."""
    x = val(node.args[0])
    first_pooled = x.ndim - _POOLED_DIMS[node.target]
    strategies = [replicate_strategy(node)]
    for p in ctx.candidates(node.args[0]):
        if p in (P, D) and x.is_floating_point():
            strategies.append(Strategy((p,), P))
        elif is_shard(p) and p.dim % x.ndim < first_pooled:
            strategies.append(Strategy((p,), S(p.dim % x.ndim, split_factor(p))))
    return dedupe(strategies)
