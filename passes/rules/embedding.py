"""Embedding lookups: vocab-parallel (rows split, masked lookup, partial sum) or
hidden-parallel (columns split, output sharded on its last dim)."""
from __future__ import annotations

import torch
import torch.fx as fx

from autotp.passes.rules import RuleContext, Strategy, register_rule, replicate_strategy, val
from autotp.placement import P, R, S

aten = torch.ops.aten


def vocab_parallel_embedding(weight: torch.Tensor, ids: torch.Tensor, rank: int) -> torch.Tensor:
    """Lookup in this rank's rows [rank*V/N, (rank+1)*V/N); other ids give zeros (Partial)."""
    rows = weight.shape[0]
    ids = ids.to(weight.device)          # a no-op at run time; keeps meta-device planning consistent
    local = ids - rank * rows
    outside = (local < 0) | (local >= rows)
    out = torch.nn.functional.embedding(local.masked_fill(outside, 0), weight)
    return out.masked_fill(outside.unsqueeze(-1), 0.0)


def _localize_vocab(node: fx.Node, strategy: Strategy, lctx) -> None:
    weight, ids = node.args[0], node.args[1]
    node.target = vocab_parallel_embedding
    node.args = (weight, ids, lctx.rank)
    node.kwargs = {}


@register_rule(aten.embedding.default)
def embedding_rule(node: fx.Node, ctx: RuleContext) -> list[Strategy]:
    weight = val(node.args[0])
    out = val(node)
    strategies = [replicate_strategy(node)]
    if len(node.args) > 2 and node.args[2] not in (-1, None):
        return strategies                          # padding_idx changes the gradient; keep it simple
    if ctx.shardable(weight.shape[0]):
        strategies.append(Strategy((S(0), R), P, localize=_localize_vocab))
    if ctx.shardable(weight.shape[1]):
        strategies.append(Strategy((S(1), R), S(out.ndim - 1)))
    return strategies
