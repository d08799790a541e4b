"""Per-rank memory when loading a checkpoint: each rank reads only its slices.

    python benchmarks/memory.py [--worlds 2 4] [--hidden 1024 --layers 8]

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


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worlds", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=8)
    args = ap.parse_args()
    from transformers import AutoConfig, AutoModelForCausalLM
    cfg = dict(model_type="llama", vocab_size=32000, hidden_size=args.hidden, intermediate_size=args.hidden * 11 // 4,
               num_hidden_layers=args.layers, num_attention_heads=16, num_key_value_heads=8)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}")
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
