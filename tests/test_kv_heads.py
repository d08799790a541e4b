"""GQA with fewer kv heads than ranks: each kv head lives whole on the N/H_kv ranks whose query
heads read it (``Grid(S(0), R, H_kv)`` for the k/v projections, vLLM's and Megatron's kv-head
replication), so attention stays local and a layer moves Megatron's 2 all-reduces forward.

Plans (one process): the Llama-3-8B shape at TP 16 (8 kv heads), MQA, a dense model whose plan
must not change.  Four gloo ranks: the public Llama (2 kv heads), Mistral with 2 kv heads and
a sliding window, MQA — logits and every gradient equal one device's, the forward
collectives counted; generate and load_checkpoint on the kv-replicated plan.  Head counts that
do not divide (6 heads at N=4) stay exact through gathers.
"""
import collections
import copy
import os
import tempfile

import pytest
import torch
import torch.nn.functional as F
import transformers.models.llama.modeling_llama  # noqa: F401 — imported once here, not in each forked rank
import transformers.models.mistral.modeling_mistral  # noqa: F401

import autotp
from autotp.placement import Grid, R, S
from models import build
from ranks import case, plan_ahead, planned, run_cases

WORLD = 4
TOL = 1e-5


def _plan(world, **config):
    torch.manual_seed(0)
    model = build("llama", **config)
    return autotp.plan(model, (torch.randint(0, 90, (2, 8)),), world_size=world)


def test_llama3_8b_heads_at_tp16_replicate_kv_heads():
    """Llama-3-8B's 32 query heads and 8 kv heads on 16 ranks (head dim 16 here): each kv head on
    2 ranks, 2 all-reduces per layer."""
    with torch.device("meta"):
        plan = _plan(16, hidden_size=512, intermediate_size=1024, num_attention_heads=32,
                     num_key_value_heads=8, vocab_size=256)
    for proj in ("k_proj", "v_proj"):
        assert plan.placements[f"model.layers.0.self_attn.{proj}.weight"] == Grid(S(0), R, 8)
    assert plan.placements["model.layers.0.self_attn.q_proj.weight"] == S(0)
    assert plan.roles()["model.layers.0.self_attn.k_proj.weight"] == "column-parallel by kv head, replicated x2"
    per_layer = plan.counts()["per_layer_forward"]
    assert per_layer[0] == per_layer[1] == collections.Counter(all_reduce=2), per_layer
    note = next(n for n in plan.notes if n.startswith("k/v heads replicated x2"))
    assert "MiB of weights per rank" in note and "us of communication per step" in note


def test_mqa_keeps_one_kv_head_replicated():
    plan = _plan(4, num_key_value_heads=1)
    assert plan.placements["model.layers.0.self_attn.k_proj.weight"] == R
    assert plan.counts()["per_layer_forward"][0] == collections.Counter(all_reduce=2)


def test_divisible_kv_heads_plan_is_unchanged():
    """4 kv heads on 4 ranks: no replication offered, the least-memory plan as before."""
    plan = _plan(4, num_key_value_heads=4)
    assert plan.placements["model.layers.0.self_attn.k_proj.weight"] == S(0)
    assert not any(n.startswith("k/v heads replicated") for n in plan.notes)
    stats = plan.ctx.solver_stats
    assert stats["weight_bytes_budget"] == stats["weight_bytes_min"] == stats["weight_bytes_per_rank"]


def _step(pm, ref, ids):
    """One training step of each: logits and worst gradient error, forward collectives."""
    from torch.distributed.tensor.debug import CommDebugMode
    with CommDebugMode() as comm:
        out = pm(ids).logits
        forward = collections.Counter({str(k).split(".")[-1]: v for k, v in comm.get_comm_counts().items()})
    F.cross_entropy(out.flatten(0, 1), ids.flatten()).backward()
    want = ref(ids).logits
    F.cross_entropy(want.flatten(0, 1), ids.flatten()).backward()
    params = dict(ref.named_parameters())
    grads = max(((p.grad.full_tensor() - params[n].grad).abs().max() / params[n].grad.abs().max()).item()
                for n, p in pm.named_parameters())
    return {"logits": ((out - want).abs().max() / want.abs().max()).item(), "grads": grads,
            "forward": dict(forward), "k": autotp.fmt(pm.plan.placements["model.layers.0.self_attn.k_proj.weight"])}


EQUIVALENCE = {"llama": ("llama", {}), "mistral": ("mistral", {"num_key_value_heads": 2}),
               "mqa": ("llama", {"num_key_value_heads": 1}),
               "heads6": ("llama", {"num_attention_heads": 6, "num_key_value_heads": 2, "hidden_size": 48})}


def _example(name):
    family, config = EQUIVALENCE[name]
    torch.manual_seed(0)
    ref = build(family, **config)
    return ref, torch.randint(0, 90, (2, 8), generator=torch.Generator().manual_seed(1))


def _equivalence(name):
    ref, ids = _example(name)
    return _step(autotp.parallelize(copy.deepcopy(ref), (ids,), **planned(name)), ref, ids)


def _generate_and_load(tmp):
    """The kv-replicated plan generates HF's tokens (padded batch) and loads a checkpoint's blocks."""
    from transformers import AutoModelForCausalLM
    torch.manual_seed(0)
    ref = build("llama")
    ids = torch.randint(1, 90, (2, 8), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    with autotp.init_empty_weights():
        model = AutoModelForCausalLM.from_config(ref.config)
    pm = autotp.parallelize(model, (ids,))
    report = autotp.load_checkpoint(pm, os.path.join(tmp, "ckpt"))
    full = autotp.full_state_dict(pm)
    tokens = pm.generate(ids, attention_mask=mask, max_new_tokens=4, pad_token_id=0)
    want = ref.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
    return {"same_tokens": bool((tokens == want).all()),
            "state": max((full[n] - p).abs().max().item() for n, p in ref.state_dict().items()),
            "read": report.bytes_read, "k": autotp.fmt(pm.plan.placements["model.layers.0.self_attn.k_proj.weight"])}


def _cases(tmp):
    def cases():
        return {**{name: (lambda n=name: _equivalence(n)) for name in EQUIVALENCE},
                "generate_load": lambda: _generate_and_load(tmp)}
    return cases


@pytest.fixture(scope="module")
def results():
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        build("llama").save_pretrained(os.path.join(tmp, "ckpt"))
        for name in EQUIVALENCE:
            ref, ids = _example(name)
            plan_ahead(name, ref, (ids,), world=WORLD)
        yield run_cases(_cases(tmp), WORLD)


@pytest.mark.parametrize("name,kv", [("llama", "S(0)·R@2"), ("mistral", "S(0)·R@2"), ("mqa", "R"), ("heads6", None)])
def test_equal_to_one_device(results, name, kv):
    for r in case(results, name):
        assert r["logits"] <= TOL and r["grads"] <= TOL, r
        if kv is not None:           # kv heads whole on their ranks: 2 all-reduces per layer, gathers only at the edges
            assert r["k"] == kv, r
            assert r["forward"] == {"all_reduce": 4, "all_gather_into_tensor": 2}, r


def test_generate_and_load_checkpoint(results):
    for r in case(results, "generate_load"):
        assert r["k"] == "S(0)·R@2" and r["same_tokens"] and r["state"] == 0.0, r


def test_heads_that_do_not_divide_say_why():
    """Qwen2.5-7B's 28 heads (4 kv heads) on 8 ranks: correct through gathers, and the plan says why."""
    with torch.device("meta"):
        plan = _plan(8, hidden_size=448, intermediate_size=512, num_attention_heads=28, num_key_value_heads=4,
                     vocab_size=256)
    note = next(n for n in plan.notes if n.startswith("attention `"))
    assert "28 query heads do not divide by 8 ranks" in note and "model.layers.0.self_attn" in note, note


def _fake_world_counts(tmp, world, config):
    """One process standing for rank 0 of ``world`` (torch's fake process group: collectives are
    counted, not run): a training step of the parallel model, its collectives counted by
    CommDebugMode, and the plan's own counts."""
    import pickle
    import torch.distributed as dist
    from torch.distributed.tensor.debug import CommDebugMode
    from torch.testing._internal.distributed.fake_pg import FakeStore
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)
    torch.manual_seed(0)
    model = build("llama", **config)
    ids = torch.randint(0, config["vocab_size"], (2, 8))
    pm = autotp.parallelize(model, (ids,), check_plan=False)      # one process: nobody to compare plans with
    with CommDebugMode() as fwd:
        out = pm(ids).logits
    with CommDebugMode() as bwd:
        out.square().mean().backward()
    count = lambda mode: {str(k).split(".")[-1].replace("_into_tensor", ""): v for k, v in mode.get_comm_counts().items()}  # noqa: E731
    plan = pm.plan.counts()
    with open(os.path.join(tmp, "counts.pkl"), "wb") as f:
        pickle.dump({"forward": count(fwd), "backward": count(bwd), "plan_forward": dict(plan["forward"]),
                     "plan_backward": dict(plan["backward"]),
                     "per_layer": {k: dict(v) for k, v in plan["per_layer_forward"].items()},
                     "k": autotp.fmt(pm.plan.placements["model.layers.0.self_attn.k_proj.weight"])}, f)
    dist.destroy_process_group()


def _fake_world(world, config):
    import pickle
    import torch.multiprocessing as mp
    with tempfile.TemporaryDirectory() as tmp:      # a process of its own: the fake group must not be this one's
        mp.start_processes(lambda rank: _fake_world_counts(tmp, world, config), nprocs=1, start_method="fork")
        with open(os.path.join(tmp, "counts.pkl"), "rb") as f:
            return pickle.load(f)


@pytest.mark.parametrize("world,config,kv,per_layer", [
    # Llama-3-8B's 32 query / 8 kv heads at TP 16: kv heads replicated x2, Megatron's 2 all-reduces per layer
    (16, dict(hidden_size=512, intermediate_size=1024, num_attention_heads=32, num_key_value_heads=8, vocab_size=256),
     "S(0)·R@8", {"all_reduce": 2}),
    # Qwen2.5-7B's 28 query / 4 kv heads at TP 8: heads do not divide, attention whole through gathers
    (8, dict(hidden_size=448, intermediate_size=512, num_attention_heads=28, num_key_value_heads=4, vocab_size=256),
     "S(0)", {"all_gather": 4, "all_reduce": 1}),
], ids=["32q-8kv-N16", "28q-4kv-N8"])
def test_collectives_at_eight_and_sixteen_ranks_are_the_plans(world, config, kv, per_layer):
    """At N = 8 and 16 (one process, the fake process group: counts only, the values are gloo's
    business at N <= 4 above), the step runs exactly the collectives the plan lists."""
    r = _fake_world(world, config)
    assert r["k"] == kv, r
    assert r["forward"] == r["plan_forward"] and r["backward"] == r["plan_backward"], r
    assert r["per_layer"][0] == r["per_layer"][1] == per_layer, r
