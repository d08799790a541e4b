"""Mixture-of-experts models: Mixtral and Qwen2-MoE (shared + routed experts), unmodified.

The experts are captured as stacked 3-D weights and ``transformers::grouped_mm_fallback``;
from the grouped-matmul rule the plan puts E/N whole experts on each rank (expert
parallelism), with no per-model code.  Tokens replicated (plain tensor parallelism): each rank
runs its experts' rows and one all-reduce combines, at any sequence length.  Tokens split by sequence
(``sequence_parallel=True``): each rank routes its own tokens and the rows travel to their
experts' ranks and back by all-to-all (dispatch + combine, split sizes from the routing).
Where E does not divide by N: tensor parallelism inside the experts, or both on the 2-D view
of the mesh (EP x TP, ``Grid``), whichever the sizes allow.
"""
import collections
import dataclasses

import pytest
import torch

import autotp
from autotp.verify import Case, HFModel, plan_case, verify
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


@dataclasses.dataclass
class SkewedMixtral:
    """Mixtral whose router scores every expert 0: top-2 picks the same two experts for every
    token, so the others get no tokens (zero-size blocks in the grouped matmul)."""
    config: dict = dataclasses.field(default_factory=lambda: MOE_FAMILIES["mixtral"])

    def __call__(self):
        model = HFModel(self.config)()
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


# 6 experts, expert ffn 24, fp32: at N=4 whole experts do not divide (6 % 4) and a quarter of
# each expert (6 columns, 24 bytes) breaks the grouped matmul's 16-byte stride rule, so neither
# pure form shards the experts; 3 experts per pair of ranks, each split in two, does.
GRID = {"mixtral": dict(MOE_FAMILIES["mixtral"], num_local_experts=6, intermediate_size=24,
                        output_router_logits=True, router_aux_loss_coef=0.02),
        "qwen2_moe": dict(MOE_FAMILIES["qwen2_moe"], num_experts=6, moe_intermediate_size=24)}


def test_expert_and_tensor_parallel_grid_is_exact():
    """EP x TP on the 2-D view (2 groups x 2 ranks) of 4 ranks: the plan picks it because it
    is the only split that holds 1/N of the expert weights; logits, every gradient (the expert
    weights are DTensors on the ('ep', 'etp') mesh) and the aux loss match one device.  Tokens
    replicated: the MoE layer combines with one all-reduce, as the dense layers do.  Tokens split
    by sequence: each rank's rows go to their group of experts, a copy to each rank of the group
    (one all-to-all), and come back as partial sums that add up (one all-to-all); skewed routing
    leaves one group with no rows at all.  (Qwen2-MoE and 19 other families on the grid, plain
    and split by sequence: ``benchmarks/model_zoo.py --world 4 --set num_experts=6,...``.)"""
    builds = {**{name: HFModel(cfg) for name, cfg in GRID.items()}, "skew": SkewedMixtral(GRID["mixtral"])}
    # (CI time: each form once per family; skewed routing where a group can get no rows at all)
    cases = [Case("mixtral", builds["mixtral"], other_shapes=((3, 5),))]
    cases += [Case("skew-a2a", builds["skew"], kwargs=SP, other_shapes=((3, 4),))]   # (Qwen2-MoE: model_zoo)
    plans = [plan_case(c, 4) for c in cases]                 # the ranks' plans, read below too
    assert all(plans), [c.name for c, p in zip(cases, plans) if p is None]      # autotp.plan(...) says why
    for rank in verify(cases, 4, plans=plans):
        for r in rank:
            assert not r.error, f"{r.name}:\n{r.error}"
            assert r.logits_err <= TOL and r.grad_err <= TOL and r.other_shape_err <= TOL, (r.name, r.grad_err)
            assert r.aux_err is None or r.aux_err <= TOL
            experts = {n: p for n, p in r.placements.items() if ".experts." in n}
            assert experts and all(p.startswith("S(0)·") and p.endswith("@2") for p in experts.values()), experts
            if r.name.endswith("-a2a"):
                # per MoE layer one dispatch and one combine (+ the split sizes' all-gather); the
                # dense layers' all-reduces are reduce-scatters and all-gathers under SP
                plan = plans[1]
                moe = [c for c in plan.collectives() if c.kind in ("moe_dispatch", "moe_combine")]
                assert sorted(c.kind for c in moe) == ["moe_combine"] * 2 + ["moe_dispatch"] * 2
                assert all(c.volume == 2 for c in moe)          # a copy for each rank of the group
                planned = sum(1 for c in plan.collectives() if c.forward == "all_to_all")
                assert r.forward_counts["all_to_all_single"] == planned == r.backward_counts["all_to_all_single"]
            else:
                assert r.forward_counts["all_reduce"] == 2 * 2, r.forward_counts


@pytest.mark.parametrize("world,experts,ffn,expect", [
    (4, 8, 96, "S(0)"),             # E divides N: whole experts (expert parallelism)
    (4, 6, 96, "S(2)"),             # E does not, a quarter of the ffn is aligned: TP inside experts
    (4, 6, 24, "S(0)·S(2)@2"),      # neither: the 2x2 grid
    (8, 12, 48, "S(0)·S(2)@4"),     # 12 % 8: 4 groups of 2 (ffn/8 = 6 columns is unaligned)
])
def test_solver_chooses_between_expert_tensor_and_grid(world, experts, ffn, expect):
    """Planning only (no process group): which split of the experts the cost model picks."""
    torch.manual_seed(0)
    cfg = dict(MOE_FAMILIES["mixtral"], num_local_experts=experts, intermediate_size=ffn, num_attention_heads=8,
               num_key_value_heads=8)
    plan = autotp.plan(HFModel(cfg)(), (torch.randint(0, 128, (2, 8)),), world_size=world)
    assert autotp.fmt(plan.placements["model.layers.0.mlp.experts.down_proj"]) == expect
    experts = collections.Counter(c.forward for c in plan.collectives() if c.module.endswith(".experts") and c.forward)
    assert experts == collections.Counter(all_reduce=2), experts      # one combine per MoE layer, every form
    if "@" in expect:
        assert plan.roles()["model.layers.0.mlp.experts.down_proj"].startswith("expert-parallel x row-parallel")


def test_plan_fingerprint_is_the_same_in_every_process():
    """Mixtral with the router's aux loss captures a Python function (``sym_float``) as a node target; its
    repr carries the process's address, and parallelize's same-plan check failed on every
    multi-rank run.  The fingerprint names functions by module and qualified name."""
    torch.manual_seed(0)
    plan = autotp.plan(HFModel(AUX)().eval(), (torch.randint(0, 128, (2, 8)),), world_size=2)
    text = plan.fingerprint_text()
    assert "sym_float" in text and " at 0x" not in text


def _grid_worker(rank, world, tmp):
    import datetime
    import os
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(os.path.join(tmp, "store"), world), rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=60))
    out = {}
    torch.manual_seed(0)
    ref = HFModel(GRID["mixtral"])()
    ids = torch.randint(0, 128, (2, 6))
    # start from other weights, then read this rank's slices of the expert grid from safetensors
    torch.manual_seed(123)
    pmodel = autotp.parallelize(HFModel(GRID["mixtral"])(), (ids,))
    autotp.load_checkpoint(pmodel, os.path.join(tmp, "ckpt"))
    out["experts"] = {n: (autotp.fmt(p.placements[0]), tuple(p.device_mesh.mesh_dim_names))
                      for n, p in pmodel.named_parameters() if ".experts." in n}
    out["load"] = pmodel.expert_load(ids)
    full = autotp.full_state_dict(pmodel)
    out["state_err"] = max((full[k] - v).abs().max().item() for k, v in ref.state_dict().items())
    # training step pieces: backward, then clipping across the 1-D and the 2-D mesh
    pmodel(ids).logits.pow(2).mean().backward()
    ref(ids).logits.pow(2).mean().backward()
    want = torch.nn.utils.clip_grad_norm_(ref.parameters(), 1e-3)
    got = autotp.clip_grad_norm_(pmodel.parameters(), 1e-3)
    out["norm"] = (float(got), float(want))
    grads = {n: p.grad.full_tensor() for n, p in pmodel.named_parameters()}
    out["grad_err"] = max(((grads[n] - p.grad).abs().max() / p.grad.abs().max()).item()
                          for n, p in ref.named_parameters())
    # greedy generation plans a decode step pinned to the same grid
    ref.eval(), pmodel.eval()
    out["generate"] = (pmodel.generate(ids, max_new_tokens=4).tolist(),
                       ref.generate(ids, max_new_tokens=4, do_sample=False).tolist())
    torch.save(out, os.path.join(tmp, f"{rank}.pt"))
    dist.destroy_process_group()


def test_grid_loads_saves_clips_and_generates():
    """The EP x TP expert weights are DTensors on the ('ep', 'etp') mesh: a safetensors load
    reads each rank's slice of its group's experts, the full state dict gives the model back,
    ``autotp.clip_grad_norm_`` clips over both meshes as torch's does on one device (torch's
    own refuses norms from two meshes), and greedy generation gives the same tokens."""
    import os
    import tempfile
    import torch.multiprocessing as mp
    with tempfile.TemporaryDirectory() as tmp:
        from safetensors.torch import save_model
        torch.manual_seed(0)
        os.makedirs(os.path.join(tmp, "ckpt"))
        # the model's own names (save_pretrained writes Mixtral's per-expert w1/w2/w3 layout)
        save_model(HFModel(GRID["mixtral"])(), os.path.join(tmp, "ckpt", "model.safetensors"))
        mp.start_processes(_grid_worker, args=(4, tmp), nprocs=4, start_method="fork")
        for r in range(4):
            res = torch.load(os.path.join(tmp, f"{r}.pt"))
            assert res["experts"] and all(p == "S(0)" and mesh == ("ep", "etp")
                                          for p, mesh in res["experts"].values()), res["experts"]
            assert res["state_err"] == 0.0
            for layer in res["load"]:               # 2 groups of 3 experts, each group's rows on its 2 ranks
                t, g = layer["tokens_per_expert"], layer["tokens_per_rank"]
                assert layer["expert_groups"] == 2 and sum(t) == 2 * 6 * 2
                assert g == [sum(t[:3]), sum(t[:3]), sum(t[3:]), sum(t[3:])], layer
            assert res["norm"][0] == pytest.approx(res["norm"][1], rel=1e-5)
            assert res["grad_err"] <= TOL
            assert res["generate"][0] == res["generate"][1]


def test_no_grid_on_the_tp_dim_of_a_larger_mesh():
    """With FSDP2 on "dp" the grid's parameters would live on a 2-D view of a sub-mesh (not
    verified): ``parallelize`` offers the grid only on a mesh of its own.  One process, the fake
    process group for 8 ranks."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.testing._internal.distributed.fake_pg import FakeStore
    from autotp import _whole_mesh
    from autotp.plan import make_plan
    assert not dist.is_initialized()
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=8)
    try:
        assert _whole_mesh(init_device_mesh("cpu", (8,), mesh_dim_names=("tp",)))
        assert not _whole_mesh(init_device_mesh("cpu", (2, 4), mesh_dim_names=("dp", "tp"))["tp"])
    finally:
        dist.destroy_process_group()
    torch.manual_seed(0)
    plan = make_plan(HFModel(GRID["mixtral"])(), (torch.randint(0, 128, (2, 8)),), world_size=4, dp_sharded=True)
    assert not any("@" in autotp.fmt(p) for p in plan.placements.values())
