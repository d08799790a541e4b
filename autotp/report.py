"""The cost report: every collective of a plan, its bytes, its time, and what they add up to.

``report_data(plan, batch=, seq=, dtype=, link=)`` computes the numbers (a JSON-able dict);
``autotp.report_text.report(...)`` renders them as a terminal table, markdown or JSON.  Every number comes with the
formula that made it, so a reader can check it by hand:

    B     = numel(tensor) x itemsize(dtype)           full (unsharded) tensor, symbolic in batch, seq
    wire  = factor(kind, N) x B                       bytes each rank sends (ring algorithms)
    time  = latency + wire / bandwidth                seconds per collective (``autotp.cost``)

The captured graph is fp32; floating tensors are re-priced at the activation ``dtype``
(``B x dtype.itemsize / 4``).  Backward collectives are those whose ``.backward`` is set; they
move the gradient of the same tensor, so they have the same ``B``.

``article_check`` puts the numbers next to the source article's Llama-70B claims and says
where the article mixes the 1x volume and the ring factor.  See ``docs/cost-model.md``.
"""
from __future__ import annotations

import collections
import re

import sympy
import torch
import torch.fx as fx

from autotp import cost
from autotp.placement import Grid, is_shard, local_shape
from autotp.capture import BATCH, SEQ
from autotp.base import layer_index, module_path
from autotp.passes.rules import val

DEGREES = (2, 4, 8, 16)

DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
          "half": torch.float16, "fp32": torch.float32, "float32": torch.float32, "float": torch.float32}


from autotp.cost import DEVICES, Device  # noqa: E402,F401  (the presets live with the cost model)

# The source article's Llama-70B numbers (see DESIGN.md); article_check compares against them.
ARTICLE = dict(d_model=8192, layers=80, batch=4, seq=2048, itemsize=2, world=8, bytes_per_all_reduce=134_217_728,
               per_forward=160, forward_gb=21.5, per_step=320, nvlink_ms=0.26, ib_1x_ms=5.4, ib_ring_ms=9.4,
               step_1x_s=1.7, step_ring_s=3.0)

FORMULAS = {
    "bytes": "B = numel x itemsize(dtype), the full (unsharded) tensor; fp32 graph tensors re-priced at dtype",
    "factor": "ring factor: all_reduce 2(N-1)/N, all_gather (N-1)/N, reduce_scatter (N-1)/N, "
              "all_to_all (N-1)/N^2 of the full B (= (N-1)/N of one rank's shard B/N)",
    "wire": "wire bytes per rank = factor x B",
    "time": "time = latency + factor x B / bandwidth (bandwidth: bytes/s per GPU, one direction)",
    "memory": "mixed-precision Adam: parameter and gradient in dtype, optimizer = fp32 m + fp32 v (+ fp32 master "
              "copy when dtype is not fp32): 2+2+12 = 16 bytes/parameter in bf16, 4+4+8 = 16 in fp32",
    "matmul": "matmul time per layer = 2 x tokens x P_layer / (N x peak); P_layer = elements of the layer's "
              "weight matrices (ndim >= 2); attention score FLOPs (4 x b x s^2 x d) not counted",
    "efficiency": "efficiency = matmul / (matmul + comm), no overlap; speedup = N x efficiency",
}


def parse_dtype(dtype) -> torch.dtype:
    """``torch.bfloat16`` or a name: bf16, fp16, fp32 (and the long forms)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return DTYPES[str(dtype).lower().replace("torch.", "")]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}") from None


def evaluate(expr, batch: int, seq: int) -> int:
    """A sympy expression in ``batch``/``seq`` at concrete sizes."""
    subs = {s: {"batch": batch, "seq": seq}[s.name] for s in sympy.sympify(expr).free_symbols}
    return int(sympy.sympify(expr).subs(subs))


def short_source(line: str) -> str:
    """'File ".../site-packages/transformers/x.py", line 3, in f: code' -> 'transformers/x.py:3 in f: code'."""
    m = re.match(r'File "([^"]+)", line (\d+), in (\S+)(.*)', line)
    if not m:
        return line
    path = re.sub(r".*/(site|dist)-packages/", "", m.group(1))
    return f"{path}:{m.group(2)} in {m.group(3)}{m.group(4)}"


def element_bytes(tensor_dtype: torch.dtype, dtype: torch.dtype) -> int:
    """Bytes per element at the activation ``dtype``: floating tensors take ``dtype``, others keep theirs."""
    return dtype.itemsize if tensor_dtype.is_floating_point else tensor_dtype.itemsize


# ---------------------------------------------------------------- collectives

def collective_rows(plan, batch: int, seq: int, dtype: torch.dtype, link) -> list[dict]:
    """One row per collective: where it is, its bytes (symbolic and at batch/seq) and time."""
    lk, n = cost.get_link(link), plan.world
    rows = []
    for c in plan.collectives():
        expr = sympy.Integer(element_bytes(c.dtype, dtype))
        for s in c.sym_shape:
            expr = expr * s
        nbytes = evaluate(expr, batch, seq)
        row = dict(node=c.node, comm=c.kind, forward=c.forward, backward=c.backward if plan.ctx.training else None,
                   module=c.module, layer=c.layer, source=short_source(c.source), reason=c.reason,
                   shape="(" + ", ".join(str(s) for s in c.sym_shape) + ")", bytes_expr=str(expr), bytes=nbytes)
        for phase in ("forward", "backward"):
            kind = row[phase]
            # a grid dispatch sends each row to every rank of its group: volume copies
            row[phase + "_factor"] = cost.factor(kind, n) * c.volume if kind else None
            row[phase + "_time_s"] = cost.collective_time(kind, nbytes * c.volume, n, lk) if kind else 0.0
        rows.append(row)
    return rows


def _total(rows: list[dict], phase: str) -> dict:
    """Count, bytes (symbolic and concrete), wire bytes and time of ``phase`` over ``rows``."""
    rows = [r for r in rows if r[phase]]
    kinds = collections.Counter(r[phase] for r in rows)
    expr = sum((sympy.sympify(r["bytes_expr"]) for r in rows), sympy.Integer(0))
    return dict(count=len(rows), by_kind=dict(sorted(kinds.items())), bytes_expr=str(expr),
                bytes=sum(r["bytes"] for r in rows),
                wire_bytes=sum(r[phase + "_factor"] * r["bytes"] for r in rows),
                time_s=sum(r[phase + "_time_s"] for r in rows))


def totals(rows: list[dict]) -> dict:
    """Per forward, per backward, per step (forward+backward), the decoder layers alone, per layer."""
    layers = sorted({r["layer"] for r in rows if r["layer"] is not None})
    in_layers = [r for r in rows if r["layer"] is not None]
    fwd, bwd = _total(rows, "forward"), _total(rows, "backward")
    step = {k: fwd[k] + bwd[k] for k in ("count", "bytes", "wire_bytes", "time_s")}
    step["bytes_expr"] = str(sympy.sympify(fwd["bytes_expr"]) + sympy.sympify(bwd["bytes_expr"]))
    step["by_kind"] = dict(collections.Counter(fwd["by_kind"]) + collections.Counter(bwd["by_kind"]))
    return dict(forward=fwd, backward=bwd, step=step, layers=len(layers),
                decoder_forward=_total(in_layers, "forward"), decoder_backward=_total(in_layers, "backward"),
                per_layer={k: dict(forward=_total([r for r in rows if r["layer"] == k], "forward"),
                                   backward=_total([r for r in rows if r["layer"] == k], "backward"))
                           for k in layers})


# ---------------------------------------------------------------- memory

def parameter_shapes(plan) -> list[tuple[str, tuple, object]]:
    """(parameter name, full shape, placement) for every parameter of the plan (tied ones once)."""
    out = []
    for node in plan.gm.graph.nodes:
        if node.op == "placeholder" and node.name in plan.ctx.params:
            out.append((plan.ctx.params[node.name], tuple(val(node).shape), node.meta["autotp"]["placement"]))
    return out


def memory(plan, dtype: torch.dtype) -> dict:
    """Per-rank bytes of parameters, gradients and Adam states, against one unsharded copy."""
    per_elem = dict(parameters=dtype.itemsize, gradients=dtype.itemsize,
                    optimizer=8 + (0 if dtype == torch.float32 else 4))
    full = local = replicated = 0
    for _, shape, p in parameter_shapes(plan):
        n_full = _numel(shape)
        n_local = _numel(local_shape(shape, p, plan.world))
        full, local = full + n_full, local + n_local
        replicated += 0 if is_shard(p) else n_full
    rows = {k: dict(bytes_per_element=b, unsharded=full * b, per_rank=local * b) for k, b in per_elem.items()}
    rows["total"] = dict(bytes_per_element=sum(per_elem.values()), unsharded=full * sum(per_elem.values()),
                         per_rank=local * sum(per_elem.values()))
    return dict(parameters=full, parameters_per_rank=local, replicated_parameters=replicated, rows=rows,
                convention=FORMULAS["memory"])


def activations(plan, batch: int, seq: int, dtype: torch.dtype) -> dict:
    """The solver's activation estimate per rank at ``batch`` x ``seq`` (floating tensors at
    ``dtype``): every tensor the forward allocates in the autograd graph and every
    redistribution's output, 1/N where sharded — an upper bound on what backward keeps; what
    ``sequence_parallel=True`` minimises and ``max_activation_bytes`` caps."""
    import dataclasses
    from autotp.passes.accounting import activation_mib
    names = {"batch": batch, "seq": seq}
    sizes = {sym: sympy.Integer(names[str(name)]) for sym, name in plan.captured.symbols.items()}
    mib = activation_mib(plan.gm, dataclasses.replace(plan.ctx, plan_sizes=sizes))
    return dict(bytes=mib * 2**20 * dtype.itemsize / 4, sequence_parallel=bool(plan.ctx.sequence_parallel))


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def attention_scores(plan, batch: int, seq: int, dtype: torch.dtype) -> dict | None:
    """The L x L score matrix a fused (flash) attention never writes, per layer and rank."""
    for node in plan.gm.graph.nodes:
        if node.op == "call_function" and "scaled_dot_product" in str(node.target):
            q = val(node.args[0])                                  # (B, H, S, D)
            heads = int(q.shape[1])
            p = node.meta.get("autotp", {}).get("placement")
            p = p[0] if isinstance(p, tuple) else p
            local = heads // plan.world if is_shard(p) and p.dim == 1 else heads
            expr = BATCH * local * SEQ ** 2 * dtype.itemsize
            return dict(heads=heads, heads_per_rank=local, bytes_expr=str(expr),
                        bytes=evaluate(expr, batch, seq),
                        formula="batch x heads_per_rank x seq^2 x itemsize, per layer and rank")
    return None


# ---------------------------------------------------------------- vocab-parallel loss

def vocab_loss(plan, rows: list[dict], batch: int, seq: int, dtype: torch.dtype, link) -> list[dict]:
    """Per log-softmax / loss over a class dim the plan keeps sharded (``passes/rules/loss.py``):
    its collectives, next to the all-gather of its input (the logits) that the op needs with its
    classes whole — what a plan without the rule moves: B = numel x itemsize, wire (N-1)/N x B
    per rank, forward only (the gather's backward keeps this rank's chunk)."""
    lk, n = cost.get_link(link), plan.world
    ops: dict[str, list] = collections.defaultdict(list)
    inputs = {}
    for node in plan.rewritten().graph.nodes:
        op = node.meta.get("autotp", {}).get("sharded_classes")
        if op is not None:
            ops[op].append(node.name)
            if getattr(node.target, "__name__", "") == "sharded_amax":
                inputs[op] = node.args[0]
    out = []
    for op, names in ops.items():
        mine = [r for r in rows if r["node"] in names]
        x = inputs[op]
        expr = sympy.Integer(element_bytes(val(x).dtype, dtype))
        for s in plan._sym_shape(x):
            expr = expr * s
        gather = evaluate(expr, batch, seq)
        steps = [r for r in mine for phase in ("forward", "backward") if r[phase]]
        out.append(dict(op=op, input=x.name, shape="(" + ", ".join(str(s) for s in plan._sym_shape(x)) + ")",
                        count=len(steps), bytes=sum(r["bytes"] for r in steps),
                        wire_bytes=sum(r[ph + "_factor"] * r["bytes"] for r in mine for ph in ("forward", "backward")
                                       if r[ph]),
                        time_s=sum(r["forward_time_s"] + r["backward_time_s"] for r in mine),
                        gather_bytes_expr=str(expr), gather_bytes=gather,
                        gather_wire_bytes=cost.factor(cost.ALL_GATHER, n) * gather,
                        gather_time_s=cost.collective_time(cost.ALL_GATHER, gather, n, lk)))
    return out


# ---------------------------------------------------------------- experts

def experts(plan, rows: list[dict], batch: int, seq: int, dtype: torch.dtype, link) -> dict | None:
    """Per MoE layer: the communication this plan pays to combine the experts, next to the
    all-to-all dispatch + combine expert parallelism pays when the tokens are split over the
    ranks (sequence or data parallel), so a reader sees why no all-to-all appears here.

    Inside a tensor-parallel group every rank already holds every token, so expert parallelism
    needs no dispatch: each rank runs its experts' rows and one collective combines them.  With
    tokens split N ways, each rank must send its routed rows (tokens x top_k x d) to the experts'
    owners and get them back: two all-to-alls, each B = tokens x top_k x d x itemsize,
    wire (N-1)/N^2 x B per rank.
    """
    lk, n = cost.get_link(link), plan.world
    blocks: dict[int | None, dict] = {}
    topks = _topks(plan)
    for node in plan.gm.graph.nodes:
        if node.op != "call_function" or "grouped_mm" not in str(node.target):
            continue
        info = node.meta.get("autotp", {})
        layer = layer_index(module_path(node))
        if layer in blocks or "strategy" not in info:
            continue
        x, w = node.args[0], node.args[1]
        sym = node.args[0].meta.get("val")
        routed = sympy.Integer(1)
        for size in sym.shape[:1]:
            routed = routed * (sympy.sympify(size.node.expr).xreplace(plan.captured.symbols)
                               if isinstance(size, torch.SymInt) else sympy.Integer(size))
        d = int(val(x).shape[1])
        wp = info["strategy"].inputs[1]
        kind = ("expert-parallel" if is_shard(wp) and wp.dim == 0 else
                "TP inside experts" if is_shard(wp) else
                f"EP x TP {wp.groups}x{plan.world // wp.groups}" if isinstance(wp, Grid) else
                "replicated")
        a2a_expr = routed * d * element_bytes(val(x).dtype, dtype)
        a2a_bytes = evaluate(a2a_expr, batch, seq)
        top_k = _top_k(topks, node) or 1
        tokens_expr = a2a_expr / top_k                 # the block's (tokens, d) input and output
        tokens_bytes = evaluate(tokens_expr, batch, seq)
        mine = [r for r in rows if r["layer"] == layer and r["forward"] and _under(r["module"], module_path(node))]
        dispatched = any(r["comm"] == "moe_dispatch" for r in mine)
        groups = wp.groups if isinstance(wp, Grid) else n      # owner groups; each row goes to n/groups ranks
        copies = n // groups
        blocks[layer] = dict(
            layer=layer, module=module_path(node).rsplit(".", 1)[0], experts=int(val(w).shape[0]),
            experts_placement=kind, routed_rows=str(routed), d_model=d,
            chosen=dict(collectives=[(r["forward"], r["bytes_expr"]) for r in mine],
                        wire_bytes=sum(r["forward_factor"] * r["bytes"] for r in mine),
                        time_s=sum(r["forward_time_s"] for r in mine)),
            dispatched=dispatched, top_k=top_k, groups=groups,
            all_to_all=dict(bytes_expr=str(a2a_expr), bytes=a2a_bytes,
                            wire_bytes=2 * cost.factor(cost.ALL_TO_ALL, n) * a2a_bytes * copies,
                            time_s=2 * cost.collective_time(cost.ALL_TO_ALL, a2a_bytes * copies, n, lk)),
            # the tokens gathered (or replicated) and the experts' partial sums combined: an
            # all-gather + reduce-scatter (sequence parallel) or one all-reduce, the same wire bytes
            gathered=dict(bytes_expr=str(tokens_expr), bytes=tokens_bytes,
                          wire_bytes=cost.factor(cost.ALL_REDUCE, n) * tokens_bytes,
                          time_s=cost.collective_time(cost.ALL_GATHER, tokens_bytes, n, lk)
                          + cost.collective_time(cost.REDUCE_SCATTER, tokens_bytes, n, lk)))
    if not blocks:
        return None
    return dict(layers=sorted(blocks, key=lambda k: -1 if k is None else k), blocks=list(blocks.values()))


def _topks(plan) -> list[tuple[str, int]]:
    """(module path, k) of every top-k routing in the graph."""
    return [(module_path(n), n.args[1]) for n in plan.gm.graph.nodes
            if n.op == "call_function" and n.target == torch.ops.aten.topk.default and isinstance(n.args[1], int)]


def _top_k(topks: list, grouped_mm: fx.Node) -> int | None:
    """k of the top-k routing feeding a grouped matmul (the ``topk`` of the same MoE block)."""
    block = module_path(grouped_mm).rsplit(".", 1)[0]
    return next((k for path, k in topks if path.startswith(block)), None)


def _under(module: str, expert_module: str) -> bool:
    """A collective of the MoE block: same block module (``model.layers.3.mlp``) or inside it."""
    block = expert_module.rsplit(".", 1)[0] if "." in expert_module else expert_module
    return module == block or module.startswith(block + ".") or module.startswith(expert_module)


# ---------------------------------------------------------------- where TP stops paying off

def layer_model(plan, rows: list[dict]) -> dict | None:
    """One decoder layer as numbers: matmul parameters, and its collectives (kind, bytes expr).

    The layer is the most common one: the first layer whose collectives are those most layers
    have (a solver may treat the first or last layer differently).
    """
    shapes = parameter_shapes(plan)
    layers = sorted({layer_index(name) for name, _, _ in shapes} - {None})
    if not layers:
        return None

    def pattern(k):
        return tuple((r["forward"], r["backward"], r["bytes_expr"]) for r in rows if r["layer"] == k)

    common = collections.Counter(pattern(k) for k in layers).most_common(1)[0][0]
    layer = next(k for k in layers if pattern(k) == common)
    matrices = [s for n, s, _ in shapes if layer_index(n) == layer and len(s) >= 2]
    mine = [r for r in rows if r["layer"] == layer]
    return dict(layer=layer, layers=len(layers), matmul_parameters=sum(_numel(s) for s in matrices),
                differing=[k for k in layers if pattern(k) != common],
                forward=[(r["forward"], r["bytes_expr"]) for r in mine if r["forward"]],
                backward=[(r["backward"], r["bytes_expr"]) for r in mine if r["backward"]])


def scaling(model: dict, batch: int, seq: int, dtype: torch.dtype, device: Device,
            degrees=DEGREES, links=tuple(cost.LINKS)) -> dict:
    """Per-layer forward comm time vs matmul time at each TP degree and link, from ``model``.

    Assumes the collective pattern of the plan (kinds and full bytes per layer) holds at every
    degree: true for Megatron's 2 all-reduces of (b, s, d), whose size does not depend on N.
    """
    peak = device.peak[dtype]
    tokens = batch * seq
    flops = 2 * tokens * model["matmul_parameters"]
    rows = []
    for name in links:
        lk = cost.get_link(name)
        for n in degrees:
            comm = sum(cost.collective_time(k, evaluate(e, batch, seq), n, lk) for k, e in model["forward"])
            matmul = flops / (n * peak)
            eff = matmul / (matmul + comm)
            rows.append(dict(link=name, world=n, comm_s=comm, matmul_s=matmul, ratio=comm / matmul,
                             efficiency=eff, speedup=n * eff))
    return dict(device=device.name, peak=peak, device_note=device.note, tokens=tokens, flops_per_layer=flops,
                rows=rows, verdict=_verdict(rows, degrees, links))


def _verdict(rows: list[dict], degrees, links) -> list[str]:
    """One plain sentence per link, and one for all of them."""
    out, pays = [], []
    for name in links:
        mine = [r for r in rows if r["link"] == name]
        ok = [r["world"] for r in mine if r["ratio"] < 1]
        best = max(mine, key=lambda r: r["speedup"])
        if best["speedup"] < 1:
            out.append(f"{name}: tensor parallelism does not pay: communication is {mine[0]['ratio']:.1f}x the "
                       f"matmul time already at TP {degrees[0]}, and a layer runs slower than on one GPU "
                       f"(best {best['speedup']:.1f}x).")
        elif len(ok) == len(mine):
            pays.append(name)
            out.append(f"{name}: pays off up to TP {degrees[-1]}: comm/matmul {mine[-1]['ratio']:.2f} at TP "
                       f"{degrees[-1]}, layer speedup {mine[-1]['speedup']:.1f}x on {degrees[-1]} GPUs.")
        else:
            below = f"stays below matmul time up to TP {max(ok)}" if ok else \
                f"exceeds matmul time from TP {degrees[0]}"
            out.append(f"{name}: communication {below}; beyond that more GPUs buy little: best layer speedup "
                       f"{best['speedup']:.1f}x at TP {best['world']} ({best['speedup'] / best['world']:.0%} of "
                       f"linear).")
    if pays and len(pays) < len(links):
        out.append(f"So: keep tensor parallelism on {', '.join(pays)}; across slower links use data or pipeline "
                   f"parallelism instead.")
    return out


# ---------------------------------------------------------------- the whole report

def report_data(plan, *, batch: int, seq: int, dtype=torch.bfloat16, link="nvlink-h100",
                device: str = "h100-sxm", full_layers: int | None = None) -> dict:
    """Every number of the report as a JSON-able dict (sympy expressions as strings).

    ``full_layers``: decoder layers of the full model when ``plan`` covers fewer (planned with a
    truncated config); only the article check scales its per-layer counts by it.
    """
    dtype, lk = parse_dtype(dtype), cost.get_link(link)
    rows = collective_rows(plan, batch, seq, dtype, lk)
    model = layer_model(plan, rows)
    return dict(
        config=dict(world=plan.world, batch=batch, seq=seq, dtype=str(dtype).replace("torch.", ""),
                    itemsize=dtype.itemsize, training=bool(plan.ctx.training), full_layers=full_layers,
                    link=dict(name=lk.name, bandwidth=lk.bandwidth, latency=lk.latency, note=lk.note)),
        formulas=dict(FORMULAS),
        collectives=rows,
        totals=totals(rows),
        memory=memory(plan, dtype),
        activations=activations(plan, batch, seq, dtype),
        attention=attention_scores(plan, batch, seq, dtype),
        experts=experts(plan, rows, batch, seq, dtype, lk),
        vocab_loss=vocab_loss(plan, rows, batch, seq, dtype, lk),
        layer_model=model,
        scaling=scaling(model, batch, seq, dtype, DEVICES[device]) if model and model["forward"] else None,
        notes=list(plan.notes),                # replicated ops and weights, pins' cost, lowered attention
    )


# ---------------------------------------------------------------- article check

def article_check(plan_or_data, layers: int | None = None) -> str:
    """The article's Llama-70B numbers next to ours, with both the 1x and the ring factor.

    ``plan_or_data``: a Plan (evaluated at the article's batch 4, seq 2048, bf16) or a
    ``report_data`` dict.  ``layers`` overrides the number of decoder layers (for a plan of a
    few layers of a deeper model: per-layer counts are what the article counts).
    """
    data = plan_or_data if isinstance(plan_or_data, dict) else report_data(
        plan_or_data, batch=ARTICLE["batch"], seq=ARTICLE["seq"], dtype=torch.bfloat16)
    return "\n".join(_article_lines(data, layers))


def article_numbers(data: dict, layers: int | None = None) -> dict:
    """The quantities the article states, computed from ``report_data``: B, counts, 1x and ring times.

    Per-layer counts come from the typical decoder layer (``layer_model``: the collectives most
    layers have), times the number of layers (``layers``, else ``full_layers``, else planned).
    """
    t, n = data["totals"], data["config"]["world"]
    model = data.get("layer_model") or {}
    typical = model.get("layer")
    mine = [r for r in data["collectives"] if r["layer"] == typical]
    fwd = [r for r in mine if r["forward"] == cost.ALL_REDUCE]
    bwd = [r for r in mine if r["backward"] == cost.ALL_REDUCE]
    L = layers or data["config"].get("full_layers") or t["layers"]
    b = fwd[0]["bytes"] if fwd else 0
    out = dict(world=n, layers=L, layer=typical, differing=model.get("differing", []), bytes=b,
               per_layer=len(fwd), per_forward=len(fwd) * L, per_step=(len(fwd) + len(bwd)) * L,
               plan_forward=t["decoder_forward"]["by_kind"].get(cost.ALL_REDUCE, 0),
               plan_step=t["decoder_forward"]["by_kind"].get(cost.ALL_REDUCE, 0)
               + t["decoder_backward"]["by_kind"].get(cost.ALL_REDUCE, 0),
               ring=cost.factor(cost.ALL_REDUCE, n))
    out["forward_bytes"] = out["per_forward"] * b
    for name in ("nvlink-h100", "ib-hdr"):
        bw = cost.LINKS[name].bandwidth
        out[name] = dict(one=b / bw, ring=out["ring"] * b / bw)
    return out


def _article_lines(data: dict, layers: int | None) -> list[str]:
    a, c = article_numbers(data, layers), data["config"]
    nv, ib = a["nvlink-h100"], a["ib-hdr"]

    def mark(ours, theirs):
        """'ok' when ours, rounded to the digits the article prints, is the article's number."""
        text = str(theirs)
        return "ok" if round(ours, len(text.split(".")[1]) if "." in text else 0) == theirs else "differs"

    ring_total, one_total = a["per_step"] * ib["ring"], a["per_step"] * ib["one"]
    rows = [
        ("bytes per all-reduce B = b x s x d x 2 (bf16)", f"{a['bytes']:,}",
         f"article {ARTICLE['bytes_per_all_reduce']:,}: {mark(a['bytes'], ARTICLE['bytes_per_all_reduce'])}"),
        (f"all-reduces per layer, forward (layer {a['layer']})", str(a["per_layer"]), ""),
        ("all-reduces per forward", str(a["per_forward"]),
         f"article {ARTICLE['per_forward']}: {mark(a['per_forward'], ARTICLE['per_forward'])}"),
        (f"bytes per forward = {a['per_forward']} x B", f"{a['forward_bytes'] / 1e9:.2f} GB",
         f"article {ARTICLE['forward_gb']} GB: {mark(a['forward_bytes'] / 1e9, ARTICLE['forward_gb'])}"),
        ("all-reduces per forward+backward", str(a["per_step"]),
         f"article {ARTICLE['per_step']}: {mark(a['per_step'], ARTICLE['per_step'])}"),
        ("nvlink-h100 (900 GB/s), 1x: B / BW", f"{nv['one'] * 1e3:.3f} ms", ""),
        (f"nvlink-h100, ring: {a['ring']:.3g} x B / BW", f"{nv['ring'] * 1e3:.3f} ms",
         f"article {ARTICLE['nvlink_ms']} ms: {mark(nv['ring'] * 1e3, ARTICLE['nvlink_ms'])}"),
        ("ib-hdr (25 GB/s), 1x: B / BW", f"{ib['one'] * 1e3:.2f} ms",
         f"article {ARTICLE['ib_1x_ms']} ms: {mark(ib['one'] * 1e3, ARTICLE['ib_1x_ms'])}"),
        (f"ib-hdr, ring: {a['ring']:.3g} x B / BW", f"{ib['ring'] * 1e3:.2f} ms",
         f"article {ARTICLE['ib_ring_ms']} ms: {mark(ib['ring'] * 1e3, ARTICLE['ib_ring_ms'])}"),
        (f"ib-hdr, {a['per_step']} all-reduces, 1x", f"{one_total:.2f} s",
         f"article {ARTICLE['step_1x_s']} s: {mark(one_total, ARTICLE['step_1x_s'])}"),
        (f"ib-hdr, {a['per_step']} all-reduces, ring", f"{ring_total:.2f} s",
         f"article {ARTICLE['step_ring_s']} s: {mark(ring_total, ARTICLE['step_ring_s'])}"),
        (f"nvlink-h100, {a['per_step']} all-reduces, 1x / ring",
         f"{a['per_step'] * nv['one'] * 1e3:.1f} / {a['per_step'] * nv['ring'] * 1e3:.1f} ms", ""),
    ]
    width = max(len(r[0]) for r in rows)
    lines = ["Article check: Llama-70B, batch 4, seq 2048, bf16, TP 8; decoder-layer all-reduces only",
             f"  this plan: TP {a['world']}, batch {c['batch']}, seq {c['seq']}, {c['dtype']}, {a['layers']} layers; "
             f"times are the bandwidth term only (no latency), N = {a['world']}"]
    lines += [f"  {name:<{width}}  {value:>14}  {note}".rstrip() for name, value, note in rows]
    if a["differing"]:
        lines.append(f"  Counts are {a['layers']} x the typical layer ({a['layer']}). This plan's "
                     f"layer{'s' if len(a['differing']) > 1 else ''} {_ranges(a['differing'])} "
                     f"{'have' if len(a['differing']) > 1 else 'has'} other collectives: its planned decoder "
                     f"layers have {a['plan_forward']} forward and {a['plan_step']} forward+backward all-reduces.")
    lines += [
        "  Where the article mixes them: its NVLink figure (0.26 ms) includes the ring factor 2(N-1)/N, its",
        "  first InfiniBand figure (5.4 ms) does not (1x volume: B / 25 GB/s); it then gives 9.4 ms with the",
        "  ring factor and 1.7 s (1x) or 3.0 s (ring) over 320. It also calls 160 all-reduces",
        "  'per forward-backward': 160 is per forward (2 per layer x 80); forward+backward is 320.",
        "  Not counted by the article: the embedding / lm_head collectives outside the decoder layers.",
    ]
    return lines


def _ranges(xs: list[int]) -> str:
    out, start = [], None
    for i, x in enumerate(xs):
        if start is None:
            start = x
        if i + 1 == len(xs) or xs[i + 1] != x + 1:
            out.append(f"{start}" if start == x else f"{start}-{x}")
            start = None
    return ", ".join(out)
