"""torch.compile per layer: one graph for the identical layers, so compile time does not grow
with depth.  Compile time (first forward + backward, inductor) of a Llama with 2 and 32 layers,
compiled per layer (``layer.compile()`` on each of ``pmodel.blocks()``) and as one model
(``torch.compile(pmodel)``), one process (world 1), CPU.

    python benchmarks/compile_layers.py [--layers 2 32] [--whole]
"""
import argparse
import os
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

from memory import _machine                  # benchmarks/memory.py: the CPU's model name


def _model(layers: int):
    from transformers import AutoConfig, AutoModelForCausalLM
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(
        model_type="llama", vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2))


def _time(layers: int, per_layer: bool) -> tuple[float, float, int]:
    import autotp
    torch._dynamo.reset()
    ids = torch.randint(0, 256, (2, 32))
    pmodel = autotp.parallelize(_model(layers), (ids,))
    if per_layer:
        for layer in pmodel.blocks():
            layer.compile()
        run = pmodel
    else:
        run = torch.compile(pmodel)
    counters = torch._dynamo.utils.counters
    counters.clear()

    def step():
        F.cross_entropy(run(ids).logits.flatten(0, 1), ids.flatten()).backward()

    t0 = time.perf_counter()
    step()
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    step()
    return first, time.perf_counter() - t0, counters["stats"]["unique_graphs"]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, nargs="+", default=[2, 32])
    ap.add_argument("--whole", action="store_true", help="also torch.compile of the whole parallel model")
    ap.add_argument("--one", type=int, nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(1)
    if not args.one:
        print(f"machine: {_machine()}, {os.cpu_count()} cores, torch {torch.__version__}; Llama d64, batch 2 x seq 32, "
              f"world 1, inductor on CPU, each run in a fresh process with an empty inductor cache")
        print(f"{'layers':>6} {'compiled':>9} {'graphs':>6} {'first step s':>13} {'next step s':>12}")
    if args.one:                            # a child: one configuration, print its numbers
        first, nxt, graphs = _time(args.one[0], bool(args.one[1]))
        print(f"{first} {nxt} {graphs}")
        return
    for layers in args.layers:
        for per_layer in (True, False) if args.whole else (True,):
            # each in a fresh process with an empty inductor cache: no graph compiled before is reused
            with tempfile.TemporaryDirectory() as cache:
                env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}
                out = subprocess.run([sys.executable, __file__, "--one", str(layers), str(int(per_layer))],
                                     env=env, capture_output=True, text=True, check=True).stdout.split()
            first, nxt, graphs = float(out[-3]), float(out[-2]), int(out[-1])
            print(f"{layers:>6} {'per layer' if per_layer else 'whole':>9} {graphs:>6} {first:>13.1f} {nxt:>12.3f}",
                  flush=True)


if __name__ == "__main__":
    main()
