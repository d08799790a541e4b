"""capture: an unmodified ``nn.Module`` -> an ATen graph with parameters as inputs.

``torch.export`` (non-strict) gives the training-IR graph; parameters and buffers become
placeholders and every node keeps ``nn_module_stack`` and ``stack_trace``, so each op maps
back to a module and a line of the user's source.

``canonicalize`` then removes what would only get in the solver's way:
  * ``linear(x, W, b)`` -> ``add(linear(x, W), b)`` and ``addmm(b, x, W)`` -> ``add(mm(x, W), b)``:
    a row-parallel matmul leaves a partial sum, and the bias must be added once, after the
    all-reduce, not on every rank.
  * ``_assert_tensor_metadata`` checks (dtype/device asserts export leaves behind).
  * a reshape that merges the batch with another dim, undone by a later reshape (through
    transposes): ``nn.MultiheadAttention``'s ``(T, B, E) -> (T, B*H, hd) -> (B*H, T, hd) -> (B, H,
    T, hd)`` becomes ``(T, B, E) -> (T, B, H, hd) -> permute -> (B, H, T, hd)``: the same values,
    and no dim whose heads would be a shard strided by the (run-time) batch size.
"""
from __future__ import annotations

import contextlib
import dataclasses
import inspect
import linecache
import logging
import operator
import os
import re
import traceback
from typing import Any

import sympy
import torch
import torch.fx as fx
from torch._guards import detect_fake_mode
from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode, guarding_hint_or_throw
from torch.export import ExportedProgram
from torch.export.graph_signature import InputKind, OutputKind

from autotp import stamp
from autotp.base import AutoTPError, where

log = logging.getLogger("autotp")

aten = torch.ops.aten

try:
    from torch.fx._lazy_graph_module import _use_lazy_graph_module
except ImportError:                     # pragma: no cover — a torch without it: export as it is
    def _use_lazy_graph_module(flag):
        import contextlib
        return contextlib.nullcontext()


def _export(model, args, kwargs, dynamic_shapes=None) -> ExportedProgram:
    """``torch.export.export`` (non-strict), with the intermediate graph modules of export's own
    passes generating their Python code only when it is used (torch's lazy graph module, what
    torch.compile runs with by default): export regenerates the code of the whole graph after
    each of its passes (6 times, ~1 s for an 80-layer Llama) and reads none of it.  The program's
    graph module is built afterwards as a plain, compiled ``GraphModule``; its graph is the same."""
    with _use_lazy_graph_module(True):
        program = torch.export.export(model, args, kwargs=kwargs, strict=False, dynamic_shapes=dynamic_shapes)
        hazard = hidden_mutation(program.graph_module)
        if hazard is not None:
            log.info("autotp: %s mutates a tensor read elsewhere: the graph is functionalized", hazard.format_node())
            program = program.run_decompositions({})
    inline_no_grad(program.graph_module)
    return program


def _is_view(node) -> bool:
    target = getattr(node, "target", None)
    return isinstance(target, torch._ops.OpOverload) and any(r.alias_info is not None and not r.alias_info.is_write
                                                             for r in target._schema.returns)


def hidden_mutation(gm: fx.GraphModule) -> fx.Node | None:
    """The first in-place op whose effect the graph's edges do not show, else None.

    An in-place op on a fresh tensor that later code reads through the op's own result is an
    ordinary node for the passes.  One that writes into a view (``buf[..., :8].copy_(k)``, then
    ``buf`` is read) or into a tensor read again by name afterwards changes a value no edge
    carries: sharding, moving or gathering that tensor would run the write on another copy.
    Such graphs are functionalized (``run_decompositions({})``: ``copy_`` into a slice becomes
    ``slice_scatter`` and the reads take its result; no op is decomposed)."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    for n in gm.graph.nodes:
        if n.op != "call_function" or not isinstance(n.target, torch._ops.OpOverload) \
                or not n.target._schema.is_mutable or not n.args or not isinstance(n.args[0], fx.Node):
            continue
        written = n.args[0]
        if _is_view(written) or any(order[u] > order[n] for u in written.users if u is not n):
            return n
    return None


_NO_GRAD_REGION = torch.ops.higher_order.wrap_with_set_grad_enabled


def inline_no_grad(gm: fx.GraphModule) -> None:
    """Inline the body of each ``torch.no_grad()`` region (export keeps it as a
    ``wrap_with_set_grad_enabled(False, submodule, *inputs)`` call) and detach what it returns.

    Same values and the same gradients (nothing flows back through a detached output), and the
    region's ops become ordinary nodes of the one graph: the rule table sees them (a router's
    top-k under no_grad is sharded like any other), and the rank-local module has no nested
    graph module (torch's module hooks — ``CommDebugMode``'s among them — do not expect one)."""
    graph = gm.graph
    regions = [n for n in graph.nodes if n.op == "call_function" and n.target is _NO_GRAD_REGION
               and n.args[0] is False]
    for node in regions:
        body = getattr(gm, node.args[1].target)
        inline_no_grad(body)
        placeholders = [p for p in body.graph.nodes if p.op == "placeholder"]
        env = dict(zip(placeholders, node.args[2:]))
        with graph.inserting_before(node):
            out = graph.graph_copy(body.graph, env)
            outs = out if isinstance(out, (tuple, list)) else (out,)
            detached = []
            for o in outs:
                if isinstance(o, fx.Node) and isinstance(o.meta.get("val"), torch.Tensor):
                    d = graph.call_function(aten.detach.default, (o,))
                    d.meta = {k: v for k, v in o.meta.items() if k in ("stack_trace", "nn_module_stack")}
                    d.meta["val"] = o.meta["val"].detach()
                    o = d
                detached.append(o)
        if isinstance(out, (tuple, list)):
            for user in list(node.users):
                if user.target is operator.getitem:
                    user.replace_all_uses_with(detached[user.args[1]])
                    graph.erase_node(user)
        else:
            node.replace_all_uses_with(detached[0])
        if node.users:
            raise AutoTPError(f"a torch.no_grad() region ({node.name}) is used other than by its outputs")
        sub = node.args[1]
        graph.erase_node(node)
        if not sub.users:
            graph.erase_node(sub)
            delattr(gm, sub.target)
    if regions:
        graph.lint()
        gm.recompile()


def _export_or_explain(model, args: tuple, kwargs: dict, dynamic_shapes) -> ExportedProgram:
    try:
        try:
            return _export(model, args, kwargs, dynamic_shapes)
        except Exception:  # noqa: BLE001 — symbolic sizes are a convenience: retry static
            if dynamic_shapes is None:
                raise
            return _export(model, args, kwargs)
    except Exception as e:  # noqa: BLE001 — re-raised with the way out
        frames = _model_frames(e)
        frame = frames[-1] if frames else None
        at = f"\nat {frame.filename}:{frame.lineno} in {frame.name}: {(frame.line or '').strip()}" if frame else ""
        hint = _EXPORT_HINTS[frame.name](frames) if frame and frame.name in _EXPORT_HINTS else ""
        raise AutoTPError(
            f"torch.export could not capture {type(model).__name__}: {type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}{at}\n{hint}"
            "What to do: autotp needs a model torch.export can trace (no data-dependent Python control "
            "flow on tensor values, no unsupported cache objects). Try model.eval(), pass use_cache=False, "
            "or rewrite the offending branch with torch.cond / torch.where. The full export error is chained "
            "below.") from e


def _statement(frame) -> str:
    """The whole (possibly multi-line) call that starts at ``frame``'s line."""
    text = ""
    for k in range(frame.lineno, frame.lineno + 20):
        text += linecache.getline(frame.filename, k)
        if text.count("(") <= text.count(")"):
            break
    return " ".join(text.split())


def _causal_flag_hint(frames) -> str:
    """``_detect_is_causal_mask(mask, is_causal, size)`` reads the mask's values when the flag is
    None.  Follow the flag outwards through the calls that passed it (``is_causal=src_is_causal``
    in ``nn.Transformer.forward``) to the name the outermost caller gives it."""
    flag, where = None, []
    for f in reversed(frames[:-1]):
        line = _statement(f)
        if flag is None:
            m = re.search(r"_detect_is_causal_mask\(\s*[\w.]+\s*,\s*(\w+)", line)
            if not m:
                return ""
        else:
            m = re.search(rf"\b{flag}\s*=\s*(\w+)\s*[,)]", line)
        if m:
            flag = m.group(1)
            where.append(f"{f.filename}:{f.lineno} in {f.name}: {line if len(line) <= 160 else line[:159] + '…'}")
    if flag is None:
        return ""
    torch_dir = os.path.dirname(torch.__file__)
    user = [f for f in frames if not f.filename.startswith(torch_dir) and not f.filename.startswith("<")]
    if user:                                     # the model's own line that called into torch's module
        f = user[-1]
        where.append(f"{f.filename}:{f.lineno} in {f.name}: {_statement(f)[:160]}")
    return ("The mask's values are compared with a causal mask to decide whether attention is causal, which "
            f"export cannot trace; the flag that skips the comparison is `{flag}`, passed on at\n  "
            + "\n  ".join(reversed(where)) +
            f"\npass {flag}=True with a causal mask ({flag}=False if it is not causal), so nothing reads "
            "its values.\n")


# torch's own model code that reads tensor values -> the way out, from the frames of the model
_EXPORT_HINTS = {"_detect_is_causal_mask": _causal_flag_hint}

# frames of the tracer itself, not of the model: an export error names the model line below them
_TRACER_PATHS = tuple(os.sep + os.path.join("torch", p) for p in ("_", "fx", "export", "utils", "overrides.py",
                                                                    "sym_node", "__init__.py"))


def _model_frames(e: BaseException) -> list:
    """The frames of the model's code (``torch.nn`` counts) down to where export failed."""
    return [f for f in traceback.extract_tb(e.__traceback__)
            if not any(p in f.filename for p in _TRACER_PATHS) and os.sep + "autotp" + os.sep not in f.filename]


def _signature(program: ExportedProgram) -> tuple[dict, dict, dict, list]:
    """(placeholder -> parameter name, -> buffer name, -> lifted constant, user input placeholders)."""
    params, buffers, constants, users = {}, {}, {}, []
    for spec in program.graph_signature.input_specs:
        name = spec.arg.name if hasattr(spec.arg, "name") else None
        if spec.kind == InputKind.PARAMETER:
            params[name] = spec.target
        elif spec.kind == InputKind.BUFFER:
            buffers[name] = spec.target
        elif spec.kind in (InputKind.CONSTANT_TENSOR, InputKind.CUSTOM_OBJ):
            constants[name] = program.constants[spec.target]
        elif spec.kind == InputKind.USER_INPUT:
            users.append(name)
    return params, buffers, constants, users


@dataclasses.dataclass
class Captured:
    gm: fx.GraphModule
    program: ExportedProgram        # what torch.export returned (a sample of the layers when stamped)
    params: dict[str, str]          # placeholder -> parameter name (first name if tied)
    buffers: dict[str, str]         # placeholder -> buffer name
    constants: dict[str, Any]       # placeholder -> lifted constant tensor
    user_inputs: list[str]          # placeholders of the user's (flattened) inputs
    in_spec: Any
    out_spec: Any
    example_kwargs: dict            # kwargs given at capture (e.g. use_cache=False): the defaults
    symbols: dict = dataclasses.field(default_factory=dict)   # export's size symbol -> sympy batch/seq
    pinned: dict = dataclasses.field(default_factory=dict)    # size symbol -> (example value, why)
    stamped: tuple | None = None    # (layer list path, layer count) when layers 1.. were stamped from a sample


def hint_int(s) -> int:
    return int(s) if isinstance(s, int) else int(guarding_hint_or_throw(s))


def concrete(v):
    """A value with its symbolic sizes replaced by their example (hint) values."""
    if isinstance(v, torch.Tensor):
        if all(isinstance(s, int) for s in v.shape):
            return v
        return torch.empty([hint_int(s) for s in v.shape], dtype=v.dtype, device="meta")
    if isinstance(v, torch.SymInt):
        return hint_int(v)
    if isinstance(v, (tuple, list)):
        return type(v)(concrete(x) for x in v)
    return v


def attach_concrete(gm: fx.GraphModule) -> None:
    """``meta["autotp_val"]``: every node's value at the example's sizes (see ``rules.val``)."""
    for node in gm.graph.nodes:
        if "val" in node.meta:
            try:
                node.meta["autotp_val"] = concrete(node.meta["val"])
            except GuardOnDataDependentSymNode as e:
                raise AutoTPError(
                    f"{where(node)}\nhas a size that depends on tensor values ({str(e).splitlines()[0]}), e.g. "
                    "nonzero(), boolean-mask indexing or .tolist() sizes. autotp plans sizes known from the "
                    "inputs' shapes only. What to do: write that step with fixed sizes (torch.where, a "
                    "scatter/gather over a padded size, topk with a fixed k), or choose another implementation "
                    "of the block if the model offers one (e.g. config._experts_implementation).") from e


def dynamic_spec(args: tuple, kwargs: dict, names: list[str]):
    """Batch (dim 0) and sequence (dim 1) of every tensor input may vary: ``Dim.AUTO`` lets
    export keep them symbolic where the model allows and specialise them where it does not."""
    auto = torch.export.Dim.AUTO

    def spec(x):
        if isinstance(x, torch.Tensor) and x.ndim >= 1:
            return {d: auto for d in range(min(x.ndim, 2))}
        return None

    return {names[i]: spec(a) for i, a in enumerate(args)} | {k: spec(v) for k, v in kwargs.items()}


def _widen(x):
    """Repeat a size-1 batch or sequence dim of a tensor input to 2 (tracing only)."""
    if isinstance(x, (tuple, list)):
        return type(x)(_widen(v) for v in x)
    if not isinstance(x, torch.Tensor):
        return x
    for d in range(min(x.ndim, 2)):
        if x.shape[d] == 1:
            x = torch.cat([x, x], dim=d)
    return x


@contextlib.contextmanager
def caches_off(model: torch.nn.Module):
    """``use_cache=False`` in the config of every submodule that has one, for the duration: a
    model behind a wrapper (PEFT's ``PeftModel``, a user's module holding a Hugging Face model)
    whose forward takes no ``use_cache`` then builds no KV-cache object, which does not export and
    which training does not need.  Restored after."""
    configs = {id(c): c for m in model.modules() if (c := getattr(m, "config", None)) is not None
               and isinstance(getattr(c, "use_cache", None), bool)}
    before = {k: c.use_cache for k, c in configs.items()}
    for c in configs.values():
        c.use_cache = False
    try:
        yield
    finally:
        for k, c in configs.items():
            c.use_cache = before[k]


@contextlib.contextmanager
def params_as(model: torch.nn.Module, dtype: torch.dtype | None):
    """The model's floating-point parameters seen as ``dtype`` copies, for the duration (tied ones
    stay tied); the model's own parameters are untouched.  Capturing inside it gives the graph the
    model computes when its parameters are ``dtype`` in the forward (FSDP2's
    ``MixedPrecisionPolicy(param_dtype=dtype)`` over fp32 master weights): the casts the model
    derives from its parameters (RMSNorm's ``.to(input_dtype)``) are ``dtype`` casts, which no
    rewrite of an fp32 graph recovers (docs/fsdp2.md, 'Mixed precision')."""
    if dtype is None:
        yield
        return
    from torch.nn.utils.stateless import _reparametrize_module
    # meta copies: export needs only dtypes and shapes, and the captured program keeps what it traced
    cast = {name: torch.nn.Parameter(torch.empty_like(p, dtype=dtype, device="meta"), requires_grad=p.requires_grad)
            for name, p in model.named_parameters() if p.is_floating_point() and p.dtype != dtype}
    with _reparametrize_module(model, cast, tie_weights=True):
        yield


def capture(model: torch.nn.Module, args: tuple, kwargs: dict | None = None,
            dynamic: bool = True, param_dtype: torch.dtype | None = None) -> Captured:
    """``param_dtype``: capture with the parameters in that dtype (``params_as``); None: as they are."""
    with caches_off(model), params_as(model, param_dtype):
        return _capture(model, args, kwargs, dynamic)


def _capture(model: torch.nn.Module, args: tuple, kwargs: dict | None = None,
             dynamic: bool = True) -> Captured:
    kwargs = dict(kwargs or {})
    forward = getattr(model, "forward", None)
    try:
        sig = inspect.signature(forward)
        if "use_cache" in sig.parameters and "use_cache" not in kwargs:
            kwargs["use_cache"] = False          # KV-cache objects do not export; training needs none
    except (TypeError, ValueError):
        pass
    dynamic_shapes = None
    if dynamic:
        # export fixes any example dim of size 1; trace batch and sequence at >= 2 so they stay symbolic
        args, kwargs = _widen(tuple(args)), {k: _widen(v) for k, v in kwargs.items()}
        try:
            names = [p for p in inspect.signature(forward).parameters][: len(args)]
            dynamic_shapes = dynamic_spec(tuple(args), kwargs, names)
        except (TypeError, ValueError):
            dynamic_shapes = None
    program, stamped = None, None
    layers = stamp.repeated_layers(model) if os.environ.get("AUTOTP_STAMP", "1") != "0" else None
    if layers is not None and stamp.config_uniform(model, len(layers[1])):
        path, modules = layers
        try:
            with stamp.sample_of(modules):            # layers 0, 1, 2 and the last
                sample = _export(model, tuple(args), kwargs, dynamic_shapes)
            params, buffers, constants, users = _signature(sample)
            gm, params, buffers = stamp.stamp(sample.graph_module, params, buffers, path, len(modules), constants)
            program, stamped = sample, (path, len(modules))
        except stamp.Doubt as why:
            log.info("autotp: the layers of %s were exported one by one (%s)", path, why)
        except Exception as e:  # noqa: BLE001 — the sample did not export: export the model as it is
            log.info("autotp: the layers of %s were exported one by one (sample: %s)", path, e)
    if program is None:
        program = _export_or_explain(model, tuple(args), kwargs, dynamic_shapes)
        params, buffers, constants, users = _signature(program)
        gm = program.graph_module
    sig = program.graph_signature
    if any(s.kind != OutputKind.USER_OUTPUT for s in sig.output_specs):
        raise AutoTPError("the model mutates a buffer or parameter in forward (e.g. running statistics); "
                          "autotp supports functional forwards only — call model.eval() or remove the update")
    _merge_tied(gm, params, model)
    canonicalize(gm)
    attach_concrete(gm)
    return Captured(gm, program, params, buffers, constants, users, program.call_spec.in_spec,
                    program.call_spec.out_spec, kwargs, _size_symbols(gm, users), unrolled_sizes(gm), stamped)


def unrolled_sizes(gm: fx.GraphModule) -> dict:
    """Size symbols the graph is not really generic in: a Python loop over a dim (a selective
    scan stepping through the sequence) is traced unrolled, as ``select(x, dim, i)`` with constant
    ``i`` on a symbolic dim.  Such a graph is only right at the example's size, so that size is
    pinned: other sizes get a clear error instead of a silently truncated loop."""
    seen: dict = {}                      # symbol -> (example size, {index: node})
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target != aten.select.int:
            continue
        x = node.args[0].meta.get("val") if isinstance(node.args[0], fx.Node) else None
        if not isinstance(x, torch.Tensor) or not isinstance(node.args[2], int) or node.args[2] < 0:
            continue
        size = x.shape[node.args[1] % x.ndim]
        if isinstance(size, torch.SymInt) and not size.node.expr.is_number:
            seen.setdefault(size.node.expr, (size, {}))[1].setdefault(node.args[2], node)
    pinned = {}
    for expr, (size, by_index) in seen.items():
        # a loop: several constant positions, up to the last one of the example (x[:, -1] is generic)
        if len(by_index) >= 2 and max(by_index) == hint_int(size) - 1:
            node = by_index[max(by_index)]
            line = (node.meta.get("stack_trace") or "").strip().splitlines()[-1:]
            values = size.node.shape_env.backed_var_to_val
            for sym in expr.free_symbols:      # the dim may be a padded length: pin the input's own size
                pinned[sym] = (int(values[sym]) if sym in values else hint_int(size), node.name, line)
    return pinned


BATCH = sympy.Symbol("batch", positive=True, integer=True)
SEQ = sympy.Symbol("seq", positive=True, integer=True)


def _size_symbols(gm: fx.GraphModule, users: list[str]) -> dict:
    """Name export's size symbols after what they are: dim 0 of the inputs is ``batch``,
    dim 1 is ``seq`` (the first input that has them names them)."""
    names = {0: BATCH, 1: SEQ}
    out = {}
    for node in gm.graph.nodes:
        if node.op == "placeholder" and node.name in users and isinstance(node.meta.get("val"), torch.Tensor):
            for d, size in enumerate(node.meta["val"].shape[:2]):
                if isinstance(size, torch.SymInt):
                    expr = size.node.expr
                    if expr.is_Symbol and expr not in out and names[d] not in out.values():
                        out[expr] = names[d]
    return out


def _merge_tied(gm: fx.GraphModule, params: dict[str, str], model: torch.nn.Module) -> None:
    """One placeholder per parameter: export may lift a tied weight (embedding = lm_head) under
    each of its names; route every use to the first and drop the rest, so the weight gets one
    placement and one gradient."""
    owner = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        owner[name] = id(p)
    first: dict[int, fx.Node] = {}
    for node in list(gm.graph.nodes):
        if node.op != "placeholder" or node.name not in params:
            continue
        key = owner.get(params[node.name])
        if key is None:
            continue
        if key in first:
            node.replace_all_uses_with(first[key])
            gm.graph.erase_node(node)
            del params[node.name]
        else:
            first[key] = node


def _fake_call(fn, *args):
    vals = fx.node.map_arg(args, lambda a: a.meta["val"])          # sizes in lists too
    mode = detect_fake_mode([v for v in vals if isinstance(v, torch.Tensor)])
    with mode:
        return fn(*vals)


def _new(graph: fx.Graph, like: fx.Node, target, args) -> fx.Node:
    node = graph.call_function(target, args)
    node.meta = {k: v for k, v in like.meta.items() if k in ("stack_trace", "nn_module_stack", "source_fn_stack")}
    node.meta["val"] = _fake_call(target, *args)
    return node


_RESHAPES = (aten.view.default, aten.reshape.default, aten._unsafe_view.default)


def _split_bias(graph: fx.Graph, node: fx.Node, matmul, x: fx.Node, w: fx.Node, b: fx.Node) -> None:
    """Replace ``node`` (a matmul with a fused bias) by ``add(matmul(x, w), b)``.

    A 2-D ``addmm`` reshaped back to (batch, seq, d) (GPT-2's Conv1D) becomes
    ``add(view(mm(x, w)), b)``: the bias is added after the reshape, so a row-parallel partial
    sum can be reduce-scattered along the sequence before it (sequence parallelism) — the
    flattened (batch*seq) rows hold no sequence shard."""
    users = list(node.users)
    reshape = users[0] if len(users) == 1 and users[0].target in _RESHAPES else None
    bias = b.meta.get("val")
    if reshape is not None and not (isinstance(bias, torch.Tensor) and bias.ndim == 1
                                    and reshape.meta["val"].shape[-1] == node.meta["val"].shape[-1]):
        reshape = None
    with graph.inserting_before(node):
        product = _new(graph, node, matmul, (x, w))
    if reshape is None:
        with graph.inserting_before(node):
            out = _new(graph, node, aten.add.Tensor, (product, b))
        node.replace_all_uses_with(out)
        graph.erase_node(node)
        return
    reshape.replace_input_with(node, product)
    graph.erase_node(node)
    with graph.inserting_after(reshape):
        out = _new(graph, reshape, aten.add.Tensor, (reshape, b))
    reshape.replace_all_uses_with(out, delete_user_cb=lambda u: u is not out)


def _copy_as_value(graph: fx.Graph, node: fx.Node) -> None:
    """Functionalization's ``copy(dst, src)`` (what ``dst.copy_(src)`` became) is ``src``
    broadcast to ``dst``'s shape in ``dst``'s dtype; eager autograd has no derivative for
    ``aten.copy``, and the passes know the plain ops."""
    dst, src = node.args[:2]
    want, have = dst.meta["val"], src.meta["val"] if isinstance(src, fx.Node) else None
    if not isinstance(have, torch.Tensor):
        return
    out = src
    with graph.inserting_before(node):
        if tuple(have.shape) != tuple(want.shape):
            sizes = [d if isinstance(d, int) else _new(graph, node, aten.sym_size.int, (dst, i))
                     for i, d in enumerate(want.shape)]
            out = _new(graph, node, aten.expand.default, (out, sizes))
        if have.dtype != want.dtype:
            out = _new(graph, node, aten._to_copy.default, (out,))
            out.kwargs = {"dtype": want.dtype}
            out.meta["val"] = _fake_call(lambda t: t.to(want.dtype), out.args[0])
    node.replace_all_uses_with(out)
    graph.erase_node(node)


def canonicalize(gm: fx.GraphModule) -> fx.GraphModule:
    graph = gm.graph
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        if node.target == aten._assert_tensor_metadata.default and not node.users:
            graph.erase_node(node)
        elif node.target == aten.linear.default and len(node.args) > 2 and node.args[2] is not None:
            x, w, b = node.args[:3]
            _split_bias(graph, node, aten.linear.default, x, w, b)
        elif node.target == aten.copy.default:
            _copy_as_value(graph, node)
        elif node.target == aten.addmm.default and node.kwargs.get("beta", 1) == 1 and node.kwargs.get("alpha", 1) == 1:
            b, x, w = node.args[:3]
            _split_bias(graph, node, aten.mm.default, x, w, b)
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target in _RESHAPES and node.users:
            _fold_merge_split(graph, node)
    graph.lint()
    gm.recompile()
    return gm


_PERMUTES = (aten.transpose.int, aten.permute.default)


def _atoms(xc: list[int], mc: list[int], symbolic: list[bool]):
    """The finest sizes that both ``x``'s shape ``xc`` and its reshape ``mc`` are groupings of:
    ``[(size, x's dim if that dim is symbolic else None)]`` and, per atom, its dim of ``mc``.
    (None, None) if a symbolic dim of x would be cut (its pieces' sizes are unknown)."""
    atoms, owner = [], []
    dims = [i for i, n in enumerate(xc) if n != 1]
    p, have = 0, (xc[dims[0]] if dims else 1)
    for j, need in enumerate(mc):
        if need == 1:
            atoms.append((1, None))
            owner.append(j)
        while need > 1:
            if p >= len(dims):
                return None, None
            d = dims[p]
            take = need if have >= need else have
            if have % take or need % take or symbolic[d] and take != xc[d]:
                return None, None
            atoms.append((take, d if symbolic[d] else None))
            owner.append(j)
            have //= take
            need //= take
            if have == 1:
                p += 1
                have = xc[dims[p]] if p < len(dims) else 1
    return atoms, owner


def _fold_merge_split(graph: fx.Graph, last: fx.Node) -> None:
    """``reshape(permute*(reshape(x, merged)), split)`` -> ``reshape?(permute(view(x, atoms)))``
    when the first reshape merges a symbolic dim (the batch) with another and ``last`` splits
    every such merge back.

    ``atoms``: the finest dims both reshapes are groupings of (``(T, B, H, hd)`` for ``(T, B, E) ->
    (T, B*H, hd)``); the transposes between move whole dims of the merged view, so they become one
    permute of the atoms.  A rank's heads of ``B*H`` would be a shard strided by ``B``, a factor
    that changes with the input: the folded chain never forms that dim.  Left as it is when a dim
    of ``x`` is split into symbolic pieces, or ``last`` cuts an atom or keeps a symbolic merge."""
    moves, t = [], last.args[0]
    while isinstance(t, fx.Node) and t.target in _PERMUTES and len(t.users) == 1:
        moves.append(t)
        t = t.args[0]
    first = t
    if not (isinstance(first, fx.Node) and first.target in _RESHAPES and len(first.users) == 1
            and isinstance(first.args[0], fx.Node)):
        return
    if any(isinstance(u.target, torch._ops.OpOverload) and u.target._schema.is_mutable for u in last.users):
        return                    # written in place: the folded chain may alias x where a reshape copied
    x = first.args[0]
    xs, ms, ls = (n.meta.get("val") for n in (x, first, last))
    if not all(isinstance(v, torch.Tensor) for v in (xs, ms, ls)):
        return
    symbolic = [isinstance(s, torch.SymInt) and not s.node.expr.is_number for s in xs.shape]
    xc, mc = [hint_int(s) for s in xs.shape], [hint_int(s) for s in ms.shape]
    atoms, owner = _atoms(xc, mc, symbolic)
    if atoms is None or not any(len([k for k, o in enumerate(owner) if o == j and atoms[k][0] != 1]) > 1
                                and any(atoms[k][1] is not None for k, o in enumerate(owner) if o == j)
                                for j in range(ms.ndim)):
        return
    order = list(range(ms.ndim))                         # dim k of the transposed tensor = order[k] of ``first``
    for m in reversed(moves):
        if m.target == aten.transpose.int:
            a, b = m.args[1] % ms.ndim, m.args[2] % ms.ndim
            order[a], order[b] = order[b], order[a]
        else:
            order = [order[d % ms.ndim] for d in m.args[1]]
    perm = [k for d in order for k, o in enumerate(owner) if o == d]
    moved = [atoms[k] for k in perm]
    from autotp.passes.rules.views import dim_groups
    for gi, gj in dim_groups([a[0] for a in moved], [hint_int(s) for s in ls.shape]):
        if len(gj) != 1 or len([i for i in gi if moved[i][0] != 1]) > 1 and any(
                moved[i][1] is not None for i in gi):
            return                                       # ``last`` cuts an atom or merges the batch again
    with graph.inserting_before(first):
        out = x
        if [a[0] for a in atoms] != xc:                  # a symbolic atom is a whole dim of x: its size at run time
            sizes = [n if d is None else _new(graph, first, aten.sym_size.int, (x, d)) for n, d in atoms]
            out = _new(graph, first, aten.view.default, (x, sizes))
        if perm != list(range(len(perm))):
            out = _new(graph, first, aten.permute.default, (out, perm))
    if [a[0] for a in moved] == [hint_int(s) for s in ls.shape]:
        last.replace_all_uses_with(out)
    else:
        with graph.inserting_before(last):
            out = _new(graph, last, aten.reshape.default, (out, last.args[1]))
        last.replace_all_uses_with(out)
    graph.erase_node(last)
    for n in moves + [first]:
        graph.erase_node(n)
