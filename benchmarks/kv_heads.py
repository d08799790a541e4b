"""GQA shapes with fewer kv heads than ranks: autotp before and after kv-head replication, beside
the Megatron / vLLM optimum, and planning time.

    python benchmarks/kv_heads.py [--layers 4] [--plan-layers 80]

Planned on the meta device (no weights, no process group).  Per layer, forward: the collectives
and their time in the cost report at batch 4 x seq 2048, bf16, NVLink (H100), and the weight
MiB per rank.  "before" is the plan with the k/v projections pinned to their least-memory split
(what autotp chose before it could keep a kv head whole); "after" is the free plan; "optimum" is
Megatron's two all-reduces of the (batch, seq, hidden) activations, kv heads replicated N/H_kv
times (vLLM; Megatron refuses head counts that do not divide).  Then the planning time of the
8B and 70B shapes at N = 8 and 16 (``--layers``) and of the full 80 layers.
"""
import argparse
import time

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

import autotp
from autotp import cost
from autotp.placement import S
from autotp.report import report_data
from machine import machine

SHAPES = {   # name: (hidden, ffn, heads, kv heads, vocab)
    "Llama-3-8B": (4096, 14336, 32, 8, 128256),
    "Qwen2.5-7B": (3584, 18944, 28, 4, 152064),
    "Llama-3-70B": (8192, 28672, 64, 8, 128256),
}
ROWS = [("Llama-3-8B", 16), ("Llama-3-8B", 8), ("Qwen2.5-7B", 8), ("Qwen2.5-7B", 4), ("Llama-3-70B", 16)]
BATCH, SEQ = 4, 2048


def model(name: str, layers: int):
    hidden, ffn, heads, kv, vocab = SHAPES[name]
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=ffn, num_attention_heads=heads, num_key_value_heads=kv,
                      num_hidden_layers=layers, vocab_size=vocab)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(cfg)


def layer_row(plan) -> tuple[str, float, float]:
    """Layer 1's forward collectives, their time (us) and the plan's weight MiB per rank."""
    data = report_data(plan, batch=BATCH, seq=SEQ)
    rows = [r for r in data["collectives"] if r.get("layer") == 1 and r.get("forward")]
    kinds: dict = {}
    for r in rows:
        kinds[r["forward"]] = kinds.get(r["forward"], 0) + 1
    us = sum(r["forward_time_s"] for r in rows) * 1e6
    mib = data["memory"]["parameters_per_rank"] * 2 / 2**20
    return " + ".join(f"{n} {k.replace('_', '-')}" for k, n in sorted(kinds.items())) or "none", us, mib


def optimum_us(name: str, world: int) -> float:
    hidden = SHAPES[name][0]
    return 2 * cost.collective_time(cost.ALL_REDUCE, BATCH * SEQ * hidden * 2, world) * 1e6


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--plan-layers", type=int, default=80)
    args = ap.parse_args()
    ids = torch.randint(0, 100, (2, 8))
    print(f"machine: {machine()}; report at batch {BATCH} x seq {SEQ}, bf16, nvlink-h100; {args.layers} layers\n")
    print("| shape | N | autotp before (per layer fwd) | us | after | us | optimum (2 all-reduce) us "
          "| weights MiB/rank before -> after |")
    print("|---|---|---|---|---|---|---|---|")
    for name, world in ROWS:
        m = model(name, args.layers)
        pins = {f"model.layers.{i}.self_attn.{p}_proj.weight": S(0) for i in range(args.layers) for p in "kv"}
        try:
            before = layer_row(autotp.plan(m, (ids,), world_size=world, overrides=pins))
        except Exception as e:  # noqa: BLE001 — a head dim that does not divide: no such split
            before = (f"({type(e).__name__})", float("nan"), float("nan"))
        after = layer_row(autotp.plan(m, (ids,), world_size=world))
        print(f"| {name} | {world} | {before[0]} | {before[1]:.1f} | {after[0]} | {after[1]:.1f} | "
              f"{optimum_us(name, world):.1f} | {before[2]:.0f} -> {after[2]:.0f} |")
    print("\n| shape | N | layers | plan seconds |\n|---|---|---|---|")
    for name in ("Llama-3-8B", "Llama-3-70B"):
        for world in (8, 16):
            for layers in (args.layers, args.plan_layers):
                m = model(name, layers)
                t = time.perf_counter()
                autotp.plan(m, (ids,), world_size=world)
                print(f"| {name} | {world} | {layers} | {time.perf_counter() - t:.1f} |")


if __name__ == "__main__":
    main()
