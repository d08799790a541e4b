"""Planning time of autotp for Llama-70B-shaped models (weights on the meta device).

    python benchmarks/plan_time.py [--layers 2 8 32 80] [--tp 8]

Prints, per layer count: capture (torch.export), solve (ILP), rewrite (collectives + local
shapes) and total seconds, with the machine named.  Planning should grow about linearly.
"""
import argparse
import os
import platform
import time

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from autotp.plan import make_plan


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, nargs="+", default=[2, 8, 32, 80])
    ap.add_argument("--tp", type=int, default=8)
    args = ap.parse_args()
    print(f"machine: {machine()}")
    print(f"Llama-70B shape (d 8192, 64 heads, 8 kv heads, ffn 28672, vocab 128256), TP {args.tp}, meta device")
    print(f"{'layers':>6} {'capture s':>10} {'solve s':>8} {'rewrite s':>10} {'total s':>8} {'s/layer':>8} {'ILP vars':>9}")
    for layers in args.layers:
        cfg = LlamaConfig(vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_hidden_layers=layers,
                          num_attention_heads=64, num_key_value_heads=8)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(cfg)
        ids = torch.randint(0, 128256, (1, 8))
        t0 = time.perf_counter()
        plan = make_plan(model, (ids,), world_size=args.tp)
        t1 = time.perf_counter()
        plan.rewritten()
        t2 = time.perf_counter()
        solve = plan.ctx.solver_stats["seconds"]
        capture_s = (t1 - t0) - solve
        total = t2 - t0
        print(f"{layers:>6} {capture_s:>10.2f} {solve:>8.2f} {t2 - t1:>10.2f} {total:>8.2f} {total / layers:>8.3f} "
              f"{plan.ctx.solver_stats['variables']:>9}")


if __name__ == "__main__":
    main()
