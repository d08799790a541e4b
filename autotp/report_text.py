"""Rendering of the cost report: ``autotp.report.report_data`` -> terminal text or Markdown.

The numbers are computed in ``autotp.report``; this module only lays them out (rich tables for
the terminal, pipe tables for Markdown) so the two concerns change independently.
"""
from __future__ import annotations

import io
import json
import re

import torch

from autotp.report import ARTICLE, _article_lines, _ranges, article_numbers, report_data


def render(data: dict, markdown: bool = False) -> str:
    """The report as text: rich tables rendered to a string, or markdown tables."""
    out = _Writer(markdown)
    c, t = data["config"], data["totals"]
    lk = c["link"]
    out.title(f"autotp cost report: TP {c['world']}, batch {c['batch']}, seq {c['seq']}, {c['dtype']}, "
              f"link {lk['name']} ({lk['bandwidth'] / 1e9:g} GB/s, latency {lk['latency'] * 1e6:g} us)")
    out.para("Formulas: " + "; ".join(data["formulas"][k] for k in ("bytes", "factor", "time")) + ".")
    _collective_section(out, data)
    _totals_section(out, t, c, (data.get("layer_model") or {}).get("layer"))
    _memory_section(out, data["memory"], data.get("attention"), c, data.get("activations"))
    if data.get("experts"):
        _experts_section(out, data["experts"], c)
    if data.get("vocab_loss"):
        _vocab_loss_section(out, data["vocab_loss"])
    if data.get("scaling"):
        _scaling_section(out, data["scaling"], data["layer_model"], data["formulas"])
    if article_numbers(data)["bytes"] == ARTICLE["bytes_per_all_reduce"]:
        out.heading("Article check")
        out.pre(_article_lines(data, None))
    if data.get("notes"):
        out.heading("Plan notes")
        out.pre(data["notes"])
    return out.text()


def _vocab_loss_section(out, ops: list[dict]) -> None:
    out.heading("Vocab-parallel loss")
    lines = []
    for v in ops:
        lines.append(f"{v['op']} on {v['input']} {v['shape']}, split along its classes: {v['count']} collectives "
                     f"per step, B {v['bytes']:,} bytes, wire {v['wire_bytes'] / 1e6:.3g} MB/rank, "
                     f"{v['time_s'] * 1e3:.3g} ms")
        lines.append(f"  with its classes whole it would all-gather {v['input']}: B = {v['gather_bytes_expr']} = "
                     f"{v['gather_bytes']:,} bytes, wire {v['gather_wire_bytes'] / 1e9:.3g} GB/rank, "
                     f"{v['gather_time_s'] * 1e3:.3g} ms per step (forward; its backward keeps a chunk)")
    out.pre(lines)


def _layer_signature(rows: list[dict], layer: int) -> tuple:
    return tuple((r["comm"], r["forward"], r["backward"], re.sub(r"\.\d+\.", ".K.", "." + r["module"] + "."),
                  r["bytes_expr"]) for r in rows if r["layer"] == layer)


def _collective_section(out, data: dict) -> None:
    rows, n = data["collectives"], data["config"]["world"]
    first: dict[tuple, int] = {}                 # signature -> first layer that has it
    same: dict[int, list[int]] = {}               # that layer -> later layers with the same collectives
    for k in sorted({r["layer"] for r in rows if r["layer"] is not None}):
        rep = first.setdefault(_layer_signature(rows, k), k)
        if rep != k:
            same.setdefault(rep, []).append(k)
    hidden = {k for ks in same.values() for k in ks}
    shown = [r for r in rows if r["layer"] not in hidden]
    out.heading(f"Collectives ({len(rows)} in the graph)")
    cols = ["comm", "fwd / bwd", "where", "shape", "B (bytes)", "B at b,s", f"factor (N={n})", "time fwd", "time bwd"]
    table = []
    for r in shown:
        factors = " / ".join(f"{f:.3g}" for f in (r["forward_factor"], r["backward_factor"]) if f is not None)
        table.append([r["comm"], f"{r['forward'] or '-'} / {r['backward'] or '-'}", r["module"] or "(top level)",
                      r["shape"], r["bytes_expr"], f"{r['bytes']:,}", factors,
                      _time(r["forward_time_s"]) if r["forward"] else "-",
                      _time(r["backward_time_s"]) if r["backward"] else "-"])
    out.table(cols, table)
    for rep, ks in same.items():
        out.para(f"Layers {_ranges(ks)} ({len(ks)} layers): the same collectives as layer {rep} "
                 f"(same kinds, modules and bytes), not repeated above.")
    out.para("Source lines and reasons:")
    out.pre([f"{r['node']}: {r['source'] or '?'}\n    {r['reason']}" for r in shown])


def _totals_section(out, t: dict, c: dict, layer: int | None) -> None:
    out.heading("Totals")
    cols = ["scope", "count", "by kind", "B total (symbolic)", "B total", "wire bytes/rank", "time"]
    table = []
    names = [("per forward", t["forward"]), ("decoder layers, forward", t["decoder_forward"])]
    if c["training"]:
        names += [("per backward", t["backward"]), ("decoder layers, backward", t["decoder_backward"]),
                  ("per step (forward+backward)", t["step"])]
    if t["per_layer"]:
        first = layer if layer in t["per_layer"] else min(t["per_layer"])
        names.insert(0, (f"per layer (layer {first}), forward", t["per_layer"][first]["forward"]))
        if c["training"]:
            names.insert(1, (f"per layer (layer {first}), backward", t["per_layer"][first]["backward"]))
    for name, tot in names:
        table.append([name, str(tot["count"]), ", ".join(f"{v} {k}" for k, v in tot["by_kind"].items()) or "-",
                      tot["bytes_expr"], _bytes(tot["bytes"]), _bytes(tot["wire_bytes"]), _time(tot["time_s"])])
    out.table(cols, table)
    out.para(f"{t['layers']} decoder layers. Backward = collectives whose backward is set (gradients of the same "
             f"tensors, same B). Time = sum over collectives of latency + factor x B / bandwidth.")


def _memory_section(out, m: dict, att: dict | None, c: dict, act: dict | None = None) -> None:
    out.heading("Memory per rank (parameters, gradients, Adam)")
    cols = ["", "bytes/param", "unsharded (1 GPU)", f"per rank (TP {c['world']})", "ratio"]
    table = [[k, str(r["bytes_per_element"]), _bytes(r["unsharded"]), _bytes(r["per_rank"]),
              f"{r['unsharded'] / max(r['per_rank'], 1):.2f}x"] for k, r in m["rows"].items()]
    out.table(cols, table)
    out.para(f"{m['parameters']:,} parameters, {m['parameters_per_rank']:,} per rank "
             f"({m['replicated_parameters']:,} replicated on every rank). Convention: {m['convention']}. "
             f"Activations and buffers not included.")
    if act:
        sp = "with" if act["sequence_parallel"] else "without"
        out.para(f"Activations per rank, the solver's estimate ({sp} sequence parallelism): "
                 f"{_bytes(act['bytes'])} at batch {c['batch']}, seq {c['seq']} — every tensor the forward allocates "
                 f"in the autograd graph and every gathered copy (the logits too), 1/N where sharded (an upper "
                 f"bound on what backward keeps).")
    if att:
        out.para(f"Flash attention never writes the L x L scores: {_bytes(att['bytes'])} per layer and rank avoided "
                 f"at batch {c['batch']}, seq {c['seq']} ({att['bytes_expr']} = {att['formula']}; "
                 f"{att['heads']} heads, {att['heads_per_rank']} per rank).")


def _experts_section(out, e: dict, c: dict) -> None:
    out.heading("Mixture of experts: all-to-all dispatch + combine vs gathering the tokens (forward)")
    b = e["blocks"][0]
    same = "Every MoE layer" if len(e["blocks"]) > 1 else "The MoE layer"
    cols = ["option", "collectives", "B", "wire bytes/rank", "time"]
    chosen = ", ".join(k for k, _ in b["chosen"]["collectives"]) or "none"
    a2a, gathered = b["all_to_all"], b["gathered"]
    mark = ("  <- this plan", "") if b["dispatched"] else ("", "  <- this plan")
    n, groups = c["world"], b.get("groups", c["world"])
    split = ("experts split, tokens split N ways: dispatch + combine" if groups == n else
             f"experts in {groups} groups (EP x TP), tokens split N ways: dispatch (a copy per rank of the "
             f"group) + combine")
    out.table(cols, [
        [split + mark[0], "2 all_to_all", a2a["bytes_expr"],
         _bytes(a2a["wire_bytes"]), _time(a2a["time_s"])],
        ["tokens gathered (or replicated), partial sums combined" + mark[1],
         "all_gather + reduce_scatter, or all_reduce", gathered["bytes_expr"], _bytes(gathered["wire_bytes"]),
         _time(gathered["time_s"])],
        [f"this plan's collectives in the block (experts {b['experts_placement']})", chosen,
         " + ".join(expr for _, expr in b["chosen"]["collectives"]) or "-",
         _bytes(b["chosen"]["wire_bytes"]), _time(b["chosen"]["time_s"])]])
    how = ("Each rank routes its own tokens and sends every routed row to the rank that owns its expert, "
           "and back (variable-size all-to-alls; split sizes exchanged by one small all-gather of expert "
           "counts, not counted here)." if b["dispatched"] else
           "Here every rank holds every token (no sequence split), so expert parallelism needs no dispatch: each "
           "rank runs its experts' rows and one collective combines them. With sequence_parallel=True the "
           "tokens are split and the solver may dispatch them by all-to-all instead.")
    moves = ("The all-to-all moves tokens/N x top_k x d x (N-1)/N per rank each way, gathering moves tokens x d x "
             "(N-1)/N each way: dispatch pays off when top_k < N." if groups == n else
             f"On the EP x TP grid each row goes to every rank of its group of experts ({n // groups} copies), and "
             f"the ranks' partial sums come back and add up: the all-to-all moves tokens/N x top_k x d x (N-1)/"
             f"groups per rank each way, gathering moves tokens x d x (N-1)/N each way: dispatch pays off when "
             f"top_k < groups ({groups}).")
    out.para(f"{same} ({b['module']}, {b['experts']} experts, {b['routed_rows']} routed rows = tokens x top_k "
             f"{b['top_k']}, d {b['d_model']}). {how} {moves}")


def _scaling_section(out, s: dict, model: dict, formulas: dict) -> None:
    out.heading("Where tensor parallelism stops paying off (one decoder layer, forward)")
    differ = f" (layers {_ranges(model['differing'])} differ)" if model.get("differing") else ""
    out.para(f"Layer model from layer {model['layer']}, the pattern most layers share{differ}: "
             f"P_layer = {model['matmul_parameters']:,} matmul parameters, "
             f"{len(model['forward'])} forward collectives ({', '.join(k for k, _ in model['forward'])}). "
             f"tokens = {s['tokens']:,}; 2 x tokens x P_layer = {s['flops_per_layer'] / 1e12:.2f} TFLOP per layer; "
             f"peak {s['peak'] / 1e12:g} TFLOP/s ({s['device_note']}). {formulas['matmul']}. "
             f"{formulas['efficiency']}. Comm uses this plan's collectives at each degree.")
    cols = ["link", "TP", "comm", "matmul", "comm/matmul", "efficiency", "layer speedup"]
    out.table(cols, [[r["link"], str(r["world"]), _time(r["comm_s"]), _time(r["matmul_s"]), f"{r['ratio']:.2f}",
                      f"{r['efficiency']:.0%}", f"{r['speedup']:.1f}x"] for r in s["rows"]])
    out.para("What it shows: " + " ".join(s["verdict"]) + " At a realistic 40-60% of peak the matmuls take "
             "2x longer, so the crossover moves one TP degree further; overlapping communication with compute "
             "helps the same way. Training adds the same communication backward against 2x the FLOPs.")


def _bytes(n: float) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"


def _time(s: float) -> str:
    if s >= 1:
        return f"{s:.2f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.2f} ms"
    return f"{s * 1e6:.1f} us"


class _Writer:
    """Headings, paragraphs, tables and preformatted lines, as markdown or as rich-rendered text."""

    def __init__(self, markdown: bool):
        self.markdown = markdown
        self.parts: list[str] = []
        if not markdown:
            from rich.console import Console
            self.console = Console(file=io.StringIO(), width=160, record=True, color_system=None,
                                   force_terminal=False, soft_wrap=False)

    def title(self, text):
        self._emit(f"# {text}\n" if self.markdown else text + "\n" + "=" * min(len(text), 160))

    def heading(self, text):
        self._emit(f"\n## {text}\n" if self.markdown else "\n" + text + "\n" + "-" * len(text))

    def para(self, text):
        self._emit(text + ("\n" if self.markdown else ""))

    def pre(self, lines):
        text = "\n".join(lines)
        self._emit(f"```\n{text}\n```" if self.markdown else text)

    def table(self, cols, rows):
        if self.markdown:
            esc = [[str(x).replace("|", "\\|") for x in row] for row in rows]
            lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
            lines += ["| " + " | ".join(row) + " |" for row in esc]
            self._emit("\n".join(lines) + "\n")
            return
        from rich import box
        from rich.table import Table
        tab = Table(*cols, box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
        for row in rows:
            tab.add_row(*[str(x) for x in row])
        self.console.print(tab)
        self.parts.append(self.console.export_text(clear=True).rstrip("\n"))

    def _emit(self, text):
        if self.markdown:
            self.parts.append(text)
        else:
            self.console.print(text, markup=False, highlight=False)
            self.parts.append(self.console.export_text(clear=True).rstrip("\n"))

    def text(self) -> str:
        return "\n".join(self.parts) + "\n"


def report(plan, *, batch: int, seq: int, dtype=torch.bfloat16, link="nvlink-h100", fmt: str = "text",
           device: str = "h100-sxm", full_layers: int | None = None) -> str:
    """The report as ``fmt``: "text" (terminal tables), "markdown" or "json" (``report_data``)."""
    data = report_data(plan, batch=batch, seq=seq, dtype=dtype, link=link, device=device, full_layers=full_layers)
    if fmt == "json":
        return json.dumps(data, indent=1, default=str)
    if fmt == "markdown":
        return render(data, markdown=True)
    if fmt == "text":
        return render(data, markdown=False)
    raise ValueError(f"unknown fmt {fmt!r}: text, markdown or json")
