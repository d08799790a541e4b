"""A fused projection of unequal parts: grouped-query ``[q | k | v]`` held as ``Blocks``.

``S(d)[Q|K|V]``: each block split evenly over the ranks, a rank's piece of every block side by
side (Megatron's fused GQA layout).  Specified here:

- the placement: its pieces, their join, its DTensor (``full_tensor``, ``redistribute``) on a real
  gloo group of two;
- the rules, on numbers (the conformance harness, inputs offered ``Blocks``): ``split_with_sizes``
  at the block sizes and a slice of whole blocks give ``Shard``; a matmul carries the weight's
  blocks to its output's last dim; an add keeps them;
- Hugging Face Phi-3 (``qkv[..., :Q]``, ``qkv[..., Q:Q+K]``, ``qkv[..., Q+K:]``) at N = 2: its qkv
  is ``S(0)[64|32|32]``, each layer forward runs Megatron's 2 all-reduces and no all-gather, the
  output and every gradient equal one device's, the parameters' full tensors, ``full_state_dict``
  and a sliced ``load_checkpoint`` give the original weights;
- fewer kv heads than ranks: each block cut into its own number of pieces (``placement.Sizes``),
  q over all N ranks, k and v over H_kv groups and whole inside each — kv heads replicated inside
  the fused weight, as separate k/v projections are (``S(0)·R@H_kv``).  Phi-3 at N = 4 (2 kv heads:
  ``S(0)[64|32·R@2|32·R@2]``) and GPT-BigCode's multi-query ``c_attn`` (one kv head, whole on every
  rank: ``S(0)[64|16·R|16·R]``) run Megatron's 2 all-reduces per layer, no all-gather inside a
  layer, and their output and every gradient (the k/v rows' gradients summed over their group,
  the q rows' not) equal one device's; the fused weight's full tensor, ``full_state_dict`` and a
  sliced ``load_checkpoint`` are the original weights, and ``generate`` gives Hugging Face's tokens.
"""
import copy
import os
import tempfile

import pytest
import torch

import autotp
from autotp.conformance import check_rule
from autotp.placement import (Blocks, Grid, R, S, Shard, Sizes, _StridedShard, blocks_to_rank_major, fmt, join_pieces,
                              local_chunk, local_shape, local_slices, normalize, rank_major_to_blocks, split_factor)
from autotp.verify import Case, HFModel, plan_case, verify
from ranks import case, plan_ahead, planned, run_cases

aten = torch.ops.aten
TOL = 1e-5
PHI3 = dict(model_type="phi3", pad_token_id=0, vocab_size=128, hidden_size=64, intermediate_size=128,
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
BIGCODE = dict(model_type="gpt_bigcode", vocab_size=128, n_embd=64, n_layer=2, n_head=4, resid_pdrop=0.0,
               embd_pdrop=0.0, attn_pdrop=0.0)            # multi-query: one kv head


# ---- the placement

def test_blocks_build_print_and_fold():
    p = S(0, (24, 8, 8))
    assert isinstance(p, Blocks) and fmt(p) == "S(0)[24|8|8]" and split_factor(p) == (24, 8, 8)
    assert S(1, (8, 8, 8)) == _StridedShard(1, split_factor=3)      # equal blocks: the strided shard
    assert S(1, (40,)) == Shard(1)
    assert p != Shard(0) and Shard(0) != p and p != S(0, (8, 24, 8)) and p == S(0, (24, 8, 8))
    assert normalize(S(-1, (24, 8, 8)), 3) == S(2, (24, 8, 8))
    assert local_shape((2, 5, 40), S(2, (24, 8, 8)), 4) == [2, 5, 10]
    assert copy.deepcopy(p) == p


@pytest.mark.parametrize("world", [2, 4])
def test_pieces_join_back(world):
    t = torch.arange(40 * 3).reshape(40, 3)
    p = S(0, (24, 8, 8))
    pieces = [local_chunk(t, p, r, world) for r in range(world)]
    b = [24 // world, 8 // world, 8 // world]
    for r, piece in enumerate(pieces):          # rank r: its slice of each block, side by side
        want = torch.cat([t[r * b[0]:(r + 1) * b[0]], t[24 + r * b[1]:24 + (r + 1) * b[1]],
                          t[32 + r * b[2]:32 + (r + 1) * b[2]]])
        assert torch.equal(piece, want)
        slices = local_slices(t.shape, p, r, world)
        assert torch.equal(join_pieces([t[i] for i in slices], slices), want)
    gathered = torch.cat(pieces)                # an all-gather's rank-major output
    assert torch.equal(rank_major_to_blocks(gathered, 0, (24, 8, 8), world), t)
    assert torch.equal(blocks_to_rank_major(t, 0, (24, 8, 8), world), gathered)


def test_blocks_whole_on_groups_of_ranks():
    """``[q|k|v]`` with k, v whole on 2 groups of 2 ranks (N = 4): rank r holds its quarter of q and
    the half of k and v of its group (ranks 0, 1: the first kv head; 2, 3: the second); cutting it
    at the blocks gives q ``S(0)`` and k, v ``S(0)·R@2``; the ranks' pieces give the tensor back."""
    sizes = Sizes((64, 32, 32), (None, 2, 2))
    p = S(0, sizes)
    assert isinstance(p, Blocks) and p.grouped and fmt(p) == "S(0)[64|32·R@2|32·R@2]"
    assert local_shape((128, 8), p, 4) == [16 + 16 + 16, 8]
    assert S(0, sizes[:1]) == Shard(0) and S(0, sizes[1:2]) == Grid(Shard(0), R, 2)
    assert S(0, sizes[1:]) == Grid(_StridedShard(0, split_factor=2), R, 2)
    assert fmt(S(0, Sizes((64, 16, 16), (None, 1, 1)))) == "S(0)[64|16·R|16·R]"
    t = torch.arange(128)
    pieces = [local_chunk(t, p, r, 4) for r in range(4)]
    for r, piece in enumerate(pieces):
        g = r // 2
        want = torch.cat([t[16 * r:16 * (r + 1)], t[64 + 16 * g:64 + 16 * (g + 1)], t[96 + 16 * g:96 + 16 * (g + 1)]])
        assert torch.equal(piece, want)
    assert torch.equal(rank_major_to_blocks(torch.cat(pieces), 0, sizes, 4), t)
    assert p == S(0, Sizes((64, 32, 32), (None, 2, 2))) and p != S(0, (64, 32, 32)) and copy.deepcopy(p) == p


def _dtensor_cases():
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate
    mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("tp",))
    rank = mesh.get_local_rank()
    full = torch.randn(3, 40, generator=torch.Generator().manual_seed(0))
    p = S(1, (24, 8, 8))
    dt = DTensor.from_local(local_chunk(full, p, rank, 2), mesh, [p], run_check=False, shape=full.shape,
                            stride=full.stride())

    def back_to_blocks():
        whole = DTensor.from_local(full, mesh, [Replicate()], run_check=False)
        return torch.equal(whole.redistribute(mesh, [p]).to_local(), local_chunk(full, p, rank, 2))
    mqa = S(1, Sizes((24, 8, 8), (None, 1, 1)))       # k and v whole on both ranks
    whole_kv = DTensor.from_local(local_chunk(full, mqa, rank, 2), mesh, [mqa], run_check=False, shape=full.shape,
                                  stride=full.stride())
    return {
        "whole_kv_full_tensor": lambda: torch.equal(whole_kv.full_tensor(), full) and whole_kv.to_local().shape[1] == 28,
        "placement": lambda: dt.placements == (p,),
        "full_tensor": lambda: torch.equal(dt.full_tensor(), full),
        "redistribute": lambda: torch.equal(dt.redistribute(mesh, [Replicate()]).to_local(), full),
        "back_to_blocks": back_to_blocks,
        "parameter": lambda: torch.equal(torch.nn.Parameter(dt).full_tensor(), full),
    }


def test_dtensor_parameter_gives_the_original_on_two_ranks():
    results = run_cases(_dtensor_cases, 2, timeout_s=120)
    for name in results[0]:
        assert all(case(results, name)), name


# ---- the rules, on numbers: inputs offered S(d)[48|24|24] wherever a dim is 96

BLOCKS = (48, 24, 24)
FACTORS = (1, 2, 3, BLOCKS)


def _g(*shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape)))


SAMPLES = {
    aten.split_with_sizes.default: [((_g(2, 8, 96), list(BLOCKS), -1), {}), ((_g(2, 8, 96), [48, 48], 2), {})],
    aten.slice.Tensor: [((_g(2, 8, 96), 2, 0, 48), {}), ((_g(2, 8, 96), -1, 48, 72), {}),
                        ((_g(2, 8, 96), 2, 48, 2 ** 62), {}), ((_g(2, 8, 96), 2, 8, 48), {})],
    aten.linear.default: [((_g(2, 8, 32), _g(96, 32)), {})],
    aten.add.Tensor: [((_g(2, 8, 96), _g(96)), {})],
    aten.view.default: [((_g(2, 8, 96), [16, 96]), {})],
    aten.transpose.int: [((_g(2, 8, 96), 1, 2), {})],
}


@pytest.mark.parametrize("op", list(SAMPLES), ids=str)
def test_rules_on_blocks_hold_on_numbers(op):
    for world in (2, 3, 4):
        report = check_rule(op, SAMPLES[op], world, factors=FACTORS)
        assert report.failures == [], "\n".join(map(str, report.failures))
        assert any("[48|24|24]" in c for c in report.cases), sorted(report.cases)


@pytest.mark.parametrize("world,groups", [(4, 2), (2, 1)], ids=["kv-on-2-groups-N4", "mqa-N2"])
def test_rules_on_blocks_whole_on_groups_hold_on_numbers(world, groups):
    """k and v blocks whole on groups of ranks: cut at the blocks they are ``S(2)·R@g``; a matmul
    and a bias add carry the layout; forward and backward hold, the gradient of the group-held
    elements a partial sum over the group; a sum over the fused dim is not offered (it would
    count those elements once per rank of a group)."""
    factors = (1, Sizes(BLOCKS, (None, groups, groups)))
    for op in (aten.split_with_sizes.default, aten.slice.Tensor, aten.linear.default, aten.add.Tensor,
               aten.view.default, aten.sum.dim_IntList):
        samples = SAMPLES.get(op, [((_g(2, 8, 96), [2]), {})])
        report = check_rule(op, samples, world, factors=factors)
        assert report.failures == [], "\n".join(map(str, report.failures))
        grouped = [c for c in report.cases if "·R" in c]
        assert bool(grouped) == (op != aten.sum.dim_IntList), (op, sorted(report.cases))
    cut = _offered(aten.split_with_sizes.default, ((_g(2, 8, 96), list(BLOCKS), -1), {}), world, factors)
    kv = f"S(2)·R@{groups}"
    assert f"(S(2)[48|24·R{'@2' if groups > 1 else ''}|24·R{'@2' if groups > 1 else ''}]) -> (S(2), {kv}, {kv})" in cut


def _offered(op, sample, world=2, factors=FACTORS):
    report = check_rule(op, [sample], world, factors=factors)
    assert report.failures == []
    return report.cases


def test_cut_at_the_blocks_gives_shards():
    x = _g(2, 8, 96)
    assert "(S(2)[48|24|24]) -> (S(2), S(2), S(2))" in _offered(aten.split_with_sizes.default,
                                                                ((x, list(BLOCKS), -1), {}))
    assert "(S(2)[48|24|24]) -> S(2)" in _offered(aten.slice.Tensor, ((x, 2, 0, 48), {}))        # q
    assert "(S(2)[48|24|24]) -> S(2)" in _offered(aten.slice.Tensor, ((x, 2, 48, 72), {}))       # k
    assert "(S(2)[48|24|24]) -> S(2)x2" in _offered(aten.slice.Tensor, ((x, 2, 48, 96), {}))     # k and v
    assert not any("[48|24|24]" in c for c in _offered(aten.slice.Tensor, ((x, 2, 8, 48), {})))  # cuts a block
    assert "(R, S(0)[48|24|24]) -> S(2)[48|24|24]" in _offered(aten.linear.default, ((_g(2, 8, 32), _g(96, 32)), {}))


# ---- Phi-3: fused qkv sliced into q, k, v

@pytest.fixture(scope="module")
def phi3_plans():
    c = Case("phi3", HFModel(PHI3))
    return c, {world: plan_case(c, world) for world in (2, 4)}


@pytest.mark.parametrize("world,qkv", [(2, "S(0)[64|32|32]"), (4, "S(0)[64|32·R@2|32·R@2]")])
def test_phi3_qkv_is_split_by_blocks_and_layers_run_megatrons_collectives(phi3_plans, world, qkv):
    """2 all-reduces per layer and no all-gather inside one (was: qkv gathered every layer).  At
    N = 4, 2 kv heads: k and v blocks whole on 2 groups of 2 ranks, q split 4 ways, and the plan
    says what it costs."""
    plan = phi3_plans[1][world]
    for layer in range(2):
        assert fmt(plan.placements[f"model.layers.{layer}.self_attn.qkv_proj.weight"]) == qkv
    per_layer = plan.counts()["per_layer_forward"]
    assert {k: dict(v) for k, v in per_layer.items() if k is not None} == {0: {"all_reduce": 2}, 1: {"all_reduce": 2}}
    if world == 4:
        assert any(n.startswith("k/v heads replicated x2") for n in plan.notes), plan.notes


@pytest.mark.parametrize("world", [2, 4])
def test_phi3_output_and_every_gradient_equal_one_device(phi3_plans, world):
    c, plans = phi3_plans
    bad = [f"{r.name} rank {rank}: logits {r.logits_err:.1e} grad {r.grad_err:.1e} ({r.worst_grad}) {r.error}"
           for rank, res in enumerate(verify([c], world, timeout_s=300, plans=[plans[world]])) for r in res
           if r.error or r.logits_err > TOL or r.grad_err > TOL or r.other_shape_err > TOL]
    assert not bad, "\n".join(bad)


def test_not_offered_when_fsdp2_shards_the_parameters():
    """FSDP2 cannot describe blocks whole on groups of ranks: under ``dp_sharded`` the fused weight is
    never offered them."""
    from autotp.plan import make_plan
    plan = make_plan(_build_phi3(0), (torch.randint(0, 100, (2, 8)),), world_size=4, dp_sharded=True)
    assert "·R" not in fmt(plan.placements["model.layers.0.self_attn.qkv_proj.weight"])


# ---- GPT-BigCode: multi-query, [q | k | v] with one kv head

@pytest.fixture(scope="module")
def bigcode():
    c = Case("bigcode", HFModel(BIGCODE))
    return c, {world: plan_case(c, world) for world in (2, 4)}


@pytest.mark.parametrize("world", [2, 4])
def test_bigcode_multi_query_keeps_its_kv_head_whole_inside_the_fused_weight(bigcode, world):
    """q split N ways, the one k and v head whole on every rank (was: c_attn replicated whole)."""
    plan = bigcode[1][world]
    for layer in range(2):
        for name in ("weight", "bias"):
            assert fmt(plan.placements[f"transformer.h.{layer}.attn.c_attn.{name}"]) == "S(0)[64|16·R|16·R]"
    per_layer = plan.counts()["per_layer_forward"]
    assert {k: dict(v) for k, v in per_layer.items() if k is not None} == {0: {"all_reduce": 2}, 1: {"all_reduce": 2}}


def test_bigcode_output_and_every_gradient_equal_one_device(bigcode):
    c, plans = bigcode
    bad = [f"{r.name} rank {rank}: logits {r.logits_err:.1e} grad {r.grad_err:.1e} ({r.worst_grad}) {r.error}"
           for rank, res in enumerate(verify([c], 2, timeout_s=300, plans=[plans[2]])) for r in res
           if r.error or r.logits_err > TOL or r.grad_err > TOL or r.other_shape_err > TOL]
    assert not bad, "\n".join(bad)


def _build(config, seed: int):
    torch.manual_seed(seed)
    return HFModel(config)().eval()


def _build_phi3(seed: int):
    return _build(PHI3, seed)


def _phi3_checkpoint_cases():
    import torch.distributed as dist
    from safetensors.torch import save_file
    ids = torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(1))
    ref = _build_phi3(0)
    want = ref(ids).logits
    pmodel = autotp.parallelize(_build_phi3(0), (ids,), **planned("phi3"))
    qkv = "model.layers.0.self_attn.qkv_proj.weight"

    def parameters():
        p = dict(pmodel.named_parameters())[qkv]
        return (isinstance(p.placements[0], Blocks), p.to_local().shape[0],
                torch.equal(p.full_tensor(), ref.state_dict()[qkv]))

    def full_state_dict():
        full, own = autotp.full_state_dict(pmodel), ref.state_dict()
        return sorted(k for k in own if not torch.equal(full[k], own[k]))

    def sliced_load():
        tmp = os.environ["AUTOTP_TEST_CKPT"]
        if dist.get_rank() == 0:
            save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, os.path.join(tmp, "model.safetensors"))
        dist.barrier()
        other = autotp.parallelize(_build_phi3(1), (ids,), **planned("phi3"))   # other weights, then loaded
        autotp.load_checkpoint(other, tmp)
        return ((other(ids).logits - want).abs().max() / want.abs().max()).item()

    def bigcode_checkpoint():
        """The multi-query c_attn (``S(0)[64|16·R|16·R]``): full tensor, full_state_dict, sliced load."""
        tmp = os.path.join(os.environ["AUTOTP_TEST_CKPT"], "bigcode")
        ref_b = _build(BIGCODE, 0)
        pm = autotp.parallelize(_build(BIGCODE, 0), (ids,), **planned("bigcode"))
        w = dict(pm.named_parameters())["transformer.h.0.attn.c_attn.weight"]
        full, own = autotp.full_state_dict(pm), ref_b.state_dict()
        if dist.get_rank() == 0:
            os.makedirs(tmp, exist_ok=True)
            save_file({k: v.clone() for k, v in own.items()}, os.path.join(tmp, "model.safetensors"))   # tied: copies
        dist.barrier()
        other = autotp.parallelize(_build(BIGCODE, 1), (ids,), **planned("bigcode"))
        autotp.load_checkpoint(other, tmp)
        want_b = ref_b(ids).logits
        # the decode step: its k and v (whole on every rank, S(2)·R) go into a replicated KV cache
        tokens = other.generate(ids, max_new_tokens=3, pad_token_id=0)
        same = bool((tokens == ref_b.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0)).all())
        return (fmt(w.placements[0]), w.to_local().shape[0], torch.equal(w.full_tensor(), own["transformer.h.0.attn.c_attn.weight"]),
                sorted(k for k in own if not torch.equal(full[k], own[k])),
                ((other(ids).logits - want_b).abs().max() / want_b.abs().max()).item(), same)

    return {"parameters": parameters, "full_state_dict": full_state_dict, "sliced_load": sliced_load,
            "bigcode_checkpoint": bigcode_checkpoint}


def test_phi3_parameters_state_dict_and_checkpoint_are_the_original_weights(monkeypatch):
    ids = torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(1))
    plan_ahead("phi3", _build_phi3(0), (ids,), world=2)
    plan_ahead("bigcode", _build(BIGCODE, 0), (ids,), world=2)
    with tempfile.TemporaryDirectory() as tmp:
        monkeypatch.setenv("AUTOTP_TEST_CKPT", tmp)
        results = run_cases(_phi3_checkpoint_cases, 2, timeout_s=300)
    for rank_result in case(results, "parameters"):
        assert rank_result == (True, 64, True)
    assert case(results, "full_state_dict") == [[], []]
    assert max(case(results, "sliced_load")) <= TOL
    for placement, rows, same, differ, err, tokens in case(results, "bigcode_checkpoint"):
        assert (placement, rows, same, differ, tokens) == ("S(0)[64|16·R|16·R]", 32 + 16 + 16, True, [], True)
        assert err <= TOL
