"""``python -m autotp``: plan, draw and verify tensor parallelism for a Hugging Face config.

    python -m autotp plan   CONFIG.json --tp 8 --batch 4 --seq 2048 --dtype bf16 --link nvlink-h100
    python -m autotp dump   CONFIG.json --tp 2 -o out/
    python -m autotp verify CONFIG.json --nproc 4

CONFIG is a config.json (with ``model_type``) or a directory holding one.  ``plan`` and ``dump``
build the model on the meta device (no weights, any size) and plan it from a tiny example input;
``verify`` builds it with random weights on ``--nproc`` gloo processes and compares the parallel
model's logits and gradients with one device.  See ``docs/cli.md``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

EXAMPLE_SHAPE = (2, 8)       # (batch, seq) of the planning example; batch 1 would make batch static


def load_config(path: str, layers: int | None = None):
    """(transformers config, config dict) from a config.json or a directory; ``layers`` overrides
    the number of decoder layers."""
    from transformers import AutoConfig
    p = Path(path)
    if p.is_file():
        raw = json.loads(p.read_text())
        cfg = AutoConfig.for_model(**raw) if "model_type" in raw else AutoConfig.from_pretrained(str(p))
    else:
        cfg = AutoConfig.from_pretrained(str(p))
        raw = cfg.to_dict()
    if layers is not None:
        cfg.num_hidden_layers = layers
        raw = {**raw, _layer_key(raw): layers}
    return cfg, raw


def _layer_key(raw: dict) -> str:
    return next((k for k in ("num_hidden_layers", "n_layer", "num_layers") if k in raw), "num_hidden_layers")


def meta_model(cfg, dtype=None):
    """The config's causal LM on the meta device (no memory), in ``dtype`` if given."""
    import torch
    from transformers import AutoModelForCausalLM
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    return model.to(dtype) if dtype is not None else model


def plan_from_config(cfg, tp: int, *, training: bool = True, sequence_parallel: bool = False, labels: bool = False):
    """Build the model on the meta device and plan it for ``tp`` ranks.  ``labels``: the example
    passes ``labels=`` so the loss is in the graph, with sharded outputs (a training step reads
    the loss; the logits may stay split along the vocabulary)."""
    import torch
    import autotp
    model = meta_model(cfg)
    # Example ids on the meta device too: a vocab-parallel embedding of meta weights with CPU ids
    # fails the local-shape check (meta/cpu device mismatch).
    ids = torch.zeros(EXAMPLE_SHAPE, dtype=torch.long, device="meta")
    kwargs = {"labels": torch.zeros(EXAMPLE_SHAPE, dtype=torch.long, device="meta")} if labels else None
    return autotp.plan(model, (ids,), kwargs, world_size=tp, training=training, sequence_parallel=sequence_parallel,
                       sharded_outputs=labels)


def _status(text: str):
    from rich.console import Console
    return Console(stderr=True).status(text, spinner="dots")


def cmd_plan(args) -> int:
    from autotp.report_text import report
    full_layers = load_config(args.config)[0].num_hidden_layers
    cfg, _ = load_config(args.config, args.layers)
    with _status(f"planning {args.config} for TP {args.tp} (capture, rules, solver) ..."):
        plan = plan_from_config(cfg, args.tp, training=not args.inference,
                                sequence_parallel=args.sequence_parallel, labels=args.labels)
    with _status("computing the report ..."):
        text = report(plan, batch=args.batch, seq=args.seq, dtype=args.dtype, link=args.link, fmt=args.format,
                      device=args.device, full_layers=full_layers)
    print(text)
    if args.memory:
        from autotp.report import DTYPES
        if args.layers is not None and args.layers != full_layers:
            print(f"note: memory for the {args.layers} planned layers, not the model's {full_layers}")
        checkpointing = None if args.checkpointing == "none" else args.checkpointing
        with _status(f"simulating a training step on the meta device (batch {args.batch} x seq {args.seq}) ..."):
            est = plan.memory(args.batch, args.seq, DTYPES[args.dtype], optimizer=args.optimizer, dp=args.dp,
                              activation_checkpointing=checkpointing, device_gb=args.device_gb)
        print(est.text())
    if args.decode:
        print(decode_text(cfg, plan, args.tp, args.batch, args.seq, args.dtype, args.top_k))
    return 0


def decode_text(cfg, plan, tp: int, batch: int, length: int, dtype: str, top_k: int) -> str:
    """What one decode step of ``generate`` moves and holds per rank: its plan
    (``autotp.generation.DecodePlan``, pinned to ``plan``'s weight placements, traced on the meta
    device in ``dtype``) at ``batch`` rows and a cache of ``length`` tokens."""
    from autotp.generation import DecodePlan
    from autotp.placement import fmt
    from autotp.report import DTYPES
    with _status(f"planning the decode step for TP {tp} ..."):
        step = DecodePlan(meta_model(cfg, DTYPES[dtype]), plan.placements, tp, trace_device="meta")
    counts, greedy = step.decode_traffic(batch, length, k=1)
    sampled, gathered = (step.decode_traffic(batch, length, k=k)[1] for k in (top_k, None))
    mine, full = step.cache_bytes(batch, length)
    per_layer = {k: dict(v) for k, v in step.plan.counts()["per_layer_forward"].items() if k is not None}
    typical = max(per_layer.values(), key=lambda c: sum(c.values()), default={})
    return "\n".join([
        f"Decode step (generate): {cfg.num_hidden_layers} layers, batch {batch}, cache {length} tokens, {dtype}, TP {tp}",
        f"  collectives per step: {dict(sorted(counts.items()))} (a typical layer: {typical}; the token "
        f"exchange included)",
        f"  bytes per step: greedy {greedy:,}; top-k {top_k} sampling {sampled:,}; top-p / min-p / penalties "
        f"(the (batch, vocab) logits gathered) {gathered:,}",
        f"  logits {fmt(step.vocab.placement)} of vocab {step.vocab.size}; KV cache per rank {mine:,} B "
        f"({mine / 2**30:.2f} GiB) of {full:,} B unsharded"])


def cmd_dump(args) -> int:
    from autotp.viz import dump
    cfg, _ = load_config(args.config, args.layers)
    with _status(f"planning {args.config} for TP {args.tp} ..."):
        plan = plan_from_config(cfg, args.tp, sequence_parallel=args.sequence_parallel)
    with _status(f"writing the graphs of every pass to {args.out} ..."):
        files = dump(plan, args.out, fold=not args.no_fold)
    for f in files:
        print(f)
    return 0


def cmd_verify(args) -> int:
    from autotp.verify import Case, HFModel, verify
    _, raw = load_config(args.config, args.layers)
    name = Path(args.config).stem
    case = Case(name, HFModel(raw), batch=args.batch, seq=args.seq,
                kwargs={"sequence_parallel": True} if args.sequence_parallel else {},
                other_shapes=((3, 2 * args.nproc),) if args.sequence_parallel else ((3, 5),))
    with _status(f"running {name} on {args.nproc} gloo processes (reference vs parallel) ..."):
        results = verify([case], args.nproc, timeout_s=args.timeout)
    worst = 0.0
    failed = False
    print(f"{'rank':>4}  {'logits err':>10}  {'other shapes':>12}  {'grad err':>10}  worst gradient / error")
    for rank, per_case in enumerate(results):
        r = per_case[0]
        if r.error:
            failed = True
            print(f"{rank:>4}  failed:\n{r.error}")
            continue
        err = max(r.logits_err, r.other_shape_err, r.grad_err)
        worst = max(worst, err)
        print(f"{rank:>4}  {r.logits_err:>10.2e}  {r.other_shape_err:>12.2e}  {r.grad_err:>10.2e}  {r.worst_grad}")
    r0 = results[0][0]
    if not r0.error:
        print(f"collectives per forward: {r0.forward_counts}; per backward: {r0.backward_counts}")
    ok = not failed and worst <= args.tol
    print(f"{'PASS' if ok else 'FAIL'}: max error {worst:.2e} (tolerance {args.tol:g}, errors are max |parallel - "
          f"reference| / max |reference|)")
    return 0 if ok else 1


def parser() -> argparse.ArgumentParser:
    from autotp import cost
    from autotp.report import DEVICES, DTYPES
    top = argparse.ArgumentParser(prog="python -m autotp", description="Plan, draw and verify tensor "
                                  "parallelism for a Hugging Face causal-LM config (see docs/cli.md).")
    sub = top.add_subparsers(dest="command", required=True)

    def common(p, tp):
        p.add_argument("config", help="config.json (with model_type) or a directory holding one")
        p.add_argument("--tp", type=int, default=tp, help=f"tensor-parallel degree (default {tp})")
        p.add_argument("--layers", type=int, default=None,
                       help="plan only this many decoder layers (faster; per-layer numbers are unchanged)")
        p.add_argument("--sequence-parallel", action="store_true",
                       help="minimise activation memory next (Megatron-SP: norms and residuals split by sequence)")

    p = sub.add_parser("plan", help="plan on the meta device and print the cost report")
    common(p, 8)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    p.add_argument("--link", default="nvlink-h100", choices=sorted(cost.LINKS))
    p.add_argument("--device", default="h100-sxm", choices=sorted(DEVICES), help="peak FLOP/s preset")
    p.add_argument("--format", default="text", choices=["text", "markdown", "json"])
    p.add_argument("--inference", action="store_true", help="forward only: no backward collectives")
    p.add_argument("--labels", action="store_true", help="plan with labels= so the loss is in the graph, and "
                   "sharded outputs: the vocab-parallel loss, no gather of the logits")
    p.add_argument("--memory", action="store_true",
                   help="also the per-rank peak memory of a training step and whether it fits --device-gb")
    p.add_argument("--dp", type=int, default=1, help="FSDP2 data-parallel degree over which parameters, gradients "
                   "and optimizer state are sharded (with --memory; default 1)")
    p.add_argument("--checkpointing", default="none", choices=["none", "full", "selective"],
                   help="activation checkpointing per layer (with --memory)")
    p.add_argument("--optimizer", default="adamw", choices=["adamw", "sgd", "sgd_momentum"])
    p.add_argument("--device-gb", type=float, default=80.0, help="device memory to check the peak against")
    p.add_argument("--decode", action="store_true", help="also what one decode step of generate moves and holds per "
                   "rank (batch --batch, a cache of --seq tokens)")
    p.add_argument("--top-k", type=int, default=50, help="top_k of the sampling row of --decode (default 50)")
    p.set_defaults(run=cmd_plan)

    p = sub.add_parser("dump", help="write each pass's graph as text and SVG")
    common(p, 2)
    p.add_argument("-o", "--out", default="out", help="output directory (default out/)")
    p.add_argument("--no-fold", action="store_true", help="draw every decoder layer")
    p.set_defaults(run=cmd_dump)

    p = sub.add_parser("verify", help="multi-process equivalence run against one device (gloo, CPU)")
    p.add_argument("config")
    p.add_argument("--nproc", type=int, default=4)
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=8)
    p.add_argument("--tol", type=float, default=1e-5)
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per collective")
    p.add_argument("--sequence-parallel", action="store_true", help="plan with sequence_parallel=True")
    p.set_defaults(run=cmd_verify)
    return top


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    args = parser().parse_args(argv)
    from autotp.base import AutoTPError
    try:
        return args.run(args)
    except AutoTPError as e:
        print(f"autotp: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
