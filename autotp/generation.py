"""Greedy generation with a head-sharded KV cache, for a model parallelised by autotp.

    pmodel = autotp.parallelize(model, (ids,))                 # inside torchrun, as for training
    out = autotp.generate(pmodel, prompt, max_new_tokens=32)   # == model.generate(prompt, ..., do_sample=False)

How (see docs/generation.md):

* **One decode-step graph, captured with the cache as explicit tensors.**  ``DecodeStep`` wraps
  the Hugging Face model: ``(input_ids, start, key_0, value_0, ...) -> (last logits, key_0', ...)``.
  Inside, a ``transformers`` ``Cache`` whose layers write the new keys and values functionally
  (``cache.index_copy(1, start + arange(S), k)``) stands in for ``StaticCache``, so the export is
  a plain function of the cache: no buffer mutation, no cache object in the graph.  Batch, the
  number of new tokens ``S`` and the cache length are symbolic: the same graph runs the prefill
  (``S`` = prompt length) and every decode step (``S = 1``), for any ``max_new_tokens``.
* **The cache is planned like any activation, and carried.**  Each cache tensor is an input the
  solver may split (on its fixed-size dims) and its new value is an output that must keep
  exactly the input's placement (``make_plan(carried_state=...)``, ``solve.tie_state_outputs``):
  the solver puts it where k and v already are — split by kv heads — and nothing moves it.
* **Same weights as the forward.**  The step is planned with every parameter pinned to the
  placement ``parallelize`` gave it, on a data-less twin of the model (``_twin``), and runs on
  the ``ParallelModule``'s own shards: generation adds no copy of any weight.
* **In place at run time, over the cache written so far.**  The cache writes become
  ``index_copy_`` on this rank's cache tensors (nothing else reads their values), so a decode
  step allocates no new cache; each step reads the first slots of the cache, those written so
  far rounded up to 32 (``DecodeRun``), not all ``max_length`` of them.
* **A step's fixed cost is the graph's own.**  At N = 1 a decode step is the model's ops and
  nothing else, so its Python cost per op decides the speed against Hugging Face's
  ``generate``: the eager step drops no-op nodes (``step_graph.drop_identities``), calls each op through
  a bound global and attention without its custom-op layers (``step_graph.bound_forward``), looks the
  weights up once per call and runs under ``torch.inference_mode`` (docs/generation.md,
  *What a decode step costs*).
* **The logits stay where the plan leaves them.**  The step is planned with ``sharded_outputs``:
  the last position's logits come out split by vocab (the forward's column-parallel ``lm_head``),
  not all-gathered.  ``autotp.decoding`` picks the token from the slices (a local argmax / top-k
  and a small exchange of (value, index) pairs) and gathers the full row only when a processor
  needs it (``Generator.vocab``, ``decode_traffic``).
"""
from __future__ import annotations

import copy
import inspect

import torch
import torch.fx as fx
import torch.nn as nn

from autotp.placement import R, fmt, is_shard, local_shape, normalize, shard_dim, split_factor
from autotp.base import AutoTPError
from autotp.program import adopt, check_same_plan, copy_graph_module, mesh_device, retarget_meta
from autotp.step_graph import bound_forward, drop_identities, write_cache_in_place

aten = torch.ops.aten

_EXAMPLE_BATCH, _EXAMPLE_NEW, _EXAMPLE_LEN = 2, 2, 4      # tracing sizes (>= 2: export keeps them symbolic)


# ---------------------------------------------------------------- the cache seen by the model
def _cache_classes():
    from transformers.cache_utils import Cache, CacheLayerMixin

    class CarriedLayer(CacheLayerMixin):
        """One layer's keys and values as plain tensors ``(batch, cache_len, kv_heads, head_dim)``,
        written functionally at ``start + arange(S)``.  The layout keeps the (often small, maybe 1)
        kv-heads dim off dims 0-1, the dims capture traces symbolically."""
        is_compileable = True
        is_sliding = False

        def __init__(self, keys, values, start):
            super().__init__()
            self.keys, self.values, self.start, self.is_initialized = keys, values, start, True

        def lazy_initialization(self, key_states, value_states) -> None:
            pass

        def update(self, key_states, value_states, *args, **kwargs):
            pos = torch.arange(key_states.shape[-2], device=key_states.device) + self.start
            self.keys = self.keys.index_copy(1, pos, key_states.transpose(1, 2))
            self.values = self.values.index_copy(1, pos, value_states.transpose(1, 2))
            return self.keys.transpose(1, 2), self.values.transpose(1, 2)

        def get_mask_sizes(self, query_length):
            return self.keys.shape[1], 0

        def get_seq_length(self):
            return self.start

        def get_max_length(self):
            return self.keys.shape[1]

    class CarriedCache(Cache):
        def __init__(self, tensors, start):
            super().__init__(layers=[CarriedLayer(tensors[2 * i], tensors[2 * i + 1], start)
                                     for i in range(len(tensors) // 2)])

        def tensors(self) -> list:
            return [t for layer in self.layers for t in (layer.keys, layer.values)]

    return CarriedCache


class DecodeStep(nn.Module):
    """``(input_ids [B, S], attention_mask [B, L], position_ids [B, S], start, key_0, value_0, ...)
    -> (logits of the last position [B, 1, V], key_0', value_0', ...)``.

    ``attention_mask`` covers the whole cache (1 = a real token, 0 = left padding; slots not yet
    written may be anything: the causal mask hides them) and goes to the model as Hugging Face's
    ``generate`` passes it, so the model's own ``create_causal_mask`` combines padding, causality
    and sliding windows.  ``position_ids`` is present only when the model's forward takes it.
    Registers the model's children as its own, so parameter names are the model's."""

    def __init__(self, model: nn.Module, num_layers: int):
        super().__init__()
        object.__setattr__(self, "_hf", model)
        adopt(self, model)
        object.__setattr__(self, "_cache_cls", _cache_classes())
        params = inspect.signature(model.forward).parameters
        self._keep_last = "logits_to_keep" in params
        self.takes_positions = "position_ids" in params
        # a MoE's auxiliary load-balancing loss is training's, not decoding's (Hugging Face's
        # generate does not compute it either): off, so the decode step has none
        self._no_aux_loss = "output_router_logits" in params
        self.num_layers = num_layers

    def forward(self, input_ids, attention_mask, *rest):
        position_ids, (start, *kv) = (rest[0], rest[1:]) if self.takes_positions else (None, rest)
        cache = self._cache_cls(list(kv), start)
        kwargs = {"logits_to_keep": 1} if self._keep_last else {}
        if position_ids is not None:
            kwargs["position_ids"] = position_ids
        if self._no_aux_loss:
            kwargs["output_router_logits"] = False
        out = self._hf(input_ids=input_ids, attention_mask=attention_mask, cache=cache, use_cache=True, **kwargs)
        logits = out.logits if hasattr(out, "logits") else out[0]
        return (logits[:, -1:], *cache.tensors())


def _decode_step_class(num_layers: int, takes_positions: bool):
    """``DecodeStep`` with named arguments (``input_ids, attention_mask, [position_ids,] start,
    key_0, value_0, ...``): capture and export bind dynamic shapes by parameter name."""
    names = ["self", "input_ids", "attention_mask"] + (["position_ids"] if takes_positions else []) + ["start"]
    names += [f"{kind}_{i}" for i in range(num_layers) for kind in ("key", "value")]

    def forward(self, input_ids, attention_mask, *rest):
        return DecodeStep.forward(self, input_ids, attention_mask, *rest)

    forward.__signature__ = inspect.Signature(
        [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD) for n in names])
    return type("DecodeStep", (DecodeStep,), {"forward": forward})


# ---------------------------------------------------------------- planning
def _twin(model: nn.Module, device: torch.device) -> nn.Module:
    """A copy of ``model`` to trace, with full-shape parameters (the DTensor shards are not
    gathered) that hold no data: on the meta device, or for a CPU model uninitialised CPU
    memory (never written; large blocks stay virtual), which keeps the code paths Hugging
    Face picks by device (a CPU MoE's grouped matmul has no fp32 meta kernel).  On meta every
    buffer and tensor attribute moves too.  Tied parameters stay tied."""
    meta = device.type != "cpu"
    memo: dict = {}

    def blank(t):
        return torch.empty(t.shape, dtype=t.dtype, device="meta" if meta else device)

    for module in model.modules():
        for p in module._parameters.values():
            if p is not None and id(p) not in memo:
                memo[id(p)] = nn.Parameter(blank(p), requires_grad=p.requires_grad)
        if meta:
            for t in [*module._buffers.values(), *vars(module).values()]:
                if isinstance(t, torch.Tensor) and id(t) not in memo:
                    memo[id(t)] = blank(t)
    return copy.deepcopy(model, memo)


def _probe_cache(twin: nn.Module, device: torch.device) -> list[tuple]:
    """Run the twin once with a ``DynamicCache`` to see each layer's keys and values:
    [(kv_heads, k_head_dim, v_head_dim, dtype)] per cached layer."""
    try:
        from transformers.cache_utils import DynamicCache
    except ImportError as e:                      # pragma: no cover
        raise AutoTPError("autotp.generate needs transformers (a Hugging Face causal LM)") from e
    cache = DynamicCache()
    ids = torch.zeros(1, 2, dtype=torch.long, device=device)
    try:
        with torch.no_grad():
            twin(input_ids=ids, cache=cache, use_cache=True)
    except TypeError as e:
        raise AutoTPError(f"autotp.generate needs a Hugging Face causal LM whose forward takes `cache=` and "
                          f"`use_cache=` ({type(twin).__name__}: {e})") from e
    layers = []
    for layer in cache.layers:
        k, v = getattr(layer, "keys", None), getattr(layer, "values", None)
        if not isinstance(k, torch.Tensor) or k.ndim != 4:
            raise AutoTPError(f"autotp.generate supports attention caches of (batch, heads, seq, dim) keys and "
                              f"values; {type(twin).__name__} has a {type(layer).__name__} layer")
        layers.append((k.shape[1], k.shape[3], v.shape[3], k.dtype))
    if not layers:
        raise AutoTPError(f"{type(twin).__name__} did not write to its cache: autotp.generate needs a model that "
                          f"uses the transformers Cache API")
    return layers


class DecodePlan:
    """The decode step of ``model`` planned for ``world_size`` ranks, with the weights placed as
    ``placements`` (the forward plan's): no mesh, no weights.  Made once per ``ParallelModule``
    by its ``Generator``, or beforehand (on the meta device, or once in a launcher for every
    rank) and handed to it: ``Generator(pmodel, decode=...)``.

    ``plan``: the step's ``autotp.Plan``; ``cache_placements``: [(cache input name, placement)];
    ``vocab``: the placement and size of the step's logits;  ``cache_bytes`` and
    ``decode_traffic`` answer what a step holds and moves, for any batch and length."""

    def __init__(self, model: nn.Module, placements: dict, world_size: int, trace_device=None):
        from autotp.plan import make_plan
        device = torch.device(trace_device) if trace_device is not None else _model_device(model)
        # trace on meta (no memory), or in place for a CPU model; ``trace_device="meta"`` forces meta
        twin = _twin(model, device)
        twin.eval()
        dev = next(twin.parameters()).device
        layers = _probe_cache(twin, dev)
        takes_positions = "position_ids" in inspect.signature(twin.forward).parameters
        step = _decode_step_class(len(layers), takes_positions)(twin, len(layers))
        ids = torch.zeros(_EXAMPLE_BATCH, _EXAMPLE_NEW, dtype=torch.long, device=dev)
        mask = torch.ones(_EXAMPLE_BATCH, _EXAMPLE_LEN, dtype=torch.long, device=dev)
        positions = [torch.zeros(_EXAMPLE_BATCH, _EXAMPLE_NEW, dtype=torch.long, device=dev)] if takes_positions else []
        start = torch.zeros((), dtype=torch.long, device=dev)
        kv = [torch.zeros(_EXAMPLE_BATCH, _EXAMPLE_LEN, h, d, dtype=dt, device=dev)
              for h, dk, dv, dt in layers for d in (dk, dv)]
        self.takes_positions = takes_positions
        self.fixed = 3 + takes_positions                 # inputs before the cache
        self.world = world_size
        names = {n for n, _ in step.named_parameters()}
        pins = {n: p for n, p in placements.items() if n in names}   # the forward's shards
        # sharded_outputs: the logits stay as the plan computes them (split by vocab), and
        # autotp.decoding moves only what the next token needs (see Generator.vocab)
        self.plan = make_plan(step, (ids, mask, *positions, start, *kv), world_size=world_size, overrides=pins,
                              training=False, plan_seq=1, carried_state={1 + i: self.fixed + i for i in range(len(kv))},
                              sharded_outputs=True, dump=False)
        nodes = {n.name: n for n in self.plan.gm.graph.nodes}
        cache_names = self.plan.captured.user_inputs[self.fixed:]
        self.cache_placements = [(name, _placement(nodes[name])) for name in cache_names]
        self._cache_vals = {name: nodes[name].meta["val"] for name in cache_names}

    @property
    def vocab(self) -> "VocabLayout":
        """Where the step's last logits ``(B, 1, V)`` lie, as the rewritten graph gives them (after
        any settling collective), the same on every rank (read as rank 0's)."""
        logits = next(n for n in self.plan.rewritten().graph.nodes if n.op == "output").args[0][0]
        return VocabLayout.of(logits, self.world, 0, "")

    def local_cache_shape(self, name: str, placement, batch: int, length: int) -> list[int]:
        shape = [batch, length, *(int(s) for s in self._cache_vals[name].shape[2:])]
        return local_shape(shape, placement, self.world)

    def cache_dtype(self, name: str) -> torch.dtype:
        return self._cache_vals[name].dtype

    def cache_bytes(self, batch: int, length: int) -> tuple[int, int]:
        """(bytes of one rank's cache, bytes of the unsharded model's cache) for ``batch`` x ``length``."""
        mine = full = 0
        for name, p in self.cache_placements:
            size = self.cache_dtype(name).itemsize
            mine += size * _prod(self.local_cache_shape(name, p, batch, length))
            full += size * _prod(self.local_cache_shape(name, None, batch, length))
        return mine, full

    def decode_traffic(self, batch: int, length: int, k: int | None = 1) -> tuple[dict, int]:
        """What one decode step (one new token per row, a cache of ``length`` slots) moves in
        forward: ({collective: count}, bytes), the step graph's collectives plus the exchange
        that picks the token from vocab-split logits: ``k`` (value, index) pairs per row and
        rank (``k = 1`` greedy, ``top_k`` when sampling; None: the whole (B, V) row gathered, for
        top-p, min-p and penalties).  Bytes are the full tensors moved (``Collective.sym_bytes``),
        as ``Plan.collectives`` counts them."""
        counts = dict(self.plan.counts()["forward"])
        moved = 0
        for c in self.plan.collectives():
            if not c.forward:
                continue
            subs = {sym: batch if str(sym) == "batch" else 1 if str(sym) == "seq" else length
                    for sym in c.sym_bytes.free_symbols}
            moved += int(c.sym_bytes.subs(subs))
        vocab = self.vocab
        if vocab.sharded:                      # the (value, index) pairs or the gathered row
            counts["all_gather"] = counts.get("all_gather", 0) + 1
            moved += vocab.exchange_bytes(batch, k)
        return counts, moved

    def describe(self) -> str:
        c = self.plan.counts()
        per_layer = {k: dict(v) for k, v in c["per_layer_forward"].items() if k is not None}
        heads = sorted({fmt(p) for _, p in self.cache_placements})
        return (f"decode step: collectives {dict(c['forward'])}, per layer {per_layer}; logits "
                f"{fmt(self.vocab.placement)} (batch, 1, vocab); KV cache placement {', '.join(heads)} "
                f"(batch, length, kv_heads, head_dim)")


def _placement(node: fx.Node):
    return node.meta.get("autotp", {}).get("placement", R) or R


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


class Generator:
    """The decode-step plan (``DecodePlan``) and its rank-local graph for one ``ParallelModule``.

    ``plan``: the decode step's ``autotp.Plan`` (``plan.counts()``, ``plan.summary()``);
    ``cache_placements``: the placement of each layer's keys and values;
    ``cache_bytes(batch, length)``: (this rank's cache bytes, the unsharded cache's bytes).
    ``decode``: a ``DecodePlan`` made beforehand for this module's model and world size (checked
    by its plan's fingerprint, the same on every rank), or None to plan here.
    """

    def __init__(self, pmodel, trace_device: str | torch.device | None = None, decode: DecodePlan | None = None):
        source = getattr(pmodel, "source_model", None)
        if source is None:
            raise AutoTPError("autotp.generate takes the ParallelModule that autotp.parallelize returned")
        self.pmodel, self.mesh = pmodel, pmodel.mesh
        local = [p.to_local() for p in pmodel.parameters() if hasattr(p, "to_local")]
        self.device = local[0].device if local else mesh_device(self.mesh)
        world = self.mesh.size()
        if decode is None:
            decode = DecodePlan(source, pmodel.plan.placements, world,
                                trace_device if trace_device is not None else self.device)
        elif decode.world != world:
            raise AutoTPError(f"the decode plan was made for {decode.world} ranks, this module runs on {world}")
        else:
            forward = pmodel.plan.placements
            for name, p in decode.plan.placements.items():
                if name in forward and forward[name] != p:
                    raise AutoTPError(f"the decode plan places `{name}` {fmt(p)}, this module's plan {fmt(forward[name])}: "
                                      f"make the DecodePlan from this module's plan (DecodePlan(model, "
                                      f"pmodel.plan.placements, world_size))")
        self.decode_plan, self.plan = decode, decode.plan
        self.takes_positions, self._fixed = decode.takes_positions, decode.fixed
        if world > 1:
            check_same_plan(self.plan, self.mesh)
        rank, group = self.mesh.get_local_rank(), self.mesh.get_group().group_name
        gm = copy_graph_module(self.plan.rewritten(rank, group))
        retarget_meta(gm, self.device)
        self.cache_placements = self._cache_inputs(gm)
        drop_identities(gm)
        # every cache written in place: a step may then run on a prefix of the cache (DecodeRun)
        self.in_place = write_cache_in_place(gm, {n.name for n, _ in self.cache_placements})
        self.gm = gm
        self._eager = bound_forward(gm)
        self._feeds = self._input_feeds(gm)
        self.rank, self.group_name = rank, group
        self.vocab = self._vocab_layout(gm)
        self._compiled: dict = {}
        self._static_cache: tuple = (None, None)

    def _vocab_layout(self, gm: fx.GraphModule) -> "VocabLayout":
        """How the step's logits output ``(B, 1, V)`` lies on the ranks (``VocabLayout``)."""
        logits = next(n for n in gm.graph.nodes if n.op == "output").args[0][0]
        return VocabLayout.of(logits, self.mesh.size(), self.rank, self.group_name)

    # ---- what the graph reads
    def _cache_inputs(self, gm: fx.GraphModule) -> list[tuple[fx.Node, object]]:
        users = self.plan.captured.user_inputs
        out = []
        for node in gm.graph.nodes:
            if node.op == "placeholder" and node.name in users[self._fixed:]:
                out.append((node, node.meta["autotp"]["placement"]))
        return out

    def _input_feeds(self, gm: fx.GraphModule) -> list:
        cap = self.plan.captured
        feeds = []
        for node in gm.graph.nodes:
            if node.op != "placeholder":
                continue
            if node.name in cap.params:
                feeds.append(("param", _owner(self.pmodel, cap.params[node.name])))
            elif node.name in cap.buffers:
                feeds.append(("buffer", _owner(self.pmodel, cap.buffers[node.name])))
            elif node.name in cap.constants:
                c = cap.constants[node.name]
                if isinstance(c, torch.Tensor) and c.device.type == "meta":
                    raise AutoTPError(f"the decode step has a constant tensor `{node.name}` on the meta device; "
                                      f"load the model's weights (autotp.load_checkpoint) before generating")
                feeds.append(("const", c))
            else:
                feeds.append(("user", cap.user_inputs.index(node.name)))
        return feeds

    def _bound_inputs(self) -> tuple[list, list[tuple[int, int]]]:
        """The step's inputs with this rank's weights, buffers and constants in place (looked up
        once per ``generate`` call: ``to_local()`` of ~40 parameters cost ~0.1 ms a step) and
        None where a user input goes; and [(input slot, index among the user inputs)]."""
        inputs, slots = [], []
        for i, (kind, what) in enumerate(self._feeds):
            if kind == "param":
                inputs.append(getattr(*what).to_local())
            elif kind == "buffer":
                inputs.append(getattr(*what))
            elif kind == "const":
                inputs.append(what)
            else:
                inputs.append(None)
                slots.append((i, what))
        return inputs, slots

    def _graph(self, compile_options: dict | None):
        """The rank-local step graph (eager: ``bound_forward``), or it under
        ``torch.compile(**compile_options)``, compiled once per set of options and kept.  Unless
        the options say otherwise the compile is static (``dynamic=False``): one graph per
        batch size and cache length (``DecodeRun.slots``), what a CUDA graph
        (``mode="reduce-overhead"``) needs."""
        if compile_options is None:
            return self._eager
        compile_options = {"dynamic": False, **compile_options}
        key = repr(sorted(compile_options.items()))
        if key not in self._compiled:
            self._compiled[key] = torch.compile(self.gm, **compile_options)
        return self._compiled[key]

    def static_cache(self, batch: int, length: int) -> list[torch.Tensor]:
        """The cache a compiled step reads, kept from one ``generate`` call to the next of the
        same batch and cache length (as Hugging Face's ``StaticCache``): its tensors keep their
        addresses, which a CUDA graph replays, and are marked static for ``torch.compile``.  Only
        the last size is kept.  Stale slots need no clearing: a step reads a slot only at or
        after the position that writes it (causality), and the prompt's slots are written first."""
        key = (batch, length)
        if self._static_cache[0] != key:
            self._static_cache = (key, None)                  # drop the old one before allocating
            cache = self.new_cache(batch, length)
            for t in cache:
                torch._dynamo.mark_static_address(t)
            self._static_cache = (key, cache)
        return self._static_cache[1]

    # ---- the cache
    def new_cache(self, batch: int, length: int) -> list[torch.Tensor]:
        """This rank's cache for ``batch`` sequences of up to ``length`` tokens: zeros, split as planned."""
        d = self.decode_plan
        return [torch.zeros(d.local_cache_shape(n.name, p, batch, length), dtype=d.cache_dtype(n.name),
                            device=self.device) for n, p in self.cache_placements]

    def cache_bytes(self, batch: int, length: int) -> tuple[int, int]:
        """(bytes of this rank's cache, bytes of the unsharded model's cache) for ``batch`` x ``length``."""
        return self.decode_plan.cache_bytes(batch, length)

    def describe(self) -> str:
        return self.decode_plan.describe()

    def decode_traffic(self, batch: int, length: int, k: int = 1) -> tuple[dict, int]:
        """``DecodePlan.decode_traffic``: what one decode step moves in forward."""
        return self.decode_plan.decode_traffic(batch, length, k)

    # ---- generation
    def run(self, batch: int, length: int, compile_options: dict | None = None) -> "DecodeRun":
        """The steps of one ``generate`` call: ``batch`` sequences of up to ``length`` tokens."""
        return DecodeRun(self, batch, length, compile_options)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, *args, **kwargs):
        """Hugging Face's ``model.generate`` for a decoder-only model, on this decode step
        (``autotp.decoding.decode``: greedy or sampling, left padding, stopping, processors,
        streamer).  Every rank must call it with the same arguments and gets the same tokens."""
        from autotp.decoding import decode
        return decode(self, input_ids, *args, **kwargs)


def generate(pmodel, input_ids: torch.Tensor, *args, **kwargs):
    """``generate(pmodel, input_ids, attention_mask=None, generation_config=None, **kwargs)``:
    ``model.generate`` of Hugging Face on a ``ParallelModule``, with a head-sharded KV cache:
    the same arguments (see ``autotp.decoding``) and, for greedy search, the same tokens.  The
    decode step is planned on the first call and kept on the module."""
    return generator(pmodel).generate(input_ids, *args, **kwargs)


def generator(pmodel, decode: DecodePlan | None = None) -> Generator:
    """The ``Generator`` of a ``ParallelModule`` (planned once, then reused), or a new one for
    the ``DecodePlan`` given."""
    gen = getattr(pmodel, "_autotp_generator", None)
    if gen is None or decode is not None:
        gen = Generator(pmodel, decode=decode)
        object.__setattr__(pmodel, "_autotp_generator", gen)
    return gen


class DecodeRun:
    """One ``generate`` call's decode steps on this rank: the weights looked up once, the cache
    for ``batch`` sequences of up to ``length`` tokens, and each step run on the first ``used``
    slots of it: the slots written so far rounded up to a multiple of ``BUCKET`` (at most
    ``slots``).

    Hugging Face's ``DynamicCache`` attends over the tokens so far; a static cache over all of
    ``length``, masked.  The prefix is the static cache's slots ``0 .. used - 1``, a view, so
    the in-place cache writes land in the whole cache; the mask is the whole mask's first
    ``used`` columns, so the model's ``create_causal_mask`` builds the same rows, cut short,
    and the slots past ``used`` (not yet written, hidden by causality) are simply not read.
    Shapes change only every ``BUCKET`` tokens.

    Under ``torch.compile`` the decode steps (one new token a row) run compiled on fixed
    shapes: the whole cache, whose ``slots`` are ``length`` rounded up to a size bucket
    (``cache_slots``), so that calls with other prompt or output lengths in the same bucket
    reuse the graph, and the same cache tensors from call to call (``Generator.static_cache``);
    the prefill runs eagerly (its length changes with every prompt, and it runs once a call).
    Where a cache write is not in place (``Generator.in_place`` false) every step takes the
    whole cache and the next cache is the step's output."""

    BUCKET = 32

    def __init__(self, gen: Generator, batch: int, length: int, compile_options: dict | None = None):
        self.gen = gen
        compiled = compile_options is not None
        self.slots = cache_slots(length) if compiled else length
        if compiled and gen.in_place:
            self.cache = gen.static_cache(batch, self.slots)     # [(B, slots, kv_heads/N, D)] per layer, k and v
        else:
            self.cache = gen.new_cache(batch, self.slots)
        self.inputs, self.user_at = gen._bound_inputs()
        self.decode = gen._graph(compile_options)
        self.prefix = gen.in_place and not compiled

    def used(self, end: int) -> int:
        """Cache slots a step that writes up to slot ``end - 1`` reads."""
        if not self.prefix:
            return self.slots
        return min(self.slots, -(-end // self.BUCKET) * self.BUCKET)

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids, start: int) -> torch.Tensor:
        """One step: ``input_ids`` (B, S) written at cache slots ``start .. start + S - 1``;
        ``attention_mask`` (B, slots) over the whole cache; ``position_ids`` (B, S), or None
        when the model takes none.  Returns this rank's last logits (B, 1, V) in the placement
        ``gen.vocab`` describes (a vocab slice when split)."""
        used = self.used(start + input_ids.shape[1])
        cache = self.cache if used == self.slots else [c[:, :used] for c in self.cache]
        # contiguous: the loop's slices of its growing position ids have the whole row's stride,
        # a new one every step, which a compiled step would guard on and recompile for
        positions = [position_ids.contiguous()] if self.gen.takes_positions else []
        user = [input_ids, attention_mask[:, :used], *positions, torch.tensor(start, device=self.gen.device), *cache]
        for slot, i in self.user_at:
            self.inputs[slot] = user[i]
        forward = self.decode if input_ids.shape[1] == 1 or not self.gen.in_place else self.gen._eager
        # inference mode: no view or version bookkeeping on the step's ~300 ops (~10% of a small
        # model's step); the logits come out as an inference tensor, which the loop only reads
        # (and copies), and the cache, made outside, may be written in place inside
        with torch.inference_mode():
            logits, *written = forward(*self.inputs)
        if not self.gen.in_place:
            self.cache = written
        return logits


def cache_slots(length: int) -> int:
    """The cache length a compiled decode step is built for: ``length`` rounded up to a power
    of two from 64 to 1024, then to a multiple of 1024 (at most 2x the slots read below 1024
    tokens, at most 1023 extra above; a graph per bucket)."""
    if length > 1024:
        return -(-length // 1024) * 1024
    return max(64, 1 << (length - 1).bit_length())


class VocabLayout:
    """Where the decode step's logits ``(B, 1, V)`` lie: ``placement`` (R, or S(2) when the
    ``lm_head`` is column-parallel: rank r holds vocab ids ``offset .. offset + V/N - 1``).
    ``sharded`` when the token must be picked from slices (``autotp.decoding``)."""

    def __init__(self, placement, vocab: int, world: int, rank: int, group: str, itemsize: int = 4):
        self.placement, self.size, self.world, self.rank, self.group = placement, vocab, world, rank, group
        self.itemsize = itemsize                 # of the logits, gathered as they come
        self.sharded = world > 1 and placement != R
        # contiguous slices (a plain shard of the last dim) allow the local argmax / top-k
        self.contiguous = is_shard(placement) and shard_dim(placement) == 2 and split_factor(placement) == 1
        self.local = vocab // world if self.contiguous else vocab
        self.offset = rank * self.local if self.contiguous else 0

    @classmethod
    def of(cls, logits: fx.Node, world: int, rank: int, group: str) -> "VocabLayout":
        """The layout of a step graph's logits output node."""
        v = logits.meta["val"]
        return cls(normalize(_placement(logits), v.ndim), int(v.shape[-1]), world, rank, group, v.dtype.itemsize)

    def exchange_bytes(self, batch: int, k: int | None) -> int:
        """Bytes of the (value, index) exchange: N x B x k pairs of float64; or, with ``k`` None
        or slices that are not contiguous, of the gathered (B, V) logits."""
        if k is None or not self.contiguous:
            return batch * self.size * self.itemsize
        return self.world * batch * min(k, self.local) * 2 * 8


# ---------------------------------------------------------------- helpers
def _owner(root: nn.Module, name: str):
    module_name, _, attr = name.rpartition(".")
    return (root.get_submodule(module_name) if module_name else root), attr


def _prod(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n
