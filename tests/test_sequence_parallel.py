"""Sequence parallelism (``sequence_parallel=True``): Megatron-SP found by the solver.

The norms, residual adds and dropouts between sharded matmuls run on sequence shards: each
forward all-reduce becomes a reduce-scatter + all-gather (the same wire bytes), and the
activations of those regions take 1/N of the memory.  Equivalence on real gloo processes.
"""
import pytest
import torch

import autotp
from autotp.cost import factor
from autotp.verify import Case, HFModel, verify
from models import FAMILIES, MOE_FAMILIES, build

TOL = 1e-5
SP = {"sequence_parallel": True}


def _cases():
    cases = [Case(name, HFModel(FAMILIES[name]), kwargs=SP, other_shapes=((3, 4),)) for name in ("llama", "gpt2")]
    # MoE under SP: the expert block's tokens are gathered and its combine reduce-scattered back
    cases.append(Case("mixtral", HFModel(MOE_FAMILIES["mixtral"]), kwargs=SP, other_shapes=((3, 4),)))
    # a cap on activation memory between the plain and the fully sequence-parallel plan: SP in
    # part of the model, all-reduces elsewhere (see test_activation_cap_trades_memory_for_time)
    cases.append(Case("llama-capped", HFModel(FAMILIES["llama"]), kwargs={"max_activation_bytes": 97 * 2**20},
                      other_shapes=((3, 4),)))
    # a sequence the plan cannot split evenly is a clear error, not a wrong number
    cases.append(Case("llama-odd-seq", HFModel(FAMILIES["llama"]), kwargs=SP, other_shapes=((2, 5),)))
    return cases


@pytest.fixture(scope="module", params=[2, 4], ids=lambda w: f"world{w}")
def results(request):
    return request.param, verify(_cases(), request.param)


@pytest.mark.parametrize("family", ["llama", "gpt2", "mixtral", "llama-capped"])
def test_sequence_parallel_matches_one_device(results, family):
    world, per_rank = results
    for rank, res in enumerate(per_rank):
        r = next(x for x in res if x.name == family)
        assert not r.error, f"rank {rank}:\n{r.error}"
        assert r.logits_err <= TOL, f"{family} world {world}: logits error {r.logits_err:.2e}"
        assert r.grad_err <= TOL, f"{family} world {world}: gradient error {r.grad_err:.2e} at {r.worst_grad}"
        assert r.other_shape_err <= TOL, f"{family} world {world}: other-shape error {r.other_shape_err:.2e}"


def test_measured_collectives_are_reduce_scatter_and_all_gather(results):
    world, per_rank = results
    r = next(x for x in per_rank[0] if x.name == "llama")
    assert not r.error, r.error
    # forward: no all-reduce at all — every one became reduce-scatter + all-gather
    assert "all_reduce" not in r.forward_counts, r.forward_counts
    assert r.forward_counts.get("reduce_scatter_tensor") == 4, r.forward_counts      # 2 per layer, 2 layers
    # backward: the gathers' reduce-scatters, the reduce-scatters' gathers, and one all-reduce:
    # the norm weights' gradients (each rank saw its part of the sequence), 2 per layer + the
    # final norm's, bucketed into one collective; with fewer kv heads (2) than ranks, one more:
    # the k/v weights' gradients, summed over each group of ranks that holds a kv head whole
    assert r.backward_counts.get("all_reduce") == 1 + (world > 2), r.backward_counts


def test_indivisible_sequence_is_a_clear_error(results):
    world, per_rank = results
    r = next(x for x in per_rank[0] if x.name == "llama-odd-seq")
    assert "seq = 5 does not divide by" in r.error, r.error
    assert "sequence_parallel" in r.error


def _wire(plan, layer):
    """Wire bytes per rank of one layer's activation collectives, forward + backward."""
    total = 0.0
    for c in plan.collectives():
        if c.layer != layer or len(c.shape) < 2:          # 1-D: a norm weight's gradient
            continue
        for kind in (c.forward, c.backward):
            if kind:
                total += factor(kind, plan.world) * c.nbytes
    return total


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_same_bytes_less_activation_memory(family):
    """Megatron-SP's promise, checked on the plans: per decoder layer the same wire bytes as the
    all-reduce plan, per layer forward exactly 2 all-gathers + 2 reduce-scatters, and activation
    memory per rank strictly lower."""
    torch.manual_seed(0)
    model = build(family)
    ids = torch.randint(0, 90, (2, 8))
    tp = autotp.plan(model, (ids,), world_size=2)
    sp = autotp.plan(model, (ids,), world_size=2, sequence_parallel=True)
    layer = 1
    assert dict(sp.counts()["per_layer_forward"][layer]) == {"all_gather": 2, "reduce_scatter": 2}
    assert dict(tp.counts()["per_layer_forward"][layer]) == {"all_reduce": 2}
    assert _wire(sp, layer) == pytest.approx(_wire(tp, layer))
    assert sp.activation_mib() < 0.95 * tp.activation_mib()


def test_three_ranks_odd_sizes():
    """3 ranks with vocab 101, ffn 200, 6 heads and MQA, sequence 9: sequence parallelism where
    the sequence divides, gathers or replication where the other sizes do not — exact."""
    from test_equivalence import ODD
    cases = [Case(n, HFModel(c), seq=9, kwargs=SP, other_shapes=((2, 6),)) for n, c in ODD.items()]
    for rank, res in enumerate(verify(cases, 3)):
        for r in res:
            assert not r.error, f"{r.name} rank {rank}:\n{r.error}"
            assert max(r.logits_err, r.grad_err, r.other_shape_err) <= TOL, (r.name, r.logits_err, r.grad_err)
            assert r.forward_counts.get("reduce_scatter_tensor"), (r.name, r.forward_counts)   # SP happened


def test_activation_cap_trades_memory_for_time():
    """``max_activation_bytes``: the fastest plan whose activation memory fits — the solver
    splits the sequence only as far as the cap needs; above the plain plan's memory nothing
    changes, below the least possible it plans for the least and says so."""
    torch.manual_seed(0)
    model = build("llama")
    ids = torch.randint(0, 90, (2, 8))
    tp = autotp.plan(model, (ids,), world_size=2)
    sp = autotp.plan(model, (ids,), world_size=2, sequence_parallel=True)
    lo, hi = sp.activation_mib(), tp.activation_mib()
    assert lo < hi

    def capped(mib):
        return autotp.plan(model, (ids,), world_size=2, max_activation_bytes=mib * 2**20)

    loose = capped(hi + 1)
    assert loose.fingerprint() == tp.fingerprint()
    mid = capped((lo + hi) / 2)
    assert mid.activation_mib() <= (lo + hi) / 2 + 1e-6
    t = lambda p: p.ctx.solver_stats["comm_time_us"]          # noqa: E731
    assert t(tp) < t(mid) <= t(sp)
    assert mid.counts()["forward"]["reduce_scatter"] > 0
    tight = capped(lo / 2)
    assert tight.activation_mib() == pytest.approx(lo)
    assert any("no plan keeps activations under" in n for n in tight.notes)
