"""The rank-local decode step's graph, made cheap to run eagerly (``autotp.generation``).

At N = 1 a decode step is the model's own ops and nothing else, so their Python cost per op
decides the speed against Hugging Face's ``generate`` (docs/generation.md, *What a decode step
costs*): ``write_cache_in_place`` makes the cache writes in place, ``drop_identities`` removes
no-op nodes, ``bound_forward`` calls each op through its C++ entry point.
"""
from __future__ import annotations

import torch
import torch.fx as fx

aten = torch.ops.aten


def write_cache_in_place(gm: fx.GraphModule, cache_inputs: set[str]) -> bool:
    """``index_copy(cache, ...)`` -> ``index_copy_(cache, ...)`` where nothing else reads the
    cache input's values (its shape may be read: ``sym_size``): the step then writes this
    rank's cache tensors instead of copying them.  Whether every cache input is now written
    in place.  (Export reads the length off every value cache, so before this allowed
    ``sym_size`` readers only the keys were written in place and each step copied every
    layer's values, ``B x length x kv_heads x head_dim`` apiece.)"""
    written = set()
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target == aten.index_copy.default:
            src = node.args[0]
            if isinstance(src, fx.Node) and src.op == "placeholder" and src.name in cache_inputs \
                    and all(u is node or u.target == aten.sym_size.int for u in src.users):
                node.target = aten.index_copy_.default
                written.add(src.name)
    gm.graph.lint()
    gm.recompile()
    return written == cache_inputs


def drop_identities(gm: fx.GraphModule) -> None:
    """Remove the nodes that return their input's values unchanged: ``to`` with the input's
    dtype and device (no copy asked), ``mul`` by the Python scalar 1, and ``slice`` of a whole
    dim.  A Hugging Face model casts to its own dtype around every norm and rotary embedding
    (fp32 -> fp32), which export keeps; each costs a dispatch per step (~20 of ~300 nodes of a
    4-layer Llama step).  Only the step's cache inputs are ever written in place, and those
    only when nothing else reads them, so an alias in place of a copy is never overwritten."""
    full = (0, None), (None, 2 ** 63 - 1)
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or not node.args or not isinstance(node.args[0], fx.Node):
            continue
        x, args, kw = node.args[0], node.args, node.kwargs
        a, b = x.meta.get("val"), node.meta.get("val")
        if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor) or a.dtype != b.dtype:
            continue
        if node.target in (aten.to.dtype, aten.to.dtype_layout, aten.to.device):
            same = a.device == b.device and not kw.get("copy", False) and kw.get("memory_format") is None \
                and not any(isinstance(v, bool) and v for v in args[1:])       # copy=True given positionally
        elif node.target == aten.mul.Tensor:
            same = len(args) == 2 and type(args[1]) in (int, float) and args[1] == 1 and not kw
        elif node.target == aten.slice.Tensor:
            start, end, step = (*args[2:5], *(None, None, 1)[len(args[2:5]):])     # slice's defaults
            same = start in full[0] and end in full[1] and step == 1 and not kw
        else:
            continue
        if same:
            node.replace_all_uses_with(x)
            gm.graph.erase_node(node)
    gm.graph.lint()
    gm.recompile()


def bound_forward(gm: fx.GraphModule):
    """``gm.forward`` with every op a global bound to its C++ entry point (``OpOverload._op``,
    what ``OpOverload.__call__`` calls), for eager decoding.  fx writes
    ``torch.ops.aten.mul.Tensor(...)``: four attribute lookups and a Python frame per node, about
    a microsecond that adds up to ~10% of a 4-layer Llama step (~280 nodes).  The code is fx's
    own with those names replaced, so it runs the same ops in the same order; ``torch.compile``
    gets ``gm`` itself.  ``autotp.attention`` is bound to the op's Python body: the same backend
    choice (``attention_op.select_backend``, counted and logged) without the custom-op layers
    around it (autograd, alias checks, dynamo's disable), which a step that never differentiates
    does not need: 2-6% of a step of that Llama on CPU."""
    from autotp.kernels import attention_op
    body = getattr(attention_op.attention, "_init_fn", None)          # torch's CustomOpDef keeps it
    entry = {torch.ops.autotp.attention.default: body} if body is not None else {}
    code = gm.graph.python_code(root_module="self")
    src, scope = code.src, dict(code.globals)
    for node in gm.graph.nodes:
        op = node.target
        name = f"_{op.namespace}_{op.__name__.replace('.', '_')}" if isinstance(op, torch._ops.OpOverload) else ""
        if node.op == "call_function" and name and name not in code.src:
            scope[name] = entry.get(op, op._op)
            src = src.replace(f"torch.ops.{op.namespace}.{op.__name__}(", f"{name}(")
    exec(compile(src, "<autotp decode step>", "exec"), scope)
    forward = scope["forward"]
    return lambda *inputs: forward(gm, *inputs)
