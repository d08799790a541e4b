"""Unit tests of the rule table: what each op may do with a sharded input."""
import pytest
import torch

from autotp.placement import P, S, local_chunk
from autotp.passes.rules.views import dim_groups, view_placement


@pytest.mark.parametrize("ishape,oshape,p,world,want", [
    ((2, 8, 64), (2, 8, 4, 16), S(2), 2, S(2)),          # split heads: H*hd -> (H, hd)
    ((2, 8, 64), (2, 8, 4, 16), S(2), 4, S(2)),
    ((2, 8, 64), (2, 8, 4, 16), S(2), 8, None),          # 4 heads cannot split 8 ways
    ((2, 8, 4, 16), (2, 8, 64), S(2), 2, S(2)),          # merge heads back
    ((2, 8, 4, 16), (16, 64), S(2), 2, S(1)),
    ((2, 8, 192), (2, 8, 3, 64), S(2, 3), 2, S(3)),      # fused [q|k|v] block layout -> per-chunk shard
    ((2, 8, 64), (16, 64), S(0), 2, S(0, 1)),            # batch shard survives flattening (outer dim)
    ((2, 8, 64), (16, 64), S(1), 2, S(0, 2)),            # seq shard under batch: strided
    ((2, 8, 64), (2, 8, 1, 64), S(2), 2, S(3)),          # unsqueeze
    ((2, 8, 64), (2, 8, 64), P, 2, P),
])
def test_view_placement(ishape, oshape, p, world, want):
    assert view_placement(list(ishape), list(oshape), p, world) == want


@pytest.mark.parametrize("ishape,oshape,p,world", [
    ((2, 8, 192), (2, 8, 3, 64), S(2, 3), 2),
    ((2, 8, 64), (16, 64), S(1), 2),
    ((2, 8, 4, 16), (16, 64), S(2), 2),
    ((6, 4), (4, 6), S(0), 2),
])
def test_view_placement_matches_real_tensors(ishape, oshape, p, world):
    """The placement view_placement claims is what viewing the local shard really gives."""
    x = torch.arange(torch.Size(ishape).numel()).reshape(ishape)
    q = view_placement(list(ishape), list(oshape), p, world)
    if q is None:
        return
    for rank in range(world):
        local = local_chunk(x, p, rank, world)
        local_out_shape = list(oshape)
        local_out_shape[q.dim] //= world
        assert torch.equal(local.reshape(local_out_shape), local_chunk(x.reshape(oshape), q, rank, world))


def test_dim_groups():
    assert dim_groups([2, 8, 64], [2, 8, 4, 16]) == [([0], [0]), ([1], [1]), ([2], [2, 3])]
    assert dim_groups([2, 8, 1, 64], [16, 64]) == [([0, 1], [0]), ([2, 3], [1])]
