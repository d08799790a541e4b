"""Per-rank training throughput of one tensor-parallel rank at real shapes (issue 8, items 4-5).

    python benchmarks/throughput.py                       # CUDA: Llama-70B shapes, TP 8, bf16
    python benchmarks/throughput.py --compile             # also under torch.compile
    python benchmarks/throughput.py --device cpu --tiny   # a smoke run of the same code on CPU

One process and torch's fake process group of ``--tp`` ranks: collectives cost nothing, so the
figures are rank 0's compute alone.  A few decoder layers of the Llama-70B shape (d 8192, 64
heads, 8 kv heads, ffn 28672, vocab 128256) are built on the device, then:

  autotp        ``autotp.parallelize`` on the fake group (rank 0's shards)
  hand-written  torchtitan's DTensor plan (ColwiseParallel q/k/v/gate/up, RowwiseParallel o/down,
                vocab-parallel embedding, lm_head column-parallel with replicated output)
  local         the plain HF model at the shard's shapes (heads/N, kv heads/N, ffn/N, vocab/N):
                the compute one rank does, with no parallel machinery at all

Each step is forward + backward (cross entropy on shifted ids); the table gives the median step
time over ``--reps`` after ``--warmup``, tokens/s, and MFU = model FLOPs of one rank per step /
step time / the device's peak dense bf16 FLOP/s (H100/H200 SXM: 989e12; ``--peak`` to override).
FLOPs of a rank: 6 x its matmul parameters x tokens + attention 12 x layers x batch x seq^2 x
(heads/N x head_dim) (causal: half of it counted, as flash attention does the work).  Then, per
decoder layer, the cost report's predicted communication time at this shape for NVLink and
InfiniBand next to the measured compute time (item 5: where TP stops paying off).
"""
import argparse
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
from comm_vs_handwritten import machine, torchtitan_plan  # noqa: E402

import autotp  # noqa: E402
from autotp.report import report_data  # noqa: E402

LLAMA_70B = dict(model_type="llama", hidden_size=8192, intermediate_size=28672, num_attention_heads=64,
                 num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rms_norm_eps=1e-5)
TINY = dict(model_type="llama", hidden_size=64, intermediate_size=128, num_attention_heads=8,
            num_key_value_heads=8, vocab_size=256, max_position_embeddings=256)
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def build(cfg: dict, layers: int, dtype, device):
    from transformers import AutoConfig, AutoModelForCausalLM
    config = AutoConfig.for_model(**cfg, num_hidden_layers=layers)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model


def local_config(cfg: dict, tp: int) -> dict:
    """The shapes one rank computes: heads, kv heads, ffn and vocab divided by ``tp``."""
    out = dict(cfg, num_attention_heads=cfg["num_attention_heads"] // tp,
               num_key_value_heads=max(1, cfg["num_key_value_heads"] // tp),
               intermediate_size=cfg["intermediate_size"] // tp, vocab_size=cfg["vocab_size"] // tp)
    out["head_dim"] = cfg["hidden_size"] // cfg["num_attention_heads"]
    return out


def rank_flops(cfg: dict, layers: int, tp: int, batch: int, seq: int) -> float:
    d, f, h, kv, v = (cfg[k] for k in ("hidden_size", "intermediate_size", "num_attention_heads",
                                       "num_key_value_heads", "vocab_size"))
    hd = d // h
    per_layer = d * (h * hd) + 2 * d * (kv * hd) + (h * hd) * d + 3 * d * f        # q, k, v, o, gate/up/down
    params = (layers * per_layer + d * v) / tp                                       # + lm_head (embedding: a lookup)
    tokens = batch * seq
    attention = 12 * layers * batch * seq * seq * (h // tp) * hd / 2                # causal
    return 6 * params * tokens + attention


def step(model, ids):
    out = model(ids)
    logits = out.logits
    if hasattr(logits, "full_tensor"):
        logits = logits.full_tensor()
    F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten()).backward()


def timed(model, ids, reps: int, warmup: int, device) -> float:
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    for _ in range(warmup):
        step(model, ids)
        model.zero_grad(set_to_none=True)
    times = []
    for _ in range(reps):
        sync()
        t = time.perf_counter()
        step(model, ids)
        sync()
        times.append(time.perf_counter() - t)
        model.zero_grad(set_to_none=True)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes (smoke run on CPU)")
    ap.add_argument("--tp", type=int, default=8)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--seq", type=int, nargs="+", default=[2048, 4096])
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--compile", action="store_true", help="also time each model under torch.compile")
    ap.add_argument("--peak", type=float, help="peak dense FLOP/s of the device (default: from its name)")
    args = ap.parse_args()
    from torch.distributed.device_mesh import init_device_mesh
    from torch.testing._internal.distributed.fake_pg import FakeStore
    cfg = TINY if args.tiny else LLAMA_70B
    dtype = getattr(torch, args.dtype)
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else machine()
    peak = args.peak or next((v for k, v in PEAK_BF16.items() if k in name), None)
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=args.tp)
    mesh = init_device_mesh(args.device.split(":")[0], (args.tp,), mesh_dim_names=("tp",))
    print(f"device: {name}; torch {torch.__version__}; fake process group of {args.tp} (compute only); "
          f"{'tiny' if args.tiny else 'Llama-70B'} shape, {args.layers} decoder layers, {args.dtype}; "
          f"peak {peak / 1e12 if peak else float('nan'):.0f} TFLOP/s")
    header = f"{'batch':>5} {'seq':>5} {'plan':<13} {'mode':<8} {'step ms':>9} {'tokens/s':>10} {'MFU':>6} {'vs hand':>8}"
    print(header)
    print("-" * len(header))
    per_layer_compute = {}
    for batch in args.batch:
        for seq in args.seq:
            ids = torch.randint(0, cfg["vocab_size"] // args.tp, (batch, seq), device=args.device)
            flops = rank_flops(cfg, args.layers, args.tp, batch, seq)
            models = {}
            torch.manual_seed(0)
            models["autotp"] = autotp.parallelize(build(cfg, args.layers, dtype, args.device), (ids,), mesh=mesh,
                                                  check_plan=False)
            torch.manual_seed(0)
            models["hand-written"] = torchtitan_plan(build(cfg, args.layers, dtype, args.device), mesh)
            torch.manual_seed(0)
            models["local"] = build(local_config(cfg, args.tp), args.layers, dtype, args.device)
            modes = ["eager"] + (["compile"] if args.compile else [])
            results = {}
            for mode in modes:
                for plan, model in models.items():
                    m = torch.compile(model) if mode == "compile" else model
                    results[plan, mode] = timed(m, ids, args.reps, args.warmup, args.device)
            for mode in modes:
                for plan in models:
                    t = results[plan, mode]
                    mfu = f"{flops / t / peak:.1%}" if peak else "-"
                    ratio = t / results["hand-written", mode]
                    print(f"{batch:>5} {seq:>5} {plan:<13} {mode:<8} {t * 1e3:>9.2f} {batch * seq / t:>10.0f} "
                          f"{mfu:>6} {ratio:>7.3f}x")
            per_layer_compute[batch, seq] = results["autotp", modes[-1]] / args.layers
            plan = models["autotp"].plan
            del models
            if args.device.startswith("cuda"):
                torch.cuda.empty_cache()
    print("\nper decoder layer: measured compute (autotp, rank 0) vs predicted communication (cost report, "
          f"N={args.tp}, forward + backward)")
    print(f"{'batch':>5} {'seq':>5} {'compute ms':>11} {'nvlink-h100 ms':>15} {'ib-ndr ms':>10} {'ib-hdr ms':>10}")
    for (batch, seq), compute in per_layer_compute.items():
        cells = []
        for link in ("nvlink-h100", "ib-ndr", "ib-hdr"):
            data = report_data(plan, batch=batch, seq=seq, dtype=dtype, link=link)
            layer0 = [r for r in data["collectives"] if r["layer"] == 0]
            cells.append(sum(r["forward_time_s"] + r["backward_time_s"] for r in layer0) * 1e3)
        print(f"{batch:>5} {seq:>5} {compute * 1e3:>11.2f} {cells[0]:>15.2f} {cells[1]:>10.2f} {cells[2]:>10.2f}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
