"""autotp against torchtitan's own tensor-parallel plan, on torchtitan's own Llama 3.

The model is ``torchtitan.models.llama3`` from a small config (fused ``wqkv`` laid out per kv
group, complex RoPE, GQA; ``model_sweep.titan_llama3``), the same random weights on both sides.
torchtitan's plan is its own: ``set_llama3_sharding_config`` (no sequence parallelism, so both
sides are plain Megatron TP) and ``Model.parallelize`` with the DTensor backend
(``spmd_backend="partial_dtensor"``).  autotp plans the same module with ``autotp.parallelize``.

torchtitan's logits stay split by vocab (its loss runs on the shards); autotp is shown both
ways: its default (logits all-gathered, a plain tensor) and ``sharded_outputs=True`` (logits
left split by vocab, a DTensor, as torchtitan's).

For each world size (gloo processes, CPU) it prints, per side: the collectives of one forward
and of one training step (forward + backward of a probe loss), their bytes, and the worst error
of the output and of every parameter gradient against one device.  Bytes are those of the whole
tensor each collective reduces or gathers (the larger of its input and output), counted by a
``TorchDispatchMode`` over ``torch.ops._c10d_functional``, which both sides call.

    python benchmarks/torchtitan_compare.py --world 2,4 --kv-heads 2

With 2 kv heads at N = 4 torchtitan's plan cannot shard k and v by heads (it fails); autotp
keeps each kv head whole on a pair of ranks.
"""
from __future__ import annotations

import argparse
import collections
import copy
import os
import platform
import sys

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

_COLLECTIVES = {"all_reduce", "all_gather_into_tensor", "reduce_scatter_tensor", "all_to_all_single"}


class CollectiveCounter(TorchDispatchMode):
    """Counts ``_c10d_functional`` collectives and the bytes of the tensor each one moves."""

    def __init__(self):
        super().__init__()
        self.counts, self.bytes = collections.Counter(), 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.namespace == "_c10d_functional" and func._opname in _COLLECTIVES:
            self.counts[func._opname.removesuffix("_into_tensor").removesuffix("_tensor")] += 1
            self.bytes += max(args[0].numel(), out.numel()) * args[0].element_size()
        return out


def _model(kv_heads: int, sharding: bool):
    """``model_sweep.titan_llama3``, with torchtitan's TP sharding config filled in when ``sharding``."""
    import model_sweep
    if not sharding:
        return model_sweep.titan_llama3(n_kv_heads=kv_heads)
    from torchtitan.models.llama3 import sharding as titan_sharding
    from torchtitan.models import llama3 as titan_llama3
    original = titan_llama3.Llama3Model.Config.build

    def build(cfg, *a, **k):                 # fill the sharding config just before the build
        titan_sharding.set_llama3_sharding_config(cfg, enable_sp=False)
        return original(cfg, *a, **k)
    titan_llama3.Llama3Model.Config.build = build
    try:
        return model_sweep.titan_llama3(n_kv_heads=kv_heads)
    finally:
        titan_llama3.Llama3Model.Config.build = original


def _full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _probe(out):
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(7))
    return (out * w).sum()


def _measure(build_parallel, reference, ids) -> dict:
    """Forward and step collectives of the parallel model, and its worst relative error."""
    want = reference(ids)
    _probe(want).backward()
    try:
        pmodel = build_parallel()
        with CollectiveCounter() as fwd:
            out = pmodel(ids)
        out = _full(out.logits if hasattr(out, "logits") else out)
        with CollectiveCounter() as bwd:
            _probe(out).backward()
    except Exception as e:  # noqa: BLE001 — reported in the table
        return dict(error=f"{type(e).__name__}: {str(e).splitlines()[0][:90] if str(e) else ''}")
    err = ((out - want).abs().max() / want.abs().max()).item()
    ref = dict(reference.named_parameters())
    floor = 1e-3 * max(p.grad.abs().max().item() for p in ref.values())
    for name, p in pmodel.named_parameters():
        name = name.replace("_orig_mod.", "")
        g = _full(p.grad)
        err = max(err, ((g - ref[name].grad).abs().max() / max(ref[name].grad.abs().max().item(), floor)).item())
    return dict(fwd=dict(fwd.counts), fwd_bytes=fwd.bytes, step=dict(fwd.counts + bwd.counts),
                step_bytes=fwd.bytes + bwd.bytes, err=err)


def _cases(kv_heads: int):
    def cases():
        import torch.distributed as dist
        import autotp
        world = dist.get_world_size()
        ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(1))

        def autotp_side(sharded_outputs: bool):
            torch.manual_seed(0)
            model = _model(kv_heads, sharding=False)
            reference = copy.deepcopy(model)
            return _measure(lambda: autotp.parallelize(model, (ids,), sharded_outputs=sharded_outputs), reference, ids)

        def titan_side():
            from torchtitan.distributed import ParallelDims
            torch.manual_seed(0)
            reference = _model(kv_heads, sharding=False)
            model = _model(kv_heads, sharding=True)
            model.load_state_dict(reference.state_dict())

            def build():
                # on CPU: torchtitan picks "cuda" when no accelerator is found, and it gives the mesh dims of
                # degree 1 the "fake" backend, which torch registers when its fake process group is imported
                import torch.testing._internal.distributed.fake_pg  # noqa: F401
                import torchtitan.distributed.parallel_dims as titan_dims
                titan_dims.device_type = "cpu"
                dims = ParallelDims(dp_replicate=1, dp_shard=1, cp=1, tp=world, pp=1, ep=1, world_size=world,
                                    spmd_backend="partial_dtensor")
                dims.build_mesh()
                model.parallelize(dims)
                return model
            return _measure(build, reference, ids)
        return {"autotp": lambda: autotp_side(False), "autotp, sharded_outputs": lambda: autotp_side(True),
                "torchtitan": titan_side}
    return cases


def _fmt_counts(c: dict) -> str:
    return " + ".join(f"{v} {k}" for k, v in sorted(c.items())) or "none"


def main() -> int:
    from ranks import run_cases
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--world", default="2,4")
    ap.add_argument("--kv-heads", type=int, default=2)
    args = ap.parse_args()
    print(f"# torchtitan Llama 3 (2 layers, dim 64, 4 heads, {args.kv_heads} kv heads, fused wqkv, complex RoPE), "
          f"batch 2 x seq 8, fp32; {platform.machine()} {os.cpu_count()}-core CPU, gloo, torch {torch.__version__}")
    print("| N | plan | forward collectives | forward bytes | step collectives | step bytes | exact (err <= 1e-5) |")
    print("|---|---|---|---|---|---|---|")
    for world in [int(w) for w in args.world.split(",")]:
        results = run_cases(_cases(args.kv_heads), world, timeout_s=300)[0]
        for side in ("autotp", "autotp, sharded_outputs", "torchtitan"):
            r = results[side]
            if isinstance(r, str):
                r = dict(error=r.strip().splitlines()[-1][:120])
            if "error" in r:
                print(f"| {world} | {side} | fails: {r['error']} | | | | no |")
                continue
            print(f"| {world} | {side} | {_fmt_counts(r['fwd'])} | {r['fwd_bytes']:,} | {_fmt_counts(r['step'])} | "
                  f"{r['step_bytes']:,} | {'yes' if r['err'] <= 1e-5 else 'NO'} ({r['err']:.1e}) |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
