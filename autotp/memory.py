"""Measured memory: the bytes of tensor storages a piece of code allocates and keeps alive.

``LiveBytes`` is a dispatch mode that sees every op's outputs, remembers each new storage by a
weak reference to the storage itself (not to a Python wrapper), and so knows at any moment how
many of the bytes it saw allocated are still alive.  It works on any device, CPU included,
where there are no allocator statistics:

    with LiveBytes() as mem:
        loss = pmodel(ids).logits.sum()
    mem.live     # bytes the forward allocated that are still held: what backward will read
    mem.peak     # the most that were alive at once

Views share their base's storage and are counted once; a storage resized in place (FSDP2's
free of an unsharded parameter) counts at its size now.  Parameters and inputs that exist
before the block are not counted (they were not allocated inside it).
"""
from __future__ import annotations

import dataclasses

import torch
import torch.fx as fx
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.checkpoint import checkpoint


class LiveBytes(TorchDispatchMode):
    """Bytes allocated inside the block that are alive now (``live``) and at the peak (``peak``)."""

    def __init__(self, on_op=None, split_dtype: torch.dtype | None = None):
        super().__init__()
        self._storages: dict[int, tuple[StorageWeakRef, int, bool]] = {}   # cdata -> (weak ref, bytes, of split_dtype)
        self._live = 0
        self.peak = 0
        self._on_op = on_op                   # called after each op (a test's own probe)
        self._split_dtype = split_dtype       # also count bytes of this dtype apart (``split``)
        self._live_split = 0
        self.peak_split = (0, 0)

    def split(self) -> tuple[int, int]:
        """Live bytes now: (of ``split_dtype``, of every other dtype)."""
        self._prune()
        return self._live_split, self._live - self._live_split

    def reset_peak(self) -> None:
        self.peak = self._live
        self.peak_split = (self._live_split, self._live - self._live_split)

    @property
    def live(self) -> int:
        self._prune()
        return self._live

    def _prune(self) -> None:
        """Forget the storages freed since, and re-read the size of those resized in place (FSDP2
        frees an unsharded parameter by resizing its storage to 0, not by dropping it)."""
        for k, (ref, n, of_split) in list(self._storages.items()):
            now = 0 if ref.expired() else torch.UntypedStorage._new_with_weak_ptr(ref.cdata).nbytes()
            if now != n:
                self._live += now - n
                self._live_split += (now - n) if of_split else 0
                self._storages[k] = (ref, now, of_split)
            if ref.expired():
                del self._storages[k]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self._prune()                         # first: a freed storage's address may be reused by an output
        # a view's storage is its input's: allocated here only if no input holds it (a view of a
        # parameter made inside the block is not new memory)
        held = {t.untyped_storage()._cdata for t in pytree.tree_leaves((args, kwargs)) if _plain(t)}
        for t in pytree.tree_leaves(out):
            if _plain(t):
                storage = t.untyped_storage()
                key = storage._cdata
                if key not in self._storages and key not in held:
                    of_split = t.dtype == self._split_dtype
                    self._storages[key] = (StorageWeakRef(storage), storage.nbytes(), of_split)
                    self._live += storage.nbytes()
                    self._live_split += storage.nbytes() if of_split else 0
        if self._live > self.peak:
            self.peak = self._live
            self.peak_split = (self._live_split, self._live - self._live_split)
        if self._on_op is not None:
            self._on_op()
        return out


def _plain(t) -> bool:
    return isinstance(t, torch.Tensor) and type(t) is torch.Tensor


# ---------------------------------------------------------------- the estimate

@dataclasses.dataclass
class MemoryEstimate:
    """Per-rank bytes of one training step (``Plan.memory``).  ``peak`` is the most alive at once:
    the state at rest (parameters, optimizer state, gradients, all sharded over dp by FSDP2), plus
    the larger of the forward's and the backward's working set, plus the layers FSDP2 gathers."""
    parameters: float
    gradients: float
    optimizer: float
    activations: float            # what the forward keeps for backward (end of forward)
    forward_peak: float           # activations + the forward's largest temporaries (logits, softmax)
    backward_peak: float          # the backward's working set above the state at rest
    gathered: float               # FSDP2: the root's and one layer's parameters, unsharded (dp > 1)
    peak: float
    device_bytes: float
    config: dict

    @property
    def fits(self) -> bool:
        return self.peak <= self.device_bytes

    def text(self) -> str:
        c = self.config
        unit, scale = ("GB", 1e9) if self.peak >= 1e9 else ("MB", 1e6)
        rows = [("parameters", self.parameters, "(tp shard / dp)"), ("gradients", self.gradients, ""),
                ("optimizer state", self.optimizer, ""),
                ("activations", self.activations, "(kept for backward, simulated on meta)"),
                ("forward peak", self.forward_peak, "(activations + temporaries: logits, softmax)"),
                ("backward peak", self.backward_peak, ""),
                ("gathered layers", self.gathered, "(FSDP2 all-gather, dp > 1)")]
        lines = [f"memory per rank: tp {c['tp']} x dp {c['dp']}, batch {c['batch']} x seq {c['seq']}, "
                 f"{str(c['dtype']).replace('torch.', '')} compute, {str(c['master_dtype']).replace('torch.', '')} "
                 f"parameters/gradients/optimizer state, {c['optimizer'] or 'no optimizer'}, "
                 f"activation checkpointing {c['activation_checkpointing']}"]
        lines += [f"  {name:<16} {value / scale:9.2f} {unit}   {why}".rstrip() for name, value, why in rows]
        lines.append(f"  {'peak':<16} {self.peak / scale:9.2f} {unit}   -> {'fits' if self.fits else 'does NOT fit'} "
                     f"{self.device_bytes / 1e9:.0f} GB")
        return "\n".join(lines)


def estimate(plan, batch: int, seq: int, dtype: torch.dtype = torch.bfloat16, optimizer: str | None = "adamw",
             dp: int = 1, activation_checkpointing: str | None = None, device_gb: float = 80.0,
             rank: int = 0, master_dtype: torch.dtype | None = None) -> MemoryEstimate:
    """The per-rank memory of a training step under ``plan``: parameter, gradient and optimizer
    bytes from the placements, activations by running this rank's program (cut into its layers,
    checkpointed as asked) on the meta device at (batch, seq) under ``LiveBytes``.

    ``dtype``: the compute dtype (activations, gathered layers).  ``master_dtype``: the dtype of
    the sharded parameters, gradients and optimizer state (default ``dtype``; ``torch.float32``
    for FSDP2's ``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)`` with fp32 master
    weights, torchtitan's setup).  The optimizer keeps its state in the parameters' dtype."""
    sims = plan.__dict__.setdefault("_memory_simulations", {})      # dp, dtype and optimizer are arithmetic
    key = (batch, seq, activation_checkpointing, rank)
    if key not in sims:
        sims[key] = simulate(plan, batch, seq, activation_checkpointing, rank)
    sim = sims[key]
    scale = dtype.itemsize / sim["float_itemsize"]
    float_ = lambda k: sim[k + "_float"] * scale + sim[k + "_other"]      # noqa: E731
    master = master_dtype or dtype
    params_tp = sim["param_numel"] * master.itemsize
    states = {None: 0, "sgd": 0, "sgd_momentum": 1, "adamw": 2, "adam": 2}
    if optimizer not in states:
        raise ValueError(f"optimizer={optimizer!r}: one of {sorted(k for k in states if k)} or None")
    params, grads = params_tp / dp, params_tp / dp
    opt = states[optimizer] * params_tp / dp
    activations, fwd = float_("kept"), float_("forward_peak")
    # backward: its peak above the state at rest, with the gradients the simulation held (every
    # local gradient, dp = 1) replaced by FSDP2's: the dp shards plus one layer's unsharded ones
    bwd = float_("backward_peak") - sim["grad_numel"] * dtype.itemsize
    layer = sim["largest_block_numel"] * dtype.itemsize
    if dp > 1:
        bwd += layer
        gathered = sim["root_numel"] * dtype.itemsize + layer
    else:
        gathered = 0.0
    peak = params + opt + max(fwd, grads + bwd) + gathered
    return MemoryEstimate(params, grads, opt, activations, fwd, bwd, gathered, peak, device_gb * 1e9,
                          {"tp": plan.world, "dp": dp, "batch": batch, "seq": seq, "dtype": dtype,
                           "master_dtype": master, "optimizer": optimizer,
                           "activation_checkpointing": activation_checkpointing})


def simulate(plan, batch: int, seq: int, activation_checkpointing: str | None = None, rank: int = 0) -> dict:
    """Run rank ``rank``'s program forward and backward on the meta device at (batch, seq) and
    measure it with ``LiveBytes``: bytes kept at the end of forward, the forward's and the
    backward's peaks (floating-point and other bytes apart, so a dtype can rescale them)."""
    from autotp.blocks import checkpoint_context, cut
    from autotp.placement import local_shape
    gm = plan.rewritten(rank)
    _to_meta(gm)
    owner_of = {**plan.captured.params, **plan.captured.buffers}
    segments, _ = cut(gm, owner_of)
    sizes = {sym: (batch if str(name) == "batch" else seq) for sym, name in plan.captured.symbols.items()}
    for node in gm.graph.nodes:           # other inputs' own symbols (labels): dim 0 batch, dim 1 seq
        v = node.meta.get("val")
        if node.op == "placeholder" and node.name in plan.captured.user_inputs and isinstance(v, torch.Tensor):
            for d, size in enumerate(v.shape[:2]):
                if isinstance(size, torch.SymInt) and size.node.expr.is_Symbol:
                    sizes.setdefault(size.node.expr, batch if d == 0 else seq)
    env, params, floats = {}, {}, set()
    for node in gm.graph.nodes:
        if node.op != "placeholder":
            continue
        v = node.meta.get("val")
        if not isinstance(v, torch.Tensor):
            env[node.name] = v
            continue
        p = node.meta.get("autotp", {}).get("placement")
        shape = [_concrete(s, sizes) for s in v.shape]
        if node.name in plan.captured.params:
            shape = local_shape(shape, p, plan.world) if p is not None else shape
            t = torch.empty(shape, dtype=v.dtype, device="meta", requires_grad=v.is_floating_point())
            params[node.name] = t
        elif node.name in plan.captured.buffers or node.name in plan.captured.constants:
            t = torch.empty(local_shape(shape, p, plan.world) if p is not None else shape, dtype=v.dtype,
                            device="meta")
        else:
            t = torch.zeros(shape, dtype=v.dtype, device="meta")
        env[node.name] = t
        if v.is_floating_point() and node.name in plan.captured.params:   # not an fp32 rotary buffer
            floats.add(v.dtype)
    float_dtype = max(floats, key=lambda d: d.itemsize) if floats else torch.float32
    block_numel: dict = {}
    for seg in segments:
        if seg.path is not None:
            block_numel[seg.path] = sum(params[n].numel() for n in seg.owned if n in params)
    owned = {n for seg in segments if seg.path for n in seg.owned}
    mem = LiveBytes(split_dtype=float_dtype)
    with mem:
        for seg in segments:
            values = [env[n] for n in seg.inputs] + [env[n] for n in seg.owned]
            if seg.path is not None and activation_checkpointing is not None:
                outs = checkpoint(seg.gm.forward, *values, use_reentrant=False,
                                  context_fn=checkpoint_context(activation_checkpointing))
            else:
                outs = seg.gm.forward(*values)
            env.update(zip(seg.outputs, outs))
        out = next(n for n in gm.graph.nodes if n.op == "output")
        results = [env[a.name] for a in out.all_input_nodes if a.name in env]
        del env
        loss = _loss(results)
        del results
        kept = mem.split()
        forward_peak = mem.peak_split
        mem.reset_peak()
        if loss is not None:
            loss.backward()
        backward_peak = mem.peak_split
    grad_numel = sum(p.numel() for p in params.values() if p.requires_grad)
    return {"kept_float": kept[0], "kept_other": kept[1], "forward_peak_float": forward_peak[0],
            "forward_peak_other": forward_peak[1], "backward_peak_float": backward_peak[0],
            "backward_peak_other": backward_peak[1], "float_itemsize": float_dtype.itemsize,
            "param_numel": sum(p.numel() for p in params.values()), "grad_numel": grad_numel,
            "largest_block_numel": max(block_numel.values(), default=0),
            "root_numel": sum(p.numel() for n, p in params.items() if n not in owned)}


def _loss(outputs: list):
    """The training loss of the simulated step: the model's own when it returns a scalar (labels
    given), else a cross-entropy over the last dim of its largest output (the logits), as a
    training loop computes it, so its log-softmax and the logits' gradient are counted."""
    grads = [o for o in outputs if isinstance(o, torch.Tensor) and o.requires_grad and o.is_floating_point()]
    if not grads:
        return None
    scalars = [o for o in grads if o.dim() == 0]
    if scalars:
        return scalars[0]
    logits = max(grads, key=lambda o: o.numel())
    flat = logits.flatten(0, -2) if logits.dim() > 1 else logits.unsqueeze(0)
    return torch.nn.functional.cross_entropy(flat, torch.zeros(flat.shape[0], dtype=torch.long, device=flat.device))


def _concrete(size, sizes: dict) -> int:
    if isinstance(size, int):
        return size
    import sympy
    return int(sympy.sympify(size.node.expr).xreplace(sizes))


def _to_meta(gm: fx.GraphModule) -> None:
    """Ops that name a device (``arange(device=cpu)``, ``.to(cpu)``) create on meta instead."""
    meta = torch.device("meta")

    def fix(a):
        return meta if isinstance(a, torch.device) else a

    for node in gm.graph.nodes:
        node.args, node.kwargs = pytree.tree_map(fix, (node.args, node.kwargs))
    gm.recompile()


def measure_step(model: torch.nn.Module, optimizer, step) -> dict:
    """Measure one training step ``step()`` (forward, loss, backward; ``optimizer.step()`` if it
    does it) on this rank: the state at rest before it (each parameter's and optimizer state's
    local bytes; gradients are expected to be None, as after ``zero_grad()``) and the peak of
    what the step allocates on top (``LiveBytes``).  Returns bytes: rest, step_peak, peak."""
    def local_bytes(t) -> int:
        t = t.to_local() if hasattr(t, "to_local") else t
        return t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0

    rest = sum(local_bytes(p.data) for p in model.parameters())
    if optimizer is not None:
        rest += sum(local_bytes(v) for state in optimizer.state.values() for v in state.values()
                    if isinstance(v, torch.Tensor) and v.dim() > 0)
    with LiveBytes() as mem:
        step()
    return {"rest": rest, "step_peak": mem.peak, "peak": rest + mem.peak}
