"""Generation speed: prefill and per-token decode latency, tokens/s, at batch 1 and 16, for
``pmodel.generate`` at N = 1, 2, 4 (gloo processes on this CPU) beside Hugging Face's own
``generate`` of the same model on one device in the same run; and what a decode step moves.

    python benchmarks/generate.py [--worlds 1 2 4] [--batches 1 16] [--prompt 32] [--new 32] [--reps 7]

Prefill = ``generate(max_new_tokens=1)`` (the prompt's forward and one token); decode per
token = (``generate(max_new_tokens=1 + new)`` - prefill) / new, from the medians of ``--reps``
runs.  The runs interleave: each repetition runs prefill, then the full generation, each by
autotp and by Hugging Face side by side (autotp first in even repetitions, HF first in odd), so
on a shared machine whose load varies both see the same load; the table gives the load average
(1 min) before and after each row.  Greedy, no padding.  The
decode step's collectives and bytes per step (forward, full tensors moved) come from its plan
(``Generator.decode_traffic``: the step graph's collectives plus the (value, index) exchange that
picks the token from the vocab-split logits), beside what the step moved when it all-gathered the
(batch, vocab) logits instead of the exchange.
"""
import argparse
import datetime
import os
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from machine import machine                  # benchmarks/machine.py: CPU model, cores, torch

CFG = dict(model_type="llama", vocab_size=8000, hidden_size=256, intermediate_size=704, num_hidden_layers=4,
           num_attention_heads=8, num_key_value_heads=4)


def _interleaved(ours, hf, ids, new: int, reps: int) -> tuple:
    """((prefill, decode per token) of ``ours``, the same of ``hf`` or None): medians of ``reps``
    runs, each run of one right beside the same run of the other, the order alternating."""
    runs = {"ours": ours, "hf": hf} if hf is not None else {"ours": ours}
    for fn in runs.values():
        fn(ids, 2)                                              # warm up (plans the decode step)
    times = {(who, n): [] for who in runs for n in (1, 1 + new)}
    for rep in range(reps):
        order = list(runs) if rep % 2 == 0 else list(runs)[::-1]
        for n in (1, 1 + new):
            for who in order:
                t0 = time.perf_counter()
                runs[who](ids, n)
                times[who, n].append(time.perf_counter() - t0)
    med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    speeds = {who: (med[who, 1], (med[who, 1 + new] - med[who, 1]) / new) for who in runs}
    return speeds["ours"], speeds.get("hf")


def _worker(rank, world, tmp, batches, prompt, new, reps):
    import autotp
    from autotp.generation import generator
    from transformers import AutoConfig, AutoModelForCausalLM
    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(os.path.join(tmp, f"store{world}"), world), rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=600))
    rows = []
    for batch in batches:
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**CFG)).eval()
        reference = AutoModelForCausalLM.from_config(AutoConfig.for_model(**CFG)).eval() if rank == 0 else None
        if reference is not None:
            reference.load_state_dict(model.state_dict())
        ids = torch.randint(0, CFG["vocab_size"], (batch, prompt), generator=torch.Generator().manual_seed(1))
        pmodel = autotp.parallelize(model, (ids,))
        load = os.getloadavg()[0]
        with torch.no_grad():
            hf_run = None if reference is None else (
                lambda x, n: reference.generate(x, max_new_tokens=n, do_sample=False))
            ours, hf = _interleaved(lambda x, n: pmodel.generate(x, max_new_tokens=n), hf_run, ids, new, reps)
        gen = generator(pmodel)
        counts, step_bytes = gen.decode_traffic(batch, prompt + new)
        gathering = gen.decode_traffic(batch, prompt + new, k=None)[1]     # the exchange replaced by a logits all-gather
        rows.append((batch, ours, hf, counts, (step_bytes, gathering), (load, os.getloadavg()[0])))
    if rank == 0:
        with open(os.path.join(tmp, f"gen{world}.txt"), "w") as f:
            f.write(repr(rows))
    dist.destroy_process_group()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--reps", type=int, default=7)
    args = ap.parse_args()
    print(f"machine: {machine()}; Llama d{CFG['hidden_size']} x {CFG['num_hidden_layers']} layers, vocab "
          f"{CFG['vocab_size']}, fp32, one thread a rank, prompt {args.prompt}, {args.new} new tokens, greedy, medians "
          f"of {args.reps} interleaved runs; gloo ranks on this CPU (N > cores: ranks share cores)")
    print(f"{'N':>2} {'batch':>5} {'prefill ms':>10} {'HF prefill':>10} {'decode ms/tok':>13} {'HF decode':>9} "
          f"{'tok/s':>7} {'HF tok/s':>8} {'vs HF':>6} {'load':>9}  decode step: collectives (bytes; with the logits "
          f"gathered)")
    with tempfile.TemporaryDirectory() as tmp:
        for world in args.worlds:
            mp.start_processes(_worker, args=(world, tmp, args.batches, args.prompt, args.new, args.reps),
                               nprocs=world, start_method="spawn")
            rows = eval(open(os.path.join(tmp, f"gen{world}.txt")).read())
            for batch, (pre, dec), (hpre, hdec), counts, (step_bytes, gathering), (load0, load1) in rows:
                print(f"{world:>2} {batch:>5} {pre * 1e3:>10.1f} {hpre * 1e3:>10.1f} {dec * 1e3:>13.2f} "
                      f"{hdec * 1e3:>9.2f} {batch / dec:>7.0f} {batch / hdec:>8.0f} {hdec / dec:>6.2f} "
                      f"{load0:>4.1f}-{load1:<4.1f}  {counts} ({step_bytes:,} B; {gathering:,} B)")


if __name__ == "__main__":
    main()
