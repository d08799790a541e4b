"""Mixture-of-experts models: Mixtral and Qwen2-MoE (shared + routed experts), unmodified.

The experts are captured as stacked 3-D weights and ``transformers::grouped_mm_fallback``;
from the grouped-matmul rule the plan puts E/N whole experts on each rank (expert
parallelism), with no per-model code.  Tokens replicated (plain tensor parallelism): each rank
runs its experts' rows and one all-reduce combines, at any sequence length.  Tokens split by sequence
(``sequence_parallel=True``): each rank routes its own tokens and the rows travel to their
experts' ranks and back by all-to-all (dispatch + combine, split sizes from the routing).
"""
import collections
import dataclasses

import pytest
import torch

import autotp
from autotp.verify import Case, HFModel, verify
from models import MOE_FAMILIES, build_any

TOL = 1e-5


SP = {"sequence_parallel": True}
AUX = dict(MOE_FAMILIES["mixtral"], output_router_logits=True, router_aux_loss_coef=0.02)
FAMILIES = list(MOE_FAMILIES) + ["mixtral-aux", "skew"]


def builders() -> dict:
    """Each checked model: name -> a picklable factory (the same one plans and runs)."""
    out = {n: HFModel(c) for n, c in MOE_FAMILIES.items()}
    out["mixtral-aux"] = HFModel(AUX)
    out["skew"] = SkewedMixtral()
    return out


@pytest.fixture(scope="module", params=[2, 4], ids=lambda w: f"world{w}")
def results(request):
    cases = [Case(n, b) for n, b in builders().items()]
    # tokens split by sequence: dispatch and combine by all-to-all
    cases += [Case(f"{n}-a2a", b, kwargs=SP, other_shapes=((3, 4),)) for n, b in builders().items()]
    return request.param, verify(cases, request.param)


@pytest.mark.parametrize("family", FAMILIES + [f"{f}-a2a" for f in FAMILIES])
def test_moe_matches_one_device(results, family):
    world, per_rank = results
    for rank, res in enumerate(per_rank):
        r = next(x for x in res if x.name == family)
        assert not r.error, f"rank {rank}:\n{r.error}"
        assert r.logits_err <= TOL and r.grad_err <= TOL, (family, world, r.logits_err, r.grad_err, r.worst_grad)
        assert r.other_shape_err <= TOL
        assert (r.aux_err is not None) == ("aux" in family)
        assert r.aux_err is None or r.aux_err <= TOL, (family, world, r.aux_err)   # load-balancing loss
        experts = {n: p for n, p in r.placements.items() if ".experts." in n}   # stacked expert weights
        assert experts and all(p != "R" for p in experts.values()), experts


@pytest.mark.parametrize("family", FAMILIES)
def test_all_to_all_dispatch_and_combine_counts(results, family):
    """Tokens split by sequence: per MoE layer forward exactly one dispatch and one combine
    all-to-all (and a small all-gather of expert counts, the split-size exchange); measured
    collectives equal the plan's; no all-to-all in the backward beyond their transposes."""
    world, per_rank = results
    r = next(x for x in per_rank[0] if x.name == f"{family}-a2a")
    assert not r.error, r.error
    torch.manual_seed(0)
    model = builders()[family]()
    plan = autotp.plan(model, (torch.randint(0, 128, (2, 8)),), world_size=world, **SP)
    moe = collections.Counter()
    planned = collections.Counter()
    for c in plan.collectives():
        if c.kind in ("moe_dispatch", "moe_combine"):
            moe[c.module, c.kind] += 1
        if c.forward:
            planned[c.forward] += 1
    layers = model.config.num_hidden_layers
    assert sorted(moe.values()) == [1] * 2 * layers, moe              # one each, in every MoE layer
    assert {m for m, _ in moe} == {f"model.layers.{i}.mlp.experts" for i in range(layers)}
    assert r.forward_counts["all_to_all_single"] == planned["all_to_all"]
    assert r.forward_counts["all_gather_into_tensor"] == planned["all_gather"] + layers   # + split sizes
    assert r.backward_counts["all_to_all_single"] == r.forward_counts["all_to_all_single"]
    assert "all_reduce" not in r.forward_counts or "aux" in family    # (the aux loss sums over tokens)


def test_all_to_all_moves_fewer_bytes_than_gathering_tokens():
    """The report's numbers: a dispatch moves tokens/N x top_k x d x (N-1)/N bytes per rank, the
    Megatron-SP alternative gathers and reduce-scatters all tokens: at N=4 with top-2, half."""
    from autotp.report import report_data
    torch.manual_seed(0)
    model = build_any("mixtral")
    plan = autotp.plan(model, (torch.randint(0, 128, (2, 8)),), world_size=4, **SP)
    b, s, d, k, n = 4, 2048, model.config.hidden_size, model.config.num_experts_per_tok, 4
    data = report_data(plan, batch=b, seq=s, dtype=torch.float32)
    rows = [r for r in data["collectives"] if r["comm"] in ("moe_dispatch", "moe_combine")]
    assert len(rows) == 2 * model.config.num_hidden_layers
    for r in rows:
        assert r["bytes_expr"] == f"{4 * k * d}*batch*seq"                       # symbolic in batch, seq
        assert r["forward_factor"] * r["bytes"] == pytest.approx(b * s / n * k * d * 4 * (n - 1) / n)
    block = data["experts"]["blocks"][0]
    assert block["dispatched"] and block["top_k"] == k
    assert block["chosen"]["wire_bytes"] == pytest.approx(block["all_to_all"]["wire_bytes"])
    assert block["all_to_all"]["wire_bytes"] == pytest.approx(0.5 * block["gathered"]["wire_bytes"])


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


@dataclasses.dataclass
class ExpertsImplementation:
    """A MoE model built with another transformers experts implementation (``batched_mm``:
    each routed row multiplied by its expert's weight, gathered per row, in one bmm)."""
    config: dict
    implementation: str

    def __call__(self):
        from transformers import AutoConfig, AutoModelForCausalLM
        return AutoModelForCausalLM.from_config(AutoConfig.for_model(**self.config),
                                                experts_implementation=self.implementation)


def test_other_experts_implementation_is_exact():
    """``batched_mm`` captures as an index of the stacked weights by expert id and a bmm: no
    grouped matmul, so no expert parallelism — tensor parallelism inside the experts, exact with
    tokens replicated and split by sequence (the slots' rows are token-local there)."""
    impl = ExpertsImplementation(MOE_FAMILIES["mixtral"], "batched_mm")
    cases = [Case("tp", impl, other_shapes=((3, 4),)), Case("sp", impl, kwargs=SP, other_shapes=((3, 4),))]
    for rank in verify(cases, 2):
        for r in rank:
            assert not r.error, f"{r.name}:\n{r.error}"
            assert r.logits_err <= TOL and r.grad_err <= TOL and r.other_shape_err <= TOL, (r.name, r.grad_err)


WIDE = dict(MOE_FAMILIES["mixtral"], hidden_size=512, intermediate_size=1024, num_attention_heads=8,
            num_key_value_heads=4, num_local_experts=8, num_experts_per_tok=2, vocab_size=256)


def test_plain_tensor_parallelism_runs_any_sequence_length():
    """Plain tensor parallelism (no ``sequence_parallel``), Mixtral-shaped with d 512 at N=4,
    where keeping each rank's own tokens and dispatching them by all-to-all would move fewer
    bytes at the planning shape: the plan still splits no batch- or sequence-sized dim, so any
    length runs (5 on 4 ranks here) and is exact.  The all-to-all is the sequence-parallel plan's
    (``test_moe_matches_one_device`` with ``-a2a``)."""
    torch.manual_seed(0)
    plan = autotp.plan(HFModel(WIDE)(), (torch.randint(0, 256, (2, 8)),), world_size=4)
    kinds = {c.kind for c in plan.collectives()}
    assert not kinds & {"moe_dispatch", "moe_combine", "scatter_tokens"}, kinds
    seq = [s for s, name in plan.captured.symbols.items() if str(name) == "seq"]
    for n in plan.gm.graph.nodes:
        p, v = n.meta.get("autotp", {}).get("placement"), n.meta.get("val")
        if isinstance(v, torch.Tensor) and p is not None and hasattr(p, "dim") and isinstance(p.dim, int):
            size = v.shape[p.dim % max(v.ndim, 1)] if v.ndim else 1
            assert not (isinstance(size, torch.SymInt) and size.node.expr.free_symbols & set(seq)), (n.name, p)
    for rank in verify([Case("wide", HFModel(WIDE), other_shapes=((3, 5),))], 4):
        r = rank[0]
        assert not r.error, r.error
        assert r.logits_err <= TOL and r.grad_err <= TOL and r.other_shape_err <= TOL, (r.logits_err, r.grad_err)
