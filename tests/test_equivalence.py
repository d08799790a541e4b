"""The contract: same logits and same gradients as one device, on real gloo process groups.

Each world size starts its processes once and runs every family in them (see autotp.verify).
"""
import pytest

from autotp.verify import Case, HFModel, verify
from models import FAMILIES

TOL = 1e-5      # max abs error relative to the output (or gradient) scale, fp32


def _cases():
    cases = [Case(name, HFModel(cfg)) for name, cfg in FAMILIES.items()]
    # the vocab-split logits returned as a DTensor instead of all-gathered
    cases.append(Case("llama-sharded-logits", HFModel(FAMILIES["llama"]), kwargs={"sharded_outputs": True}))
    return cases


@pytest.fixture(scope="module", params=[1, 2, 4], ids=lambda w: f"world{w}")
def results(request):
    world = request.param
    per_rank = verify(_cases(), world)
    return world, per_rank


@pytest.mark.parametrize("family", list(FAMILIES) + ["llama-sharded-logits"])
def test_logits_and_gradients_match_one_device(results, family):
    world, per_rank = results
    for rank, res in enumerate(per_rank):
        r = next(x for x in res if x.name == family)
        assert not r.error, f"rank {rank}:\n{r.error}"
        assert r.logits_err <= TOL, f"{family} world {world} rank {rank}: logits error {r.logits_err:.2e}"
        assert r.grad_err <= TOL, (f"{family} world {world} rank {rank}: gradient error {r.grad_err:.2e} "
                                   f"at {r.worst_grad}")
        # batch and sequence are symbolic in the plan: another input shape runs exactly too
        assert r.other_shape_err <= TOL, f"{family} world {world}: other-shape error {r.other_shape_err:.2e}"


@pytest.mark.parametrize("family", list(FAMILIES))
def test_weights_are_sharded(results, family):
    world, per_rank = results
    r = next(x for x in per_rank[0] if x.name == family)
    assert not r.error, r.error
    sharded = [n for n, p in r.placements.items() if p != "R"]
    if world == 1:
        return
    # every weight matrix is split: these configs divide by N everywhere
    assert r.matrices and all(n in sharded for n in r.matrices), f"replicated: {set(r.matrices) - set(sharded)}"


def test_sharded_logits_skip_the_gather(results):
    world, per_rank = results
    r = next(x for x in per_rank[0] if x.name == "llama-sharded-logits")
    full = next(x for x in per_rank[0] if x.name == "llama")
    assert not r.error, r.error
    # at N=2 (every dim divides) the logits' all-gather is gone and nothing else changes; at N=4
    # the GQA kv heads do not divide and the free output placement lets the solver re-plan more
    if world == 2:
        gathers = "all_gather_into_tensor"
        assert r.forward_counts.get(gathers, 0) == full.forward_counts[gathers] - 1, (r.forward_counts,
                                                                                     full.forward_counts)


def test_megatron_collective_counts(results):
    """Llama at N=2: exactly 2 all-reduces per decoder layer forward and 2 backward (Megatron),
    plus the named embedding / lm_head collectives."""
    world, per_rank = results
    if world != 2:
        pytest.skip("counts are stated for N=2, where every dim divides")
    layers = FAMILIES["llama"]["num_hidden_layers"]
    r = next(x for x in per_rank[0] if x.name == "llama")
    assert not r.error, r.error
    # forward: g after o_proj and down_proj per layer; all-gather of the hidden-split embedding
    # output and of the vocab-split logits (full logits on every rank)
    assert r.forward_counts == {"all_reduce": 2 * layers, "all_gather_into_tensor": 2}, r.forward_counts
    # backward: f before q/k/v and gate/up per layer, and f before lm_head
    assert r.backward_counts == {"all_reduce": 2 * layers + 1}, r.backward_counts


ODD = {
    # 3 ranks: vocab 101 and ffn 200 do not divide; heads 6 and kv heads 3 do
    "llama-odd": dict(FAMILIES["llama"], hidden_size=96, num_attention_heads=6, num_key_value_heads=3,
                      intermediate_size=200, vocab_size=101),
    # GPT-2 with 6 heads of 16, vocab 101 (tied), ffn 4*96
    "gpt2-odd": dict(FAMILIES["gpt2"], n_embd=96, n_head=6, vocab_size=101),
    # MQA: one kv head shared by every query head
    "llama-mqa": dict(FAMILIES["llama"], hidden_size=96, num_attention_heads=6, num_key_value_heads=1,
                      intermediate_size=192, vocab_size=99),
}


def test_sizes_that_do_not_divide_three_ranks():
    """A correct plan, never a wrong number: what cannot split by 3 runs replicated or gathered."""
    per_rank = verify([Case(n, HFModel(c)) for n, c in ODD.items()], 3)
    for rank, res in enumerate(per_rank):
        for r in res:
            assert not r.error, f"{r.name} rank {rank}:\n{r.error}"
            assert r.logits_err <= TOL and r.grad_err <= TOL and r.other_shape_err <= TOL, \
                (r.name, r.logits_err, r.grad_err, r.worst_grad, r.other_shape_err)
    llama = next(x for x in per_rank[0] if x.name == "llama-odd")
    assert llama.placements["model.layers.0.self_attn.q_proj.weight"] != "R"   # heads split 2 per rank
