"""Vocab-parallel cross-entropy: the loss of logits split along the vocabulary, never gathered.

Megatron's method, in three steps per token (rank r holds classes [lo, lo + V_r)):

    m    = max over all classes           sharded_amax        all-reduce max   (batch, seq)
    lse  = m + log sum exp(x - m)         sharded_logsumexp   all-reduce sum   (batch, seq)
    loss = lse - x[target]                vocab_parallel_nll  x[target] on its owning rank,
                                                              0 elsewhere: a Partial sum

then the reduction (mean over the non-ignored tokens, or sum) and one all-reduce of the result.
The same pieces serve the rule (``passes/rules/loss.py``, a loss inside the captured graph)
and ``cross_entropy`` below (a loss on the vocab-sharded logits of ``sharded_outputs=True``).
"""
from __future__ import annotations

import torch

from autotp import comm

REDUCTIONS = {"none": 0, "mean": 1, "sum": 2}          # ATen's reduction codes


def vocab_parallel_nll(logp: torch.Tensor, target: torch.Tensor, lo: int, classes: int, class_dim: int,
                       reduction: int, ignore_index: int) -> torch.Tensor:
    """This rank's share of ``nll_loss(logp_full, target)``, where ``logp`` holds classes
    ``[lo, lo + logp.shape[class_dim])`` of ``classes``: -logp[target] for the targets in this
    slice, 0 for the others, reduced as ``reduction`` (0 none, 1 mean, 2 sum).  Summed over the
    ranks it is the loss (``Partial``): the mean divides by the number of non-ignored targets
    on every rank (0/0 = nan when all are ignored, as on one device)."""
    n = logp.shape[class_dim]
    rows = logp.shape[:class_dim] + logp.shape[class_dim + 1:]
    if target.shape != rows:           # as nll_loss on one device (gather alone would take a prefix)
        raise ValueError(f"Expected input batch_size ({rows[0] if rows else 1}) to match target batch_size "
                         f"({target.shape[0] if target.ndim else 1}): target {list(target.shape)}, input "
                         f"{list(rows)} without the class dim")
    valid = target != ignore_index
    torch._assert_async(((target >= 0) & (target < classes) | ~valid).all(),
                        f"cross entropy: a target is outside [0, {classes}) and is not ignore_index {ignore_index}")
    local = target - lo
    mine = valid & (local >= 0) & (local < n)                      # targets this rank owns
    picked = logp.gather(class_dim, local.masked_fill(~mine, 0).unsqueeze(class_dim)).squeeze(class_dim)
    loss = -picked.masked_fill(~mine, 0.0)                         # (tokens,) partial
    if reduction == REDUCTIONS["none"]:
        return loss
    if reduction == REDUCTIONS["sum"]:
        return loss.sum()
    return loss.sum() / valid.sum().to(loss.dtype)


def cross_entropy(logits, labels: torch.Tensor, ignore_index: int = -100, reduction: str = "mean") -> torch.Tensor:
    """``F.cross_entropy(logits.flatten(0, -2), labels.flatten(), ...)`` for ``logits`` (..., V)
    that may be a DTensor split along the vocabulary (its last dim: the ``sharded_outputs=True``
    logits of ``autotp.parallelize``).  Exact, with no gather: per token one all-reduce of the
    max and one of the sum of exp, then one of the reduced loss (backward: one of the
    log-sum-exp's gradient).  Uneven vocab shards (V not divisible by the ranks) are fine.

    ``labels`` (...) are class indices, already shifted for next-token prediction; tokens labelled
    ``ignore_index`` count for nothing (``reduction="mean"`` averages over the others;
    ``"none"`` gives each token's loss, in the labels' shape, 0 where ignored).  Returns
    a plain tensor, the same on every rank; its backward reaches the logits' DTensor gradient.
    A replicated DTensor or a plain tensor is computed as one device would."""
    import torch.nn.functional as F
    from torch.distributed.tensor import DTensor
    from autotp.base import AutoTPError
    if reduction not in REDUCTIONS:
        raise AutoTPError(f"autotp.cross_entropy: reduction must be one of {sorted(REDUCTIONS)}, got {reduction!r}")
    if isinstance(labels, DTensor):
        labels = labels.full_tensor()
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise AutoTPError(f"autotp.cross_entropy: labels must be class indices (an integer tensor), got "
                          f"{labels.dtype}")
    if tuple(labels.shape) != tuple(logits.shape[:-1]):
        raise AutoTPError(f"autotp.cross_entropy: labels {list(labels.shape)} must have the logits' shape "
                          f"without the vocab dim, {list(logits.shape[:-1])} (logits {list(logits.shape)})")
    labels = labels.to(torch.long)
    shard = _vocab_shard(logits) if isinstance(logits, DTensor) else None
    if shard is None:                  # not split along the vocabulary: as one device would
        full = logits.full_tensor() if isinstance(logits, DTensor) else logits
        return F.cross_entropy(full.flatten(0, -2), labels.flatten().to(full.device), ignore_index=ignore_index,
                               reduction=reduction)
    lo, group = shard
    x = logits.to_local()                                          # (..., V_r)
    dim = x.ndim - 1
    labels = labels.to(x.device)
    shift = comm.sharded_amax(x, dim, group)                       # (..., 1) global max
    lse = comm.reduce_grad(comm.sharded_logsumexp(x, shift, dim, group), group)   # grad: partial -> full
    partial = vocab_parallel_nll(x - lse, labels, lo, logits.shape[-1], dim, REDUCTIONS[reduction], ignore_index)
    return comm.all_reduce(partial, group)


def _vocab_shard(logits):
    """(first class index of this rank's slice, group name) when ``logits`` is a DTensor on a
    1-D mesh split along its last dim, else None."""
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
    mesh, placements = logits.device_mesh, logits.placements
    if mesh.ndim != 1 or not isinstance(placements[0], Shard) or type(placements[0]) is not Shard \
            or placements[0].dim % logits.ndim != logits.ndim - 1:
        return None
    _, offset = compute_local_shape_and_global_offset(logits.shape, mesh, placements)
    return int(offset[-1]), mesh.get_group().group_name
