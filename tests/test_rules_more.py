"""Rules for the ops of transformers outside Hugging Face's causal LMs, checked on real tensors.

Every strategy a rule returns is run: each rank's local inputs (``local_chunk`` of the full input
under the strategy's input placement; a partial input split into random terms that sum to it),
the node's arguments rewritten by the strategy's ``localize`` hook, the op called on them; the
result must be the rank's piece of the full output under the strategy's output placement (for a
partial output, the ranks' results must sum to it).  So a rule that claims a wrong strategy
fails here, whatever the solver would have picked.
"""
import copy
import types

import pytest
import torch
import torch.fx as fx

from autotp.passes.rules import RuleContext, find_rule, tensor_inputs
from autotp.placement import P, R, S, is_shard, local_chunk, split_factor

aten = torch.ops.aten


def _record(gm: fx.GraphModule, *args) -> dict:
    """Every node's real value on ``args``."""
    values = {}

    class Recorder(fx.Interpreter):
        def run_node(self, n):
            values[n] = super().run_node(n)
            return values[n]

    Recorder(gm).run(*args)
    return values


def _terms(t: torch.Tensor, world: int, seed: int) -> list[torch.Tensor]:
    """``world`` random tensors that sum to ``t``."""
    g = torch.Generator().manual_seed(seed)
    parts = [torch.randn(t.shape, generator=g, dtype=torch.float32).to(t.dtype) for _ in range(world - 1)]
    return parts + [t - sum(parts)]


def check_rule(fn, args, op, candidates, world: int) -> list:
    """Export ``fn``, run every strategy of ``op``'s rule (first node of ``op``), return them."""
    program = torch.export.export(_Fn(fn), tuple(args), strict=False)
    gm = program.module()
    values = _record(gm, *args)
    for node in gm.graph.nodes:
        if "val" in node.meta:
            node.meta["autotp_val"] = node.meta["val"]
    node = next(n for n in gm.graph.nodes if n.target == op)
    ins = tensor_inputs(node)
    x = values[ins[0]]                # candidates are what a producer can deliver: shards that divide
    ctx = RuleContext(world, (), {ins[0]: {p for p in candidates if not is_shard(p)
                                           or x.shape[p.dim] % (split_factor(p) * world) == 0}})
    strategies = find_rule(op)(node, ctx)
    for s in strategies:
        terms = {a: _terms(values[a], world, i) for i, (a, p) in enumerate(zip(ins, s.inputs)) if p == P}
        outs = []
        for rank in range(world):
            local_gm = copy.deepcopy(gm)
            local = next(n for n in local_gm.graph.nodes if n.name == node.name)
            if s.localize is not None:
                s.localize(local, s, types.SimpleNamespace(world=world, rank=rank))
            by_name = {a.name: (terms[a][rank] if p == P else local_chunk(values[a], p, rank, world))
                       for a, p in zip(ins, s.inputs)}
            call_args, call_kwargs = fx.node.map_arg((local.args, local.kwargs), lambda a: by_name[a.name])
            outs.append(local.target(*call_args, **call_kwargs))
        full = values[node]
        fulls, placements = (full, s.output) if isinstance(s.output, tuple) else ((full,), (s.output,))
        for j, (want, p) in enumerate(zip(fulls, placements)):
            got = [o[j] if isinstance(s.output, tuple) else o for o in outs]
            if p == P:
                torch.testing.assert_close(sum(got), want, msg=f"{s}: partial terms do not sum to the output")
            else:
                for rank in range(world):
                    # to the last bit for data movement; an op's arithmetic may round differently
                    torch.testing.assert_close(got[rank], local_chunk(want, p, rank, world), rtol=1e-6, atol=1e-6,
                                               msg=f"{s}, rank {rank}")
    return strategies


class _Fn(torch.nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, *args):
        return self.fn(*args)


def _outputs(strategies) -> set:
    return {(tuple(s.inputs), s.output) for s in strategies}


@pytest.mark.parametrize("world", [2, 4])
def test_view_as_complex_keeps_every_dim_but_the_pair(world):
    x = torch.randn(2, 8, 4, 8, 2)
    got = _outputs(check_rule(torch.view_as_complex, [x], aten.view_as_complex.default,
                              [S(0), S(2), S(3), S(2, 2), S(4), P], world))
    assert ((S(2),), S(2)) in got and ((S(3),), S(3)) in got
    assert (((S(2, 2),), S(2, 2)) in got) == (world == 2)    # 4 heads as 2 blocks: 2 ranks, not 4
    assert ((P,), P) in got                          # real-linear: a sum of reals views as a sum of complex
    assert not any(s[0] == (S(4),) for s in got)     # the (real, imaginary) pair is never split


@pytest.mark.parametrize("world", [2, 4])
def test_view_as_real_adds_the_pair_dim(world):
    x = torch.randn(2, 8, 4, 8, dtype=torch.complex64)
    got = _outputs(check_rule(torch.view_as_real, [x], aten.view_as_real.default, [S(1), S(2), S(3)], world))
    assert {((S(1),), S(1)), ((S(2),), S(2)), ((S(3),), S(3))} <= got


@pytest.mark.parametrize("world", [2, 4])
def test_complex_rotary_product_stays_sharded_on_heads(world):
    """torchtitan's RoPE: view as complex, multiply by the (seq, 1, hd/2) frequencies, view as real."""
    freqs = torch.polar(torch.ones(8, 1, 4), torch.randn(8, 1, 4))
    xq = torch.randn(2, 8, 4, 8)

    def rope(x):
        x_ = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
        return torch.view_as_real(x_ * freqs).flatten(3)

    got = _outputs(check_rule(lambda x: torch.view_as_complex(x.reshape(2, 8, 4, 4, 2)) * freqs, [xq],
                              aten.mul.Tensor, [S(2)], world))
    assert any(out == S(2) for _, out in got)       # complex mul: the heads shard passes, freqs broadcast
    check_rule(rope, [xq], aten.view_as_real.default, [S(2)], world)


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("output_size", [False, True])
def test_repeat_interleave_on_the_kv_heads(world, output_size):
    """GQA's k/v repeat: 4 kv heads, 2 copies each; a rank's kv heads become its query heads' copies."""
    k = torch.randn(2, 4, 8, 16)
    kw = {"output_size": 8} if output_size else {}
    got = _outputs(check_rule(lambda t: t.repeat_interleave(2, dim=1, **kw), [k], aten.repeat_interleave.self_int,
                              [S(0), S(1), S(1, 2), S(3), P], world))
    assert ((S(1),), S(1)) in got and ((S(3),), S(3)) in got and ((P,), P) in got
    assert (((S(1, 2),), S(1, 2)) in got) == (world == 2)


def test_repeat_interleave_per_row_counts_and_flattened():
    x = torch.randn(4, 6)
    got = _outputs(check_rule(lambda t: t.repeat_interleave(torch.tensor([1, 2, 1, 3]), dim=0), [x],
                              aten.repeat_interleave.self_Tensor, [S(0), S(1)], 2))
    assert ((S(1), R), S(1)) in got and not any(s[0][0] == S(0) for s in got)
    got = _outputs(check_rule(lambda t: t.repeat_interleave(2), [x], aten.repeat_interleave.self_int, [S(0)], 2))
    assert all(out == R for _, out in got)          # no dim: flattened first


@pytest.mark.parametrize("world", [2, 4])
def test_unequal_split_of_strided_blocks(world):
    """A fused projection of 4 equal blocks ``[q0 q1 | k | v]`` held as ``S(2)x4``, split into
    unequal pieces (q, k, v): whole blocks per piece, so q is ``S(2)x2`` and k, v are ``S(2)``."""
    x = torch.randn(2, 8, 128)
    got = _outputs(check_rule(lambda t: t.split([64, 32, 32], dim=-1), [x], aten.split_with_sizes.default,
                              [S(2, 4), S(2, 2), S(2), S(1)], world))
    assert ((S(2, 4),), (S(2, 2), S(2), S(2))) in got
    assert ((S(2, 2),), (S(2), S(2, 1), S(2, 1))) not in got       # k would cut a block of 64
    assert ((S(1),), (S(1), S(1), S(1))) in got


@pytest.mark.parametrize("world", [2, 4])
def test_per_group_split_keeps_the_groups_shard(world):
    """torchtitan's fused qkv laid out per kv group: (B, T, groups, q_per_kv + 2, hd) split unequally on
    the per-group dim; a shard on the groups dim passes to q, k and v."""
    x = torch.randn(2, 8, 4, 4, 16)
    got = _outputs(check_rule(lambda t: t.split([2, 1, 1], dim=-2), [x], aten.split_with_sizes.default,
                              [S(2)], world))
    assert ((S(2),), (S(2), S(2), S(2))) in got


def test_split_factors_arithmetic():
    from autotp.passes.rules.views import _split_blocks
    assert _split_blocks([64, 64, 64], (64,) * 3) == [(64,), (64,), (64,)]
    assert _split_blocks([64, 32, 32], (32,) * 4) == [(32, 32), (32,), (32,)]
    assert _split_blocks([64, 32, 32], (64, 64)) is None
    assert _split_blocks([64, 16, 16], (64, 16, 16)) == [(64,), (16,), (16,)]      # unequal blocks
    assert split_factor(S(2, 2)) == 2 and is_shard(S(2, 2))


@pytest.mark.parametrize("world", [2, 4])
def test_packed_in_proj_gives_q_k_v_their_heads(world):
    """``nn.MultiheadAttention``'s packed projection ``(T, B, 3E)`` held as ``S(2)x3`` (a rank's heads
    of q, k and v) viewed as ``(T, B, 3, E)``: the shard lands on E, and taking q, k or v keeps it.
    A plain ``S(2)`` would cut across the q|k|v blocks: no strategy."""
    x = torch.randn(4, 2, 3 * 48)
    got = _outputs(check_rule(lambda t: t.unflatten(-1, (3, 48)), [x], aten.unflatten.int, [S(2, 3), S(2)], world))
    assert ((S(2, 3),), S(3)) in got and not any(ins == (S(2),) for ins, _ in got)
    packed = torch.randn(3, 4, 2, 48)
    got = _outputs(check_rule(lambda t: t[1], [packed], aten.select.int, [S(3)], world))
    assert ((S(3),), S(2)) in got
    from autotp.conformance import check_rule as conformance    # every placement offered, backward too
    for op, sample in ((aten.unflatten.int, (x, -1, [3, 48])), (aten.select.int, (packed, 0, 1))):
        report = conformance(op, [(sample, {})], world)
        assert report.failures == [], "\n".join(map(str, report.failures))


def test_unflatten_blocks_are_strided_factors():
    """The solver offers a weight ``S(d)x3`` when the graph unflattens a dim into 3 blocks."""
    from autotp.passes.propagate import split_factors
    gm = torch.export.export(_Fn(lambda t: t.unflatten(-1, (3, 16))[..., 0, :]), (torch.randn(2, 48),),
                             strict=False).module()
    assert 3 in split_factors(gm)


@pytest.mark.parametrize("world", [2, 4])
def test_repeat_keeps_count_one_dims_and_strides_repeated_ones(world):
    """``repeat(x, counts)``: a count of 1 keeps the shard; ``r`` copies of a rank's block are its
    block of each copy, ``S(d)xr`` (never a contiguous ``S(d)``); a leading new dim shifts the rest."""
    x = torch.randn(4, 8, 16)
    got = _outputs(check_rule(lambda t: t.repeat(1, 3, 1), [x], aten.repeat.default, [S(1), S(2), S(1, 2), P], world))
    assert {((S(2),), S(2)), ((S(1),), S(1, 3)), ((P,), P)} <= got
    assert ((S(1, 2),), S(1, 6)) in got                             # a fused dim of 2 blocks, 3 copies: 6 blocks
    assert ((S(1),), S(1)) not in got
    got = _outputs(check_rule(lambda t: t.repeat(2, 1, 1, 1), [x], aten.repeat.default, [S(0), S(2)], world))
    assert {((S(0),), S(1)), ((S(2),), S(3))} <= got
    from autotp.conformance import check_rule as conformance       # the contiguous claim is false
    from autotp.passes.rules import Strategy, replicate_strategy
    wrong = conformance(aten.repeat.default, [((x, [1, 3, 1]), {})], world,
                        rule=lambda node, ctx: [replicate_strategy(node), Strategy((S(1),), S(1))])
    assert len(wrong.failures) == 1


def test_repeat_of_a_replicated_probe_per_batch_row():
    """SigLIP's pooling head repeats a (1, 1, d) probe per batch row: the hidden shard stays, and a
    replicated probe may be repeated straight into a batch shard (each rank makes its rows' copies).
    A count that is the symbolic batch gives no shard on that dim (its factor would vary)."""
    probe = torch.randn(1, 1, 16)
    got = _outputs(check_rule(lambda t: t.repeat(4, 1, 1), [probe], aten.repeat.default, [S(2), R], 2))
    assert {((S(2),), S(2)), ((R,), S(0))} <= got

    class Head(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.probe = torch.nn.Parameter(torch.randn(1, 1, 16))

        def forward(self, h):
            return self.probe.repeat(h.shape[0], 1, 1) + h

    batch = torch.export.Dim("batch", min=2)
    gm = torch.export.export(Head(), (torch.randn(4, 1, 16),), dynamic_shapes=({0: batch},), strict=False).module()
    node = next(n for n in gm.graph.nodes if n.target == aten.repeat.default)
    x = node.args[0]
    outs = {s.output for s in find_rule(aten.repeat.default)(node, RuleContext(2, (), {x: {R, S(0), S(2)}}))}
    assert S(2) in outs and not any(is_shard(p) and p.dim == 0 for p in outs)


@pytest.mark.parametrize("world", [2, 4])
def test_pad_keeps_the_dims_it_does_not_pad(world):
    """Swin pads (B, H, W, C) to whole windows: H and W must be whole, B and C keep their shards.
    Zeros pad a partial sum's terms to the padded sum; a nonzero constant would be added N times."""
    x = torch.randn(4, 8, 8, 16)
    got = _outputs(check_rule(lambda t: torch.nn.functional.pad(t, (0, 0, 0, 2, 0, 2)), [x], aten.pad.default,
                              [S(0), S(1), S(2), S(3), P], world))
    assert {((S(3),), S(3)), ((P,), P)} <= got
    assert not any(ins[0] in (S(1), S(2)) for ins, _ in got)
    got = _outputs(check_rule(lambda t: torch.nn.functional.pad(t, (1, 1), value=0.5), [x], aten.pad.default,
                              [S(2), P], world))
    assert ((S(2),), S(2)) in got and not any(ins == (P,) for ins, _ in got)
    got = _outputs(check_rule(lambda t: torch.nn.functional.pad(t, (1, 1), mode="reflect"), [x[0]], aten.pad.default,
                              [S(0), S(1), P], world))
    assert {((S(0),), S(0)), ((P,), P)} <= got                   # copies of the input: linear


@pytest.mark.parametrize("world", [2, 4])
def test_roll_keeps_the_dims_it_does_not_roll(world):
    x = torch.randn(4, 8, 8, 16)
    got = _outputs(check_rule(lambda t: torch.roll(t, (-2, -2), (1, 2)), [x], aten.roll.default,
                              [S(0), S(1), S(3), P], world))
    assert {((S(0),), S(0)), ((S(3),), S(3)), ((P,), P)} <= got and ((S(1),), S(1)) not in got


@pytest.mark.parametrize("world", [2, 4])
def test_adaptive_avg_pool_keeps_batch_and_channels(world):
    """Swin's pooler: (B, C, L) -> (B, C, 1); the pooled dims whole, the leading ones keep shards."""
    x = torch.randn(2, 16, 12)
    got = _outputs(check_rule(lambda t: torch.nn.functional.adaptive_avg_pool1d(t, 1), [x],
                              aten.adaptive_avg_pool1d.default, [S(1), S(2), P], world))
    assert {((S(1),), S(1)), ((P,), P)} <= got and not any(ins == (S(2),) for ins, _ in got)
    x = torch.randn(4, 16, 8, 8)
    got = _outputs(check_rule(lambda t: torch.nn.functional.adaptive_avg_pool2d(t, (2, 2)), [x],
                              aten.adaptive_avg_pool2d.default, [S(0), S(1), S(2), S(3), P], world))
    assert {((S(0),), S(0)), ((S(1),), S(1)), ((P,), P)} <= got
    assert not any(ins[0] in (S(2), S(3)) for ins, _ in got)


def _vision_plan(model):
    import autotp
    return autotp.make_plan(model.eval(), (torch.randn(2, 3, 32, 32),), world_size=2)


def test_siglip_probe_repeat_is_planned_sharded():
    """SigLIP's pooling head (plan only): its probe repeat had no rule and ran replicated; the probe
    now stays split on the hidden dim through the repeat, and the head gathers less."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    plan = _vision_plan(transformers.SiglipVisionModel(transformers.SiglipVisionConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8)))
    assert not any("aten.repeat" in n for n in plan.notes)
    repeat = next(n for n in plan.gm.graph.nodes if n.target == aten.repeat.default)
    assert repeat.meta["autotp"]["placement"] == S(2)
    gathers = [c for c in plan.collectives() if c.forward == "all_gather"]
    # 4 without the repeat rule; 2 or 3 with it: the head's out_proj has two plans of equal cost
    # (row-parallel and an all-reduce of its (2, 64) output, or column-parallel and a gather of it),
    # and which one the solver returns depends on the other strategies in the problem
    assert len(gathers) <= 3


def test_swin_pads_rolls_and_pooler_have_rules():
    """Swin (plan only): window padding, the shifted windows' roll and the pooler no longer run
    replicated for want of a rule."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    plan = _vision_plan(transformers.SwinModel(transformers.SwinConfig(
        image_size=32, patch_size=2, embed_dim=16, depths=[2, 2], num_heads=[2, 4], window_size=4)))
    missing = " ".join(n for n in plan.notes if "no sharding rule" in n)
    assert all(op not in missing for op in ("aten.pad", "aten.roll", "adaptive_avg_pool1d"))
