"""Vocab-parallel cross-entropy (issue 18, item 1): the loss of vocab-sharded logits, never gathered.

A Hugging Face causal LM given ``labels=`` computes its loss inside the captured graph
(``aten.cross_entropy_loss``).  Planned with ``sharded_outputs=True``, the logits stay split
along the vocabulary and the loss rule (``passes/rules/loss.py``) computes the exact loss from
the slices: an all-reduce of the max and one of the sum of exp per token, and the target logit
picked on its owning rank.  ``autotp.cross_entropy`` does the same for a loss written outside
the model.  Checked at N = 2, 3 (and an uneven vocab of 101), 4 on gloo against one device:
the loss and every gradient, and that no collective moves a tensor of the logits' size.
"""
import datetime
import os
import pickle
import tempfile
import time
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
import transformers.models.llama.modeling_llama  # noqa: F401 — imported once here, not in each forked rank
from torch.distributed.tensor.debug import CommDebugMode

import autotp
from autotp.loss import REDUCTIONS, vocab_parallel_nll
from autotp.placement import S, local_chunk
from models import build
from ranks import plan_ahead, planned

BATCH, SEQ = 2, 8
# vocab much larger than hidden, so a collective of the logits' size stands out
CONFIGS = {2: dict(vocab_size=256, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                   num_key_value_heads=2, num_hidden_layers=1),
           3: dict(vocab_size=258, hidden_size=48, intermediate_size=96, num_attention_heads=6,
                   num_key_value_heads=3, num_hidden_layers=1),
           4: dict(vocab_size=256, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                   num_key_value_heads=4, num_hidden_layers=1)}
UNEVEN_VOCAB = 101               # the helper on logits split 51/50 (N=2), 34/34/33 (N=3), 26/26/26/23 (N=4)


def _rel(got, want, floor=0.0) -> float:
    return (got - want).abs().max().item() / max(want.abs().max().item(), floor, 1e-30)


class _Sizes(CommDebugMode):
    """CommDebugMode that also records how many elements each collective moves."""

    def __init__(self):
        super().__init__()
        self.numels = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.name() if hasattr(func, "name") else ""
        if name.startswith("_c10d_functional::") and "wait_tensor" not in name and args \
                and isinstance(args[0], torch.Tensor):
            self.numels.append(args[0].numel())
        return super().__torch_dispatch__(func, types, args, kwargs)


def _labels(ids, vocab, seed):
    """Next-token labels with some positions ignored (-100), as a data collator masks padding."""
    labels = ids.clone()
    g = torch.Generator().manual_seed(seed)
    labels[torch.rand(labels.shape, generator=g) < 0.3] = -100
    return labels


def _grad_err(reference, pmodel) -> float:
    ref = {n: p.grad for n, p in reference.named_parameters() if p.grad is not None}
    floor = 1e-3 * max(g.abs().max().item() for g in ref.values())
    worst = 0.0
    for name, p in pmodel.named_parameters():
        g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
        worst = max(worst, _rel(g, ref[name], floor))
    assert len(ref) == len(dict(pmodel.named_parameters()))
    return worst


def _in_graph_example(world):
    torch.manual_seed(0)
    model = build("llama", **CONFIGS[world])
    ids = torch.randint(0, model.config.vocab_size, (BATCH, SEQ), generator=torch.Generator().manual_seed(1))
    # labels a tensor of their own: export would take the same tensor object twice as one input
    return model, (ids,), {"labels": ids.clone()}


def _in_graph(world):
    """The model's own loss (labels=) on the vocab-sharded logits, and the helper on them."""
    import copy
    model, (ids,), kwargs = _in_graph_example(world)
    vocab = model.config.vocab_size
    reference = copy.deepcopy(model)
    pmodel = autotp.parallelize(model, (ids,), kwargs, sharded_outputs=True, **planned("in_graph"))
    out = {"plan_shapes": [c.shape for c in pmodel.plan.collectives()],
           "plan_kinds": [c.kind for c in pmodel.plan.collectives()],
           "logits_placement": str(pmodel(ids, labels=ids).logits.placements)}

    labels = _labels(ids, vocab, seed=2)
    ref_loss = reference(ids, labels=labels).loss
    ref_loss.backward()
    with _Sizes() as comm:
        loss = pmodel(ids, labels=labels).loss
        loss.backward()
    out["loss"] = _rel(loss.detach(), ref_loss.detach())
    out["loss_same_on_ranks"] = loss.item()                      # a plain number, not a partial one
    out["grads"] = _grad_err(reference, pmodel)
    out["largest_collective"] = max(comm.numels)
    out["logits_numel"] = BATCH * SEQ * vocab

    # ignore_index everywhere: nan on one device, nan here
    ignored = torch.full_like(ids, -100)
    out["all_ignored"] = (reference(ids, labels=ignored).loss.item(), pmodel(ids, labels=ignored).loss.item())

    # labels of another shape or dtype: the error one device gives, or autotp's own
    for name, bad in {"short": labels[:, 1:], "float": labels.float()}.items():
        out["graph_" + name] = (_error(lambda: reference(ids, labels=bad).loss.item()),
                                _error(lambda: pmodel(ids, labels=bad).loss.item()))

    # the helper on the sharded logits the same call returns (labels shifted by the caller)
    reference.zero_grad()
    pmodel.zero_grad()
    ref_logits = reference(ids, labels=ids).logits
    ref_loss = F.cross_entropy(ref_logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())
    ref_loss.backward()
    with _Sizes() as comm:
        logits = pmodel(ids, labels=ids).logits                       # DTensor, Shard(2)
        loss = autotp.cross_entropy(logits[:, :-1], labels[:, 1:])
        loss.backward()
    out["helper_loss"] = _rel(loss.detach(), ref_loss.detach())
    out["helper_grads"] = _grad_err(reference, pmodel)
    out["helper_largest_collective"] = max(comm.numels)
    out["bad_shape"] = _error(lambda: autotp.cross_entropy(logits, labels[:, 1:]))
    out["bad_dtype"] = _error(lambda: autotp.cross_entropy(logits, labels.float()))
    return out


def _replicated_outputs(world):
    """Without sharded_outputs the logits come back whole (one gather, for the output); the loss
    is still exact."""
    import copy
    if world != 2:
        return {}
    torch.manual_seed(0)
    model = build("llama", **CONFIGS[world])
    reference = copy.deepcopy(model)
    ids = torch.randint(0, model.config.vocab_size, (BATCH, SEQ), generator=torch.Generator().manual_seed(1))
    pmodel = autotp.parallelize(model, (ids,), {"labels": ids.clone()})
    labels = _labels(ids, model.config.vocab_size, seed=4)
    ref, out = reference(ids, labels=labels), pmodel(ids, labels=labels)
    (ref.loss + ref.logits.square().mean()).backward()
    (out.loss + out.logits.square().mean()).backward()
    return {"loss": _rel(out.loss.detach(), ref.loss.detach()), "logits": _rel(out.logits.detach(), ref.logits),
            "grads": _grad_err(reference, pmodel)}


def _uneven(world):
    """The helper on logits split unevenly (vocab 101): every reduction, ignore_index, gradients."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard
    mesh = init_device_mesh("cpu", (world,))
    rank = dist.get_rank()
    g = torch.Generator().manual_seed(3)
    full = torch.randn(BATCH, SEQ, UNEVEN_VOCAB, generator=g) * 3
    labels = torch.randint(0, UNEVEN_VOCAB, (BATCH, SEQ), generator=g)
    labels[0, :3] = -100
    out = {}
    for reduction in REDUCTIONS:
        ref = full.clone().requires_grad_()
        want = F.cross_entropy(ref.flatten(0, 1), labels.flatten(), reduction=reduction)
        want.backward(torch.ones_like(want))
        local = full.chunk(world, dim=2)[rank].clone().requires_grad_()      # DTensor's (torch.chunk) sizes
        logits = DTensor.from_local(local, mesh, [Shard(2)], run_check=False, shape=full.shape, stride=full.stride())
        got = autotp.cross_entropy(logits, labels, reduction=reduction)
        got.backward(torch.ones_like(got))
        out[reduction] = (_rel(got.detach().flatten(), want.detach()),      # "none": labels' shape
                          _rel(local.grad, ref.grad.chunk(world, dim=2)[rank]))
    return out


def _error(fn) -> str:
    try:
        fn()
    except autotp.AutoTPError as e:
        return "AutoTPError: " + str(e)
    except Exception as e:  # noqa: BLE001
        return f"{type(e).__name__}: {e}"
    return "no error"


def _worker(rank, world, tmp):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(os.path.join(tmp, "store"), world), rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=120))
    out = {}
    for case, fn in {"in_graph": _in_graph, "uneven": _uneven, "replicated_outputs": _replicated_outputs}.items():
        t0 = time.perf_counter()
        try:
            out[case] = fn(world)
        except Exception:  # noqa: BLE001 — reported by the parent
            out[case] = traceback.format_exc()
        out[case + "_s"] = time.perf_counter() - t0
    with open(os.path.join(tmp, f"{rank}.pkl"), "wb") as f:
        pickle.dump(out, f)
    dist.barrier()
    dist.destroy_process_group()


@pytest.fixture(scope="module", params=[2, 3, 4], ids=lambda n: f"N{n}")
def results(request):
    world = request.param
    plan_ahead("in_graph", *_in_graph_example(world), world=world, sharded_outputs=True)
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(_worker, args=(world, tmp), nprocs=world, start_method="fork")
        return world, [pickle.load(open(os.path.join(tmp, f"{r}.pkl"), "rb")) for r in range(world)]


def _case(results, case):
    world, per_rank = results
    for rank, res in enumerate(per_rank):
        assert isinstance(res[case], dict), f"rank {rank}:\n{res[case]}"
        print(f"N={world} rank {rank} {case} ({res[case + '_s']:.1f} s): {res[case]}")
    return world, [res[case] for res in per_rank]


def test_loss_in_the_graph_equals_one_device_without_gathering_the_logits(results):
    world, rs = _case(results, "in_graph")
    vocab = CONFIGS[world]["vocab_size"]
    for r in rs:
        assert r["logits_placement"] == "(Shard(dim=2),)"
        assert r["loss"] <= 1e-5 and r["grads"] <= 1e-5, r
        # nothing of the logits' size moves: the largest collective is an activation (batch, seq, hidden)
        assert r["largest_collective"] < r["logits_numel"] // world, r
        assert not any(vocab in shape for shape in r["plan_shapes"]), r["plan_shapes"]
        assert r["plan_kinds"].count("sharded_amax") == r["plan_kinds"].count("sharded_logsumexp") == 1
        for bad in ("graph_short", "graph_float"):               # labels of another shape, dtype
            ref, got = r[bad]
            assert ref != "no error" and (got.split(":")[0] == ref.split(":")[0] or got.startswith("AutoTPError")), r
        ref, got = r["all_ignored"]
        assert ref != ref and got != got                          # nan on one device, nan here
    assert len({r["loss_same_on_ranks"] for r in rs}) == 1      # replicated, not a partial sum


def test_cross_entropy_helper_on_sharded_logits(results):
    world, rs = _case(results, "in_graph")
    for r in rs:
        assert r["helper_loss"] <= 1e-5 and r["helper_grads"] <= 1e-5, r
        assert r["helper_largest_collective"] < r["logits_numel"] // world, r
        assert r["bad_shape"].startswith("AutoTPError") and "labels" in r["bad_shape"], r["bad_shape"]
        assert r["bad_dtype"].startswith("AutoTPError") and "integer" in r["bad_dtype"], r["bad_dtype"]


def test_cross_entropy_helper_on_an_uneven_vocab(results):
    _, rs = _case(results, "uneven")
    for r in rs:
        for reduction, (loss, grad) in r.items():
            assert loss <= 1e-5 and grad <= 1e-5, (reduction, r)


def test_loss_with_replicated_outputs(results):
    _, rs = _case(results, "replicated_outputs")
    for r in rs:
        assert all(err <= 1e-5 for err in r.values()), r


# ---- the rule, in one process ----

@pytest.mark.parametrize("world", [2, 3, 4])
@pytest.mark.parametrize("reduction", list(REDUCTIONS))
@pytest.mark.parametrize("ignore_index", [-100, 5])
def test_partial_pick_sums_to_nll_loss(world, reduction, ignore_index):
    """The rule's claim: each rank's pick on its class slice is a Partial sum of nll_loss, with
    the mean over the non-ignored targets (an ignore_index inside the class range too)."""
    g = torch.Generator().manual_seed(0)
    logp = torch.randn(10, 12, generator=g).log_softmax(-1)
    target = torch.randint(0, 12, (10,), generator=g)
    target[:3] = ignore_index
    want = F.nll_loss(logp, target, reduction=reduction, ignore_index=ignore_index)
    got = sum(vocab_parallel_nll(local_chunk(logp, S(1), r, world), target, r * 12 // world, 12, 1,
                                 REDUCTIONS[reduction], ignore_index) for r in range(world))
    torch.testing.assert_close(got, want)


def test_the_solver_finds_the_vocab_parallel_loss():
    """Planned with labels and sharded outputs, the loss runs on the vocab shards: no gather of the
    logits, three (batch, seq)-sized forward all-reduces and one backward.  With a class weight
    (no sharded strategy) the logits are gathered as before."""
    torch.manual_seed(0)
    model = build("llama", **CONFIGS[4])
    ids = torch.randint(0, 256, (BATCH, SEQ))
    plan = autotp.plan(model, (ids,), {"labels": ids.clone()}, world_size=4, sharded_outputs=True)
    loss_node = next(n for n in plan.gm.graph.nodes if n.target == torch.ops.aten.cross_entropy_loss.default)
    assert loss_node.meta["autotp"]["strategy"].inputs == (S(1), autotp.Replicate())
    rewrite = {n.name for n in plan.rewritten().graph.nodes
               if n.meta.get("autotp", {}).get("sharded_classes") == loss_node.name}
    mine = [c for c in plan.collectives() if c.node in rewrite]
    assert [(c.kind, c.forward, c.backward, c.shape) for c in mine] == [
        ("sharded_amax", "all_reduce", None, (BATCH * SEQ, 1)),
        ("sharded_logsumexp", "all_reduce", None, (BATCH * SEQ, 1)),
        ("reduce_grad", None, "all_reduce", (BATCH * SEQ, 1)),
        ("all_reduce", "all_reduce", None, ())]
    assert not any(c.kind == "all_gather" and 256 in c.shape for c in plan.collectives())


def test_log_softmax_and_nll_loss_over_a_sharded_dim():
    """A loss written as log_softmax + nll_loss gets the same rewrite, one op each; a weighted
    loss keeps its classes whole (the logits are gathered)."""
    class Head(torch.nn.Module):
        def __init__(self, weight=None):
            super().__init__()
            self.proj = torch.nn.Linear(16, 64, bias=False)
            self.weight = weight

        def forward(self, x, target):
            return F.nll_loss(F.log_softmax(self.proj(x), -1), target, weight=self.weight)

    x, target = torch.randn(6, 16), torch.randint(0, 64, (6,))
    plan = autotp.plan(Head(), (x, target), world_size=4, sharded_outputs=True)
    assert plan.placements["proj.weight"] == S(0)
    kinds = [c.kind for c in plan.collectives()]
    assert kinds == ["sharded_amax", "sharded_logsumexp", "reduce_grad", "all_reduce"], kinds
    weighted = autotp.plan(Head(torch.rand(64)), (x, target), world_size=4, sharded_outputs=True)
    assert any(c.kind == "all_gather" and c.shape == (6, 64) for c in weighted.collectives())


def test_plan_cli_with_labels_reports_the_removed_gather(capsys):
    """``python -m autotp plan CONFIG --labels``: the loss is in the graph, the logits stay split, and
    the report puts the loss's collectives next to the gather of the logits they replace."""
    import json
    from pathlib import Path
    from autotp.__main__ import main
    config = Path(__file__).resolve().parents[1] / "examples" / "configs" / "llama-tiny.json"
    assert main(["plan", str(config), "--tp", "2", "--labels", "--format", "json"]) == 0
    data = json.loads(capsys.readouterr().out)
    vocab = json.loads(config.read_text())["vocab_size"]
    [loss] = data["vocab_loss"]
    assert loss["op"] == "cross_entropy_loss" and loss["count"] == 4           # 3 forward, 1 backward
    assert loss["gather_bytes"] == 4 * 2048 * vocab * 2                       # (batch*seq, vocab) bf16
    assert loss["bytes"] == 3 * 4 * 2048 * 2 + 2                              # three (batch*seq, 1), one ()
    assert not any(str(vocab) in r["shape"] for r in data["collectives"])
