"""``memory_budget=``: the fastest plan within a weight-memory budget per rank, where time counts
the compute a replicated matmul repeats as well as the collectives it saves (issue 20, item 3).
Plans on the meta device, and one 2-rank equivalence run of a model whose 7 heads do not divide."""
import pytest
import torch

import autotp
from autotp.__main__ import load_config, meta_model
from autotp.verify import Case, HFModel, verify

from models import LLAMA

LAYER_WEIGHTS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
HEADS7 = dict(LLAMA, num_attention_heads=7, num_key_value_heads=7, hidden_size=112, intermediate_size=128)


def _per_layer(plan, layer=1):
    return dict(plan.counts()["per_layer_forward"][layer])


def test_a_large_budget_keeps_megatrons_layers_at_70b_scale():
    """Llama-3-70B's shape (4 of its layers) at TP 8: with 60 GB of weights allowed per rank the
    solver replicates only what costs no compute (the embedding: its all-gather goes), and keeps
    every layer column/row-parallel with 2 all-reduces — splitting the matmuls is worth more than
    the collectives it costs, at H100 peak and NVLink."""
    cfg, _ = load_config("examples/configs/llama-70b.json", 4)
    model = meta_model(cfg)
    ids = torch.zeros(2, 8, dtype=torch.long, device="meta")
    least = autotp.plan(model, (ids,), world_size=8)
    rich = autotp.plan(model, (ids,), world_size=8, memory_budget="60GB")
    for plan in (least, rich):
        assert _per_layer(plan) == {"all_reduce": 2}
    for name, p in least.placements.items():
        if any(w in name for w in LAYER_WEIGHTS):
            assert rich.placements[name] == p, name
    assert autotp.fmt(rich.placements["model.embed_tokens.weight"]) == "R"
    assert rich.counts()["forward"]["all_gather"] == least.counts()["forward"]["all_gather"] - 1
    stats = rich.ctx.solver_stats
    assert stats["weight_bytes_min"] < stats["weight_bytes_per_rank"] <= 60e9
    note = next(n for n in rich.notes if n.startswith("memory_budget"))
    assert "57,220.5 MiB of weights per rank" in note and "saves" in note, note


def test_a_small_model_is_replicated_when_the_budget_allows():
    """7 heads on 2 ranks, hidden 112: at the planning sizes every collective costs more than the
    compute it saves, so with room for it the plan replicates everything (no collective at all);
    by default the attention runs whole through gathers, and the plan says why."""
    model = HFModel(HEADS7)()
    ids = torch.randint(0, 100, (2, 8))
    least = autotp.plan(model, (ids,), world_size=2)
    rich = autotp.plan(model, (ids,), world_size=2, memory_budget=2**30)
    assert _per_layer(least) == {"all_gather": 4, "all_reduce": 1}
    assert sum(rich.counts()["forward"].values()) == 0
    assert any("7 query heads do not divide by 2 ranks" in n for n in least.notes)
    assert any(n.startswith("memory_budget 1,024.0 MiB") and "saves" in n for n in rich.notes), rich.notes


def test_a_budget_below_the_least_weight_memory_is_an_error():
    model = HFModel(HEADS7)()
    ids = torch.randint(0, 100, (2, 8))
    with pytest.raises(autotp.AutoTPError, match="below the least weight memory per rank"):
        autotp.plan(model, (ids,), world_size=2, memory_budget="1KiB")
    with pytest.raises(autotp.AutoTPError, match="give bytes as a number or a string"):
        autotp.plan(model, (ids,), world_size=2, memory_budget="lots")


def test_seven_heads_on_two_ranks_are_exact_with_and_without_a_budget():
    cases = [Case("heads7", HFModel(HEADS7)), Case("heads7_budget", HFModel(HEADS7), kwargs={"memory_budget": "1GiB"})]
    for rank, results in enumerate(verify(cases, 2, timeout_s=300)):
        for r in results:
            assert not r.error, r.error
            assert r.logits_err <= 1e-5 and r.grad_err <= 1e-5 and r.other_shape_err <= 1e-5, (rank, r)


def test_a_budget_gives_dit_megatrons_blocks():
    """diffusers' DiT at DiT-XL's width (16 heads x 72, 2 of its 28 blocks) at N = 4: by default
    each block also all-reduces its adaLN-Zero modulation (its weights split for memory) and
    gathers in its conditioning MLP; with a budget those small per-sample matmuls are replicated
    (compute they repeat: a row per sample, not per token) and each block has Megatron's 2
    all-reduces, attention and MLP still split."""
    diffusers = pytest.importorskip("diffusers")
    with torch.device("meta"):
        model = diffusers.DiTTransformer2DModel(num_attention_heads=16, attention_head_dim=72, in_channels=4,
                                                out_channels=8, num_layers=2, sample_size=32, patch_size=2,
                                                num_embeds_ada_norm=1000, norm_num_groups=32).eval()
    x = torch.randn(8, 4, 32, 32, device="meta")
    kwargs = {"timestep": torch.tensor([3] * 8, device="meta"), "class_labels": torch.tensor([1] * 8, device="meta"),
              "return_dict": False}
    least = autotp.plan(model, (x,), kwargs, world_size=4)
    rich = autotp.plan(model, (x,), kwargs, world_size=4, memory_budget="4GiB")
    assert least.counts()["per_layer_forward"][1]["all_reduce"] == 3
    for layer in (0, 1):
        assert dict(rich.counts()["per_layer_forward"][layer]) == {"all_reduce": 2}
    assert dict(rich.counts()["forward"]) == {"all_reduce": 4}
    placed = {n.removeprefix("transformer_blocks.0."): autotp.fmt(p) for n, p in rich.placements.items()
              if n.startswith("transformer_blocks.0.") and n.endswith("weight")}
    assert placed["norm1.linear.weight"] == "R"
    assert [placed[f"attn1.to_{w}.weight"] for w in "qkv"] == ["S(0)"] * 3 and placed["attn1.to_out.0.weight"] == "S(1)"
    assert placed["ff.net.0.proj.weight"] == "S(0)" and placed["ff.net.2.weight"] == "S(1)"
