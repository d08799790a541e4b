"""Planning time of autotp for Llama-70B-shaped models (weights on the meta device).

    python benchmarks/plan_time.py [--layers 2 8 32 80] [--tp 8] [--repeat 1]

Prints, per layer count: capture (torch.export + canonicalize), plan passes (propagate and
the rest of make_plan, solve excluded), solve (ILP), rewrite (collectives, local shapes and
their check, attention lowering) and total seconds, with the machine named.  Planning should
grow about linearly.  A one-layer warm-up runs first (printed on its own): the first export in
a process imports and initialises much of torch, which no layer count should be charged for.
"""
import argparse
import sys
import time

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from autotp.plan import make_plan
from machine import machine

_plan_module = sys.modules["autotp.plan"]
_capture = _plan_module.capture
_capture_s = []


def _timed_capture(*args, **kwargs):
    t = time.perf_counter()
    try:
        return _capture(*args, **kwargs)
    finally:
        _capture_s.append(time.perf_counter() - t)


_plan_module.capture = _timed_capture        # make_plan calls it by this name


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, nargs="+", default=[2, 8, 32, 80])
    ap.add_argument("--tp", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=1, help="runs per layer count; the fastest is printed")
    args = ap.parse_args()
    print(f"machine: {machine()}")
    print(f"Llama-70B shape (d 8192, 64 heads, 8 kv heads, ffn 28672, vocab 128256), TP {args.tp}, meta device")
    print(f"warm-up (1 layer, first export in this process): {run(1, args.tp)[-2]:.2f} s")
    print(f"{'layers':>6} {'capture s':>10} {'passes s':>9} {'solve s':>8} {'rewrite s':>10} {'total s':>8} "
          f"{'s/layer':>8} {'ILP vars':>9}")
    for layers in args.layers:
        capture_s, passes, solve, rewrite, total, variables = min(run(layers, args.tp) for _ in range(args.repeat))
        print(f"{layers:>6} {capture_s:>10.2f} {passes:>9.2f} {solve:>8.2f} {rewrite:>10.2f} {total:>8.2f} "
              f"{total / layers:>8.3f} {variables:>9}")


def run(layers: int, tp: int) -> tuple:
    """(capture, other plan passes, solve, rewrite, total seconds, ILP variables) of one plan."""
    cfg = LlamaConfig(vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_hidden_layers=layers,
                      num_attention_heads=64, num_key_value_heads=8)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    ids = torch.randint(0, 128256, (1, 8))
    _capture_s.clear()
    t0 = time.perf_counter()
    plan = make_plan(model, (ids,), world_size=tp)
    t1 = time.perf_counter()
    plan.rewritten()
    t2 = time.perf_counter()
    solve = plan.ctx.solver_stats["seconds"]
    capture_s = sum(_capture_s)
    total = t2 - t0
    return capture_s, (t1 - t0) - capture_s - solve, solve, t2 - t1, total, plan.ctx.solver_stats["variables"]


if __name__ == "__main__":
    main()
