"""Random small transformers on real gloo groups: each draw matches one device or fails clearly.

The longer, by-hand run of ``tests/test_random_models.py`` (same space, same checks):

    python benchmarks/random_models.py --draws 30 --world 2,3,4          # 30 draws per world size
    python benchmarks/random_models.py --draws 30 --world 3 --seed 7     # other draws
    python benchmarks/random_models.py --draws 10 --size-one             # examples of batch/seq 1 too
    python benchmarks/random_models.py --world 3 --config '{"model_type": "llama", ...}' \\
        --batch 2 --seq 8 --other 3,5                                     # re-run one draw

Prints every draw (config, example and other shape) and its outcome: ``ok`` with the errors
relative to scale, ``clear-error`` with the AutoTPError text, or ``WRONG`` / ``BAD-ERROR``
(a failure: a wrong number, or an error that is not a clear AutoTPError at parallelize time).
Every world size's draws run ``--chunk`` at a time in one start of ``max(world)`` processes
(starting them costs 10-20 s), each world size on a sub-mesh, as in the test.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

from test_random_models import SEED, collect, describe, outcome, run_draws  # noqa: E402


def run(chosen: dict[int, list[dict]], chunk: int) -> list[tuple[int, int, str]]:
    """Check ``chosen`` ({world: draws}), ``chunk`` draws per world size per process start;
    print each draw and its verdict; return (world, index, verdict) of the failures."""
    failures = []
    longest = max(len(ds) for ds in chosen.values())
    for start in range(0, longest, chunk):
        part = {w: ds[start:start + chunk] for w, ds in chosen.items() if ds[start:start + chunk]}
        t0 = time.time()
        results = run_draws(part)
        for world, ds in sorted(part.items()):
            for i, d in enumerate(ds):
                kind, detail = outcome([results[world][r][i] for r in range(world)])
                print(f"[world {world}] {describe(start + i, d)}")
                print(f"  -> {kind}: {detail if kind == 'ok' else _indent(detail)}")
                if kind in ("WRONG", "BAD-ERROR"):
                    failures.append((world, start + i, kind))
        print(f"{sum(len(ds) for ds in part.values())} draws in {time.time() - t0:.1f} s", flush=True)
    return failures


def _indent(text: str) -> str:
    return "\n     ".join(text.strip().splitlines())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--draws", type=int, default=10, help="draws per world size")
    ap.add_argument("--world", default="2,3,4", help="world sizes, comma-separated")
    ap.add_argument("--seed", type=int, default=SEED)
    ap.add_argument("--chunk", type=int, default=10, help="draws per world size per process start")
    ap.add_argument("--size-one", action="store_true",
                    help="let the example's batch and sequence be 1 (export specialises them: see the test)")
    ap.add_argument("--config", help="re-run one config (JSON) instead of drawing")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=8)
    ap.add_argument("--other", default="3,5", help="the other batch,seq to run after planning")
    args = ap.parse_args(argv)
    worlds = [int(w) for w in args.world.split(",")]
    t0 = time.time()
    if args.config:
        one = dict(config=json.loads(args.config), batch=args.batch, seq=args.seq,
                   other=tuple(int(x) for x in args.other.split(",")))
        chosen = {w: [one] for w in worlds}
    else:
        chosen = {w: collect(args.draws, w, args.seed, args.size_one) for w in worlds}
    failures = run(chosen, args.chunk)
    total = sum(len(ds) for ds in chosen.values())
    print(f"\n{total} draws over world sizes {worlds} in {time.time() - t0:.0f} s; {len(failures)} failure(s)"
          + "".join(f"\n  world {w} draw{i}: {k}" for w, i, k in failures))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
