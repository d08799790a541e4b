"""Training-step time on CPU (gloo): autotp vs torchtitan's hand-written DTensor plan vs Hugging
Face's own tensor parallelism (the model's ``tp_plan``, as ``from_pretrained(tp_plan="auto")`` applies it).

    python benchmarks/step_time.py [--worlds 1 2 4] [--reps 20]

Small Llama (hidden 256, 4 layers, 8 heads, ffn 688, vocab 1024), batch 4 x seq 128, fp32.
Each process builds the three parallel models and interleaves their steps (forward + backward),
so noise hits all alike; the table gives medians, the ratios autotp / hand-written and autotp / HF,
and the max logits error of the HF model vs the unsharded one (relative to the logits' scale).
At N = 1 HF applies no plan: its model is the plain module.
"""
import argparse
import datetime
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(__file__))
from comm_vs_handwritten import hf_tp_plan, machine, rel_err, step, torchtitan_plan  # noqa: E402

import autotp  # noqa: E402
from autotp.verify import HFModel  # noqa: E402

CFG = dict(model_type="llama", vocab_size=1024, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
           num_attention_heads=8, num_key_value_heads=8)
PLANS = ("autotp", "hand-written", "HF tp_plan")


def _worker(rank, world, tmp, reps, batch, seq):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(os.path.join(tmp, "store"), world), rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=120))
    from torch.distributed.device_mesh import init_device_mesh
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("tp",))
    ids = torch.randint(0, CFG["vocab_size"], (batch, seq), generator=torch.Generator().manual_seed(0))
    models = {}
    torch.manual_seed(0)
    ref = HFModel(CFG)()(ids).logits.detach()
    torch.manual_seed(0)
    models["autotp"] = autotp.parallelize(HFModel(CFG)(), (ids,), mesh=mesh)
    torch.manual_seed(0)
    models["hand-written"] = torchtitan_plan(HFModel(CFG)(), mesh)
    torch.manual_seed(0)
    models["HF tp_plan"] = hf_tp_plan(HFModel(CFG)(), world)
    hf_err = rel_err(models["HF tp_plan"](ids).logits, ref)
    times = {name: [] for name in PLANS}
    for i in range(reps + 3):
        for name, model in models.items():
            dist.barrier()
            t = time.perf_counter()
            step(model, ids)
            dist.barrier()
            if i >= 3:                               # warm-up
                times[name].append(time.perf_counter() - t)
            model.zero_grad(set_to_none=True)
    if rank == 0:
        with open(os.path.join(tmp, "out.txt"), "w") as f:
            f.write(repr({**{k: statistics.median(v) for k, v in times.items()}, "HF err": hf_err}))
    dist.destroy_process_group()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    args = ap.parse_args()
    print(f"machine: {machine()}, {os.cpu_count()} cores, torch {torch.__version__}; "
          f"gloo, 1 thread per rank; Llama d256 x 4 layers, batch {args.batch} x seq {args.seq}, fp32, "
          f"median of {args.reps} interleaved steps")
    print(f"{'N':>2} {'autotp ms':>10} {'hand-written ms':>16} {'HF tp_plan ms':>14} {'autotp/hand':>12} "
          f"{'autotp/HF':>10} {'HF err':>8}")
    for world in args.worlds:
        with tempfile.TemporaryDirectory() as tmp:
            mp.start_processes(_worker, args=(world, tmp, args.reps, args.batch, args.seq), nprocs=world,
                               start_method="spawn")
            res = eval(open(os.path.join(tmp, "out.txt")).read())
        a, h, f = (res[name] * 1e3 for name in PLANS)
        print(f"{world:>2} {a:>10.1f} {h:>16.1f} {f:>14.1f} {a / h:>12.2f} {a / f:>10.2f} {res['HF err']:>8.1e}")


if __name__ == "__main__":
    main()
