"""The communication cost model: bytes x algorithm factor / link bandwidth + latency.

Per-rank bytes on the wire for a tensor of ``B`` bytes (full, unsharded size) on ``N`` ranks,
ring algorithms (what NCCL and gloo use for large messages):

=================  =====================  ==========================================
collective         factor (x B)           why
=================  =====================  ==========================================
all-reduce         2(N-1)/N               reduce-scatter then all-gather
all-gather         (N-1)/N                receive every other rank's shard
reduce-scatter     (N-1)/N                send every other rank its partial shard
all-to-all         (N-1)/N^2              send (N-1)/N of one local shard (B/N)
=================  =====================  ==========================================

time = latency + factor x B / bandwidth.
"""
from __future__ import annotations

import dataclasses

ALL_REDUCE, ALL_GATHER, REDUCE_SCATTER, ALL_TO_ALL = "all_reduce", "all_gather", "reduce_scatter", "all_to_all"


@dataclasses.dataclass(frozen=True)
class Link:
    name: str
    bandwidth: float          # bytes/s per GPU, one direction
    latency: float            # seconds per collective
    note: str = ""


LINKS = {
    "nvlink-h100": Link("nvlink-h100", 900e9, 5e-6, "NVLink 4 via NVSwitch, H100 SXM (900 GB/s)"),
    "ib-hdr": Link("ib-hdr", 25e9, 10e-6, "InfiniBand HDR, 200 Gb/s = 25 GB/s per GPU"),
    "ib-ndr": Link("ib-ndr", 50e9, 10e-6, "InfiniBand NDR, 400 Gb/s = 50 GB/s per GPU"),
    "pcie5": Link("pcie5", 64e9, 10e-6, "PCIe 5.0 x16 (64 GB/s one direction)"),
}


@dataclasses.dataclass(frozen=True)
class Device:
    name: str
    peak: dict            # dtype -> dense tensor-core FLOP/s
    note: str = ""


def _devices() -> dict:
    import torch
    return {
        "h100-sxm": Device("h100-sxm", {torch.bfloat16: 989e12, torch.float16: 989e12, torch.float32: 494.5e12},
                           "H100 SXM dense tensor-core peak: bf16/fp16 989 TFLOP/s, tf32 494.5 TFLOP/s"),
        "a100": Device("a100", {torch.bfloat16: 312e12, torch.float16: 312e12, torch.float32: 156e12},
                       "A100 SXM dense tensor-core peak: bf16/fp16 312 TFLOP/s, tf32 156 TFLOP/s"),
    }


DEVICES = _devices()


def compute_time(flops: float, dtype, device="h100-sxm") -> float:
    """Seconds for ``flops`` of matmul-class work at ``device``'s dense peak for ``dtype`` (a
    lower bound: the solver weighs compute against communication with it, the way the report's
    scaling section does)."""
    d = device if isinstance(device, Device) else DEVICES[device]
    return flops / d.peak.get(dtype, d.peak[next(iter(d.peak))])


def get_link(link) -> Link:
    """A preset name, a ``Link`` or a bandwidth in bytes/s."""
    if isinstance(link, Link):
        return link
    if isinstance(link, (int, float)):
        return Link(f"custom-{link / 1e9:g}GB/s", float(link), 10e-6, "user-given bandwidth")
    try:
        return LINKS[link]
    except KeyError:
        raise ValueError(f"unknown link {link!r}; presets: {', '.join(LINKS)}, or pass bytes/s as a number") from None


def factor(kind: str, world: int) -> float:
    n = world
    return {ALL_REDUCE: 2 * (n - 1) / n, ALL_GATHER: (n - 1) / n, REDUCE_SCATTER: (n - 1) / n,
            ALL_TO_ALL: (n - 1) / (n * n)}[kind]


def collective_time(kind: str, nbytes: float, world: int, link="nvlink-h100") -> float:
    """Seconds for one collective over a tensor of ``nbytes`` (its full size)."""
    if world <= 1:
        return 0.0
    lk = get_link(link)
    return lk.latency + factor(kind, world) * nbytes / lk.bandwidth
