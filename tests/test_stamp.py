"""Repeated layers (``autotp/stamp.py``): export layers 0, 1, 2 and L-1, stamp layer 1's graph
for the others.  The stamped graph must be the graph exporting all layers gives, node for node
(same ops, arguments, symbolic shapes, module paths, parameters); where the layers are not
provably identical, capture exports them all.  And the stamped plan is exact on gloo."""
import logging
import os

import pytest
import torch
import torch.fx as fx

from autotp.capture import capture
from autotp.verify import Case, HFModel, verify
from models import FAMILIES, MOE_FAMILIES, build, build_any
from test_families import FAMILIES as UNSEEN

LAYERS = 7


def _model(family: str, **extra):
    if family in UNSEEN:
        cfg = dict(model_type=family, **UNSEEN[family])
        key = "n_layer" if "n_layer" in cfg else "num_hidden_layers"
        return HFModel(dict(cfg, **{key: LAYERS}, **extra))()
    key = "n_layer" if family == "gpt2" else "num_hidden_layers"
    return (build_any if family in MOE_FAMILIES else build)(family, **{key: LAYERS}, **extra)


def _canonical(c) -> tuple:
    """The graph with nodes named by position, parameters and buffers by name, tensor constants
    by value (export lifts one per layer; the stamped layers share their template's)."""
    names, ops, i = {}, [], 0
    for n in c.gm.graph.nodes:
        if n.op == "placeholder":
            if n.name in c.constants:
                t = c.constants[n.name]
                names[n] = ("constant", str(t.dtype), t.tolist())
            else:
                names[n] = c.params.get(n.name) or c.buffers.get(n.name) or n.target
        else:
            names[n], i = i, i + 1
    for n in c.gm.graph.nodes:
        if n.op == "placeholder":
            continue
        args = fx.node.map_aggregate((n.args, n.kwargs), lambda x: ("node", names[x]) if isinstance(x, fx.Node) else x)
        v = n.meta.get("val")
        stack = n.meta.get("nn_module_stack") or {}
        ops.append((n.op, str(n.target), repr(args), str(tuple(v.shape)) if isinstance(v, torch.Tensor) else type(v).__name__,
                    list(stack.values())[-1][0] if stack else ""))
    inputs = {names[n] if not isinstance(names[n], tuple) else repr(names[n]) for n in c.gm.graph.nodes
              if n.op == "placeholder"}
    return inputs, ops


def _both(model):
    ids = torch.randint(0, 90, (2, 8))
    stamped = capture(model, (ids,))
    os.environ["AUTOTP_STAMP"] = "0"
    try:
        full = capture(model, (ids,))
    finally:
        del os.environ["AUTOTP_STAMP"]
    return stamped, full


@pytest.mark.parametrize("family", ["llama", "gpt2", "mixtral", "qwen2_moe", "falcon"])
def test_stamped_graph_is_the_full_export(family):
    torch.manual_seed(0)
    stamped, full = _both(_model(family))
    assert stamped.stamped is not None and stamped.stamped[1] == LAYERS
    assert full.stamped is None
    assert sorted(stamped.params.values()) == sorted(full.params.values())
    assert sorted(stamped.buffers.values()) == sorted(full.buffers.values())
    assert _canonical(stamped) == _canonical(full)


def test_layers_that_differ_are_exported_one_by_one(caplog):
    """A per-layer pattern in the config (Gemma-3's sliding/full attention), an attribute changed
    in one layer, a forward replaced on one layer, and per-layer outputs (MoE router logits) all
    rule stamping out; the graph is then the full export."""
    torch.manual_seed(0)
    gemma = _model("gemma3_text")
    assert capture(gemma, (torch.randint(0, 90, (2, 8)),)).stamped is None
    llama = _model("llama")
    llama.model.layers[4].self_attn.scaling = 0.5
    assert capture(llama, (torch.randint(0, 90, (2, 8)),)).stamped is None
    llama = _model("llama")
    plain = llama.model.layers[3].mlp.forward
    llama.model.layers[3].mlp.forward = lambda x: plain(x) * 2
    assert capture(llama, (torch.randint(0, 90, (2, 8)),)).stamped is None
    with caplog.at_level(logging.INFO, logger="autotp"):
        stamped, full = _both(_model("mixtral", output_router_logits=True))
    assert stamped.stamped is None and "exported one by one" in caplog.text
    assert _canonical(stamped) == _canonical(full)


def test_stamped_plan_matches_one_device():
    results = verify([Case("llama-7", HFModel(dict(FAMILIES["llama"], num_hidden_layers=LAYERS)))], 2)
    for rank in results:
        r = rank[0]
        assert not r.error, r.error
        assert r.logits_err <= 1e-5 and r.grad_err <= 1e-5 and r.other_shape_err <= 1e-5
        assert any("copies of layer 1" in line for line in r.summary.splitlines())
