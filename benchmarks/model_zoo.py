"""Every causal-LM family transformers ships, shrunk to a small config with random weights, through
``autotp.parallelize`` on real gloo processes: exact, a clear error, or a failure.

    python benchmarks/model_zoo.py --world 2                    # every family
    python benchmarks/model_zoo.py --world 2,4 --only llama,phi3,dbrx
    python benchmarks/model_zoo.py --world 2 --sp               # with sequence_parallel=True

No family has code in autotp: this is the "a model the tests have never seen" check.  The config
is the family's default with its sizes shrunk through the common config names (hidden size,
heads, layers, experts, MLA ranks ...); a family whose own forward fails on that config (not an
autotp matter) is listed as ``skip``.  Outcomes per family and world size:

    ok           logits and every gradient within 1e-5 of one device (relative to scale)
    clear-error  parallelize raised an AutoTPError (names the op/node and what to do)
    WRONG        numbers differ                         (a bug)
    BAD-ERROR    any other exception or a hang          (a bug)
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
import traceback

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from autotp.verify import Case, HFModel, verify  # noqa: E402

TOL = 1e-5
SMALL = dict(
    vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, max_position_embeddings=128, pad_token_id=0, bos_token_id=1,
    eos_token_id=2,
    # mixtures of experts
    num_experts=4, num_local_experts=4, n_routed_experts=4, moe_num_experts=4, num_experts_per_tok=2,
    moe_topk=2, moe_intermediate_size=32, shared_expert_intermediate_size=32, n_shared_experts=1,
    first_k_dense_replace=1, n_group=1, topk_group=1, decoder_sparse_step=1, moe_layer_freq=1,
    # multi-head latent attention
    q_lora_rank=32, kv_lora_rank=32, qk_rope_head_dim=16, qk_nope_head_dim=8, v_head_dim=16, rotary_dim=8,
    # no randomness in the forward
    dropout=0.0, attention_dropout=0.0, hidden_dropout=0.0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    use_cache=False, tie_word_embeddings=False,
)


MAX_PARAMS = 200_000_000
_RANDOM = ("dropout", "pdrop", "layerdrop", "drop_path")


def families() -> list[str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def config_of(model_type: str) -> dict:
    """The family's small config as a dict (keys the family's config does not know are dropped,
    so each family keeps its own defaults for everything else)."""
    from transformers import AutoConfig
    base = AutoConfig.for_model(model_type)
    known = set(base.to_dict()) | set(getattr(base, "attribute_map", {}))
    small = {k: v for k, v in SMALL.items() if k in known}
    for k, v in base.to_dict().items():                 # every dropout, whatever the family calls it
        if isinstance(v, float) and not isinstance(v, bool) and any(w in k for w in _RANDOM):
            small[k] = 0.0
    if "kv_lora_rank" in known and "num_key_value_heads" in small:   # latent attention: k/v per head
        small["num_key_value_heads"] = small["num_attention_heads"]
    return dict(model_type=model_type, **small)


def buildable(model_type: str, seq: int = 8, memory_gb: float = 4.0, timeout_s: float = 120.0) -> str:
    """'' if the family builds from its small config and runs a forward on token ids by itself,
    else why not (one line).  Runs in a forked child with ``memory_gb`` of address space (a family
    whose defaults the shrinking misses could otherwise take the machine's memory)."""
    import multiprocessing as mp
    ctx = mp.get_context("fork")
    recv, send = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_build_child, args=(model_type, seq, memory_gb, send))
    child.start()
    send.close()
    try:
        why = recv.recv() if recv.poll(timeout_s) else f"no forward within {timeout_s:.0f} s"
    except EOFError:
        why = f"the build process died (exit code {child.exitcode})"
    if child.is_alive():
        child.kill()
    child.join()
    return why


def _build_child(model_type: str, seq: int, memory_gb: float, send) -> None:
    import resource
    limit = int(memory_gb * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    try:
        send.send(_build(model_type, seq))
    except BaseException as e:  # noqa: BLE001 — MemoryError and the like
        send.send(f"{type(e).__name__}")


def _build(model_type: str, seq: int) -> str:
    try:
        torch.manual_seed(0)
        model = HFModel(config_of(model_type))()
        params = sum(p.numel() for p in model.parameters())
        if params > MAX_PARAMS:          # a vision tower or sizes under names the shrinking does not know
            return f"{params / 1e6:.0f}M parameters at the shrunk config (over {MAX_PARAMS / 1e6:.0f}M)"
        ids = torch.randint(3, 128, (2, seq))
        out = model(ids)
        if not hasattr(out, "logits"):
            return "no logits in the output"
        if not torch.isfinite(out.logits).all():
            return "its own forward gives NaN/inf on this config"
        if not torch.equal(model(ids).logits, out.logits):
            return "its forward is random (a dropout the shrinking missed)"
        return ""
    except Exception as e:  # noqa: BLE001 — a family that does not build is reported, not fixed
        return f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"


def outcome(r) -> str:
    if r.error:
        final = r.error.rsplit("Traceback (most recent call last):", 1)[-1]   # the exception raised last
        kind = "clear-error" if "AutoTPError" in final else "BAD-ERROR"
        msg = next((ln for ln in final.splitlines() if "Error" in ln and not ln.startswith(" ")), final.strip().splitlines()[-1])
        if r.logits_err == r.logits_err and r.grad_err == r.grad_err:      # the example itself ran
            ok = "ok" if max(r.logits_err, r.grad_err) <= TOL else "WRONG"
            return f"{ok}  logits {r.logits_err:.1e}  grads {r.grad_err:.1e}; other shape: {kind}: {msg[:120]}"
        return f"{kind}: {msg[:160]}"
    errs = (r.logits_err, r.grad_err, r.other_shape_err)
    verdict = "ok" if all(e <= TOL for e in errs) else "WRONG"   # NaN is WRONG
    experts = sorted({p for n, p in r.placements.items() if ".experts." in n})
    return (f"{verdict}  logits {r.logits_err:.1e}  grads {r.grad_err:.1e} ({r.worst_grad})  other "
            f"{r.other_shape_err:.1e}" + (f"  experts {'/'.join(experts)}" if experts else ""))


def _with(config: dict, extra: dict) -> dict:
    """``config`` with the ``--set`` values of the keys it has."""
    return {**config, **{k: v for k, v in extra.items() if k in config}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--world", default="2", help="comma-separated world sizes")
    ap.add_argument("--only", default="", help="comma-separated model types (default: every family)")
    ap.add_argument("--sp", action="store_true", help="sequence_parallel=True")
    ap.add_argument("--chunk", type=int, default=8, help="families per process start")
    ap.add_argument("--timeout", type=float, default=180.0, help="collective timeout, seconds")
    ap.add_argument("--set", default="", help="comma-separated key=int over the small config, where the family "
                                              "has the key (e.g. num_experts=6,moe_intermediate_size=24)")
    args = ap.parse_args()
    extra = {k: int(v) for k, v in (kv.split("=") for kv in args.set.split(",") if kv)}
    names = args.only.split(",") if args.only else families()
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}")
    runnable, skipped = [], {}
    for n in names:
        why = buildable(n)
        (skipped.__setitem__(n, why) if why else runnable.append(n))
    for n, why in skipped.items():
        print(f"{n:28s} skip: {why}")
    failures = 0
    kwargs = {"sequence_parallel": True} if args.sp else {}
    for world in [int(w) for w in args.world.split(",")]:
        for i in range(0, len(runnable), args.chunk):
            part = runnable[i:i + args.chunk]
            cases = [Case(n, HFModel(_with(config_of(n), extra)), kwargs=kwargs,
                          other_shapes=((3, 4 if args.sp else 5),)) for n in part]
            t0 = time.time()
            try:
                per_rank = verify(cases, world, timeout_s=args.timeout)
            except Exception:  # noqa: BLE001 — a hang or a crash of the whole start
                print(f"N={world} {part}: BAD-ERROR (the processes failed)\n{traceback.format_exc()[-800:]}")
                failures += len(part)
                continue
            for j, n in enumerate(part):
                worst = max((outcome(per_rank[r][j]) for r in range(world)),
                            key=lambda s: ("BAD" in s, "WRONG" in s, "clear" in s))
                failures += "WRONG" in worst or "BAD-ERROR" in worst
                print(f"{n:28s} N={world}  {worst}", flush=True)
            print(f"#   {time.time() - t0:.0f} s", flush=True)
    print(f"# failures: {failures}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
