"""bf16 mixed precision with autotp (issue 18, item 2), four gloo ranks, a tiny Llama.

* autocast: fp32 parameters, ``torch.autocast("cpu", dtype=torch.bfloat16)`` around the forward,
  tp 2.  The captured graph runs its ATen ops under autocast as eager code does (matmuls and
  attention in bf16, the norms' explicit fp32 upcasts as traced), so 3 AdamW steps give the
  losses of the same model on one device under the same autocast, within bf16's rounding.
* FSDP2 mixed precision on (dp 2 x tp 2): the fp32 model planned with ``parallelize(...,
  param_dtype=bf16)``, then ``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)`` per
  layer (docs/fsdp2.md, 'Mixed precision').  3 AdamW steps give the losses of one device training
  fp32 master weights with a bf16 forward (the parameters cast to bf16 in the forward, as the
  policy does), and every collective of the forward moves bf16: autotp's over tp (recorded by a
  dispatch mode, as many as the plan lists) and FSDP2's all-gathers over dp.
* A plan made in fp32 under that policy, and a bf16 plan over fp32 parameters without it, raise
  an AutoTPError naming the way out, instead of torch's "expected m1 and m2 to have the same
  dtype" deep in the first layer.
* ``capture(..., param_dtype=bf16)`` (one process): the graph of the bf16 model over fp32 weights,
  what ``parallelize(..., param_dtype=)`` plans from.

Tolerance: 2e-2 relative on each step's loss (bf16 keeps 8 bits of mantissa: 4e-3 per rounding).
The autotp-vs-one-device difference must also be of the order of bf16's own error (one device in
bf16 vs one device in fp32): a difference much larger than that would be autotp's, not bf16's.
"""
import collections
import copy
import time

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
import transformers.models.llama.modeling_llama  # noqa: F401 — imported once here, not in each forked rank
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

import autotp
from models import build
from ranks import case, run_cases

DP, TP = 2, 2
BATCH, SEQ, STEPS = 2, 16, 3          # BATCH rows per dp rank
TOL = 2e-2


def _loss(logits, ids):
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())


def _adamw(params):
    return torch.optim.AdamW(params, lr=1e-2, eps=1e-3, weight_decay=0.1)


def _train(forward, params, ids, autocast=False) -> list[float]:
    """STEPS AdamW steps of ``forward(ids) -> logits``; the losses."""
    opt, losses = _adamw(params), []
    for _ in range(STEPS):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            logits = forward(ids)
            loss = _loss(logits, ids)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def _first_rank() -> bool:
    """The one-device references run on rank 0 only (2 cores shared by 4 ranks); every rank is
    compared with them."""
    return dist.get_rank() == 0


def _setup():
    from torch.distributed.device_mesh import init_device_mesh
    mesh = init_device_mesh("cpu", (DP, TP), mesh_dim_names=("dp", "tp"))
    torch.manual_seed(0)
    model = build("llama")
    ids = torch.randint(0, model.config.vocab_size, (DP * BATCH, SEQ), generator=torch.Generator().manual_seed(1))
    return mesh, model, ids


def _autocast():
    """tp 2 (each dp group trains the same batch on its own), fp32 parameters, bf16 autocast."""
    mesh, model, ids = _setup()
    fp32_ref, bf16_ref = copy.deepcopy(model), copy.deepcopy(model)
    mine = ids[:BATCH]
    pmodel = autotp.parallelize(model, (mine,), mesh=mesh["tp"])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        dtype = pmodel(mine).logits.dtype
    out = {"losses": _train(lambda x: pmodel(x).logits, pmodel.parameters(), mine, autocast=True),
           "logits_dtype": dtype, "param_dtype": next(pmodel.parameters()).dtype}
    if _first_rank():
        out["bf16_reference"] = _train(lambda x: bf16_ref(x).logits, bf16_ref.parameters(), mine, autocast=True)
        out["fp32_reference"] = _train(lambda x: fp32_ref(x).logits, fp32_ref.parameters(), mine)
    return out


def _one_device_mixed(model, ids) -> list[float]:
    """fp32 master weights, the forward on their bf16 casts (what FSDP2's policy computes), the
    cast's backward bringing each gradient back to fp32 for AdamW."""
    params = dict(model.named_parameters())

    def forward(x):
        cast = {n: p.to(torch.bfloat16) for n, p in params.items()}
        return torch.func.functional_call(model, cast, (x,)).logits
    return _train(forward, list(params.values()), ids)


class _CollectiveDtypes(TorchDispatchMode):
    """Counts the collectives dispatched inside it by (op, dtype of its first tensor, mesh dim):
    autotp's are torch's functional collectives (``_c10d_functional``), FSDP2's are ``c10d`` ops.
    Only records; every op runs as it would."""

    def __init__(self, mesh):
        super().__init__()
        self.dims = {mesh[d].get_group().group_name: d for d in mesh.mesh_dim_names}
        self.seen = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace in ("_c10d_functional", "c10d") and not func._opname.startswith("wait"):
            leaves = pytree.tree_leaves((args, kwargs))
            tensor = next(a for a in leaves if isinstance(a, torch.Tensor))
            dim = next((self.dims[n] for n in map(_group_name, leaves) if n in self.dims), "?")
            self.seen[(f"{func.namespace}.{func._opname}", tensor.dtype, dim)] += 1
        return func(*args, **(kwargs or {}))


def _group_name(arg) -> str | None:
    """The process group an argument names: a functional collective's ``group_name`` string, or a
    c10d op's ProcessGroup."""
    if isinstance(arg, str):
        return arg
    if isinstance(arg, torch.ScriptObject):        # a ProcessGroup or a ReduceOp, boxed for the dispatcher
        try:
            return dist.ProcessGroup.unbox(arg).group_name
        except (RuntimeError, TypeError):
            return None
    return None


def _first_forward_error(pmodel, ids) -> str | None:
    try:
        pmodel(ids)
    except autotp.AutoTPError as e:
        return str(e)
    return None


def _fsdp2_mixed(param_dtype=torch.bfloat16):
    """(dp 2 x tp 2): the fp32 model planned with ``param_dtype`` (None: in fp32), FSDP2 per layer
    with the bf16 MixedPrecisionPolicy over the fp32 master weights; each dp rank its half of the
    batch."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mesh, model, ids = _setup()
    fp32_ref, mixed_ref, bf16_ref = copy.deepcopy(model), copy.deepcopy(model), copy.deepcopy(model).to(torch.bfloat16)
    dp = mesh["dp"].get_local_rank()
    mine = ids[dp * BATCH:(dp + 1) * BATCH]
    pmodel = autotp.parallelize(model, (mine,), mesh=mesh, param_dtype=param_dtype)
    out = {"without_policy": _first_forward_error(pmodel, mine) if param_dtype is not None else None}
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for layer in pmodel.blocks():
        fully_shard(layer, mesh=mesh["dp"], mp_policy=policy)
    fully_shard(pmodel, mesh=mesh["dp"], mp_policy=policy)
    comm = _CollectiveDtypes(mesh)

    def forward(x):
        with comm:
            return pmodel(x).logits
    losses = torch.tensor(_train(forward, pmodel.parameters(), mine))
    dist.all_reduce(losses, group=mesh["dp"].get_group())      # equal halves: the mean is the whole batch's
    out |= {"losses": (losses / DP).tolist(), "param_dtype": next(pmodel.parameters()).dtype,
            "forward_collectives": dict(comm.seen), "planned_per_forward": sum(pmodel.plan.counts()["forward"].values())}
    if _first_rank():
        out["mixed_reference"] = _one_device_mixed(mixed_ref, ids)
        out["bf16_reference"] = _train(lambda x: bf16_ref(x).logits, bf16_ref.parameters(), ids)
        out["fp32_reference"] = _train(lambda x: fp32_ref(x).logits, fp32_ref.parameters(), ids)
    return out


def _fp32_plan_under_policy():
    try:
        _fsdp2_mixed(param_dtype=None)
    except autotp.AutoTPError as e:
        return {"message": str(e)}
    return {"message": None}


@pytest.fixture(scope="module")
def results():
    def timed(fn):
        def run():
            t0 = time.perf_counter()
            out = fn()
            print(f"{fn.__name__}: {time.perf_counter() - t0:.1f} s")
            return out
        return run
    return run_cases(lambda: {"autocast": timed(_autocast), "fsdp2_mixed": timed(_fsdp2_mixed),
                              "fp32_plan": timed(_fp32_plan_under_policy)}, DP * TP)


def _rel(got, want) -> float:
    return max(abs(g - w) / abs(w) for g, w in zip(got, want))


def test_autocast_trains_like_one_device(results):
    refs = case(results, "autocast")[0]
    for rank, r in enumerate(case(results, "autocast")):
        r = {**refs, **r}
        assert r["param_dtype"] == torch.float32 and r["logits_dtype"] == torch.bfloat16, r   # autocast ran
        vs_bf16, bf16_error = _rel(r["losses"], r["bf16_reference"]), _rel(r["bf16_reference"], r["fp32_reference"])
        print(f"rank {rank} autocast tp {TP}: losses {[round(x, 5) for x in r['losses']]}: vs one device under "
              f"autocast {vs_bf16:.1e} (tolerance {TOL:.0e}); one device autocast vs fp32 {bf16_error:.1e}")
        assert vs_bf16 <= TOL, (rank, vs_bf16)
        assert bf16_error > 0 and vs_bf16 <= 3 * bf16_error, (rank, vs_bf16, bf16_error)


def test_fsdp2_mixed_precision_policy_trains_like_one_device(results):
    refs = case(results, "fsdp2_mixed")[0]
    for rank, r in enumerate(case(results, "fsdp2_mixed")):
        r = {**refs, **r}
        assert r["param_dtype"] == torch.float32, r          # the sharded master weights
        vs_mixed = _rel(r["losses"], r["mixed_reference"])
        vs_bf16, bf16_error = _rel(r["losses"], r["bf16_reference"]), _rel(r["mixed_reference"], r["fp32_reference"])
        print(f"rank {rank} MixedPrecisionPolicy dp {DP} x tp {TP}: losses {[round(x, 5) for x in r['losses']]}: "
              f"vs one device mixed {vs_mixed:.1e}, vs one device all-bf16 {vs_bf16:.1e} (tolerance {TOL:.0e}); "
              f"one device mixed vs fp32 {bf16_error:.1e}")
        assert vs_mixed <= TOL and vs_bf16 <= TOL, (rank, vs_mixed, vs_bf16)
        assert bf16_error > 0 and vs_mixed <= 3 * bf16_error, (rank, vs_mixed, bf16_error)


def test_fsdp2_mixed_precision_collectives_move_bf16(results):
    """Collectives run in the activation dtype: in the forward of the fp32 model planned with
    ``param_dtype=bf16`` under the bf16 policy, every collective autotp inserted (over tp) moves
    bf16, and it ran as many times as the plan lists per forward; FSDP2's all-gathers over dp
    move the bf16 casts of the weights."""
    for rank, r in enumerate(case(results, "fsdp2_mixed")):
        seen = r["forward_collectives"]
        print(f"rank {rank} forward collectives over {STEPS} steps: "
              + ", ".join(f"{n} x {op} {str(dtype).replace('torch.', '')} over {dim}"
                          for (op, dtype, dim), n in sorted(seen.items(), key=str)))
        tp = {k: n for k, n in seen.items() if k[2] == "tp"}
        assert tp and all(op.startswith("_c10d_functional.") for op, _, _ in tp), seen
        assert sum(tp.values()) == STEPS * r["planned_per_forward"], (seen, r["planned_per_forward"])
        assert {dtype for _, dtype, _ in seen} == {torch.bfloat16}, seen
        assert {dim for _, _, dim in seen} == {"tp", "dp"}, seen


def test_bf16_plan_without_the_policy_names_it(results):
    """``param_dtype=bf16`` over fp32 parameters that nothing casts (no fully_shard yet): the
    first forward says to apply the policy."""
    for message in (r["without_policy"] for r in case(results, "fsdp2_mixed")):
        assert message is not None, "a plan made in bf16 ran on fp32 parameters"
        assert "captured with torch.bfloat16" in message and "MixedPrecisionPolicy(param_dtype=torch.bfloat16)" \
            in message, message


def test_fp32_plan_under_bf16_policy_names_the_way_out(results):
    for rank, message in enumerate(r["message"] for r in case(results, "fp32_plan")):
        assert message is not None, "a plan made in fp32 ran under MixedPrecisionPolicy(param_dtype=bf16)"
        assert "captured with torch.float32" in message and "param_dtype=torch.bfloat16" in message, message


def test_capture_in_the_param_dtype_keeps_the_model_fp32():
    """``capture(..., param_dtype=bf16)``, the mechanism of planning in bf16 over fp32 weights: the
    graph is the one of a bf16 model (the parameters bf16, RMSNorm's ``.to(input_dtype)`` a bf16
    cast), the model's own parameters stay fp32, and tied weights stay one placeholder."""
    from autotp.capture import capture
    aten = torch.ops.aten
    model = build("qwen2")                      # tie_word_embeddings: embedding and head share a weight
    ids = torch.randint(0, model.config.vocab_size, (2, 8), generator=torch.Generator().manual_seed(1))
    cast = capture(model, (ids,), param_dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    placeholders = {n.name: getattr(n.meta["val"], "dtype", None) for n in cast.gm.graph.nodes if n.op == "placeholder"}
    assert {placeholders[n] for n in cast.params} == {torch.bfloat16}
    assert len(cast.params) == len(list(model.parameters())) == len(model.state_dict()) - 1   # the tied pair: one
    casts = [n.args[1] for n in cast.gm.graph.nodes if n.target == aten.to.dtype]
    assert torch.bfloat16 in casts and torch.float32 in casts, casts         # .to(input_dtype) and the upcast
