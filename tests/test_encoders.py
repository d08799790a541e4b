"""Transformers beyond Hugging Face causal LMs get Megatron's plan, exactly (issue 19).

Each model is the library's own, built from a small config (``benchmarks/model_sweep.py``) with
random weights, fp32, at N = 2 and 4 (gloo processes), compared with one device:

- Hugging Face ``BertForMaskedLM`` with a padding mask, ``T5ForConditionalGeneration``;
- torchtitan's Llama 3 (fused ``wqkv`` laid out per kv group, complex RoPE, 4 heads, 2 kv heads:
  at N = 4 the kv heads are replicated over pairs of ranks);
- litgpt's ``GPT`` with ``n_query_groups < n_head``;
- a diffusers ``DiTTransformer2DModel``.

For each: output and every parameter gradient equal the unsharded model's; the forward
collectives inside the blocks are Megatron's (one all-reduce per attention block and per MLP
block, no all-gather; the edges — embedding, head — may gather); this rank runs 1/N of the
forward matmul and attention FLOPs, except the conv patch embedding, which the plan names.

litgpt's ``[q | k | v]`` of unequal parts is split per block (``S(0)[64|32|32]``, the ``Blocks``
placement); at N = 4, more ranks than its 2 kv heads, the k and v blocks are split over 2 groups of
ranks and whole inside each (``S(0)[64|32·R@2|32·R@2]``: kv heads replicated inside the fused
weight), so its blocks run Megatron's all-reduces too.  ``benchmarks/model_sweep.py`` lists
the same models' plans without processes.
"""
import copy
import functools
import os
import sys

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

import autotp
from ranks import case, plan_ahead, planned, run_cases

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import model_sweep as zoo  # noqa: E402

TOL = 1e-5
# layers per model: two where a layer-to-layer boundary is new to the tests, one for the Hugging
# Face encoders (their layers are the families' layers; the time goes to the other models)
LAYERS = {"bert": 1, "t5": 1, "titan_llama3": 2, "litgpt": 2, "dit": 2}
LIBRARY = {"bert": "transformers", "t5": "transformers", "titan_llama3": "torchtitan", "litgpt": "litgpt",
           "dit": "diffusers"}
# forward collectives of one block (per layer index: T5's encoder and decoder block i share index i)
BLOCK = {
    "bert": {"all_reduce": 2},                    # attention, MLP
    "t5": {"all_reduce": 5},                      # encoder: attention, MLP; decoder: self-, cross-attention, MLP
    "titan_llama3": {"all_reduce": 2},
    "litgpt": {"all_reduce": 2},
    "dit": {"all_reduce": 3},                     # attention, MLP, and the adaLN-Zero modulation (see below)
}
KV_HEADS = {"titan_llama3": 2, "litgpt": 2}


def _available(name: str) -> bool:
    try:
        __import__(LIBRARY[name])
        return True
    except ImportError:
        return False


MODELS = [m for m in LIBRARY if _available(m)]


def _attention_flops(q, k, v, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(q, k, v)


def _zero_flops(*args, out_shape=None, **kwargs) -> int:
    return 0


def _forward_flops(model, args, kwargs, conv: bool) -> int:
    """Matmul and attention FLOPs of one forward (autotp's attention op counted as SDPA); the
    convolutions only with ``conv``."""
    mapping = {torch.ops.autotp.attention.default: _attention_flops}
    if not conv:
        mapping[torch.ops.aten.convolution] = _zero_flops        # keyed by the packet, as FlopCounterMode registers it
    with FlopCounterMode(display=False, custom_mapping=mapping) as counter, torch.no_grad():
        model(*args, **kwargs)
    return counter.get_total_flops()


def _probe_loss(out):
    """``<out, w>`` for a fixed random ``w``: its gradient reaches every output element."""
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(7))
    return (out * w).sum()


def _logits(out):
    return out.logits if hasattr(out, "logits") else (out[0] if isinstance(out, (tuple, list)) else out)


def _example(name: str):
    m = zoo.MODELS[name]
    torch.manual_seed(0)
    model = m.build(layers=LAYERS[name])
    return (model, *m.inputs(2, 8, 1))


def _run(name: str) -> dict:
    """One model on this rank: the output's and the worst gradient's error against one device
    (each relative to its own scale, at least 1e-3 of the largest gradient), the plan's forward
    collectives per layer, its notes, and this rank's share of the forward FLOPs without and
    with convolutions."""
    model, args, kwargs = _example(name)
    reference = copy.deepcopy(model)
    want = _logits(reference(*args, **kwargs))
    _probe_loss(want).backward()
    pmodel = autotp.parallelize(model, args, kwargs, **planned(name))
    got = _logits(pmodel(*args, **kwargs))
    _probe_loss(got).backward()
    ref_grads = {n: p.grad for n, p in reference.named_parameters() if p.grad is not None}
    floor = 1e-3 * max(g.abs().max().item() for g in ref_grads.values())
    grads = {n: p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
             for n, p in pmodel.named_parameters() if n in ref_grads}
    assert grads.keys() == ref_grads.keys(), set(ref_grads) ^ set(grads)
    grad_err = {n: ((g - ref_grads[n]).abs().max() / max(ref_grads[n].abs().max().item(), floor)).item()
                for n, g in grads.items()}
    return dict(output_err=((got - want).abs().max() / want.abs().max()).item(),
                grad_err=max(grad_err.values()), worst_grad=max(grad_err, key=grad_err.get),
                per_layer={k: dict(v) for k, v in pmodel.plan.counts()["per_layer_forward"].items()},
                notes=list(pmodel.plan.notes),
                fraction=_forward_flops(pmodel, args, kwargs, False) / _forward_flops(reference, args, kwargs, False),
                with_conv=_forward_flops(pmodel, args, kwargs, True) / _forward_flops(reference, args, kwargs, True))


def _cases():
    return {name: functools.partial(_run, name) for name in MODELS}


@pytest.fixture(scope="module", params=[2, 4], ids=lambda w: f"N{w}")
def results(request):
    if not MODELS:
        pytest.skip("none of transformers, torchtitan, litgpt, diffusers is installed")
    for name in MODELS:
        model, args, kwargs = _example(name)
        plan_ahead(name, model, args, kwargs, world=request.param)
    return request.param, run_cases(_cases, request.param, timeout_s=300)


def _need(name: str):
    if name not in MODELS:
        pytest.skip(f"{LIBRARY[name]} is not installed")


@pytest.mark.parametrize("name", ["bert", "t5", "titan_llama3", "litgpt", "dit"])
def test_output_and_every_gradient_equal_one_device(results, name):
    _need(name)
    world, per_rank = results
    for rank, r in enumerate(case(per_rank, name)):
        assert r["output_err"] <= TOL and r["grad_err"] <= TOL, (
            f"{name} N={world} rank {rank}: output {r['output_err']:.1e}, gradient {r['grad_err']:.1e} "
            f"({r['worst_grad']})")


@pytest.mark.parametrize("name", ["bert", "t5", "titan_llama3", "litgpt", "dit"])
def test_blocks_run_megatrons_collectives(results, name):
    """Per layer: Megatron's all-reduces and no all-gather, except DiT: each of its blocks also
    all-reduces the adaLN-Zero modulation (``Linear(c) -> 6 x dim``: a large weight, split for
    memory, whose per-sample output every token needs whole) and runs its own conditioning MLP
    (timestep and class embedding, on (B, 256) sinusoids) with one gather or reduce-scatter; block
    0's embedder runs once more for the output's modulation."""
    _need(name)
    world, per_rank = results
    r = case(per_rank, name)[0]
    for layer in range(LAYERS[name]):
        got = dict(r["per_layer"].get(layer, {}))
        if name == "dit":        # its own conditioning MLP: an all-gather or a reduce-scatter, not in attention/MLP
            assert got.pop("all_gather", 0) + got.pop("reduce_scatter", 0) <= 2, got
        assert got == BLOCK[name], f"{name} N={world} layer {layer}: {r['per_layer']}"


@pytest.mark.parametrize("name", ["bert", "t5", "titan_llama3", "litgpt", "dit"])
def test_each_rank_runs_a_1_over_n_share_of_the_flops(results, name):
    _need(name)
    world, per_rank = results
    for rank, r in enumerate(case(per_rank, name)):
        # with fewer kv heads than ranks each kv head is kept whole on N / H_kv ranks: the k and v
        # projections run at 1/H_kv (titan_llama3 at N = 4: 0.288 instead of 0.25)
        slack = 0.02 if world <= KV_HEADS.get(name, world) else 0.05
        assert -0.02 <= r["fraction"] - 1 / world <= slack, f"{name} N={world} rank {rank}: {r['fraction']:.3f} of the FLOPs"
        if name == "dit":     # the conv patch embedding runs whole on every rank, and the plan says so
            assert any("aten.conv2d" in n and "replicated" in n for n in r["notes"]), r["notes"]
            assert r["with_conv"] > r["fraction"]
