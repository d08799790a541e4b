"""Tests for the Triton FlashAttention kernels against the fp32 PyTorch reference.

Without CUDA the kernels run under Triton's CPU interpreter; shapes are kept
tiny and block sizes small (16/32) so that short odd-length sequences still
cross several tiles, partial tail tiles and the causal diagonal. With CUDA the
same tests run on the GPU, plus larger bf16 cases (``test_cuda_bf16``).
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    # Must precede the first import of the kernel module: @triton.jit reads
    # the flag when the kernels are decorated.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from autotp.kernels.flash_attention import (  # noqa: E402
    attention_reference,
    triton_flash_attention,
)

# fp32: the kernel and the reference differ only in summation order and
# exp vs exp2, so errors are ~1e-6; 1e-4 leaves headroom without hiding bugs.
FP32_TOL = dict(rtol=1e-4, atol=1e-4)
# bf16 has an 8-bit mantissa (eps = 2^-8 ~ 3.9e-3); outputs are O(1), so allow
# ~2-4 ulp at magnitude 1-2 for the extra rounding of P before the PV matmul.
BF16_FWD_TOL = dict(rtol=2e-2, atol=2e-2)
# bf16 gradients go through more rounded matmuls (dP, dS, dQ/dK/dV).
BF16_BWD_TOL = dict(rtol=5e-2, atol=5e-2)

CUDA = torch.device("cuda") if torch.cuda.is_available() else None
# The interpreter needs CPU tensors and compiled kernels need CUDA ones, so the
# small-shape tests below run wherever the kernels run.
DEVICE = CUDA if CUDA is not None else torch.device("cpu")


def _make_inputs(batch, heads_q, heads_kv, seqlen_q, seqlen_k, head_dim, dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype).requires_grad_()

    q = rand(batch, heads_q, seqlen_q, head_dim)
    k = rand(batch, heads_kv, seqlen_k, head_dim)
    v = rand(batch, heads_kv, seqlen_k, head_dim)
    dout = torch.randn(batch, heads_q, seqlen_q, head_dim, generator=gen).to(device=device, dtype=dtype)
    return q, k, v, dout


def _check(q, k, v, dout, *, causal, fwd_tol, bwd_tol=None, softmax_scale=None, **blocks):
    """Compare output (and gradients if ``bwd_tol``) of the kernel with the fp32 reference."""
    out = triton_flash_attention(q, k, v, causal=causal, softmax_scale=softmax_scale, **blocks)
    # Reference on fp32 copies so that its own rounding does not count against the kernel.
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    ref = attention_reference(q32, k32, v32, causal=causal, softmax_scale=softmax_scale)
    assert out.dtype == q.dtype and out.shape == q.shape
    torch.testing.assert_close(out.float(), ref, **fwd_tol)
    if bwd_tol is None:
        return
    grads = torch.autograd.grad(out, (q, k, v), dout)
    ref_grads = torch.autograd.grad(ref, (q32, k32, v32), dout.float())
    for name, got, want, inp in zip(("dq", "dk", "dv"), grads, ref_grads, (q, k, v)):
        assert got.dtype == inp.dtype and got.shape == inp.shape, name
        torch.testing.assert_close(got.float(), want, **bwd_tol, msg=lambda m: f"{name}: {m}")


# (batch, heads_q, heads_kv, seqlen, head_dim, block_m, block_n)
FP32_CASES = [
    pytest.param(1, 2, 2, 37, 16, 16, 16, id="mha-L37-d16-b16x16"),
    pytest.param(2, 4, 2, 50, 16, 16, 32, id="gqa2-L50-d16-b16x32"),
    pytest.param(1, 4, 1, 50, 64, 32, 16, id="mqa-L50-d64-b32x16"),
    pytest.param(1, 4, 2, 64, 64, 16, 16, id="gqa2-L64-d64-even"),
]


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("batch,heads_q,heads_kv,seqlen,head_dim,block_m,block_n", FP32_CASES)
def test_fp32_forward_backward(batch, heads_q, heads_kv, seqlen, head_dim, block_m, block_n, causal):
    q, k, v, dout = _make_inputs(batch, heads_q, heads_kv, seqlen, seqlen, head_dim, torch.float32, DEVICE)
    _check(q, k, v, dout, causal=causal, fwd_tol=FP32_TOL, bwd_tol=FP32_TOL,
           block_m=block_m, block_n=block_n)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("seqlen_q,seqlen_k", [(20, 45), (45, 20)])
def test_fp32_unequal_lengths(seqlen_q, seqlen_k, causal):
    # Causal stays top-left aligned (query i sees keys j <= i), as in SDPA.
    q, k, v, dout = _make_inputs(1, 2, 1, seqlen_q, seqlen_k, 32, torch.float32, DEVICE)
    _check(q, k, v, dout, causal=causal, fwd_tol=FP32_TOL, bwd_tol=FP32_TOL, block_m=16, block_n=16)


def test_fp32_custom_scale_default_blocks():
    q, k, v, dout = _make_inputs(1, 2, 2, 70, 70, 32, torch.float32, DEVICE, seed=1)
    _check(q, k, v, dout, causal=True, fwd_tol=FP32_TOL, bwd_tol=FP32_TOL, softmax_scale=0.3)


def test_noncontiguous_inputs():
    # (B, L, H, D) storage viewed as (B, H, L, D), the usual layout after a QKV projection.
    gen = torch.Generator().manual_seed(2)
    q, k, v, dout = (torch.randn(1, 37, 2, 16, generator=gen).to(DEVICE).transpose(1, 2) for _ in range(4))
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    assert not q.is_contiguous()
    _check(q, k, v, dout, causal=True, fwd_tol=FP32_TOL, bwd_tol=FP32_TOL, block_m=16, block_n=16)


def test_bf16_forward():
    q, k, v, dout = _make_inputs(1, 4, 2, 50, 50, 64, torch.bfloat16, DEVICE, seed=3)
    _check(q, k, v, dout, causal=True, fwd_tol=BF16_FWD_TOL, block_m=16, block_n=32)


def test_bf16_default_tiles():
    # Default GPU tiles (forward 64x64, backward 64x32 at D=64) over 150 tokens:
    # several tiles and a partial tail in every kernel.
    q, k, v, dout = _make_inputs(1, 2, 1, 150, 150, 64, torch.bfloat16, DEVICE, seed=4)
    _check(q, k, v, dout, causal=True, fwd_tol=BF16_FWD_TOL, bwd_tol=BF16_BWD_TOL)


def test_rejects_bad_inputs():
    q = torch.randn(1, 3, 16, 16)
    kv = torch.randn(1, 2, 16, 16)
    with pytest.raises(ValueError, match="multiple of kv heads"):
        triton_flash_attention(q, kv, kv, causal=False)
    with pytest.raises(ValueError, match="head_dim"):
        x = torch.randn(1, 2, 16, 48)
        triton_flash_attention(x, x, x, causal=False)
    with pytest.raises(ValueError, match="block_n"):
        x = torch.randn(1, 2, 16, 16)
        triton_flash_attention(x, x, x, causal=False, block_n=8)


def _lowp_attention(q, k, v, causal):
    """Plain PyTorch attention computed in the inputs' dtype (no fp32 upcast)."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
    if causal:
        visible = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~visible, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


@pytest.mark.skipif(CUDA is None, reason="needs a CUDA GPU")
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("heads_q,heads_kv,seqlen,head_dim", [
    (8, 8, 1000, 64),
    (8, 2, 1000, 128),
    (4, 1, 2048, 128),
])
def test_cuda_bf16(heads_q, heads_kv, seqlen, head_dim, causal):
    """bf16 on GPU, judged like the FlashAttention test suite: the kernel's max
    error against the fp32 reference must be at most twice that of the same
    attention computed naively in bf16, plus 1e-3 (forward) / 1e-2 (grads)."""
    q, k, v, dout = _make_inputs(2, heads_q, heads_kv, seqlen, seqlen, head_dim, torch.bfloat16, CUDA)
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    ref = attention_reference(q32, k32, v32, causal=causal)
    ref_grads = torch.autograd.grad(ref, (q32, k32, v32), dout.float())

    results = {}
    for name, fn in (("triton", lambda: triton_flash_attention(q, k, v, causal=causal)),
                     ("naive_bf16", lambda: _lowp_attention(q, k, v, causal))):
        out = fn()
        results[name] = (out, *torch.autograd.grad(out, (q, k, v), dout))

    for i, (label, want) in enumerate(zip(("out", "dq", "dk", "dv"), (ref, *ref_grads))):
        err = (results["triton"][i].float() - want).abs().max().item()
        baseline = (results["naive_bf16"][i].float() - want).abs().max().item()
        slack = 1e-3 if label == "out" else 1e-2
        assert err <= 2 * baseline + slack, f"{label}: triton err {err:.3e}, naive bf16 err {baseline:.3e}"
