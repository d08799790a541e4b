"""Per-rank memory: loading a checkpoint (each rank reads only its slices), a training step's
parameters, gradients and activations with and without sequence parallelism, and
``Plan.memory``'s estimate against measured peaks plus the Llama-3-70B table.

    python benchmarks/memory.py [--worlds 2 4] [--hidden 1024 --layers 8] [--skip-load] [--skip-step]
    python benchmarks/memory.py --estimate

Second table (``--skip-load`` runs only it): a small Llama (d256, 4 layers, batch 4 x seq 256,
fp32) on N = 1, 2, 4 gloo ranks, plain tensor parallelism and ``sequence_parallel=True``.
Parameters and gradients are measured from the local shards after one backward; activations are
the bytes autograd saves for backward during the forward (``saved_tensors_hooks``, each storage
counted once), next to ``Plan.activation_mib()`` — the solver's proxy, which counts every tensor
the forward allocates in the autograd graph, so it is an upper bound; compare the SP/TP ratios.

Saves a Llama checkpoint (sharded safetensors, ~670 MB fp32 at the defaults), then on N gloo
ranks: builds the model on the meta device, parallelises it, loads the checkpoint with
``autotp.load_checkpoint`` and reports each rank's parameter bytes (measured from the local
shards), the plan's prediction, the bytes read from disk, the resident-memory growth across the
load (VmRSS) and the process's peak resident memory (VmHWM, which includes torch, transformers
and the planning step).
"""
import argparse
import datetime
import os
import platform
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _status_mb(field: str) -> float:
    """VmRSS (now) or VmHWM (peak) of this process, from /proc."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field)) / 1024


def _worker(rank, world, tmp, cfg):
    import autotp
    from transformers import AutoConfig, AutoModelForCausalLM
    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(os.path.join(tmp, f"store{world}"), world), rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=300))
    with autotp.init_empty_weights():
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**cfg))
    full = sum(p.numel() * p.element_size() for p in model.parameters())
    pmodel = autotp.parallelize(model, (torch.randint(0, 100, (2, 8)),))
    before = _status_mb("VmRSS")
    report = autotp.load_checkpoint(pmodel, os.path.join(tmp, "ckpt"))
    after, peak = _status_mb("VmRSS"), _status_mb("VmHWM")
    local = sum(p.to_local().numel() * p.to_local().element_size() for p in pmodel.parameters())
    predicted = sum(p.numel() * p.element_size() / (world if autotp.fmt(pl) != "R" else 1)
                    for (n, p), pl in zip(model.named_parameters(), [pmodel.plan.placements[n] for n, _ in
                                                                     model.named_parameters()]))
    rows = [None] * world
    dist.all_gather_object(rows, (rank, full, local, predicted, report.bytes_read, after - before, peak))
    if rank == 0:
        with open(os.path.join(tmp, f"out{world}.txt"), "w") as f:
            f.write(repr(rows))
    dist.destroy_process_group()


def _machine() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def _saved_bytes(fn):
    """Bytes of the distinct storages autograd saves for backward while ``fn()`` runs."""
    seen = {}

    def pack(t):
        if t.device.type != "meta":
            st = t.untyped_storage()
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(seen.values())


def _step_worker(rank, world, tmp, cfg, batch, seq):
    import autotp
    from autotp.plan import make_plan
    from transformers import AutoConfig, AutoModelForCausalLM
    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(os.path.join(tmp, f"step{world}"), world), rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=300))
    rows = []
    for sp in (False, True):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**cfg))
        ids = torch.randint(0, cfg["vocab_size"], (batch, seq), generator=torch.Generator().manual_seed(1))
        predicted = make_plan(model, (ids,), world_size=world, sequence_parallel=sp, plan_batch=batch,
                              plan_seq=seq, dump=False).activation_mib()
        pmodel = autotp.parallelize(model, (ids,), sequence_parallel=sp)
        out, saved = _saved_bytes(lambda: pmodel(ids).logits)
        out.float().logsumexp(-1).mean().backward()
        params = sum(p.to_local().numel() * p.to_local().element_size() for p in pmodel.parameters())
        grads = sum(p.grad.to_local().numel() * p.grad.to_local().element_size() for p in pmodel.parameters()
                    if p.grad is not None)
        rows.append((sp, params, grads, saved, predicted * 2**20))
    if rank == 0:
        with open(os.path.join(tmp, f"step{world}.txt"), "w") as f:
            f.write(repr(rows))
    dist.destroy_process_group()


def step_table(worlds, tmp) -> None:
    cfg = dict(model_type="llama", vocab_size=8000, hidden_size=256, intermediate_size=704, num_hidden_layers=4,
               num_attention_heads=8, num_key_value_heads=4)
    batch, seq = 4, 256
    print(f"\nTraining step, Llama d256 x 4 layers (8 heads, 4 kv), vocab 8000, batch {batch} x seq {seq}, fp32; "
          f"rank 0; MB = 1e6 bytes")
    print(f"{'N':>2} {'plan':>8} {'params MB':>10} {'grads MB':>9} {'saved acts MB':>14} {'predicted MB':>13} "
          f"{'vs N=1 TP':>13}")
    base = None                                   # saved activations of plain TP at the smallest N
    for world in worlds:
        mp.start_processes(_step_worker, args=(world, tmp, cfg, batch, seq), nprocs=world, start_method="spawn")
        for sp, params, grads, saved, predicted in eval(open(os.path.join(tmp, f"step{world}.txt")).read()):
            base = base or saved
            print(f"{world:>2} {'TP+SP' if sp else 'TP':>8} {params / 1e6:>10.2f} {grads / 1e6:>9.2f} "
                  f"{saved / 1e6:>14.2f} {predicted / 1e6:>13.2f} {saved / base:>13.2f}")


# ---------------------------------------------------------------- the estimate against measured peaks

ESTIMATE_MODEL = dict(model_type="llama", vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2)
ESTIMATE_BATCH, ESTIMATE_SEQ = 2, 64          # per dp rank


def estimate_vs_measured(rank, world, tmp, layouts, cfg=None, batch=ESTIMATE_BATCH, seq=ESTIMATE_SEQ):
    """For each (dp, activation_checkpointing) in ``layouts`` (tp = world / dp): parallelise a Llama,
    FSDP2 per layer when dp > 1, AdamW; one warm-up step (the optimizer state exists), then measure
    the next step's peak (``autotp.memory.measure_step``: the state at rest + what forward, loss,
    backward and the optimizer step allocate) next to ``Plan.memory``'s estimate.  Rank 0 writes
    rows (world, dp, tp, checkpointing, measured, estimated, estimate parts) to tmp/estimate{world}.txt."""
    import autotp
    import torch.nn.functional as F
    from autotp.memory import measure_step
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from transformers import AutoConfig, AutoModelForCausalLM
    cfg = cfg or ESTIMATE_MODEL
    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(os.path.join(tmp, f"est{world}"), world), rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=300))
    rows = []
    for dp, checkpointing in layouts:
        mesh = init_device_mesh("cpu", (dp, world // dp), mesh_dim_names=("dp", "tp"))
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**cfg))
        ids = torch.randint(0, cfg["vocab_size"], (batch, seq), generator=torch.Generator().manual_seed(rank // (world // dp)))
        pmodel = autotp.parallelize(model, (ids,), mesh=mesh, activation_checkpointing=checkpointing)
        if dp > 1:
            for layer in pmodel.blocks():
                fully_shard(layer, mesh=mesh["dp"])
            fully_shard(pmodel, mesh=mesh["dp"])
        opt = torch.optim.AdamW(pmodel.parameters(), lr=1e-3)

        def step():
            F.cross_entropy(pmodel(ids).logits.flatten(0, 1), ids.flatten()).backward()
            opt.step()

        step()
        opt.zero_grad()
        measured = measure_step(pmodel, opt, step)
        opt.zero_grad()
        est = pmodel.plan.memory(batch, seq, torch.float32, "adamw", dp=dp, activation_checkpointing=checkpointing)
        peaks = torch.tensor([float(measured["peak"])])
        dist.all_reduce(peaks, op=dist.ReduceOp.MAX)             # the fullest rank
        rows.append((world, dp, world // dp, checkpointing, peaks.item(), est.peak,
                     {k: getattr(est, k) for k in ("parameters", "gradients", "optimizer", "activations",
                                                   "forward_peak", "backward_peak", "gathered")}))
    if rank == 0:
        with open(os.path.join(tmp, f"estimate{world}.txt"), "w") as f:
            f.write(repr(rows))
    dist.destroy_process_group()


ESTIMATE_LAYOUTS = {1: [(1, None), (1, "full"), (1, "selective")], 2: [(1, None), (1, "full")],
                    4: [(1, None), (1, "full"), (2, None), (2, "full"), (2, "selective")]}


def run_estimates(tmp, layouts=ESTIMATE_LAYOUTS) -> list:
    rows = []
    for world, todo in layouts.items():
        mp.start_processes(estimate_vs_measured, args=(world, tmp, todo), nprocs=world, start_method="fork")
        rows += eval(open(os.path.join(tmp, f"estimate{world}.txt")).read())
    return rows


def estimate_table(tmp) -> None:
    c = ESTIMATE_MODEL
    print(f"\nEstimate vs measured peak per rank: Llama d{c['hidden_size']} x {c['num_hidden_layers']} layers, vocab "
          f"{c['vocab_size']}, batch {ESTIMATE_BATCH} x seq {ESTIMATE_SEQ} per dp rank, fp32, AdamW, FSDP2 per layer "
          f"when dp > 1 (gloo, the fullest rank; kB = 1e3 bytes)")
    print(f"{'tp':>3} {'dp':>3} {'checkpointing':>13} {'measured kB':>12} {'estimate kB':>12} {'error':>7} "
          f"{'acts kB':>8} {'params kB':>10}")
    for world, dp, tp, ac, measured, est, parts in run_estimates(tmp):
        print(f"{tp:>3} {dp:>3} {str(ac):>13} {measured / 1e3:>12.0f} {est / 1e3:>12.0f} "
              f"{est / measured - 1:>+7.1%} {parts['activations'] / 1e3:>8.0f} {parts['parameters'] / 1e3:>10.0f}")


def table_70b() -> None:
    """Llama-3-70B (80 layers, meta device), TP 8, bf16 parameters, gradients and AdamW state."""
    import time
    from autotp.__main__ import load_config, plan_from_config
    cfg, _ = load_config(os.path.join(os.path.dirname(__file__), "..", "examples", "configs", "llama-70b.json"))
    t0 = time.perf_counter()
    plan = plan_from_config(cfg, 8)
    print(f"\nLlama-3-70B, TP 8, batch 1 per dp rank, bf16 compute, FSDP2 per layer over dp, AdamW; "
          f"GB = 1e9 bytes; planned in {time.perf_counter() - t0:.1f} s.  'bf16': parameters, gradients and "
          f"optimizer state in bf16; 'fp32 master': in fp32 (mixed precision, torchtitan's setup)")
    print(f"{'seq':>5} {'dp':>3} {'checkpointing':>13} {'acts':>6} {'params':>7} {'bf16 peak':>10} {'fits':>5} "
          f"{'fp32 master peak':>17} {'fits':>5}")
    for seq in (4096, 8192):
        for ac in (None, "full", "selective"):
            for dp in (1, 4, 16):
                e = plan.memory(1, seq, torch.bfloat16, "adamw", dp=dp, activation_checkpointing=ac)
                m = plan.memory(1, seq, torch.bfloat16, "adamw", dp=dp, activation_checkpointing=ac,
                                master_dtype=torch.float32)
                print(f"{seq:>5} {dp:>3} {str(ac):>13} {e.activations / 1e9:>6.1f} {e.parameters / 1e9:>7.1f} "
                      f"{e.peak / 1e9:>10.1f} {'yes' if e.fits else 'no':>5} {m.peak / 1e9:>17.1f} "
                      f"{'yes' if m.fits else 'no':>5}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worlds", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--skip-load", action="store_true", help="only the training-step table")
    ap.add_argument("--skip-step", action="store_true", help="only the checkpoint-loading table")
    ap.add_argument("--estimate", action="store_true",
                    help="only the memory estimate: against measured peaks, and the Llama-3-70B table")
    args = ap.parse_args()
    from transformers import AutoConfig, AutoModelForCausalLM
    cfg = dict(model_type="llama", vocab_size=32000, hidden_size=args.hidden, intermediate_size=args.hidden * 11 // 4,
               num_hidden_layers=args.layers, num_attention_heads=16, num_key_value_heads=8)
    print(f"machine: {_machine()}, {os.cpu_count()} cores, torch {torch.__version__}")
    if args.estimate:
        with tempfile.TemporaryDirectory() as tmp:
            estimate_table(tmp)
        table_70b()
        return
    if not args.skip_step:
        with tempfile.TemporaryDirectory() as tmp:
            step_table(sorted({1, *args.worlds}), tmp)
    if args.skip_load:
        return
    with tempfile.TemporaryDirectory() as tmp:
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**cfg))
        model.save_pretrained(os.path.join(tmp, "ckpt"), max_shard_size="200MB")
        size = sum(p.numel() * p.element_size() for p in model.parameters())
        del model
        print(f"Llama d{args.hidden} x {args.layers} layers, vocab 32000, fp32: {size / 1e6:.0f} MB of parameters")
        print(f"{'N':>2} {'rank':>4} {'params MB':>10} {'predicted MB':>13} {'read MB':>8} {'RSS growth MB':>14} "
              f"{'peak RSS MB':>12}")
        for world in args.worlds:
            mp.start_processes(_worker, args=(world, tmp, cfg), nprocs=world, start_method="spawn")
            for rank, full, local, predicted, read, rss, peak in eval(open(os.path.join(tmp, f"out{world}.txt")).read()):
                print(f"{world:>2} {rank:>4} {local / 1e6:>10.1f} {predicted / 1e6:>13.1f} {read / 1e6:>8.1f} "
                      f"{rss:>14.1f} {peak:>12.1f}")


if __name__ == "__main__":
    main()
