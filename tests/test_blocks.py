"""The parallel model keeps the model's hierarchy: each decoder layer is a rank-local module at
its path, owning its shards, and the standard per-layer recipes work on it.

Two gloo processes (tp 2), a 2-layer Llama: the structure itself; activation checkpointing
("full" recomputes each layer, "selective" keeps matmul, attention and collective outputs) with
the collectives backward runs counted by ``CommDebugMode``; torch's own ``checkpoint_wrapper``
applied per layer; ``torch.compile`` per layer (inductor, one graph for the identical layers).
Every variant's loss and gradients equal one device's.
"""
import collections
import contextlib
import copy

import pytest
import torch
import torch.nn.functional as F
import transformers.models.llama.modeling_llama  # noqa: F401 — imported once here, not in each forked rank

from models import build
from ranks import case, run_cases

WORLD = 2


def _loss(logits, ids):
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())


def _plain(name: str) -> str:
    """A parameter's name without torch's checkpoint wrapper (its state dict strips it too)."""
    return name.replace("_checkpoint_wrapped_module.", "")


def _compare(pmodel, reference, ids, count: bool = True) -> dict:
    """One training step of each: relative loss and worst gradient error, and the collectives the
    parallel backward ran (``CommDebugMode``, by kind)."""
    from torch.distributed.tensor.debug import CommDebugMode
    reference.zero_grad()
    ref_loss = _loss(reference(ids).logits, ids)
    ref_loss.backward()
    pmodel.zero_grad()
    # the whole step under one CommDebugMode (its module tracker must see the forward of a module
    # that backward recomputes); backward's collectives are the total less the forward's.  Not
    # when compiling: dynamo runs no frame under a dispatch mode
    with CommDebugMode() if count else contextlib.nullcontext() as comm:
        loss = _loss(pmodel(ids).logits, ids)
        forward = collections.Counter({str(k).split(".")[-1]: v for k, v in comm.get_comm_counts().items()}) \
            if count else None
        loss.backward()
    ref = dict(reference.named_parameters())
    grads = max(((p.grad.full_tensor() - ref[_plain(n)].grad).abs().max() / ref[_plain(n)].grad.abs().max()).item()
                for n, p in pmodel.named_parameters())
    backward = collections.Counter({str(k).split(".")[-1]: v for k, v in comm.get_comm_counts().items()}) - forward \
        if count else {}
    return {"loss": abs(loss.item() - ref_loss.item()) / abs(ref_loss.item()), "grads": grads,
            "backward": dict(backward)}


def _structure(autotp, ids):
    torch.manual_seed(0)
    model = build("llama")
    names = [n for n, _ in model.named_parameters()]
    original_layers = list(model.model.layers)
    pmodel = autotp.parallelize(model, (ids,))
    layer = pmodel.model.layers[1]
    own = {n for n, _ in layer.named_parameters()}
    return {
        "is_block": [b is layer for b in pmodel.blocks()] == [False, True],
        "class_kept": isinstance(layer, type(original_layers[1])),
        "owns_its_shards": own == {n.removeprefix("model.layers.1.") for n in names if n.startswith("model.layers.1.")}
        and layer.self_attn.q_proj.weight.placements[0].is_shard(),
        "names_kept": [n for n, _ in pmodel.named_parameters()] == names,
        "source_untouched": list(model.model.layers) == original_layers,
        "one_graph_for_identical_layers": len({id(s.gm) for s in pmodel._segments if s.path}) == 1,
        "segments": [s.path for s in pmodel._segments],
    }


def _checkpointing(autotp, ids, mode):
    torch.manual_seed(0)
    model = build("llama")
    reference = copy.deepcopy(model)
    pmodel = autotp.parallelize(model, (ids,), activation_checkpointing=mode)
    return _compare(pmodel, reference, ids)


def _checkpoint_wrapper(autotp, ids):
    """torch's own per-layer recipe (what torchtitan and FSDP users write) on the parallel model."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (apply_activation_checkpointing,
                                                                             checkpoint_wrapper)
    torch.manual_seed(0)
    model = build("llama")
    reference = copy.deepcopy(model)
    layer_cls = type(model.model.layers[0])
    pmodel = autotp.parallelize(model, (ids,))
    names = [n for n, _ in pmodel.named_parameters()]
    apply_activation_checkpointing(pmodel, checkpoint_wrapper_fn=checkpoint_wrapper,
                                   check_fn=lambda m: isinstance(m, layer_cls))
    out = _compare(pmodel, reference, ids)
    out["wrapped"] = sum(type(m).__name__ == "CheckpointWrapper" for m in pmodel.modules())
    out["state_dict_names"] = list(pmodel.state_dict()) == names
    return out


def _compile_per_layer(autotp, ids):
    torch.manual_seed(0)
    model = build("llama")
    reference = copy.deepcopy(model)
    pmodel = autotp.parallelize(model, (ids,))
    for layer in pmodel.blocks():
        layer.compile()
    counters = torch._dynamo.utils.counters
    counters.clear()
    out = _compare(pmodel, reference, ids, count=False)
    out["breaks"] = sum(counters["graph_break"].values())
    out["graphs"] = counters["stats"]["unique_graphs"]
    return out


def _cases():
    import autotp
    ids = torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(1))
    return {"structure": lambda: _structure(autotp, ids),
            "none": lambda: _checkpointing(autotp, ids, None),
            "full": lambda: _checkpointing(autotp, ids, "full"),
            "selective": lambda: _checkpointing(autotp, ids, "selective"),
            "wrapper": lambda: _checkpoint_wrapper(autotp, ids),
            "compile": lambda: _compile_per_layer(autotp, ids)}


@pytest.fixture(scope="module")
def results():
    return run_cases(_cases, WORLD)


def test_layers_are_rank_local_modules_at_their_paths(results):
    for r in case(results, "structure"):
        assert r["segments"] == [None, "model.layers.0", "model.layers.1", None], r["segments"]
        for key in ("is_block", "class_kept", "owns_its_shards", "names_kept", "source_untouched",
                    "one_graph_for_identical_layers"):
            assert r[key], (key, r)


@pytest.mark.parametrize("mode", ["none", "full", "selective", "wrapper", "compile"])
def test_per_layer_recipes_match_one_device(results, mode):
    for rank, r in enumerate(case(results, mode)):
        print(f"rank {rank} {mode}: loss {r['loss']:.1e} grads {r['grads']:.1e} backward {r['backward']}")
        assert r["loss"] <= 1e-5 and r["grads"] <= 1e-5, r
    if mode == "wrapper":
        assert all(r["wrapped"] == 2 and r["state_dict_names"] for r in case(results, mode))
    if mode == "compile":
        for r in case(results, mode):      # compiled, without a break, one graph for both (identical) layers
            assert r["breaks"] == 0 and r["graphs"] == 1, r


def test_selective_checkpointing_runs_no_collective_twice(results):
    """The backward of "selective" runs exactly the collectives of no checkpointing.  "full"
    recomputes each layer up to the last tensor its backward reads (torch's checkpoint stops
    there): the attention block's all-reduce runs again, the MLP's (past it) does not."""
    for none, full, sel in zip(*(case(results, m) for m in ("none", "full", "selective"))):
        assert sel["backward"] == none["backward"], (none, sel)
        assert full["backward"].get("all_reduce", 0) == none["backward"].get("all_reduce", 0) + 2, (none, full)
