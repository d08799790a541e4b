"""Models behind a wrapper: PEFT's LoRA (``PeftModel``) and a user's module holding a Hugging
Face model.  ``parallelize`` sees through them (the KV cache is turned off through every
submodule's config while capturing), and the result equals one device: outputs, the adapters'
gradients, and no gradient for the frozen base weights.  Two gloo processes."""
import copy

import pytest
import torch
import torch.nn.functional as F

from models import build
from ranks import case, run_cases

peft = pytest.importorskip("peft")
WORLD = 2


class Holder(torch.nn.Module):
    """A user's wrapper: returns the Hugging Face output as it is (a cache object included)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids):
        return self.model(input_ids)


def _lora(autotp, ids):
    from peft import LoraConfig, get_peft_model
    torch.manual_seed(0)
    model = get_peft_model(build("llama"), LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"],
                                                      lora_dropout=0.0, init_lora_weights=False))
    reference = copy.deepcopy(model)
    pmodel = autotp.parallelize(model, (ids,))
    trainable = [n for n, p in pmodel.named_parameters() if p.requires_grad]
    opt = torch.optim.AdamW([p for p in pmodel.parameters() if p.requires_grad], lr=1e-3)
    loss = F.cross_entropy(pmodel(ids).logits.flatten(0, 1), ids.flatten())
    loss.backward()
    ref_loss = F.cross_entropy(reference(ids).logits.flatten(0, 1), ids.flatten())
    ref_loss.backward()
    ref = dict(reference.named_parameters())
    grads = max(((p.grad.full_tensor() - ref[n].grad).abs().max() / ref[n].grad.abs().max()).item()
                for n, p in pmodel.named_parameters() if p.requires_grad)
    opt.step()
    return {"loss": abs(loss.item() - ref_loss.item()) / abs(ref_loss.item()), "grads": grads,
            "trainable": trainable, "optimized": sum(len(g["params"]) for g in opt.param_groups),
            "frozen_grads": [n for n, p in pmodel.named_parameters() if not p.requires_grad and p.grad is not None]}


def _holder(autotp, ids):
    torch.manual_seed(0)
    model = Holder(build("llama"))
    reference = copy.deepcopy(model)
    pmodel = autotp.parallelize(model, (ids,))
    out, want = pmodel(ids).logits, reference(ids).logits
    return {"err": ((out - want).abs().max() / want.abs().max()).item(),
            "cache_on_again": model.model.config.use_cache}


def _cases():
    import autotp
    ids = torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(1))
    return {"lora": lambda: _lora(autotp, ids), "holder": lambda: _holder(autotp, ids)}


@pytest.fixture(scope="module")
def results():
    return run_cases(_cases, WORLD, timeout_s=120)


def test_lora_through_peft_equals_one_device(results):
    for rank, r in enumerate(case(results, "lora")):
        print(f"rank {rank}: loss {r['loss']:.1e}, adapter gradients {r['grads']:.1e}")
        assert r["loss"] <= 1e-5 and r["grads"] <= 1e-5, r
        assert r["trainable"] and all("lora_" in n for n in r["trainable"]), r["trainable"]
        assert r["optimized"] == len(r["trainable"]) == 2 * 3 * 2     # A and B, 3 targets, 2 layers
        assert r["frozen_grads"] == [], r["frozen_grads"]


def test_a_users_wrapper_is_seen_through(results):
    for r in case(results, "holder"):
        assert r["err"] <= 1e-5, r
        assert r["cache_on_again"] is True          # the model's own setting is back after capture


def test_lora_adapters_keep_the_base_layers_split_at_real_proportions():
    """At a real model's proportions (hidden 1024, rank 8; meta device, plan only) an adapter is a
    small weight next to its base: under a column-parallel base, A replicated and B split like
    the base (both matmuls local, no collective); under a row-parallel base, A split like the
    base (a partial sum) and B replicated, with one all-reduce of the rank-8 activation — the
    layout of Megatron/NeMo's parallel LoRA adapters.  Each layer then runs Megatron's 2
    all-reduces plus that one small one."""
    import autotp
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, LlamaConfig
    cfg = LlamaConfig(hidden_size=1024, intermediate_size=2816, num_attention_heads=16, num_key_value_heads=8,
                      num_hidden_layers=2, vocab_size=4096)
    with torch.device("meta"):
        model = get_peft_model(AutoModelForCausalLM.from_config(cfg),
                               LoraConfig(r=8, target_modules=["q_proj", "v_proj", "down_proj"], lora_dropout=0.0))
    plan = autotp.plan(model, (torch.zeros(2, 8, dtype=torch.long, device="meta"),), world_size=4)
    layer = "base_model.model.model.layers.1"
    got = {n[len(layer) + 1:]: autotp.fmt(p) for n, p in plan.placements.items() if n.startswith(layer + ".")
           and ("lora_" in n or "base_layer" in n)}
    for proj in ("self_attn.q_proj", "self_attn.v_proj"):        # column-parallel base
        assert got[f"{proj}.base_layer.weight"] == got[f"{proj}.lora_B.default.weight"] == "S(0)", got
        assert got[f"{proj}.lora_A.default.weight"] == "R", got
    assert got["mlp.down_proj.base_layer.weight"] == got["mlp.down_proj.lora_A.default.weight"] == "S(1)", got
    assert got["mlp.down_proj.lora_B.default.weight"] == "R", got
    per_layer = plan.counts()["per_layer_forward"]
    assert per_layer[0] == per_layer[1] == {"all_reduce": 3}, per_layer
    small = [c for c in plan.collectives() if c.kind == "all_reduce" and c.shape[-1] == 8]
    assert len(small) == 2, [c.shape for c in plan.collectives()]      # one rank-8 all-reduce per layer
