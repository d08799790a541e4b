"""Mixture-of-experts models: Mixtral and Qwen2-MoE (shared + routed experts), unmodified.

The experts are captured as stacked 3-D weights and ``transformers::grouped_mm_fallback``;
from the grouped-matmul rule the plan puts E/N whole experts on each rank (expert
parallelism; the alternative, tensor parallelism inside each expert, costs the same bytes),
with no per-model code.
"""
import collections

import pytest
import torch

import autotp
from autotp.verify import Case, HFModel, verify
from models import MOE_FAMILIES, build_any

TOL = 1e-5


@pytest.fixture(scope="module", params=[2, 4], ids=lambda w: f"world{w}")
def results(request):
    cases = [Case(n, HFModel(c)) for n, c in MOE_FAMILIES.items()]
    cases.append(Case("mixtral-aux", HFModel(dict(MOE_FAMILIES["mixtral"], output_router_logits=True,
                                                  router_aux_loss_coef=0.02))))
    cases.append(Case("skew", SkewedMixtral()))
    return request.param, verify(cases, request.param)


@pytest.mark.parametrize("family", list(MOE_FAMILIES) + ["mixtral-aux", "skew"])
def test_moe_matches_one_device(results, family):
    world, per_rank = results
    for rank, res in enumerate(per_rank):
        r = next(x for x in res if x.name == family)
        assert not r.error, f"rank {rank}:\n{r.error}"
        assert r.logits_err <= TOL and r.grad_err <= TOL, (family, world, r.logits_err, r.grad_err, r.worst_grad)
        assert r.other_shape_err <= TOL
        experts = {n: p for n, p in r.placements.items() if ".experts." in n}   # stacked expert weights
        assert experts and all(p != "R" for p in experts.values()), experts


def test_mixtral_expert_parallel_counts_per_layer():
    torch.manual_seed(0)
    plan = autotp.plan(build_any("mixtral"), (torch.randint(0, 128, (2, 8)),), world_size=2)
    per_layer = plan.counts()["per_layer_forward"]
    # attention output + the experts' combine: one all-reduce each, per layer
    assert per_layer[0] == collections.Counter(all_reduce=2) == per_layer[1]
    # expert parallelism: E/N whole experts per rank (the stacked weights split on E)
    assert autotp.fmt(plan.placements["model.layers.0.mlp.experts.gate_up_proj"]) == "S(0)"
    assert autotp.fmt(plan.placements["model.layers.0.mlp.experts.down_proj"]) == "S(0)"
    assert autotp.fmt(plan.placements["model.layers.0.mlp.gate.weight"]) == "R"           # the small router


def test_load_balance_is_visible():
    """Tokens per expert and per rank for one batch (one process: the world of one)."""
    import torch.distributed as dist
    if not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        ids = torch.randint(0, 128, (2, 8))
        pmodel = autotp.parallelize(SkewedMixtral()(), (ids,))
        load = pmodel.expert_load(ids)
        assert len(load) == 2                                  # two MoE layers
        for layer in load:
            # 16 tokens x top-2, all to the same two experts; the other two get none
            assert sorted(layer["tokens_per_expert"]) == [0, 0, 16, 16], layer
            assert layer["tokens_per_rank"] == [32]
    finally:
        dist.destroy_process_group()


class SkewedMixtral:
    """Mixtral whose router scores every expert 0: top-2 picks the same two experts for every
    token, so the other two get no tokens (zero-size blocks in the grouped matmul)."""
    def __call__(self):
        model = HFModel(MOE_FAMILIES["mixtral"])()
        with torch.no_grad():
            for layer in model.model.layers:
                layer.mlp.gate.weight.zero_()
        return model
