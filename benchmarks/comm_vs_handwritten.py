"""Communication per training step: autotp vs the hand-written DTensor plan (torchtitan's Llama plan).

    python benchmarks/comm_vs_handwritten.py [--worlds 2 4 8] [--families llama mistral gpt2 mixtral]

One process and torch's fake process group (``backend="fake"``): collectives cost nothing and
return placeholders, so the counts and bytes are exact while the numbers are not.  Both plans
run forward + backward of the same model under one byte-counting dispatch mode (every
``_c10d_functional`` collective, which is what both DTensor and autotp issue).

Bytes are the full (unsharded) size of each collective's tensor; per-rank wire bytes follow from
the factors in ``autotp/cost.py``.
"""
import argparse
import collections
import os
import platform
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from models import FAMILIES_ALL  # noqa: E402

import autotp  # noqa: E402
from autotp.verify import HFModel  # noqa: E402

_c10d = torch.ops._c10d_functional
_KINDS = {"all_reduce": "all_reduce", "all_gather_into_tensor": "all_gather", "reduce_scatter_tensor": "reduce_scatter",
          "all_to_all_single": "all_to_all"}


class CollectiveBytes(TorchDispatchMode):
    """Counts collectives and the full-tensor bytes each one moves."""

    def __init__(self, world):
        super().__init__()
        self.world, self.count, self.bytes = world, collections.Counter(), collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func._schema.name.split("::")[-1]
        if func.namespace == "_c10d_functional" and name in _KINDS:
            kind, x = _KINDS[name], args[0]
            full = x.numel() * x.element_size() * (self.world if kind == "all_gather" else 1)
            self.count[kind] += 1
            self.bytes[kind] += full
        return out


def step(model, ids):
    out = model(ids)
    logits = out.logits
    if hasattr(logits, "full_tensor"):
        logits = logits.full_tensor()
    F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).backward()


def measure(model, ids, world):
    fwd, full = CollectiveBytes(world), CollectiveBytes(world)
    with fwd, torch.no_grad():
        model(ids)
    with full:
        step(model, ids)
    return fwd, full


def torchtitan_plan(model, mesh):
    """The hand-written Llama plan torchtitan uses (ColwiseParallel q/k/v/gate/up, RowwiseParallel
    o/down, vocab-parallel embedding, lm_head column-parallel with replicated output)."""
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
    plan = {"model.embed_tokens": RowwiseParallel(input_layouts=Replicate()),
            "lm_head": ColwiseParallel(output_layouts=Replicate())}
    for i in range(len(model.model.layers)):
        p = f"model.layers.{i}."
        plan.update({p + "self_attn.q_proj": ColwiseParallel(), p + "self_attn.k_proj": ColwiseParallel(),
                     p + "self_attn.v_proj": ColwiseParallel(), p + "self_attn.o_proj": RowwiseParallel(),
                     p + "mlp.gate_proj": ColwiseParallel(), p + "mlp.up_proj": ColwiseParallel(),
                     p + "mlp.down_proj": RowwiseParallel()})
    return parallelize_module(model, mesh, plan)


_ABBREV = {"all_reduce": "AR", "all_gather": "AG", "reduce_scatter": "RS", "all_to_all": "A2A"}


def fmt_counts(c):
    return " ".join(f"{v}{_ABBREV[k]}" for k, v in sorted(c.items())) or "-"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worlds", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--families", nargs="+", default=["llama", "mistral", "gpt2", "mixtral"])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=64)
    args = ap.parse_args()
    from torch.distributed.device_mesh import init_device_mesh
    from torch.testing._internal.distributed.fake_pg import FakeStore
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}; "
          f"fake process group; batch {args.batch} x seq {args.seq}, fp32")
    print("AR=all-reduce AG=all-gather RS=reduce-scatter A2A=all-to-all; MB = full-tensor megabytes per step")
    header = f"{'model':<9} {'N':>2} {'plan':<12} {'fwd collectives':<16} {'fwd MB':>8} {'fwd+bwd collectives':<20} {'fwd+bwd MB':>10}"
    print(header)
    print("-" * len(header))
    for world in args.worlds:
        dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)
        mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("tp",))
        for fam in args.families:
            cfg = dict(FAMILIES_ALL[fam])
            # widen the toy configs so every dim divides by 8
            cfg.update({"llama": dict(hidden_size=128, intermediate_size=256, num_attention_heads=8,
                                      num_key_value_heads=8, vocab_size=256),
                        "mistral": dict(hidden_size=128, intermediate_size=256, num_attention_heads=8,
                                        num_key_value_heads=8, vocab_size=256),
                        "gpt2": dict(n_embd=128, n_head=8, vocab_size=256, n_positions=128),
                        "mixtral": dict(hidden_size=128, intermediate_size=256, num_attention_heads=8,
                                        num_key_value_heads=8, vocab_size=256, num_local_experts=8)}[fam])
            ids = torch.randint(0, 256, (args.batch, args.seq))
            rows = []
            torch.manual_seed(0)
            m = HFModel(cfg)()
            pm = autotp.parallelize(m, (ids,), mesh=mesh, check_plan=False)
            rows.append(("autotp",) + measure(pm, ids, world))
            if fam in ("llama", "mistral"):
                torch.manual_seed(0)
                rows.append(("torchtitan",) + measure(torchtitan_plan(HFModel(cfg)(), mesh), ids, world))
            for name, fwd, full in rows:
                print(f"{fam:<9} {world:>2} {name:<12} {fmt_counts(fwd.count):<16} {sum(fwd.bytes.values()) / 1e6:>8.2f} "
                      f"{fmt_counts(full.count):<20} {sum(full.bytes.values()) / 1e6:>10.2f}")
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
