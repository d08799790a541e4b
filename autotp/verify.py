"""Multi-process equivalence runs: the parallel model against the same model on one device.

``verify(cases, world_size)`` starts ``world_size`` processes on gloo (CPU), and in each one,
for every case: builds the model (same seed on every rank), runs the unsharded reference
forward+backward, parallelises a copy with ``autotp.parallelize``, runs it, and compares
logits and every parameter gradient (``p.grad.full_tensor()``).  Collectives are counted with
``CommDebugMode``.  Used by the tests and by ``python -m autotp verify``.
"""
from __future__ import annotations

import copy
import dataclasses
import datetime
import os
import pickle
import tempfile
import traceback
from typing import Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F


@dataclasses.dataclass
class Case:
    """A model to check: ``build()`` returns a fresh module (called after seeding)."""
    name: str
    build: Callable[[], torch.nn.Module]
    batch: int = 2
    seq: int = 8
    vocab: int | None = None                  # default: model.config.vocab_size
    kwargs: dict = dataclasses.field(default_factory=dict)   # parallelize options
    other_shapes: tuple = ((3, 5),)           # (batch, seq) to run after planning on (batch, seq)
    # a model fed other inputs than token ids: ``inputs(batch, seq, seed) -> (args, kwargs)``; the
    # loss is then the output's inner product with a fixed random tensor (every output counts)
    inputs: Callable | None = None


@dataclasses.dataclass
class Result:
    name: str
    world: int
    logits_err: float = float("nan")          # max |parallel - reference| / max |reference|
    other_shape_err: float = 0.0              # the same, for inputs of other shapes than the example
    aux_err: float | None = None              # a MoE model's auxiliary (load-balancing) loss, relative
    grad_err: float = float("nan")            # worst over parameters, each relative to its own scale
    worst_grad: str = ""
    forward_counts: dict = dataclasses.field(default_factory=dict)
    backward_counts: dict = dataclasses.field(default_factory=dict)
    placements: dict = dataclasses.field(default_factory=dict)
    matrices: list = dataclasses.field(default_factory=list)   # parameters with >= 2 dims
    error: str = ""
    summary: str = ""


def _logits(out):
    logits = out.logits if hasattr(out, "logits") else (out[0] if isinstance(out, (tuple, list)) else out)
    if hasattr(logits, "full_tensor"):        # sharded_outputs=True: a DTensor in the plan's placement
        logits = logits.full_tensor()
    return logits


def _loss(logits, ids, aux=None):
    """Next-token cross entropy, plus the model's auxiliary loss when it returns one (a MoE
    router's load-balancing loss), so its gradient is checked too."""
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
    return loss if aux is None else loss + aux


def _probe_loss(logits):
    """``<logits, w>`` for a fixed random ``w``: a loss whose gradient reaches every output element."""
    w = torch.randn(logits.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float32)
    return (logits.float() * w).sum()


def _aux(out):
    aux = getattr(out, "aux_loss", None)
    return aux if isinstance(aux, torch.Tensor) else None


def _counts(mode) -> dict:
    return {str(k).split(".")[-1]: v for k, v in mode.get_comm_counts().items() if v}


# parallelize's options that make the plan (a plan made beforehand carries them)
_PLAN_OPTIONS = ("strict", "link", "overrides", "sharded_outputs", "sequence_parallel", "max_activation_bytes",
                 "memory_budget",
                 "param_dtype")


def _example(case: Case, seed: int):
    """The case's model (seeded), example inputs and vocabulary size: the same in every process."""
    torch.manual_seed(seed)
    model = case.build()
    vocab = None
    if case.inputs is None:
        vocab = case.vocab or getattr(model.config, "vocab_size", None) or model.get_input_embeddings().num_embeddings
        ids = torch.randint(0, vocab, (case.batch, case.seq), generator=torch.Generator().manual_seed(seed + 1))
        return model, (ids,), {}, vocab
    args, kwargs = case.inputs(case.batch, case.seq, seed + 1)
    return model, args, kwargs, vocab


def plan_case(case: Case, world: int, seed: int = 0):
    """The case's plan, made once in this process (``autotp.plan``) for every rank to use; the
    planning error's text when it cannot be made (each rank then plans and reports it)."""
    import autotp
    try:
        model, args, kwargs, _ = _example(case, seed)
        return autotp.plan(model, args, kwargs, world_size=world,
                           **{k: v for k, v in case.kwargs.items() if k in _PLAN_OPTIONS})
    except Exception:  # noqa: BLE001 — the ranks plan again and report it in their result
        return None


def run_case(case: Case, rank: int, world: int, seed: int = 0, plan=None) -> Result:
    """``plan``: made beforehand by ``plan_case`` (None: this rank plans, as ``parallelize`` does)."""
    import autotp
    from torch.distributed.tensor.debug import CommDebugMode
    res = Result(case.name, world)
    torch.set_grad_enabled(True)          # whatever an earlier case left behind
    try:
        model, args, kwargs, vocab = _example(case, seed)
        reference = copy.deepcopy(model)
        res.matrices = [n for n, p in model.named_parameters() if p.ndim >= 2]
        if case.inputs is None:
            loss_of = lambda logits, aux: _loss(logits, args[0], aux)  # noqa: E731
        else:
            loss_of = lambda logits, aux: _probe_loss(logits) if aux is None else _probe_loss(logits) + aux  # noqa: E731
        ref_out = reference(*args, **kwargs)
        ref_logits, ref_aux = _logits(ref_out), _aux(ref_out)
        loss_of(ref_logits, ref_aux).backward()
        ref_grads = {n: p.grad for n, p in reference.named_parameters() if p.grad is not None}

        given = {"plan": plan} if plan is not None else {k: v for k, v in case.kwargs.items() if k in _PLAN_OPTIONS}
        others = {k: v for k, v in case.kwargs.items() if k not in _PLAN_OPTIONS}
        pmodel = autotp.parallelize(model, args, kwargs, **given, **others)
        res.placements = {n: autotp.fmt(p) for n, p in pmodel.plan.placements.items()}
        res.summary = pmodel.plan.summary()
        with CommDebugMode() as fwd:
            out = pmodel(*args, **kwargs)
        logits, aux = _logits(out), _aux(out)
        if (aux is None) != (ref_aux is None):
            raise AssertionError(f"auxiliary loss: {aux} from the parallel model, {ref_aux} from the reference")
        if aux is not None:
            res.aux_err = abs(aux.item() - ref_aux.item()) / max(abs(ref_aux.item()), 1e-12)
        loss = loss_of(logits, aux)
        with CommDebugMode() as bwd:
            loss.backward()
        res.forward_counts, res.backward_counts = _counts(fwd), _counts(bwd)
        scale = ref_logits.abs().max().item()
        res.logits_err = (logits.detach() - ref_logits.detach()).abs().max().item() / scale
        worst, worst_name = 0.0, ""
        # a gradient that is zero in exact arithmetic (a key bias: softmax ignores it) is float
        # noise on both sides; measure each against at least 1e-3 of the largest gradient
        floor = 1e-3 * max(g.abs().max().item() for g in ref_grads.values())
        for name, p in pmodel.named_parameters():
            if name not in ref_grads:
                continue
            g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
            ref = ref_grads[name]
            err = (g - ref).abs().max().item() / max(ref.abs().max().item(), floor)
            if not err <= worst:                      # NaN counts as the worst
                worst, worst_name = err, name
        missing = [n for n in ref_grads if n not in dict(pmodel.named_parameters())]
        if missing:
            raise AssertionError(f"parameters missing from the parallel model: {missing}")
        res.grad_err, res.worst_grad = worst, worst_name
        for b, t in case.other_shapes:
            if case.inputs is None:
                other = (torch.randint(0, vocab, (b, t), generator=torch.Generator().manual_seed(seed + 2)),), {}
            else:
                other = case.inputs(b, t, seed + 2)
            with torch.no_grad():
                want = _logits(reference(*other[0], **other[1]))
                got = _logits(pmodel(*other[0], **other[1]))
            err = (got - want).abs().max().item() / want.abs().max().item()
            res.other_shape_err = err if not err <= res.other_shape_err else res.other_shape_err
    except Exception:  # noqa: BLE001 — reported to the parent process
        res.error = traceback.format_exc()
    return res


def _worker(rank: int, world: int, store_path: str, out_dir: str, cases: list[Case], timeout_s: float,
            plans: list) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    store = dist.FileStore(store_path, world)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=timeout_s))
    results = [run_case(c, rank, world, plan=p) for c, p in zip(cases, plans)]
    with open(os.path.join(out_dir, f"rank{rank}.pkl"), "wb") as f:
        pickle.dump(results, f)
    dist.barrier()
    dist.destroy_process_group()


def verify(cases: list[Case], world_size: int, timeout_s: float = 120.0, plan_once: bool = True,
           plans: list | None = None) -> list[list[Result]]:
    """Run every case on ``world_size`` gloo processes; returns results[rank][case].

    ``plan_once``: plan each case here, once, and give every rank that plan
    (``parallelize(..., plan=)``; forked processes inherit it) instead of every rank planning the
    same thing — on a machine with fewer cores than ranks, planning is most of a case's time.
    Whether ranks plan alike is ``check_same_plan``'s test, not this one's.  ``plans``: the
    cases' plans when the caller has made them (``plan_case``), None entries planned here."""
    start = os.environ.get("AUTOTP_START_METHOD", "fork")
    given = plans or [None] * len(cases)
    plans = [p if p is not None else plan_case(c, world_size) if plan_once and start == "fork" else None
             for c, p in zip(cases, given)]
    with tempfile.TemporaryDirectory() as tmp:
        store = os.path.join(tmp, "store")
        mp.start_processes(_worker, args=(world_size, store, tmp, cases, timeout_s, plans), nprocs=world_size,
                           join=True, start_method=start)
        out = []
        for r in range(world_size):
            with open(os.path.join(tmp, f"rank{r}.pkl"), "rb") as f:
                out.append(pickle.load(f))
        return out


@dataclasses.dataclass
class HFModel:
    """A picklable Hugging Face causal-LM factory: ``AutoConfig.for_model(**config)``, random weights."""
    config: dict

    def __call__(self) -> torch.nn.Module:
        from transformers import AutoConfig, AutoModelForCausalLM
        cfg = AutoConfig.for_model(**self.config)
        return AutoModelForCausalLM.from_config(cfg)
