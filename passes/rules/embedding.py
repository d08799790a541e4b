"""Embedding lookups: vocab-parallel (rows split, masked lookup, partial sum) or
hidden-parallel (columns split, output sharded on its last dim)."""
from __future__ import annotations

import torch
import torch.fx as fx

from autotp.passes.rules import RuleContext, Strategy, register_rule, replicate_strategy, val
from autotp.placement import P, R, S

aten = torch.ops.aten


def vocab_parallel_embedding(weight: torch.Tensor, ids: torch.Tensor, rank: int, padding_idx: int = -1) -> torch.Tensor:
    """Lookup in this rank's rows [rank*V/N, (rank+1)*V/N); other ids give zeros (Partial).
    ``padding_idx`` (whose row gets no gradient) is moved into local numbering when it is ours."""
    rows = weight.shape[0]
    ids = ids.to(weight.device)          # a no-op at run time; keeps meta-device planning consistent
    local = ids - rank * rows
    outside = (local < 0) | (local >= rows)
    pad = padding_idx - rank * rows if padding_idx is not None and padding_idx >= 0 else -1
    pad = pad if 0 <= pad < rows else -1
    out = torch.ops.aten.embedding(weight, local.masked_fill(outside, 0), pad)
    return out.masked_fill(outside.unsqueeze(-1), 0.0)


def _localize_vocab(node: fx.Node, strategy: Strategy, lctx) -> None:
    weight, ids = node.args[0], node.args[1]
    padding_idx = node.args[2] if len(node.args) > 2 else -1
    node.target = vocab_parallel_embedding
    node.args = (weight, ids, lctx.rank, padding_idx)
    node.kwargs = {}


@register_rule(aten.embedding.default)
def embedding_rule(node: fx.Node, ctx: RuleContext) -> list[Strategy]:
    weight = val(node.args[0])
    out = val(node)
    strategies = [replicate_strategy(node)]
    if len(node.args) > 3 and (node.args[3] or (len(node.args) > 4 and node.args[4])):
        return strategies                          # scale_grad_by_freq / sparse: keep replicated
    if ctx.shardable(weight.shape[0]):
        strategies.append(Strategy((S(0), R), P, localize=_localize_vocab))
    if ctx.shardable(weight.shape[1]):
        strategies.append(Strategy((S(1), R), S(out.ndim - 1)))
    return strategies
