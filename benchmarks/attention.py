"""Benchmark causal attention: naive PyTorch, SDPA (flash backend), autotp's Triton
FlashAttention kernel and, when installed, ``flash_attn.flash_attn_func``.

For each sequence length (batch * heads held fixed) it reports forward and
forward+backward latency, TFLOP/s and the peak extra CUDA memory of one call.

TFLOP/s use the usual model-FLOPs convention: forward = 4 * B * H * L^2 * D
(two matmuls), halved when causal; forward+backward = 3.5x forward (the
backward has five matmuls to the forward's two). Work an implementation
repeats (e.g. recomputing P twice in the backward) is not counted.

Without a CUDA GPU the script says so, runs a tiny fp32 check of the Triton
kernel against the reference under the Triton CPU interpreter, and exits 0.

    python benchmarks/attention.py [--batch 2] [--heads 16] [--seqlens 1024 2048 ...]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Callable

import torch

# Make ``autotp`` importable when run as ``python benchmarks/attention.py`` from a checkout.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PROVIDERS = ("naive", "sdpa_flash", "triton", "flash_attn")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--seqlens", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    parser.add_argument("--non-causal", action="store_true", help="benchmark full (non-causal) attention")
    parser.add_argument("--providers", nargs="+", default=list(PROVIDERS), choices=PROVIDERS)
    parser.add_argument("--warmup", type=int, default=5, help="untimed calls before timing")
    parser.add_argument("--rep", type=int, default=20, help="timed calls; the median is reported")
    return parser.parse_args()


# --------------------------------------------------------------------------- #
# Implementations. Each entry maps (q, k, v) in (B, H, L, D) layout to a
# prepared closure, so that layout conversions happen outside the timed region.
# --------------------------------------------------------------------------- #
def naive_attention(q, k, v, causal: bool):
    """Plain matmul-softmax-matmul in the input dtype; materialises the (L, L) scores."""
    scores = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
    if causal:
        visible = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~visible, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


def make_provider(name: str, q, k, v, causal: bool):
    """Returns ``(inputs, fn)``: leaf tensors to differentiate and a call producing the output."""
    if name == "naive":
        return (q, k, v), lambda: naive_attention(q, k, v, causal)
    if name == "sdpa_flash":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        def sdpa():
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)
        return (q, k, v), sdpa
    if name == "triton":
        from autotp.kernels.flash_attention import triton_flash_attention
        return (q, k, v), lambda: triton_flash_attention(q, k, v, causal=causal)
    if name == "flash_attn":
        from flash_attn import flash_attn_func  # optional dependency; caller checks availability
        # flash_attn wants (B, L, H, D); convert once, outside the timed call.
        qt, kt, vt = (t.detach().transpose(1, 2).contiguous().requires_grad_() for t in (q, k, v))
        return (qt, kt, vt), lambda: flash_attn_func(qt, kt, vt, causal=causal)
    raise ValueError(name)


# --------------------------------------------------------------------------- #
# Measurement
# --------------------------------------------------------------------------- #
def cuda_time_ms(fn: Callable[[], None], warmup: int, rep: int) -> float:
    """Median wall time of ``fn`` on the current stream, in milliseconds."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(rep)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(rep)]
    for start, end in zip(starts, ends):
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    times = sorted(s.elapsed_time(e) for s, e in zip(starts, ends))
    return times[len(times) // 2]


def peak_extra_mib(fn: Callable[[], None]) -> float:
    """Peak memory allocated by one call of ``fn`` beyond what was live before it."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def measure(inputs, attn: Callable, dout, args) -> dict[str, tuple[float, float] | None]:
    """``{"fwd": (ms, MiB), "fwd+bwd": (ms, MiB)}``; a mode that runs out of memory maps to None."""
    def forward():
        with torch.no_grad():  # inference: no autograd graph or saved activations
            attn()

    def forward_backward():
        for t in inputs:
            t.grad = None  # overwrite instead of accumulating into old grads
        attn().backward(dout)

    result = {}
    for mode, fn in (("fwd", forward), ("fwd+bwd", forward_backward)):
        try:
            result[mode] = (cuda_time_ms(fn, args.warmup, args.rep), peak_extra_mib(fn))
        except torch.cuda.OutOfMemoryError:
            result[mode] = None
        torch.cuda.empty_cache()
    return result


def run_cuda(args: argparse.Namespace) -> None:
    providers = list(args.providers)
    if "flash_attn" in providers:
        try:
            import flash_attn  # noqa: F401
        except ImportError:
            print("flash_attn not importable: skipping that provider")
            providers.remove("flash_attn")

    causal = not args.non_causal
    dtype = torch.bfloat16
    batch, heads, head_dim = args.batch, args.heads, args.head_dim
    print(f"device: {torch.cuda.get_device_name()} | dtype: bf16 | batch={batch} heads={heads} "
          f"head_dim={head_dim} causal={causal} | median of {args.rep} after {args.warmup} warmup")
    print("TFLOP/s = model FLOPs (see module docstring); MiB = peak extra memory of one call")

    check_triton_against_sdpa(batch, heads, head_dim, causal)

    header = f"{'L':>6} {'provider':<11} {'fwd ms':>9} {'fwd TF/s':>9} {'fwd MiB':>9} " \
             f"{'f+b ms':>9} {'f+b TF/s':>9} {'f+b MiB':>9}"
    print(header)
    print("-" * len(header))
    for seqlen in args.seqlens:
        fwd_flops = 4 * batch * heads * seqlen * seqlen * head_dim * (0.5 if causal else 1.0)
        flops = {"fwd": fwd_flops, "fwd+bwd": 3.5 * fwd_flops}
        gen = torch.Generator(device="cuda").manual_seed(0)
        q, k, v, dout = (torch.randn(batch, heads, seqlen, head_dim, device="cuda", dtype=dtype, generator=gen)
                         for _ in range(4))
        q, k, v = (t.requires_grad_() for t in (q, k, v))
        for name in providers:
            inputs, attn = make_provider(name, q, k, v, causal)
            grad_out = dout.transpose(1, 2).contiguous() if name == "flash_attn" else dout
            cells = []
            for mode, r in measure(inputs, attn, grad_out, args).items():
                if r is None:
                    cells.append(f"{'OOM':>9} {'-':>9} {'-':>9}")
                else:
                    ms, mib = r
                    cells.append(f"{ms:>9.3f} {flops[mode] / ms * 1e-9:>9.1f} {mib:>9.0f}")
            print(f"{seqlen:>6} {name:<11} " + " ".join(cells), flush=True)
            del inputs, attn, grad_out  # closures may hold large buffers; free before the next provider
            for t in (q, k, v):
                t.grad = None
            torch.cuda.empty_cache()
        del q, k, v, dout


def check_triton_against_sdpa(batch: int, heads: int, head_dim: int, causal: bool) -> None:
    """One-off bf16 comparison so that a broken kernel cannot post a fast time unnoticed."""
    from autotp.kernels.flash_attention import triton_flash_attention

    q, k, v = (torch.randn(batch, heads, 1000, head_dim, device="cuda", dtype=torch.bfloat16)
               for _ in range(3))
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)
    got = triton_flash_attention(q, k, v, causal=causal)
    print(f"sanity: max |triton - sdpa| at L=1000 = {(got.float() - want.float()).abs().max().item():.2e}")


def run_cpu_sanity() -> bool:
    """Tiny fp32 forward/backward check of the Triton kernel under the CPU interpreter."""
    from autotp.kernels.flash_attention import attention_reference, triton_flash_attention

    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 4, 48, 32, generator=gen, requires_grad=True)
    k, v = (torch.randn(1, 2, 48, 32, generator=gen, requires_grad=True) for _ in range(2))
    dout = torch.randn(1, 4, 48, 32, generator=gen)
    ok = True
    for causal in (False, True):
        # 16x16 tiles so that L=48 spans several tiles, including the causal diagonal.
        outs = [triton_flash_attention(q, k, v, causal=causal, block_m=16, block_n=16),
                attention_reference(q, k, v, causal=causal)]
        grads = [torch.autograd.grad(o, (q, k, v), dout) for o in outs]
        errors = {"out": (outs[0] - outs[1]).abs().max().item()}
        errors.update({n: (a - b).abs().max().item() for n, a, b in zip(("dq", "dk", "dv"), *grads)})
        passed = max(errors.values()) < 1e-4
        ok &= passed
        print(f"  causal={causal}: max abs err " + ", ".join(f"{n}={e:.1e}" for n, e in errors.items())
              + ("  OK" if passed else "  FAILED"))
    return ok


def main() -> int:
    args = parse_args()
    if torch.cuda.is_available():
        run_cuda(args)
        return 0
    print("No CUDA GPU present: skipping the timing benchmark.")
    # Must be set before the kernel module is imported (triton.jit reads it at decoration).
    os.environ.setdefault("TRITON_INTERPRET", "1")
    print("Running a tiny CPU sanity check of the Triton kernel (GQA 4:2, L=48, D=32, 16x16 tiles, fp32) "
          "under TRITON_INTERPRET=1:")
    if not run_cpu_sanity():
        print("CPU sanity check FAILED")
        return 1
    print("CPU sanity check passed.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
