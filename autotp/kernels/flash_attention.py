"""FlashAttention-2 forward and backward in Triton, with causal masking and GQA.

Layout follows ``torch.nn.functional.scaled_dot_product_attention``:
``q`` is (B, H_q, L_q, D) and ``k``/``v`` are (B, H_kv, L_k, D) with
``H_q % H_kv == 0``. Query head ``h`` attends to key/value head
``h // (H_q // H_kv)``; K/V are never repeated in memory.

Algorithm (Dao, "FlashAttention-2", 2023):

* forward: each program owns BLOCK_M query rows and streams over BLOCK_N-wide
  key/value tiles, keeping a running row max ``m``, row sum ``l`` and an
  unnormalised fp32 output accumulator (online softmax). It writes O and the
  row logsumexp, which is all the backward pass needs to rebuild P.
* backward: ``delta = rowsum(dO * O)`` is precomputed, then one kernel owns a
  K/V tile and accumulates dK/dV over all query tiles (and, for GQA, over all
  query heads of the group, so no atomics are needed), and a second kernel owns
  a Q tile and accumulates dQ over key tiles. P is recomputed in both.

Softmax runs in base 2: scores are pre-multiplied by ``softmax_scale * log2(e)``
so that ``exp2`` can be used, and the saved logsumexp is in the same base-2
units. All matmuls accumulate in fp32 whatever the input dtype.

Causal masking is top-left aligned (query i sees keys j <= i), matching
SDPA's ``is_causal=True``. Sequence lengths need not be multiples of the block
sizes: out-of-range rows/columns are masked on load and in the scores.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

__all__ = ["FlashAttentionFunction", "triton_flash_attention", "attention_reference"]

SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)
_LOG2E = 1.4426950408889634  # 1 / ln(2): converts natural-log scores to base 2


# Triton's CPU interpreter (TRITON_INTERPRET=1) stores bf16 as raw uint16 and
# feeds those bits straight to numpy's matmul, so bf16 tl.dot operands must be
# widened there. Widening is exact (bf16 x bf16 products fit in fp32), so the
# interpreter still sees the bf16 rounding of P that the GPU path applies.
_INTERPRETER = tl.constexpr(bool(triton.knobs.runtime.interpret))


@triton.jit
def _dot(a, b, acc, DOT_PRECISION: tl.constexpr):
    """``tl.dot(a, b, acc)`` with fp32 accumulation; ``acc`` may be None."""
    if _INTERPRETER:
        if a.dtype == tl.bfloat16:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=DOT_PRECISION)


# --------------------------------------------------------------------------- #
# Forward
# --------------------------------------------------------------------------- #
@triton.jit
def _attn_fwd_inner(
    acc, l_i, m_i, q,  # running state for BLOCK_M query rows; q: (BLOCK_M, HEAD_DIM)
    k_base, v_base, stride_kn,
    offs_m, offs_d, lo, hi, seqlen_k, qk_scale,
    BLOCK_N: tl.constexpr,
    CAUSAL_MASK: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Fold key tiles [lo, hi) into the online-softmax state (acc, l_i, m_i).

    ``CAUSAL_MASK`` is only set for tiles that straddle the diagonal; tiles
    fully below it skip the compare. The bounds mask is always applied because
    the last tile may run past ``seqlen_k``.
    """
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        # K is loaded transposed so the score tile is a plain q @ kT.
        kt = tl.load(k_base + offs_n[None, :] * stride_kn + offs_d[:, None],
                     mask=offs_n[None, :] < seqlen_k, other=0.0)  # (HEAD_DIM, BLOCK_N)
        v = tl.load(v_base + offs_n[:, None] * stride_kn + offs_d[None, :],
                    mask=offs_n[:, None] < seqlen_k, other=0.0)  # (BLOCK_N, HEAD_DIM)
        s = _dot(q, kt, None, DOT_PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N), base-2 logits
        valid = offs_n[None, :] < seqlen_k
        if CAUSAL_MASK:
            valid = valid & (offs_n[None, :] <= offs_m[:, None])
        s = tl.where(valid, s, float("-inf"))
        # Every row sees key 0 in the first tile processed, so m_new is finite
        # from the first iteration on and exp2(-inf - m_new) is a clean 0.
        m_new = tl.maximum(m_i, tl.max(s, 1))  # (BLOCK_M,)
        alpha = tl.math.exp2(m_i - m_new)  # rescales what was accumulated under the old max
        p = tl.math.exp2(s - m_new[:, None])  # (BLOCK_M, BLOCK_N)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        # P is cast to the input dtype so the second matmul also runs on tensor cores.
        acc = _dot(p.to(v.dtype), v, acc, DOT_PRECISION)  # (BLOCK_M, HEAD_DIM)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attn_fwd_kernel(
    Q, K, V, O, LSE,
    qk_scale,
    stride_qz, stride_qh, stride_qm,  # shared by Q and O
    stride_kz, stride_kh, stride_kn,  # shared by K and V
    num_heads_q, seqlen_q, seqlen_k,
    GROUP_SIZE: tl.constexpr,  # H_q // H_kv
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    IS_CAUSAL: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Grid: (cdiv(L_q, BLOCK_M), B * H_q). Writes O (input dtype) and LSE (fp32, base 2)."""
    start_m = tl.program_id(0) * BLOCK_M
    off_bh = tl.program_id(1)
    off_z = off_bh // num_heads_q
    off_h = off_bh % num_heads_q
    off_hkv = off_h // GROUP_SIZE
    # int64 base offsets: B * H * L * D overflows int32 at long context.
    q_offset = off_z.to(tl.int64) * stride_qz + off_h.to(tl.int64) * stride_qh
    kv_offset = off_z.to(tl.int64) * stride_kz + off_hkv.to(tl.int64) * stride_kh

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_mask = offs_m[:, None] < seqlen_q
    q = tl.load(Q + q_offset + offs_m[:, None] * stride_qm + offs_d[None, :],
                mask=row_mask, other=0.0)  # (BLOCK_M, HEAD_DIM)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

    k_base = K + kv_offset
    v_base = V + kv_offset
    if IS_CAUSAL:
        # Key tiles left of the one holding this block's first row are visible
        # to every row of the block; only the tiles from there up to the
        # block's last row straddle the diagonal and need the causal compare.
        full_hi = tl.minimum((start_m // BLOCK_N) * BLOCK_N, seqlen_k)
    else:
        full_hi = seqlen_k
    acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kn,
                                    offs_m, offs_d, 0, full_hi, seqlen_k, qk_scale,
                                    BLOCK_N=BLOCK_N, CAUSAL_MASK=False, DOT_PRECISION=DOT_PRECISION)
    if IS_CAUSAL:
        diag_hi = tl.minimum(start_m + BLOCK_M, seqlen_k)
        acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kn,
                                        offs_m, offs_d, full_hi, diag_hi, seqlen_k, qk_scale,
                                        BLOCK_N=BLOCK_N, CAUSAL_MASK=True, DOT_PRECISION=DOT_PRECISION)

    o = acc / l_i[:, None]  # (BLOCK_M, HEAD_DIM)
    tl.store(O + q_offset + offs_m[:, None] * stride_qm + offs_d[None, :],
             o.to(O.dtype.element_ty), mask=row_mask)
    # LSE is (B, H_q, L_q) contiguous; base-2 so backward can use exp2 directly.
    tl.store(LSE + off_bh * seqlen_q + offs_m, m_i + tl.math.log2(l_i), mask=offs_m < seqlen_q)


# --------------------------------------------------------------------------- #
# Backward
# --------------------------------------------------------------------------- #
@triton.jit
def _attn_bwd_preprocess_kernel(
    O, DO, DELTA,
    stride_qz, stride_qh, stride_qm,  # shared by O and DO
    num_heads_q, seqlen_q,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """Grid: (cdiv(L_q, BLOCK_M), B * H_q). DELTA = rowsum(dO * O) in fp32, shaped like LSE.

    This is the ``rowsum(P * dP)`` term of the softmax backward, computed once
    here instead of in every tile of the main backward kernels.
    """
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    off_bh = tl.program_id(1)
    off_z = off_bh // num_heads_q
    off_h = off_bh % num_heads_q
    offset = off_z.to(tl.int64) * stride_qz + off_h.to(tl.int64) * stride_qh
    offs_d = tl.arange(0, HEAD_DIM)
    ptrs = offset + offs_m[:, None] * stride_qm + offs_d[None, :]
    mask = offs_m[:, None] < seqlen_q
    o = tl.load(O + ptrs, mask=mask, other=0.0).to(tl.float32)  # (BLOCK_M, HEAD_DIM)
    do = tl.load(DO + ptrs, mask=mask, other=0.0).to(tl.float32)  # (BLOCK_M, HEAD_DIM)
    tl.store(DELTA + off_bh * seqlen_q + offs_m, tl.sum(o * do, axis=1), mask=offs_m < seqlen_q)


@triton.jit
def _attn_bwd_dkdv_inner(
    dk, dv, k, v,  # dk, dv: fp32 (BLOCK_N, HEAD_DIM) accumulators; k, v: this program's tile
    q_base, do_base, lse_base, delta_base, stride_qm,
    offs_n, offs_d, lo, hi, seqlen_q, qk_scale,
    BLOCK_M: tl.constexpr,
    CAUSAL_MASK: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Accumulate the contribution of query tiles [lo, hi) of one q head to dK and dV.

    Works on transposed score tiles (keys x queries) so that the products
    land directly in the (BLOCK_N, HEAD_DIM) layout of dK/dV. dK is left
    unscaled; the caller multiplies by softmax_scale once at the end.
    """
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        row_ok = offs_m < seqlen_q
        ptrs = offs_m[:, None] * stride_qm + offs_d[None, :]
        q = tl.load(q_base + ptrs, mask=row_ok[:, None], other=0.0)  # (BLOCK_M, HEAD_DIM)
        do = tl.load(do_base + ptrs, mask=row_ok[:, None], other=0.0)  # (BLOCK_M, HEAD_DIM)
        lse = tl.load(lse_base + offs_m, mask=row_ok, other=0.0)  # (BLOCK_M,)
        delta = tl.load(delta_base + offs_m, mask=row_ok, other=0.0)  # (BLOCK_M,)

        st = _dot(k, tl.trans(q), None, DOT_PRECISION) * qk_scale  # (BLOCK_N, BLOCK_M)
        valid = row_ok[None, :]
        if CAUSAL_MASK:
            valid = valid & (offs_m[None, :] >= offs_n[:, None])
        # Recompute P^T from the saved logsumexp; no row max or sum needed.
        pt = tl.where(valid, tl.math.exp2(st - lse[None, :]), 0.0)  # (BLOCK_N, BLOCK_M)
        dv = _dot(pt.to(do.dtype), do, dv, DOT_PRECISION)  # (BLOCK_N, HEAD_DIM)
        dpt = _dot(v, tl.trans(do), None, DOT_PRECISION)  # (BLOCK_N, BLOCK_M)
        dst = pt * (dpt - delta[None, :])  # (BLOCK_N, BLOCK_M), grad w.r.t. the scaled scores
        dk = _dot(dst.to(q.dtype), q, dk, DOT_PRECISION)  # (BLOCK_N, HEAD_DIM)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO, DK, DV, LSE, DELTA,
    softmax_scale, qk_scale,
    stride_qz, stride_qh, stride_qm,  # shared by Q and DO
    stride_kz, stride_kh, stride_kn,  # shared by K, V, DK and DV
    num_heads_q, num_heads_kv, seqlen_q, seqlen_k,
    GROUP_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    IS_CAUSAL: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Grid: (cdiv(L_k, BLOCK_N), B * H_kv). Writes dK, dV for one K/V tile.

    For GQA the program loops over the GROUP_SIZE query heads that share this
    kv head, so the group reduction happens in registers and every dK/dV
    element has exactly one writer.
    """
    start_n = tl.program_id(0) * BLOCK_N
    off_bhkv = tl.program_id(1)
    off_z = off_bhkv // num_heads_kv
    off_hkv = off_bhkv % num_heads_kv
    kv_offset = off_z.to(tl.int64) * stride_kz + off_hkv.to(tl.int64) * stride_kh

    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    kv_ptrs = kv_offset + offs_n[:, None] * stride_kn + offs_d[None, :]
    kv_mask = offs_n[:, None] < seqlen_k
    k = tl.load(K + kv_ptrs, mask=kv_mask, other=0.0)  # (BLOCK_N, HEAD_DIM)
    v = tl.load(V + kv_ptrs, mask=kv_mask, other=0.0)  # (BLOCK_N, HEAD_DIM)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)

    if IS_CAUSAL:
        # Query rows before start_n see none of these keys, rows of the q tiles
        # in [diag_lo, full_lo) see some of them, rows from full_lo on see all.
        diag_lo = (start_n // BLOCK_M) * BLOCK_M
        full_lo = tl.minimum(tl.cdiv(start_n + BLOCK_N, BLOCK_M) * BLOCK_M, seqlen_q)
    else:
        full_lo = 0
    for g in range(GROUP_SIZE):
        off_h = off_hkv * GROUP_SIZE + g
        off_bh = off_z * num_heads_q + off_h
        q_offset = off_z.to(tl.int64) * stride_qz + off_h.to(tl.int64) * stride_qh
        q_base = Q + q_offset
        do_base = DO + q_offset
        lse_base = LSE + off_bh * seqlen_q
        delta_base = DELTA + off_bh * seqlen_q
        if IS_CAUSAL:
            dk, dv = _attn_bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base,
                                          stride_qm, offs_n, offs_d, diag_lo, full_lo, seqlen_q, qk_scale,
                                          BLOCK_M=BLOCK_M, CAUSAL_MASK=True, DOT_PRECISION=DOT_PRECISION)
        dk, dv = _attn_bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base,
                                      stride_qm, offs_n, offs_d, full_lo, seqlen_q, seqlen_q, qk_scale,
                                      BLOCK_M=BLOCK_M, CAUSAL_MASK=False, DOT_PRECISION=DOT_PRECISION)

    # dS was taken w.r.t. the scaled scores, so the chain rule adds one softmax_scale.
    dk = dk * softmax_scale
    tl.store(DK + kv_ptrs, dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + kv_ptrs, dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _attn_bwd_dq_inner(
    dq, q, do, lse, delta,  # dq: fp32 (BLOCK_M, HEAD_DIM) accumulator; the rest are this tile's
    k_base, v_base, stride_kn,
    offs_m, offs_d, lo, hi, seqlen_k, qk_scale,
    BLOCK_N: tl.constexpr,
    CAUSAL_MASK: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Accumulate the contribution of key tiles [lo, hi) to dQ (left unscaled)."""
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        kv_mask = offs_n[:, None] < seqlen_k
        kv_ptrs = offs_n[:, None] * stride_kn + offs_d[None, :]
        k = tl.load(k_base + kv_ptrs, mask=kv_mask, other=0.0)  # (BLOCK_N, HEAD_DIM)
        v = tl.load(v_base + kv_ptrs, mask=kv_mask, other=0.0)  # (BLOCK_N, HEAD_DIM)
        s = _dot(q, tl.trans(k), None, DOT_PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N)
        valid = offs_n[None, :] < seqlen_k
        if CAUSAL_MASK:
            valid = valid & (offs_n[None, :] <= offs_m[:, None])
        p = tl.where(valid, tl.math.exp2(s - lse[:, None]), 0.0)  # (BLOCK_M, BLOCK_N)
        dp = _dot(do, tl.trans(v), None, DOT_PRECISION)  # (BLOCK_M, BLOCK_N)
        ds = p * (dp - delta[:, None])  # (BLOCK_M, BLOCK_N)
        dq = _dot(ds.to(k.dtype), k, dq, DOT_PRECISION)  # (BLOCK_M, HEAD_DIM)
    return dq


@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, DO, DQ, LSE, DELTA,
    softmax_scale, qk_scale,
    stride_qz, stride_qh, stride_qm,  # shared by Q, DO and DQ
    stride_kz, stride_kh, stride_kn,  # shared by K and V
    num_heads_q, seqlen_q, seqlen_k,
    GROUP_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    IS_CAUSAL: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Grid: (cdiv(L_q, BLOCK_M), B * H_q). Writes dQ for one query tile.

    Kept separate from the dK/dV kernel so that each output has a single
    writer (no atomics); the price is recomputing P once more.
    """
    start_m = tl.program_id(0) * BLOCK_M
    off_bh = tl.program_id(1)
    off_z = off_bh // num_heads_q
    off_h = off_bh % num_heads_q
    off_hkv = off_h // GROUP_SIZE
    q_offset = off_z.to(tl.int64) * stride_qz + off_h.to(tl.int64) * stride_qh
    kv_offset = off_z.to(tl.int64) * stride_kz + off_hkv.to(tl.int64) * stride_kh

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    q_ptrs = q_offset + offs_m[:, None] * stride_qm + offs_d[None, :]
    row_ok = offs_m < seqlen_q
    q = tl.load(Q + q_ptrs, mask=row_ok[:, None], other=0.0)  # (BLOCK_M, HEAD_DIM)
    do = tl.load(DO + q_ptrs, mask=row_ok[:, None], other=0.0)  # (BLOCK_M, HEAD_DIM)
    lse = tl.load(LSE + off_bh * seqlen_q + offs_m, mask=row_ok, other=0.0)  # (BLOCK_M,)
    delta = tl.load(DELTA + off_bh * seqlen_q + offs_m, mask=row_ok, other=0.0)  # (BLOCK_M,)
    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

    k_base = K + kv_offset
    v_base = V + kv_offset
    if IS_CAUSAL:
        full_hi = tl.minimum((start_m // BLOCK_N) * BLOCK_N, seqlen_k)  # same split as forward
    else:
        full_hi = seqlen_k
    dq = _attn_bwd_dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_kn,
                            offs_m, offs_d, 0, full_hi, seqlen_k, qk_scale,
                            BLOCK_N=BLOCK_N, CAUSAL_MASK=False, DOT_PRECISION=DOT_PRECISION)
    if IS_CAUSAL:
        diag_hi = tl.minimum(start_m + BLOCK_M, seqlen_k)
        dq = _attn_bwd_dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_kn,
                                offs_m, offs_d, full_hi, diag_hi, seqlen_k, qk_scale,
                                BLOCK_N=BLOCK_N, CAUSAL_MASK=True, DOT_PRECISION=DOT_PRECISION)

    dq = dq * softmax_scale
    tl.store(DQ + q_ptrs, dq.to(DQ.dtype.element_ty), mask=row_ok[:, None])


# --------------------------------------------------------------------------- #
# Host side
# --------------------------------------------------------------------------- #
def _dot_precision(dtype: torch.dtype) -> str | None:
    # fp32 inputs would otherwise be rounded to TF32 on tensor cores; keep them
    # exact. 16-bit inputs use the target's default (full-rate MMA).
    return "ieee" if dtype == torch.float32 else None


def _tile_config(head_dim: int, dtype: torch.dtype, backward: bool) -> tuple[int, int, int]:
    """Default ``(BLOCK_M, BLOCK_N, num_warps)`` for one pass.

    Not autotuned: picked offline among tiles for which ptxas reports no
    register spills on sm_90 with bf16 at D=64 and D=128. The backward keeps
    two fp32 (BLOCK_N, D) accumulators live, hence its narrower key tile.
    """
    if dtype == torch.float32:
        # Exact fp32 dots run on FMA units with operands held in registers;
        # small tiles keep spills low. A precision path, not a fast one.
        return 32, 32, 8
    if backward:
        return 64, 32, 8
    if head_dim <= 64:
        return 64, 64, 4
    return 128, 64, 8


def _check_inputs(q, k, v, block_m: int | None, block_n: int | None) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError("q, k, v must be 4-D (batch, heads, seqlen, head_dim)")
    if k.shape != v.shape:
        raise ValueError(f"k and v shapes differ: {tuple(k.shape)} vs {tuple(v.shape)}")
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"batch/head_dim mismatch: q {tuple(q.shape)} vs k {tuple(k.shape)}")
    if q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"query heads ({q.shape[1]}) must be a multiple of kv heads ({k.shape[1]})")
    if q.shape[3] not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"head_dim {q.shape[3]} not supported; expected one of {SUPPORTED_HEAD_DIMS}")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"q, k, v must share one of fp16/bf16/fp32, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError("q, k, v must be on the same device")
    for name, block in (("block_m", block_m), ("block_n", block_n)):
        # tl.dot needs every dimension >= 16; tl.arange needs powers of two.
        if block is not None and (block < 16 or block & (block - 1)):
            raise ValueError(f"{name} must be a power of two >= 16, got {block}")


def _flash_attn_forward(q, k, v, causal, softmax_scale, block_m=None, block_n=None):
    """Returns O (like q) and the base-2 logsumexp, fp32 (B, H_q, L_q). Inputs must be contiguous."""
    batch, heads_q, seqlen_q, head_dim = q.shape
    heads_kv, seqlen_k = k.shape[1], k.shape[2]
    default_m, default_n, num_warps = _tile_config(head_dim, q.dtype, backward=False)
    block_m, block_n = block_m or default_m, block_n or default_n
    o = torch.empty_like(q)
    lse = torch.empty((batch, heads_q, seqlen_q), device=q.device, dtype=torch.float32)
    grid = (triton.cdiv(seqlen_q, block_m), batch * heads_q)
    _attn_fwd_kernel[grid](
        q, k, v, o, lse,
        softmax_scale * _LOG2E,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        heads_q, seqlen_q, seqlen_k,
        GROUP_SIZE=heads_q // heads_kv, HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_N=block_n,
        IS_CAUSAL=causal, DOT_PRECISION=_dot_precision(q.dtype),
        num_warps=num_warps, num_stages=2,
    )
    return o, lse


def _flash_attn_backward(do, q, k, v, o, lse, causal, softmax_scale, block_m=None, block_n=None):
    """Returns dq, dk, dv in the input dtype. All tensors must be contiguous."""
    batch, heads_q, seqlen_q, head_dim = q.shape
    heads_kv, seqlen_k = k.shape[1], k.shape[2]
    group_size = heads_q // heads_kv
    precision = _dot_precision(q.dtype)
    default_m, default_n, num_warps = _tile_config(head_dim, q.dtype, backward=True)
    block_m, block_n = block_m or default_m, block_n or default_n
    options = {"num_warps": num_warps, "num_stages": 2}
    q_strides = (q.stride(0), q.stride(1), q.stride(2))
    k_strides = (k.stride(0), k.stride(1), k.stride(2))

    delta = torch.empty_like(lse)
    _attn_bwd_preprocess_kernel[(triton.cdiv(seqlen_q, block_m), batch * heads_q)](
        o, do, delta, *q_strides, heads_q, seqlen_q, HEAD_DIM=head_dim, BLOCK_M=block_m,
    )

    dq = torch.empty_like(q)
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    qk_scale = softmax_scale * _LOG2E
    _attn_bwd_dkdv_kernel[(triton.cdiv(seqlen_k, block_n), batch * heads_kv)](
        q, k, v, do, dk, dv, lse, delta,
        softmax_scale, qk_scale, *q_strides, *k_strides,
        heads_q, heads_kv, seqlen_q, seqlen_k,
        GROUP_SIZE=group_size, HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_N=block_n,
        IS_CAUSAL=causal, DOT_PRECISION=precision, **options,
    )
    _attn_bwd_dq_kernel[(triton.cdiv(seqlen_q, block_m), batch * heads_q)](
        q, k, v, do, dq, lse, delta,
        softmax_scale, qk_scale, *q_strides, *k_strides,
        heads_q, seqlen_q, seqlen_k,
        GROUP_SIZE=group_size, HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_N=block_n,
        IS_CAUSAL=causal, DOT_PRECISION=precision, **options,
    )
    return dq, dk, dv


class FlashAttentionFunction(torch.autograd.Function):
    """Autograd wrapper: ``apply(q, k, v, causal, softmax_scale, block_m, block_n)``.

    Saves q, k, v, O and the logsumexp (O(L) extra memory, not O(L^2)).
    ``softmax_scale`` must be a float; ``block_m``/``block_n`` of None pick
    per-pass defaults. :func:`triton_flash_attention` is the friendlier entry.
    """

    @staticmethod
    def forward(ctx, q, k, v, causal: bool, softmax_scale: float, block_m: int | None, block_n: int | None):
        _check_inputs(q, k, v, block_m, block_n)
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        o, lse = _flash_attn_forward(q, k, v, causal, softmax_scale, block_m, block_n)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.causal = causal
        ctx.softmax_scale = softmax_scale
        ctx.block_m = block_m
        ctx.block_n = block_n
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        dq, dk, dv = _flash_attn_backward(do.contiguous(), q, k, v, o, lse, ctx.causal,
                                          ctx.softmax_scale, ctx.block_m, ctx.block_n)
        return dq, dk, dv, None, None, None, None


def triton_flash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool,
    softmax_scale: float | None = None,
    block_m: int | None = None,
    block_n: int | None = None,
) -> torch.Tensor:
    """Scaled dot-product attention, drop-in for ``F.scaled_dot_product_attention``.

    Args:
        q: (B, H_q, L_q, D); fp16, bf16 or fp32; D in {16, 32, 64, 128}.
        k, v: (B, H_kv, L_k, D), same dtype/device as q, ``H_q % H_kv == 0`` (GQA/MQA).
        causal: top-left aligned causal mask (query i attends to keys j <= i).
        softmax_scale: multiplier on q @ k^T; defaults to ``1 / sqrt(D)``.
        block_m, block_n: query/key tile sizes (powers of two >= 16) used by
            every kernel; by default each pass picks its own (see
            ``_tile_config``). Exposed mainly so tests can exercise
            multi-tile paths with short sequences.

    Returns:
        (B, H_q, L_q, D) tensor in q's dtype; differentiable w.r.t. q, k and v.
    """
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(q.shape[-1])
    return FlashAttentionFunction.apply(q, k, v, causal, float(softmax_scale), block_m, block_n)


def attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool,
    softmax_scale: float | None = None,
) -> torch.Tensor:
    """Naive attention with the same contract as :func:`triton_flash_attention`.

    Computes in fp32 with an explicit (L_q, L_k) score matrix and repeated K/V
    for GQA; returns q's dtype. Differentiable, so it also serves as the
    gradient reference in tests.
    """
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(q.shape[-1])
    group_size = q.shape[1] // k.shape[1]
    qf = q.float()
    kf = k.float().repeat_interleave(group_size, dim=1)  # (B, H_q, L_k, D)
    vf = v.float().repeat_interleave(group_size, dim=1)  # (B, H_q, L_k, D)
    scores = (qf @ kf.transpose(-2, -1)) * softmax_scale  # (B, H_q, L_q, L_k)
    if causal:
        seqlen_q, seqlen_k = q.shape[2], k.shape[2]
        visible = torch.ones(seqlen_q, seqlen_k, dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~visible, float("-inf"))
    return (torch.softmax(scores, dim=-1) @ vf).to(q.dtype)
