"""The memory estimate (``Plan.memory``) against measured peaks, and the measuring tool itself.

The estimate runs this rank's program on the meta device; the measurement runs the real step on
gloo ranks and counts what is alive (``autotp.memory.LiveBytes``).  At N = 1, 2, 4 and on a
(dp 2 x tp 2) mesh with per-layer FSDP2, with and without activation checkpointing, the estimate
is within 15% of the measured peak of the fullest rank (``benchmarks/memory.py --estimate``
prints the same rows as a table).
"""
import os
import sys
import tempfile

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
from memory import run_estimates  # noqa: E402

LAYOUTS = {1: [(1, None), (1, "full")], 2: [(1, None), (1, "full")], 4: [(1, None), (1, "full"), (2, None), (2, "full")]}


@pytest.fixture(scope="module")
def rows():
    with tempfile.TemporaryDirectory() as tmp:
        return run_estimates(tmp, LAYOUTS)


def test_estimate_is_within_15_percent_of_the_measured_peak(rows):
    assert len(rows) == sum(len(v) for v in LAYOUTS.values())
    for world, dp, tp, checkpointing, measured, estimated, parts in rows:
        print(f"tp {tp} dp {dp} {checkpointing}: measured {measured / 1e3:.0f} kB, estimate {estimated / 1e3:.0f} kB "
              f"({estimated / measured - 1:+.1%}) {parts}")
        assert abs(estimated / measured - 1) <= 0.15, (tp, dp, checkpointing, measured, estimated)


def test_checkpointing_lowers_both_the_estimate_and_the_measured_peak(rows):
    by = {(tp, dp, ac): (m, e, parts) for _, dp, tp, ac, m, e, parts in rows}
    for tp, dp, _ in [k for k in by if k[2] is None]:
        m0, e0, p0 = by[(tp, dp, None)]
        m1, e1, p1 = by[(tp, dp, "full")]
        assert m1 < m0 and e1 < e0 and p1["activations"] < 0.4 * p0["activations"], (tp, dp)


def test_live_bytes_counts_what_stays_alive():
    from autotp.memory import LiveBytes
    base = torch.ones(1000)
    with LiveBytes() as mem:
        kept = base * 2                         # 4000 bytes, kept
        view = kept.view(10, 100)               # a view: no new memory
        tmp = base + 1                          # 4000 bytes, freed below
        del tmp
        resized = base * 3
        resized.untyped_storage().resize_(0)    # freed in place, as FSDP2 frees a gathered parameter
    assert view.untyped_storage().nbytes() == 4000
    assert mem.live == 4000, mem.live
    assert mem.peak == 8000, mem.peak          # kept + tmp, then kept + resized: never all three


def test_cli_prints_whether_a_70b_step_fits(capsys):
    from autotp.__main__ import main
    here = os.path.join(os.path.dirname(__file__), "..", "examples", "configs", "llama-70b.json")
    assert main(["plan", here, "--tp", "8", "--layers", "2", "--batch", "1", "--seq", "4096", "--memory",
                 "--dp", "4", "--checkpointing", "full"]) == 0
    out = capsys.readouterr().out
    assert "memory per rank: tp 8 x dp 4" in out and "activations" in out and "fits 80 GB" in out, out
