"""Debug mode: ranks that pass different inputs get a clear error, not a silent wrong answer."""
import datetime
import os
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from models import build


def _worker(rank, world, tmp):
    import autotp
    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(os.path.join(tmp, "store"), world), rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=60))
    torch.manual_seed(0)
    ids = torch.randint(0, 90, (2, 8), generator=torch.Generator().manual_seed(1))
    pmodel = autotp.parallelize(build("llama"), (ids,), check_inputs=True)
    pmodel(ids)                                            # same inputs: fine
    other = ids.clone()
    if rank == 1:
        other[0, 0] = (other[0, 0] + 1) % 90               # one token differs on rank 1
    try:
        pmodel(other)
        outcome = "no error"
    except autotp.AutoTPError as e:
        outcome = str(e)
    with open(os.path.join(tmp, f"{rank}.txt"), "w") as f:
        f.write(outcome)
    dist.destroy_process_group()


def test_ranks_with_different_inputs_are_told():
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(_worker, args=(2, tmp), nprocs=2, start_method="fork")
        for r in range(2):
            text = open(os.path.join(tmp, f"{r}.txt")).read()
            assert "ranks passed different inputs" in text and "input_ids" in text, text
