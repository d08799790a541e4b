"""torch.compile on the parallel model: same results, no graph breaks from autotp's own ops;
inductor compiles the backward too and its gradients are the unsharded model's."""
import datetime
import json
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from models import build


def _loss(logits, ids):
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())


def _grad_fns(t):
    """Names of every autograd node behind ``t``."""
    seen, todo = set(), [t.grad_fn]
    while todo:
        fn = todo.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        todo.extend(f for f, _ in fn.next_functions)
    return {type(fn).__name__ for fn in seen}


def _worker(rank, world, tmp):
    import copy
    import autotp
    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(os.path.join(tmp, "store"), world), rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=300))
    torch.manual_seed(0)
    model = build("llama", num_hidden_layers=1)
    reference = copy.deepcopy(model)
    ids = torch.randint(0, 90, (2, 8), generator=torch.Generator().manual_seed(1))
    pmodel = autotp.parallelize(model, (ids,))
    explain = torch._dynamo.explain(pmodel)(ids)
    # sequence parallelism adds a per-call divisibility check on the sequence: traced, not a break
    sp_model = autotp.parallelize(build("llama", num_hidden_layers=1), (ids,), sequence_parallel=True)
    sp_breaks = torch._dynamo.explain(sp_model)(ids).graph_break_count
    compiled = torch.compile(pmodel)
    with torch.no_grad():
        out = compiled(ids).logits
        want = reference(ids).logits
    err = ((out - want).abs().max() / want.abs().max()).item()

    # training: forward, loss and backward through the compiled model (grad mode: a new graph,
    # AOTAutograd's joint forward/backward, both compiled by inductor)
    counters = torch._dynamo.utils.counters
    counters.clear()
    loss = _loss(compiled(ids).logits, ids)
    loss.backward()
    ref_loss = _loss(reference(ids).logits, ids)
    ref_loss.backward()
    ref_grads = dict(reference.named_parameters())
    grad_err, missing = 0.0, []
    for name, p in pmodel.named_parameters():
        if p.grad is None:
            missing.append(name)
            continue
        got, want_g = p.grad.full_tensor(), ref_grads[name].grad
        grad_err = max(grad_err, ((got - want_g).abs().max() / want_g.abs().max()).item())
    res = {"breaks": explain.graph_break_count, "err": err, "sp_breaks": sp_breaks,
           "train_breaks": sum(counters["graph_break"].values()), "train_graphs": counters["stats"]["unique_graphs"],
           "compiled_backward": "CompiledFunctionBackward" in _grad_fns(loss),
           "loss_err": abs(loss.item() - ref_loss.item()) / abs(ref_loss.item()), "grad_err": grad_err,
           "missing": missing}
    with open(os.path.join(tmp, f"{rank}.json"), "w") as f:
        json.dump(res, f)
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def results():
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(_worker, args=(2, tmp), nprocs=2, start_method="fork")
        return [json.load(open(os.path.join(tmp, f"{r}.json"))) for r in range(2)]


def test_compiled_parallel_model_matches_and_does_not_break(results):
    for r, res in enumerate(results):
        assert res["breaks"] == 0, f"rank {r}: {res['breaks']} graph breaks"
        assert res["sp_breaks"] == 0, f"rank {r}: {res['sp_breaks']} graph breaks with sequence_parallel"
        assert res["err"] <= 1e-5, f"rank {r}: error {res['err']}"


def test_compiled_backward_matches_unsharded_gradients(results):
    for r, res in enumerate(results):
        print(f"rank {r}: {res}")
        assert res["train_breaks"] == 0 and res["train_graphs"] == 1, f"rank {r}: {res}"
        assert res["compiled_backward"], f"rank {r}: the backward did not run AOTAutograd's compiled graph"
        assert not res["missing"], f"rank {r}: no gradient for {res['missing']}"
        assert res["loss_err"] <= 1e-5, f"rank {r}: {res}"
        assert res["grad_err"] <= 1e-5, f"rank {r}: {res}"
