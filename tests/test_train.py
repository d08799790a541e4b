"""The training recipe, ``examples/train.py`` (issue 18, items 2 and 5), on four gloo ranks.

A tiny Llama (examples/configs/llama-tiny.json) on a (dp 2, tp 2) mesh: autotp over tp, FSDP2
per layer over dp, AdamW with warmup + cosine, clipping, the vocab-parallel loss.  The recipe's
own functions run the steps; the reference is the same model trained on one device on the same
global batches (``global_batch`` of the step: dp 2 x batch 2 rows), with torch's clipping and
``F.cross_entropy`` over the whole batch.

* fp32, 20 steps: the loss curve equals the reference's.
* stopped at step 10 (DCP checkpoint), resumed: steps 11-20 equal the uninterrupted run's.
* bf16 (the model in bf16) and bf16-mixed (fp32 master weights, ``parallelize(...,
  param_dtype=bf16)``, FSDP2's MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)), 3 steps
  each: within bf16's rounding of the bf16 reference, and the same distance from the fp32
  reference as one device's bf16 run is: the error is bf16's, not autotp's.
* Tokenised files: the bf16 run reads its corpus from a .npy of token ids, the bf16-mixed run
  from a .bin of uint16 ids (nanoGPT's format), and each reference from the same file.
"""
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers.models.llama.modeling_llama  # noqa: F401 — imported once here, not in each forked rank

from ranks import case, run_cases

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
import train as recipe  # noqa: E402

DP, TP = 2, 2
STEPS, STOP, BF16_STEPS = 20, 10, 3
ARGS = ["--model", str(ROOT / "examples/configs/llama-tiny.json"), "--dp", str(DP), "--tp", str(TP),
        "--batch", "2", "--seq", "16", "--steps", str(STEPS), "--quiet"]


def _reference(args, steps: int, dtype: torch.dtype) -> list[float]:
    """The same model, one device, the whole global batch of each step."""
    model, _ = recipe.build_model(args.model, dtype, args.seed)
    tokens = recipe.load_tokens(args.data, model.config.vocab_size, args.seed)
    opt = recipe.make_optimizer(model.parameters(), args)
    losses = []
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = recipe.lr_at(step, args)
        window = recipe.global_batch(tokens, step, DP * args.batch, args.seq, args.seed)
        logits = model(window[:, :-1]).logits
        loss = F.cross_entropy(logits.flatten(0, 1), window[:, 1:].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def _cases(ckpt_dir, data):
    def fp32():
        args = recipe.parse_args(ARGS)
        losses, s = _timed(lambda: recipe.train(args))
        return {"losses": [losses[i + 1] for i in range(STEPS)], "reference": _reference(args, STEPS, torch.float32),
                "s": s}

    def resumed():
        stopped = recipe.train(recipe.parse_args(ARGS + ["--ckpt-dir", ckpt_dir, "--ckpt-every", "5",
                                                         "--stop-after", str(STOP)]))
        rest = recipe.train(recipe.parse_args(ARGS + ["--ckpt-dir", ckpt_dir, "--resume"]))
        return {"stopped": stopped, "rest": rest, "saved": sorted(os.listdir(ckpt_dir))}

    def bf16(dtype):
        args = recipe.parse_args(ARGS + ["--steps", str(BF16_STEPS), "--dtype", dtype, "--data", data[dtype]])
        losses = recipe.train(args)
        return {"losses": [losses[i + 1] for i in range(BF16_STEPS)], "data": args.data,
                "bf16_reference": _reference(args, BF16_STEPS, torch.bfloat16),
                "fp32_reference": _reference(args, BF16_STEPS, torch.float32)}

    return {"fp32": fp32, "resumed": resumed, "bf16": lambda: bf16("bf16"), "bf16_mixed": lambda: bf16("bf16-mixed")}


def _token_files(tmp: str) -> dict[str, str]:
    """A corpus other than the synthetic default (another seed's bigram chain, 4096 tokens), as
    the .npy and the .bin (uint16) ``--data`` reads: --dtype -> path."""
    ids = recipe.load_tokens(None, 128, seed=7, synthetic_tokens=4096).numpy()       # llama-tiny: vocab 128
    npy, bin_ = os.path.join(tmp, "tokens.npy"), os.path.join(tmp, "tokens.bin")
    np.save(npy, ids.astype(np.int32))
    ids.astype(np.uint16).tofile(bin_)
    return {"bf16": npy, "bf16-mixed": bin_}


@pytest.fixture(scope="module")
def results():
    with tempfile.TemporaryDirectory() as tmp:
        data = _token_files(tmp)
        return run_cases(lambda: _cases(os.path.join(tmp, "ckpt"), data), DP * TP)


def _rel(got, want) -> float:
    return max(abs(g - w) / abs(w) for g, w in zip(got, want))


def test_loss_curve_equals_one_device(results):
    for rank, r in enumerate(case(results, "fp32")):
        err = _rel(r["losses"], r["reference"])
        print(f"rank {rank}: 20 AdamW steps, max relative loss difference {err:.1e} ({r['s']:.1f} s); "
              f"loss {r['losses'][0]:.4f} -> {r['losses'][-1]:.4f}")
        assert r["losses"][-1] < r["losses"][0] - 0.05     # it trains: the curve is not flat
        assert err <= 1e-5, (rank, err)      # measured 4e-7 over 20 AdamW steps


def test_stopped_and_resumed_run_continues_the_same_curve(results):
    uninterrupted = case(results, "fp32")
    for rank, r in enumerate(case(results, "resumed")):
        assert r["saved"] == ["latest", "step-10", "step-5"], r["saved"]      # the stopped run saved these
        assert sorted(r["stopped"]) == list(range(1, STOP + 1))
        assert sorted(r["rest"]) == list(range(STOP + 1, STEPS + 1))     # it started at step 11
        full = uninterrupted[rank]["losses"]
        err = max(abs(r["rest"][s] - full[s - 1]) for s in r["rest"])
        print(f"rank {rank}: resumed steps 11-20 vs uninterrupted: max |difference| {err:.1e}")
        assert [r["stopped"][s] for s in sorted(r["stopped"])] == full[:STOP]
        assert err == 0.0, (rank, err)                                 # bitwise


@pytest.mark.parametrize("dtype", ["bf16", "bf16_mixed"])
def test_bf16_matches_one_device_bf16(results, dtype):
    for rank, r in enumerate(case(results, dtype)):
        vs_bf16 = _rel(r["losses"], r["bf16_reference"])
        vs_fp32 = _rel(r["losses"], r["fp32_reference"])
        one_device = _rel(r["bf16_reference"], r["fp32_reference"])
        print(f"rank {rank} {dtype}: losses {[round(x, 4) for x in r['losses']]}: vs one-device bf16 {vs_bf16:.1e}, "
              f"vs fp32 {vs_fp32:.1e} (one-device bf16 vs fp32: {one_device:.1e})")
        assert vs_bf16 <= 2e-2, (rank, vs_bf16)
        assert vs_fp32 <= 2e-2, (rank, vs_fp32)


def test_bf16_runs_trained_on_the_token_files(results, tmp_path):
    """The bf16 runs above trained with ``--data``, and what it loads is the file's ids (.npy as
    saved, .bin as uint16), not the synthetic default."""
    want = recipe.load_tokens(None, 128, seed=7, synthetic_tokens=4096)
    assert not torch.equal(recipe.load_tokens(None, 128, seed=0)[:len(want)], want)
    for dtype, path in _token_files(str(tmp_path)).items():
        assert torch.equal(recipe.load_tokens(path, 128, seed=0), want), path
        for r in case(results, dtype.replace("-", "_")):
            assert os.path.basename(r["data"]) == os.path.basename(path), r["data"]
