"""MoE communication per step: expert parallelism vs tensor parallelism inside the experts.

    python benchmarks/moe_comm.py [--worlds 2 4 8]

Mixtral-style model (8 experts, top-2), fake process group (one process; counts and bytes are
exact, values are not).  "EP" is the solver's choice (E/N whole experts per rank); "TP-in-expert"
pins the stacked expert weights to the Megatron split (gate_up S(1)x2, down S(2)) with
``overrides``.  Bytes are full-tensor sizes, per step, from the same dispatch counter as
benchmarks/comm_vs_handwritten.py.
"""
import argparse
import os
import platform
import sys

import torch
import torch.distributed as dist
from torch.distributed.tensor.placement_types import Shard, _StridedShard

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from comm_vs_handwritten import fmt_counts, measure  # noqa: E402
from models import MIXTRAL  # noqa: E402

import autotp  # noqa: E402
from autotp.verify import HFModel  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worlds", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=64)
    args = ap.parse_args()
    from torch.distributed.device_mesh import init_device_mesh
    from torch.testing._internal.distributed.fake_pg import FakeStore
    cfg = dict(MIXTRAL, hidden_size=128, intermediate_size=256, num_attention_heads=8, num_key_value_heads=8,
               vocab_size=256, num_local_experts=8)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}; "
          f"fake process group; Mixtral 2 layers, 8 experts top-2, d 128, batch {args.batch} x seq {args.seq}, fp32")
    header = (f"{'N':>2} {'plan':<13} {'experts':<18} {'fwd collectives':<16} {'fwd MB':>7} "
              f"{'fwd+bwd collectives':<20} {'fwd+bwd MB':>10} {'MoE-layer fwd':<14}")
    print(header)
    print("-" * len(header))
    for world in args.worlds:
        dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)
        mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("tp",))
        ids = torch.randint(0, 256, (args.batch, args.seq))
        tp_in_expert = {"*.experts.gate_up_proj": _StridedShard(1, split_factor=2), "*.experts.down_proj": Shard(2)}
        for name, overrides in (("EP", None), ("TP-in-expert", tp_in_expert)):
            torch.manual_seed(0)
            pm = autotp.parallelize(HFModel(cfg)(), (ids,), mesh=mesh, check_plan=False, overrides=overrides)
            fwd, full = measure(pm, ids, world)
            experts = autotp.fmt(pm.plan.placements["model.layers.0.mlp.experts.gate_up_proj"])
            moe = [c for c in pm.plan.collectives() if ".mlp" in c.module and c.layer == 0 and c.forward]
            moe_text = " ".join(f"{c.forward}({'x'.join(str(s) for s in c.shape)})" for c in moe) or "-"
            print(f"{world:>2} {name:<13} {experts:<18} {fmt_counts(fwd.count):<16} {sum(fwd.bytes.values()) / 1e6:>7.2f} "
                  f"{fmt_counts(full.count):<20} {sum(full.bytes.values()) / 1e6:>10.2f} {moe_text:<14}")
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
