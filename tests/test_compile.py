"""torch.compile on the parallel model: same results, no graph breaks from autotp's own ops."""
import datetime
import os
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from models import build


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
    compiled = torch.compile(pmodel)
    with torch.no_grad():
        out = compiled(ids).logits
        want = reference(ids).logits
    err = ((out - want).abs().max() / want.abs().max()).item()
    with open(os.path.join(tmp, f"{rank}.txt"), "w") as f:
        f.write(f"{explain.graph_break_count} {err}")
    dist.destroy_process_group()


def test_compiled_parallel_model_matches_and_does_not_break():
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(_worker, args=(2, tmp), nprocs=2, start_method="fork")
        for r in range(2):
            breaks, err = open(os.path.join(tmp, f"{r}.txt")).read().split()
            assert int(breaks) == 0, f"rank {r}: {breaks} graph breaks"
            assert float(err) <= 1e-5, f"rank {r}: error {err}"
