"""Communication per training step: autotp vs the hand-written DTensor plan (torchtitan's Llama plan)
vs Hugging Face's own tensor parallelism (the model's ``tp_plan``).

    python benchmarks/comm_vs_handwritten.py [--worlds 2 4 8] [--families llama mistral gpt2 mixtral]

One process and torch's fake process group (``backend="fake"``): collectives cost nothing and
return placeholders, so the counts and bytes are exact while the numbers are not.  Every plan
runs forward (no grad) and forward + backward of the same model under one byte-counting dispatch
mode: every ``_c10d_functional`` collective (what DTensor and autotp issue) and every in-place
``c10d`` one (HF's no-grad row-parallel path and MoE experts call ``dist.all_reduce``).

"HF tp_plan" is what ``from_pretrained(..., tp_plan="auto")`` does after building the model:
``maybe_distribute_model`` with ``DistributedConfig(tp_plan="auto", tp_size=N)``, here on the
random-init model: each rank keeps its shard of the same seeded weights instead of loading them
(``from_pretrained``'s TP path sets ``device_map="cpu"``, which needs ``accelerate``, not a
dependency here; with it, the shards are identical).  The plan is checked first on gloo with N
real processes: "HF err" is the max logits error vs the unsharded model, relative to the logits'
scale, over the grad and no-grad paths; a model class without a plan prints "n/a (reason)".

Bytes are the full (unsharded) size of each collective's tensor; per-rank wire bytes follow from
the factors in ``autotp/cost.py``.
"""
import argparse
import collections
import datetime
import json
import os
import platform
import sys
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from models import FAMILIES_ALL  # noqa: E402

import autotp  # noqa: E402
from autotp.verify import HFModel  # noqa: E402

_KINDS = {"all_reduce": "all_reduce", "all_gather_into_tensor": "all_gather", "reduce_scatter_tensor": "reduce_scatter",
          "all_to_all_single": "all_to_all",          # _c10d_functional
          "allreduce_": "all_reduce", "_allgather_base_": "all_gather", "_reduce_scatter_base_": "reduce_scatter",
          "alltoall_base_": "all_to_all"}             # c10d (in place)
VOCAB = 256


class CollectiveBytes(TorchDispatchMode):
    """Counts collectives and the full-tensor bytes each one moves."""

    def __init__(self, world):
        super().__init__()
        self.world, self.count, self.bytes = world, collections.Counter(), collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func._schema.name.split("::")[-1]
        if func.namespace in ("_c10d_functional", "c10d") and name in _KINDS:
            # functional ops take the input first; c10d's allreduce_ a list of tensors, the others (output, input)
            x = args[0] if func.namespace == "_c10d_functional" else args[0][0] if name == "allreduce_" else args[1]
            kind = _KINDS[name]
            self.count[kind] += 1
            self.bytes[kind] += x.numel() * x.element_size() * (self.world if kind == "all_gather" else 1)
        return out


def machine() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else the architecture."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


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


def hf_tp_plan(model, world: int):
    """Hugging Face's tensor parallelism over all ``world`` ranks, as ``from_pretrained(tp_plan="auto")``
    applies it (a plain module at ``world`` 1).  Weights must be identical on every rank: each keeps its shard."""
    from transformers.distributed import DistributedConfig
    from transformers.distributed.utils import initialize_distributed_mesh
    cfg = DistributedConfig(tp_plan="auto", tp_size=world)
    return type(model).maybe_distribute_model(model, cfg, initialize_distributed_mesh(cfg)[1])


def rel_err(logits: torch.Tensor, ref: torch.Tensor) -> float:
    return ((logits.detach() - ref).abs().max() / ref.abs().max()).item()


def bench_config(fam: str) -> dict:
    """The toy config of ``fam``, widened so every dim divides by 8."""
    attn = dict(hidden_size=128, intermediate_size=256, num_attention_heads=8, num_key_value_heads=8, vocab_size=VOCAB)
    return {**FAMILIES_ALL[fam], **{"llama": attn, "mistral": attn, "mixtral": dict(attn, num_local_experts=8),
                                    "gpt2": dict(n_embd=128, n_head=8, vocab_size=VOCAB, n_positions=128)}[fam]}


def _hf_check_worker(rank, world, tmp, families, batch, seq):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(os.path.join(tmp, "store"), world), rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=120))
    ids = torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(0))
    res = {}
    for fam in families:
        torch.manual_seed(0)
        ref = HFModel(bench_config(fam))()(ids).logits.detach()
        torch.manual_seed(0)
        try:
            model = hf_tp_plan(HFModel(bench_config(fam))(), world)
        except Exception as e:                       # no plan for this model class, or the plan does not apply
            res[fam] = str(e).split(". ")[0]
            continue
        with torch.no_grad():
            no_grad = rel_err(model(ids).logits, ref)
        res[fam] = max(no_grad, rel_err(model(ids).logits, ref))
    if rank == 0:
        with open(os.path.join(tmp, "out.json"), "w") as f:
            json.dump(res, f)
    dist.destroy_process_group()


def hf_check(world: int, families: list[str], batch: int, seq: int) -> dict[str, float | str]:
    """HF tp_plan on ``world`` gloo processes: per family, the max logits error or why it does not run."""
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(_hf_check_worker, args=(world, tmp, families, batch, seq), nprocs=world,
                           start_method="spawn")
        with open(os.path.join(tmp, "out.json")) as f:
            return json.load(f)


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
    print(f"machine: {machine()}, {os.cpu_count()} cores, torch {torch.__version__}; fake process group "
          f"(HF err: gloo); batch {args.batch} x seq {args.seq}, fp32")
    print("AR=all-reduce AG=all-gather RS=reduce-scatter A2A=all-to-all; MB = full-tensor megabytes per step; "
          "HF err = max logits error of HF tp_plan vs one device")
    header = (f"{'model':<9} {'N':>2} {'plan':<12} {'fwd collectives':<16} {'fwd MB':>8} {'fwd+bwd collectives':<20} "
              f"{'fwd+bwd MB':>10} {'HF err':>8}")
    print(header)
    print("-" * len(header))
    for world in args.worlds:
        hf = hf_check(world, args.families, args.batch, args.seq)
        dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)
        mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("tp",))
        for fam in args.families:
            cfg = bench_config(fam)
            ids = torch.randint(0, VOCAB, (args.batch, args.seq))
            rows = []
            torch.manual_seed(0)
            pm = autotp.parallelize(HFModel(cfg)(), (ids,), mesh=mesh, check_plan=False)
            rows.append(("autotp",) + measure(pm, ids, world))
            if fam in ("llama", "mistral"):
                torch.manual_seed(0)
                rows.append(("torchtitan",) + measure(torchtitan_plan(HFModel(cfg)(), mesh), ids, world))
            if isinstance(hf[fam], float):
                torch.manual_seed(0)
                rows.append(("HF tp_plan",) + measure(hf_tp_plan(HFModel(cfg)(), world), ids, world))
            for name, fwd, full in rows:
                err = f"{hf[fam]:.1e}" if name == "HF tp_plan" else "-"
                print(f"{fam:<9} {world:>2} {name:<12} {fmt_counts(fwd.count):<16} {sum(fwd.bytes.values()) / 1e6:>8.2f} "
                      f"{fmt_counts(full.count):<20} {sum(full.bytes.values()) / 1e6:>10.2f} {err:>8}")
            if isinstance(hf[fam], str):
                print(f"{fam:<9} {world:>2} {'HF tp_plan':<12} n/a ({hf[fam]})")
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
