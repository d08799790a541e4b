"""lower_attention: every attention becomes one ``autotp.attention`` op, and nothing changes.

The op: ``torch.ops.autotp.attention`` is SDPA (forward and backward) on CPU, and dispatches
flash-attn -> Triton -> SDPA by device, dtype, mask and head_dim.
The pass: SDPA nodes, hand-written ``q @ k^T -> softmax -> @ v`` chains (the ``eager``
attention of Hugging Face models) and ``repeat_kv`` in front of them become one op per layer,
with the kv repeats dropped for ``enable_gqa``; what cannot be lowered stays, with a note.
Equivalence: logits and every gradient equal the unsharded eager model's on 1 and 2 gloo ranks.
"""
import dataclasses
import functools
import logging
import math
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")   # before the Triton kernel module is imported

import autotp  # noqa: E402
from autotp.kernels import attention_op  # noqa: E402
from autotp.program import copy_graph_module  # noqa: E402
from autotp.passes import REWRITE_PASSES  # noqa: E402
from autotp.passes.rules import val  # noqa: E402
from autotp.verify import Case, verify  # noqa: E402
from models import FAMILIES  # noqa: E402

ATTENTION = torch.ops.autotp.attention.default
SDPA = torch.ops.aten.scaled_dot_product_attention.default
TOL = 1e-5      # relative, fp32: SDPA against eager matmul + softmax differs in the last bits


# ---------------------------------------------------------------- the op

def _qkv(heads_q=4, heads_kv=4, seq_q=8, seq_k=8, head_dim=16, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads_q, seq_q, head_dim, generator=g).requires_grad_()
    k = torch.randn(batch, heads_kv, seq_k, head_dim, generator=g).requires_grad_()
    v = torch.randn(batch, heads_kv, seq_k, head_dim, generator=g).requires_grad_()
    return q, k, v


def _grads(fn, inputs, grad_out):
    out = fn(*inputs)
    return (out, *torch.autograd.grad(out, [t for t in inputs if t is not None and t.requires_grad], grad_out))


OP_CASES = {
    "causal": dict(kv=4, mask=None, causal=True, scale=None, gqa=False),
    "additive-mask": dict(kv=4, mask="float", causal=False, scale=0.3, gqa=False),
    "learned-mask": dict(kv=4, mask="float-grad", causal=False, scale=None, gqa=False),
    "bool-mask": dict(kv=4, mask="bool", causal=False, scale=None, gqa=False),
    "gqa-causal": dict(kv=2, mask=None, causal=True, scale=None, gqa=True),
    "gqa-mask": dict(kv=1, mask="float", causal=False, scale=0.5, gqa=True),
}


def _mask(kind):
    g = torch.Generator().manual_seed(1)
    if kind is None:
        return None
    if kind == "bool":
        return (torch.rand(2, 1, 8, 8, generator=g) > 0.3) | torch.eye(8, dtype=torch.bool)   # no empty row
    m = torch.randn(2, 1, 8, 8, generator=g)
    return m.requires_grad_() if kind == "float-grad" else m


@pytest.mark.parametrize("case", list(OP_CASES))
def test_op_is_sdpa_forward_and_backward(case):
    c = OP_CASES[case]
    q, k, v = _qkv(heads_kv=c["kv"])
    mask = _mask(c["mask"])
    grad_out = torch.randn(2, 4, 8, 16, generator=torch.Generator().manual_seed(2))

    def ours(q, k, v, mask):
        return torch.ops.autotp.attention(q, k, v, attn_mask=mask, is_causal=c["causal"], scale=c["scale"],
                                          enable_gqa=c["gqa"])

    def sdpa(q, k, v, mask):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=c["causal"], scale=c["scale"],
                                              enable_gqa=c["gqa"])

    got, want = _grads(ours, (q, k, v, mask), grad_out), _grads(sdpa, (q, k, v, mask), grad_out)
    assert len(got) == len(want) == (5 if case == "learned-mask" else 4)     # out, dq, dk, dv (, dmask)
    for name, a, b in zip(("out", "dq", "dk", "dv", "dmask"), got, want):
        assert a.shape == b.shape, name
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=lambda m: f"{case} {name}: {m}")   # it *is* SDPA


def test_op_opcheck():
    """Schema, fake (meta) kernel, autograd registration and AOT tracing, by torch's own checker."""
    q, k, v = _qkv(heads_kv=2)
    torch.library.opcheck(ATTENTION, (q, k, v), dict(attn_mask=_mask("float"), is_causal=False, scale=0.25,
                                                     enable_gqa=True))


def test_op_takes_3d_inputs_and_returns_contiguous():
    q, k, v = (t.detach().flatten(0, 1).requires_grad_() for t in _qkv())    # (B*H, L, D)
    out = torch.ops.autotp.attention(q, k, v, is_causal=True)
    want = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    assert out.is_contiguous() and out.shape == (8, 8, 16)
    out.sum().backward()
    assert q.grad.shape == q.shape


def test_op_counts_and_logs_its_backend(caplog):
    attention_op.reset_backend_counts()
    q, k, v = _qkv()
    with caplog.at_level(logging.INFO, logger="autotp"):
        for _ in range(3):
            torch.ops.autotp.attention(q, k, v, is_causal=True).sum().backward()
    assert attention_op.backend_counts() == {"sdpa": 3}           # forwards only: the backward recomputes
    assert attention_op.last_backend() == "sdpa"
    logged = [r for r in caplog.records if "autotp.attention runs on sdpa" in r.getMessage()]
    assert len(logged) == 1 and logged[0].levelno == logging.INFO   # once, not per call


def _fake(shape, dtype=torch.float16, device="cuda"):
    return torch.empty(shape, dtype=dtype, device=device)


@pytest.mark.parametrize("flash_installed", [True, False], ids=["flash-attn", "no-flash-attn"])
def test_choose_backend_dispatch_order(monkeypatch, flash_installed):
    """flash-attn, then Triton, on CUDA fp16/bf16 with no mask; SDPA otherwise (fake CUDA tensors)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    monkeypatch.setattr(attention_op, "_flash_attn_func", lambda: (lambda *a, **k: None) if flash_installed else None)
    monkeypatch.setattr(attention_op, "_triton_attention", lambda: (lambda *a, **k: None))
    fused = "flash_attn" if flash_installed else "triton"
    choose = attention_op.choose_backend
    with FakeTensorMode(allow_non_fake_inputs=True):
        q, kv = _fake((2, 8, 128, 64)), _fake((2, 2, 128, 64))
        assert choose(q, None, True) == fused
        assert choose(q, None, True, k=kv, v=kv, enable_gqa=True) == fused
        assert choose(q, None, True, k=kv, v=kv, enable_gqa=False) == "sdpa"     # SDPA's error, not ours
        assert choose(_fake((2, 8, 128, 64), torch.bfloat16), None, False) == fused
        assert choose(q, _fake((2, 1, 128, 128), torch.bool)) == "sdpa"           # masks: SDPA only
        assert choose(_fake((2, 8, 128, 64), torch.float32), None, True) == "sdpa"
        assert choose(_fake((2, 8, 128, 64), device="cpu"), None, True) == "sdpa"
        # head_dim 80: flash-attn takes any multiple of 8 up to 256, the Triton kernel 16/32/64/128
        assert choose(_fake((2, 8, 128, 80)), None, True) == ("flash_attn" if flash_installed else "sdpa")
        # causal with L_q != L_k: flash-attn aligns the mask bottom-right, SDPA and Triton top-left
        assert choose(_fake((2, 8, 16, 64)), None, True, k=kv, v=kv, enable_gqa=True) == "triton"


def _flash_attn_like(q, k, v, softmax_scale=None, causal=False):
    """flash-attn's contract on (B, L, H, D) tensors, GQA included, computed by SDPA."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         is_causal=causal, scale=softmax_scale, enable_gqa=True)
    return out.transpose(1, 2)


@pytest.mark.parametrize("backend", ["flash_attn", "triton"])
def test_fused_backends_forward_and_backward(monkeypatch, backend):
    """The op's plumbing for the CUDA backends (layouts, GQA, the recomputing backward), on CPU:
    Triton under its interpreter, flash-attn as a stand-in with its calling convention."""
    monkeypatch.setattr(attention_op, "select_backend", lambda *a: (backend, "forced by the test"))
    if backend == "flash_attn":
        monkeypatch.setattr(attention_op, "_flash_attn_func", lambda: _flash_attn_like)
    attention_op.reset_backend_counts()
    q, k, v = _qkv(heads_q=4, heads_kv=2, seq_q=20, seq_k=20, head_dim=16, batch=1)
    grad_out = torch.randn(1, 4, 20, 16, generator=torch.Generator().manual_seed(3))
    got = _grads(lambda q, k, v: torch.ops.autotp.attention(q, k, v, None, True, 0.3, True), (q, k, v), grad_out)
    want = _grads(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.3, enable_gqa=True),
                  (q, k, v), grad_out)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=lambda m: f"{backend} {name}: {m}")
    assert got[0].is_contiguous() and attention_op.backend_counts() == {backend: 1}


# ---------------------------------------------------------------- the pass on Hugging Face models

@dataclasses.dataclass
class EagerHF:
    """A picklable factory: the Hugging Face model with hand-written (``eager``) attention."""
    config: dict

    def __call__(self) -> nn.Module:
        from transformers import AutoConfig, AutoModelForCausalLM
        return AutoModelForCausalLM.from_config(AutoConfig.for_model(**self.config), attn_implementation="eager")


def _layers(family: str) -> int:
    cfg = FAMILIES[family]
    return cfg.get("num_hidden_layers", cfg.get("n_layer"))


@functools.lru_cache(maxsize=None)
def _plan(family: str, impl: str, world: int):
    torch.manual_seed(0)
    model = EagerHF(FAMILIES[family])() if impl == "eager" else _sdpa_model(family)
    ids = torch.randint(0, 96, (2, 8))
    return autotp.plan(model, (ids,), world_size=world)


def _sdpa_model(family: str) -> nn.Module:
    from autotp.verify import HFModel
    return HFModel(FAMILIES[family])()


def _targets(gm):
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


# the graph in detail for a few plans; every eager family at worlds 1 and 2 is counted in the
# equivalence runs below (from the plan's note)
PLANS = [("llama", "eager", 2), ("gpt2", "eager", 2), ("llama", "sdpa", 1), ("mistral", "sdpa", 2)]


@pytest.mark.parametrize("family,impl,world", PLANS, ids=lambda x: str(x))
def test_one_attention_op_per_layer(family, impl, world):
    plan = _plan(family, impl, world)
    gm = plan.rewritten()
    ops = [n for n in gm.graph.nodes if n.target == ATTENTION]
    assert len(ops) == _layers(family)
    targets = _targets(gm)
    assert SDPA not in targets and torch.ops.aten.softmax.int not in targets
    assert torch.ops.aten.matmul.default not in targets                # both matmuls of every chain are gone
    gqa = FAMILIES[family].get("num_key_value_heads", 0) not in (0, FAMILIES[family].get("num_attention_heads"))
    for op in ops:
        q, k = val(op.args[0]), val(op.args[1])
        assert op.kwargs["enable_gqa"] == gqa and (k.shape[1] < q.shape[1]) == gqa
        info = op.meta["autotp"]
        assert info["lowered"] == "sdpa"                                   # CPU: SDPA runs
        assert info["placement"] == (autotp.Shard(1) if world == 2 else autotp.Replicate())   # heads split
        assert op.meta.get("stack_trace") and op.meta.get("nn_module_stack")
        assert tuple(op.meta["autotp_val"].shape) == tuple(q.shape)
    # repeat_kv's expand to (B, H_kv, n_rep, L, D) is never materialised
    assert not [n for n in gm.graph.nodes if n.target == torch.ops.aten.expand.default and val(n).ndim == 5]
    assert any("attention lowered to autotp.attention" in n for n in plan.notes)
    assert "autotp.attention(" in plan.graph_text()


def _rewrite(plan, **options):
    """The rewritten graph of ``plan`` with context attributes changed (not cached)."""
    ctx = dataclasses.replace(plan.ctx, notes=[])
    for name, value in options.items():
        setattr(ctx, name, value)
    gm = copy_graph_module(plan.gm)
    for p in REWRITE_PASSES:
        gm = p(gm, ctx)
    return gm


def test_mqa_replicated_kv_head_is_not_repeated():
    """One kv head, replicated, under split query heads: collectives put Megatron's f
    (``reduce_grad``) inside ``repeat_kv``; lowering moves it onto k/v themselves."""
    from autotp import comm
    torch.manual_seed(0)
    model = EagerHF({**FAMILIES["llama"], "num_key_value_heads": 1})()
    plan = autotp.plan(model, (torch.randint(0, 96, (2, 8)),), world_size=2)
    gm = plan.rewritten()
    for op in [n for n in gm.graph.nodes if n.target == ATTENTION]:
        k, v = op.args[1], op.args[2]
        # each k/v reaches the op replicated with its gradient summed over ranks: Megatron's f, or
        # (k_proj/v_proj split on head_dim) an all-gather whose backward reduce-scatters
        summed = (comm.reduce_grad, comm.all_gather_rs)
        assert op.kwargs["enable_gqa"] and k.target in summed and v.target in summed
        assert val(k).shape[1] == 1 and op.meta["autotp"]["placement"] == autotp.Shard(1)
    assert not [n for n in gm.graph.nodes if n.target == torch.ops.aten.expand.default and val(n).ndim == 5]
    collectives = [n.target for n in gm.graph.nodes if n.target in comm.COLLECTIVES]
    assert collectives == [n.target for n in _rewrite(plan, lower_attention=False).graph.nodes
                           if n.target in comm.COLLECTIVES]                  # the same communication


def test_lowering_can_be_turned_off():
    gm = _rewrite(_plan("mistral", "sdpa", 2), lower_attention=False)
    assert ATTENTION not in _targets(gm) and _targets(gm).count(SDPA) == _layers("mistral")


# ---------------------------------------------------------------- hand-written attention, variants

class TinyLM(nn.Module):
    """Embedding -> one hand-written causal attention -> lm head; ``variant`` picks how the
    scores are scaled and masked (each is a way real models write it)."""

    def __init__(self, variant: str, vocab: int = 64, d: int = 32, heads: int = 4, max_len: int = 16):
        super().__init__()
        self.variant, self.heads, self.head_dim = variant, heads, d // heads
        self.embed = nn.Embedding(vocab, d)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d, bias=False) for _ in range(4))
        if variant == "bias":
            self.bias = nn.Parameter(0.1 * torch.randn(heads, max_len, max_len))   # learned, per head
        self.lm_head = nn.Linear(d, vocab, bias=False)

    def forward(self, ids):
        x = self.embed(ids)
        b, t, _ = x.shape
        h, hd = self.heads, self.head_dim
        q, k, v = (p(x).view(b, t, h, hd).transpose(1, 2) for p in (self.q, self.k, self.v))   # (B, H, T, hd)
        future = torch.ones(t, t, dtype=torch.bool, device=x.device).triu(1)                     # (T, T)
        weights = None
        if self.variant == "sdpa-causal":
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        elif self.variant == "sdpa-dropout":
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=0.1)
        elif self.variant == "bmm":
            q3, k3, v3 = (z.flatten(0, 1) for z in (q, k, v))                                     # (B*H, T, hd)
            s = torch.bmm(q3, k3.transpose(1, 2)) / math.sqrt(hd)
            out = torch.bmm(s.masked_fill(future, float("-inf")).softmax(-1), v3).view(b, -1, t, hd)
        else:
            s = q @ k.transpose(-2, -1)                                                         # (B, H, T, T)
            if self.variant == "masked-fill":
                s = (s / math.sqrt(hd)).masked_fill(future, float("-inf"))
            elif self.variant == "bias":       # additive learned bias, then the causal mask with the dtype min
                s = torch.where(future, torch.finfo(s.dtype).min, s * hd ** -0.5 + self.bias[:, :t, :t])
            elif self.variant == "softcap":    # Gemma-2 style logit soft-capping
                s = (torch.tanh(s * hd ** -0.5 / 5.0) * 5.0).masked_fill(future, float("-inf"))
            elif self.variant == "finite-fill":
                s = (s * hd ** -0.5).masked_fill(future, -1e4)
            elif self.variant == "weights-returned":
                s = (s * hd ** -0.5).masked_fill(future, float("-inf"))
            weights = s.softmax(dim=-1)
            if self.variant == "dropout":
                weights = F.dropout(weights, p=0.1, training=True)
            out = weights @ v
        logits = self.lm_head(self.o(out.transpose(1, 2).reshape(b, t, -1)))
        return (logits, weights) if self.variant == "weights-returned" else logits


@dataclasses.dataclass
class Tiny:
    variant: str

    def __call__(self) -> nn.Module:
        return TinyLM(self.variant)


LOWERED = ["masked-fill", "bias", "bmm", "sdpa-causal"]
KEPT = {"softcap": "soft-capping", "finite-fill": "filled with -10000", "weights-returned": "used outside",
        "dropout": "dropout p=0.1", "sdpa-dropout": "dropout_p=0.1"}


def _tiny_plan(variant: str, world: int = 2):
    torch.manual_seed(0)
    return autotp.plan(TinyLM(variant), (torch.randint(0, 64, (2, 8)),), world_size=world)


@pytest.mark.parametrize("variant", LOWERED)
def test_hand_written_variants_lower(variant):
    plan = _tiny_plan(variant)
    op = next(n for n in plan.rewritten().graph.nodes if n.target == ATTENTION)
    targets = _targets(plan.rewritten())
    assert torch.ops.aten.softmax.int not in targets and SDPA not in targets
    # masked-fill and bmm mask with triu(ones(T, T)): built from the length alone, exactly causal
    causal = variant in ("sdpa-causal", "masked-fill", "bmm")
    assert op.kwargs["is_causal"] == causal
    assert op.kwargs["scale"] == pytest.approx(8 ** -0.5)
    assert (op.kwargs["attn_mask"] is None) == causal


@pytest.mark.parametrize("variant", list(KEPT))
def test_what_cannot_be_lowered_stays_with_a_note(variant):
    plan = _tiny_plan(variant)
    gm = plan.rewritten()
    assert ATTENTION not in _targets(gm)
    notes = [n for n in plan.notes if "not lowered" in n]
    assert len(notes) == 1 and KEPT[variant] in notes[0], plan.notes


# ---------------------------------------------------------------- equivalence on gloo ranks

EQUIVALENCE = [Case(f"{f}-eager", EagerHF(FAMILIES[f])) for f in ("llama", "gpt2", "mistral")] + \
              [Case(f"tiny-{v}", Tiny(v), vocab=64) for v in LOWERED]
# a replicated kv head under split query heads only exists on several ranks
MQA = Case("llama-mqa-eager", EagerHF({**FAMILIES["llama"], "num_key_value_heads": 1}))


@pytest.fixture(scope="module", params=[1, 2], ids=lambda w: f"world{w}")
def results(request):
    world = request.param
    return world, verify(EQUIVALENCE + ([MQA] if world > 1 else []), world)


@pytest.mark.parametrize("name", [c.name for c in EQUIVALENCE + [MQA]])
def test_lowered_model_matches_unsharded_eager(results, name):
    world, per_rank = results
    if name == MQA.name and world == 1:
        pytest.skip("one rank has nothing to split")
    for rank, res in enumerate(per_rank):
        r = next(x for x in res if x.name == name)
        assert not r.error, f"rank {rank}:\n{r.error}"
        layers = _layers(name.split("-")[0]) if name.split("-")[0] in FAMILIES else 1
        assert f"attention lowered to autotp.attention: {layers}x sdpa" in r.summary, r.summary   # one per layer
        assert "not lowered" not in r.summary, r.summary
        assert r.logits_err <= TOL, f"{name} world {world}: logits error {r.logits_err:.2e}"
        assert r.grad_err <= TOL, f"{name} world {world}: gradient error {r.grad_err:.2e} at {r.worst_grad}"
        assert r.other_shape_err <= TOL, f"{name} world {world}: other-shape error {r.other_shape_err:.2e}"


@pytest.mark.parametrize("family,impl", [("llama", "sdpa"), ("gpt2", "eager")])
def test_size_only_causal_mask_becomes_is_causal(family, impl):
    """HF builds the causal mask from the sequence length (no attention_mask given): it is
    recognised as exactly causal, so the fused kernels (which take no mask) can run; a padding
    mask the user passes is data and stays."""
    torch.manual_seed(0)
    model = (_sdpa_model(family) if impl == "sdpa" else EagerHF(FAMILIES[family])())
    ids = torch.randint(0, 96, (2, 8))
    ops = [n for n in autotp.plan(model, (ids,), world_size=2).rewritten().graph.nodes if n.target == ATTENTION]
    assert ops and all(op.kwargs["is_causal"] and op.kwargs["attn_mask"] is None for op in ops)
    padded = autotp.plan(model, (ids,), {"attention_mask": torch.ones_like(ids)}, world_size=2)
    ops = [n for n in padded.rewritten().graph.nodes if n.target == ATTENTION]
    assert ops and all(not op.kwargs["is_causal"] and op.kwargs["attn_mask"] is not None for op in ops)
    # and the op computes the same thing as the mask did: one device, the mask form vs is_causal
    q, k, v = (torch.randn(2, 4, 8, 16) for _ in range(3))
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=torch.ones(8, 8, dtype=torch.bool).tril())
    assert torch.allclose(torch.ops.autotp.attention(q, k, v, is_causal=True), want, atol=1e-6)
