"""``torch.ops.autotp.attention``: the one attention op every lowered attention becomes.

    out = torch.ops.autotp.attention(q, k, v, attn_mask=None, is_causal=False, scale=None,
                                     enable_gqa=False)

It computes exactly ``F.scaled_dot_product_attention(q, k, v, attn_mask, is_causal=is_causal,
scale=scale, enable_gqa=enable_gqa)`` with no dropout: q is (B, H_q, L_q, D), k/v are
(B, H_kv, L_k, D) (any leading dims work, as for SDPA), and with ``enable_gqa`` query head
``h`` reads kv head ``h // (H_q // H_kv)`` without the repeats being materialised.  The
output is always contiguous (B, H_q, L_q, D_v), whatever layout the backend returns, so the
graph's later views see one layout on every backend.

Which kernel runs is decided per call, in one place (``choose_backend``), in this order:

1. ``flash_attn.flash_attn_func`` — importable, CUDA, fp16/bf16, no mask, 4-D (or 3-D),
   D % 8 == 0 and D <= 256, and ``is_causal`` only with L_q == L_k (flash-attn aligns the causal
   mask bottom-right, SDPA top-left; they agree only for square scores);
2. the project's Triton FlashAttention-2 kernel (``autotp.kernels.flash_attention``) — CUDA,
   fp16/bf16, no mask, D in {16, 32, 64, 128};
3. ``torch.nn.functional.scaled_dot_product_attention`` — everything else (CPU, masks, fp32).

The backend that ran is counted (``backend_counts()``, ``last_backend()``) and logged once per
backend at INFO on the ``autotp`` logger.  The backward recomputes the forward through the
same backend's differentiable path and differentiates it (``torch.autograd.grad``): one extra
attention forward per backward, the price of keeping a single opaque forward op whose saved
state is just q, k, v (and the mask).
"""
from __future__ import annotations

import contextlib

import collections
import functools
import logging
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["attention", "choose_backend", "select_backend", "backend_counts", "last_backend",
           "reset_backend_counts", "BACKENDS", "FLASH_ATTN", "TRITON", "SDPA"]

log = logging.getLogger("autotp")

FLASH_ATTN, TRITON, SDPA = "flash_attn", "triton", "sdpa"
BACKENDS = (FLASH_ATTN, TRITON, SDPA)
_HALF = (torch.float16, torch.bfloat16)
_TRITON_HEAD_DIMS = (16, 32, 64, 128)      # autotp.kernels.flash_attention.SUPPORTED_HEAD_DIMS

_counts: collections.Counter = collections.Counter()
_last: str | None = None
_logged: set[str] = set()


@functools.lru_cache(maxsize=None)
def _flash_attn_func():
    try:
        from flash_attn import flash_attn_func
    except Exception:  # noqa: BLE001 — not installed, or built for another torch/CUDA
        return None
    return flash_attn_func


@functools.lru_cache(maxsize=None)
def _triton_attention():
    try:
        from autotp.kernels.flash_attention import triton_flash_attention
    except Exception:  # noqa: BLE001 — no triton
        return None
    return triton_flash_attention


def select_backend(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, is_causal: bool,
                   enable_gqa: bool) -> tuple[str, str]:
    """(backend, why): the first backend of the dispatch order whose conditions all hold."""
    if not q.is_cuda:
        return SDPA, f"tensors on {q.device.type}"
    if attn_mask is not None:
        return SDPA, "an attention mask is given (the fused kernels take none)"
    if q.dtype not in _HALF:
        return SDPA, f"dtype {q.dtype} (the fused kernels run fp16/bf16)"
    if not (q.dtype == k.dtype == v.dtype) or q.ndim not in (3, 4) or not (q.ndim == k.ndim == v.ndim):
        return SDPA, "q, k, v differ in dtype or rank"
    if k.shape != v.shape or q.shape[-1] != k.shape[-1] or q.shape[:-3] != k.shape[:-3]:
        return SDPA, "k and v (or q and k) differ in shape"
    heads_q, heads_kv = q.shape[-3], k.shape[-3]
    if heads_q % heads_kv or (heads_q != heads_kv and not enable_gqa):
        return SDPA, f"{heads_q} query heads over {heads_kv} kv heads"
    head_dim = q.shape[-1]
    square = q.shape[-2] == k.shape[-2]
    if (_flash_attn_func() is not None and head_dim % 8 == 0 and head_dim <= 256
            and (square or not is_causal)):
        return FLASH_ATTN, f"CUDA {q.dtype}, head_dim {head_dim}"
    if _triton_attention() is not None and head_dim in _TRITON_HEAD_DIMS:
        return TRITON, f"CUDA {q.dtype}, head_dim {head_dim}"
    return SDPA, f"no fused kernel installed for head_dim {head_dim}"


def choose_backend(q: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False, *,
                   k: Tensor | None = None, v: Tensor | None = None, enable_gqa: bool = False) -> str:
    """The backend ``autotp.attention`` runs for these inputs: "flash_attn", "triton" or "sdpa".

    Works on real, fake and meta tensors (the plan asks with the traced values); ``k``/``v``
    default to ``q``'s shape, which is right for everything but GQA and cross-attention.
    """
    k = q if k is None else k
    v = k if v is None else v
    return select_backend(q, k, v, attn_mask, is_causal, enable_gqa)[0]


def backend_counts() -> dict[str, int]:
    """How many forward calls of ``autotp.attention`` each backend has run in this process."""
    return dict(_counts)


def last_backend() -> str | None:
    """The backend of the latest forward call, or None before the first one."""
    return _last


def reset_backend_counts() -> None:
    """Forget the counts, and log each backend's next first call again."""
    global _last
    _counts.clear()
    _logged.clear()
    _last = None


def _record(backend: str, why: str, q: Tensor) -> None:
    global _last
    _last = backend
    _counts[backend] += 1
    if backend not in _logged:
        _logged.add(backend)
        log.info("autotp.attention runs on %s (%s; first call: q %s %s on %s)", backend, why,
                 tuple(q.shape), q.dtype, q.device)


def _as_4d(t: Tensor) -> Tensor:
    return t if t.ndim == 4 else t.unsqueeze(0)     # (N, L, D) -> (1, N, L, D): N plays the heads


def _run(backend: str, q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, is_causal: bool,
         scale: float, enable_gqa: bool) -> Tensor:
    """Attention on ``backend``; differentiable when autograd is on (the backward uses that)."""
    if backend == SDPA:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal,
                                              scale=scale, enable_gqa=enable_gqa)
    q4, k4, v4 = _as_4d(q), _as_4d(k), _as_4d(v)                       # (B, H, L, D)
    if backend == FLASH_ATTN:
        # flash-attn's layout is (B, L, H, D); the transposes are views (last dim stays unit-stride)
        out = _flash_attn_func()(q4.transpose(1, 2), k4.transpose(1, 2), v4.transpose(1, 2),
                                 softmax_scale=scale, causal=is_causal).transpose(1, 2)
    elif backend == TRITON:
        out = _triton_attention()(q4, k4, v4, causal=is_causal, softmax_scale=scale)
    else:
        raise ValueError(f"unknown attention backend {backend!r}; expected one of {BACKENDS}")
    return out.reshape(*q.shape[:-1], v.shape[-1])                    # drop the 3-D unsqueeze


def _scale(q: Tensor, scale: float | None) -> float:
    return 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale


@torch.library.custom_op("autotp::attention", mutates_args=())
def attention(q: Tensor, k: Tensor, v: Tensor, attn_mask: Optional[Tensor] = None, is_causal: bool = False,
              scale: Optional[float] = None, enable_gqa: bool = False) -> Tensor:
    """SDPA without dropout, on the fastest exact backend (see the module docstring)."""
    if q.is_meta:                   # memory simulation (autotp.memory): what a fused kernel allocates
        return _attention_fake(q, k, v, attn_mask, is_causal, scale, enable_gqa)
    backend, why = select_backend(q, k, v, attn_mask, is_causal, enable_gqa)
    _record(backend, why, q)
    out = _run(backend, q, k, v, attn_mask, is_causal, _scale(q, scale), enable_gqa)
    return out.contiguous()


@attention.register_fake
def _attention_fake(q, k, v, attn_mask=None, is_causal=False, scale=None, enable_gqa=False):
    return q.new_empty((*q.shape[:-1], v.shape[-1]))                 # (B, H_q, L_q, D_v), contiguous


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, attn_mask, is_causal, scale, enable_gqa = inputs
    ctx.save_for_backward(q, k, v, attn_mask)
    ctx.is_causal, ctx.scale, ctx.enable_gqa = is_causal, _scale(q, scale), enable_gqa
    ctx.backend = select_backend(q, k, v, attn_mask, is_causal, enable_gqa)[0]
    device = q.device.type          # the recompute runs under the forward's autocast (q, k, v may differ in dtype)
    on = torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device)
    ctx.autocast = (device, torch.get_autocast_dtype(device)) if on else None


def _backward(ctx, grad_out: Tensor):
    """Recompute the forward on the same backend with autograd on, then differentiate it.

    Gradients flow to q, k, v and to a floating-point mask that requires grad (a learned
    position bias passed as the mask); the GQA group sum over query heads is the backend's.
    """
    q, k, v, attn_mask = ctx.saved_tensors
    needs = (*ctx.needs_input_grad, False, False, False, False)[:4]     # short when called with 3 args
    if q.is_meta:                   # memory simulation: a fused backward allocates the gradients, no L x L
        return (*(torch.empty_like(t) if n else None for t, n in zip((q, k, v, attn_mask), needs)), None, None, None)
    autocast = torch.autocast(*ctx.autocast) if ctx.autocast else contextlib.nullcontext()
    with torch.enable_grad(), autocast:
        leaves = [t.detach().requires_grad_(n) if t is not None else None
                  for t, n in zip((q, k, v, attn_mask), needs)]
        out = _run(ctx.backend, *leaves, ctx.is_causal, ctx.scale, ctx.enable_gqa)
        wanted = [t for t, n in zip(leaves, needs) if n]
        grads = iter(torch.autograd.grad(out, wanted, grad_out))
    return (*(next(grads) if n else None for n in needs), None, None, None)


attention.register_autograd(_backward, setup_context=_setup_context)
