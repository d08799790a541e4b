"""Run named cases on several gloo ranks (forked processes, a file store): the pattern the
distributed tests share.  Each case is caught, so one failure reports its traceback and the
others still run; the parent gets one dict per rank: case name -> result, or the traceback text."""
import datetime
import os
import pickle
import tempfile
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

PLANS: dict = {}      # key -> a plan made in the parent before the ranks fork (``plan_ahead``)
DECODES: dict = {}    # key -> the decode step's plan for that plan (``plan_ahead(..., decode=True)``)


def _worker(rank, world, tmp, cases, timeout_s):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(os.path.join(tmp, "store"), world), rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=timeout_s))
    out = {}
    for name, fn in cases().items():
        try:
            out[name] = fn()
        except Exception:  # noqa: BLE001 — reported by the parent
            out[name] = traceback.format_exc()
    with open(os.path.join(tmp, f"{rank}.pkl"), "wb") as f:
        pickle.dump(out, f)
    dist.destroy_process_group()


def run_cases(cases, world: int, timeout_s: int = 300) -> list[dict]:
    """``cases()`` (called in each rank, after the process group starts) -> {name: callable}."""
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(_worker, args=(world, tmp, cases, timeout_s), nprocs=world, start_method="fork")
        return [pickle.load(open(os.path.join(tmp, f"{r}.pkl"), "rb")) for r in range(world)]


def case(results: list[dict], name: str) -> list:
    """Every rank's result of ``name``; a rank that raised fails the test with its traceback."""
    for rank, res in enumerate(results):
        assert not isinstance(res[name], str), f"rank {rank}:\n{res[name]}"
    return [res[name] for res in results]


def plan_ahead(key, model, args, kwargs=None, *, world: int, decode: bool = False, **options) -> None:
    """Plan ``model`` here, once, for the ranks ``run_cases`` forks next: each rank then passes
    ``**planned(key)`` to ``autotp.parallelize`` instead of exporting and solving the same model
    again (on CI's 2 cores, 4 ranks planning is most of a case's time).  ``options``: make_plan's
    (``dp_sharded=True`` for the tp dim of an FSDP2 mesh).  Whether ranks plan alike is
    ``check_same_plan``'s test (tests/test_moe.py), not these.  ``decode``: the decode step's
    plan too (``autotp.generation.DecodePlan``; ``generator(pmodel, decode=planned_decode(key))``)."""
    from autotp.plan import make_plan
    PLANS[key] = make_plan(model, args, kwargs, world_size=world, **options)
    if decode:
        from autotp.generation import DecodePlan
        DECODES[key] = DecodePlan(model, PLANS[key].placements, world)


def planned(key) -> dict:
    """``parallelize``'s keyword for the plan ``plan_ahead(key, ...)`` made ({} if none)."""
    return {"plan": PLANS[key]} if key in PLANS else {}


def planned_decode(key):
    """The decode plan ``plan_ahead(key, ..., decode=True)`` made (None if none)."""
    return DECODES.get(key)
