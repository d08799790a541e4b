"""MoE communication per step: expert parallelism (all-to-all or combine) vs tensor parallelism
inside the experts, with tokens replicated (plain TP) or split by sequence (sequence parallel).

    python benchmarks/moe_comm.py [--worlds 2 4 8] [--batch 4] [--seq 64]

Mixtral-style model (2 layers, 8 experts, top-2, d 128), fp32, N gloo processes on this machine
(real collectives: the all-to-all split sizes depend on the routing, which a fake process group
cannot produce).  Measured on rank 0 with a dispatch-level counter: every collective and the
bytes it puts on the wire for this rank (ring algorithms: all-reduce 2(N-1)/N x B, all-gather
and reduce-scatter (N-1)/N x B, all-to-all the rows sent to other ranks — exact, from the split
sizes).  Plans:

  EP            the solver's choice with tokens replicated: E/N experts per rank, one combine
  TP-in-expert  expert weights pinned to the Megatron split (gate_up S(1)x2, down S(2))
  EP x TP       (N >= 4) experts pinned to the 2-D grid: N/2 groups of whole experts, each split
                column/row over the 2 ranks of its group; tokens replicated, one combine
  EP a2a        sequence_parallel=True: the solver's choice, rows dispatched and combined by all-to-all
  EP x TP a2a   (N >= 4) sequence_parallel=True with the grid pinned: each row to every rank of its
                group (2 copies), the partial sums back
  TP-in-expert  sequence_parallel=True with the experts pinned as above: tokens gathered, reduce-scattered

"MoE fwd" is the forward wire bytes of the MoE blocks alone as the plan's cost report predicts
them at this batch and sequence (load balanced), next to the measured whole-model totals.
"""
import argparse
import collections
import os
import sys
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.distributed.tensor.placement_types import Shard, _StridedShard
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from comm_vs_handwritten import machine  # noqa: E402
from models import MIXTRAL  # noqa: E402

import autotp  # noqa: E402
from autotp.report import report_data  # noqa: E402
from autotp.placement import Grid  # noqa: E402
from autotp.verify import HFModel  # noqa: E402

CFG = dict(MIXTRAL, hidden_size=128, intermediate_size=256, num_attention_heads=8, num_key_value_heads=8,
           vocab_size=256, num_local_experts=8)
TP_IN_EXPERT = {"*.experts.gate_up_proj": _StridedShard(1, split_factor=2), "*.experts.down_proj": Shard(2)}


def grid_pin(world: int) -> dict:
    return {"*.experts.gate_up_proj": Grid(Shard(0), _StridedShard(1, split_factor=2), world // 2),
            "*.experts.down_proj": Grid(Shard(0), Shard(2), world // 2)}


PLANS = [("EP", {}), ("TP-in-expert", {"overrides": TP_IN_EXPERT}), ("EP x TP", {"overrides": grid_pin}),
         ("EP a2a", {"sequence_parallel": True}), ("EP x TP a2a", {"sequence_parallel": True, "overrides": grid_pin}),
         ("TP-in-expert", {"sequence_parallel": True, "overrides": TP_IN_EXPERT})]
_KINDS = {"all_reduce": "AR", "all_gather_into_tensor": "AG", "reduce_scatter_tensor": "RS", "all_to_all_single": "A2A"}


class WireBytes(TorchDispatchMode):
    """Collectives run by this rank and the bytes each puts on the wire for it."""

    def __init__(self, world: int, rank: int):
        super().__init__()
        self.world, self.rank = world, rank
        self.count, self.wire = collections.Counter(), 0.0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func._schema.name.split("::")[-1]
        if func.namespace == "_c10d_functional" and name in _KINDS:
            x, n = args[0], self.world
            nbytes = x.numel() * x.element_size()
            kind = _KINDS[name]
            self.count[kind] += 1
            if kind == "AR":
                self.wire += 2 * (n - 1) / n * nbytes
            elif kind == "AG":
                self.wire += (n - 1) * nbytes                       # x is this rank's shard
            elif kind == "RS":
                self.wire += (n - 1) / n * nbytes
            else:
                send = args[2] or [x.shape[0] // n] * n             # input split sizes (rows)
                row = nbytes / max(x.shape[0], 1)
                self.wire += sum(s for j, s in enumerate(send) if j != self.rank) * row
        return out


def _worker(rank, world, store_path, out_dir, batch, seq):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(store_path, world), rank=rank, world_size=world)
    ids = torch.randint(0, CFG["vocab_size"], (batch, seq), generator=torch.Generator().manual_seed(1))
    rows = []
    for name, kwargs in PLANS:
        if callable(kwargs.get("overrides")):
            if world < 4:
                continue
            kwargs = dict(kwargs, overrides=kwargs["overrides"](world))
        torch.manual_seed(0)
        pm = autotp.parallelize(HFModel(CFG)(), (ids,), **kwargs)
        fwd, full = WireBytes(world, rank), WireBytes(world, rank)
        with fwd, torch.no_grad():
            pm(ids)
        with full:
            logits = pm(ids).logits
            F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).backward()
        data = report_data(pm.plan, batch=batch, seq=seq, dtype=torch.float32)
        moe = sum(b["chosen"]["wire_bytes"] for b in data["experts"]["blocks"]) if data.get("experts") else 0.0
        experts = autotp.fmt(pm.plan.placements["model.layers.0.mlp.experts.gate_up_proj"])
        rows.append((name, "SP" if kwargs.get("sequence_parallel") else "TP", experts, dict(fwd.count), fwd.wire,
                     dict(full.count), full.wire, moe))
    if rank == 0:
        torch.save(rows, os.path.join(out_dir, "rows.pt"))
    dist.barrier()
    dist.destroy_process_group()


def _counts(c: dict) -> str:
    return " ".join(f"{v}{k}" for k, v in sorted(c.items()))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worlds", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=64)
    args = ap.parse_args()
    print(f"machine: {machine()}, {os.cpu_count()} cores, torch {torch.__version__}; gloo, N processes; "
          f"Mixtral 2 layers, 8 experts top-2, d 128, batch {args.batch} x seq {args.seq}, fp32; "
          f"wire MB per rank (rank 0)")
    header = (f"{'N':>2} {'tokens':<6} {'plan':<13} {'experts':<13} {'fwd collectives':<22} {'fwd MB':>7} "
              f"{'fwd+bwd collectives':<24} {'fwd+bwd MB':>10} {'MoE fwd MB (plan)':>17}")
    print(header)
    print("-" * len(header))
    for world in args.worlds:
        with tempfile.TemporaryDirectory() as tmp:
            mp.start_processes(_worker, args=(world, os.path.join(tmp, "store"), tmp, args.batch, args.seq),
                               nprocs=world, join=True, start_method="fork")
            rows = torch.load(os.path.join(tmp, "rows.pt"))
        for name, tokens, experts, fc, fw, bc, bw, moe in rows:
            print(f"{world:>2} {tokens:<6} {name:<13} {experts:<13} {_counts(fc):<22} {fw / 1e6:>7.3f} "
                  f"{_counts(bc):<24} {bw / 1e6:>10.3f} {moe / 1e6:>17.3f}")


if __name__ == "__main__":
    main()
