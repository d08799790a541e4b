"""Transformers that are not Hugging Face causal LMs: encoders, encoder-decoders, vision and
diffusion transformers, and LLMs from other libraries, each from a small config with random
weights.  Prints each model's forward collectives per kind from ``autotp.plan`` (no processes),
the ops it runs replicated, and with ``--verify`` whether the parallel model is exact on gloo.

    python benchmarks/model_sweep.py --world 2,4
    python benchmarks/model_sweep.py --world 2 --only encoder,titan_llama3 --verify

Megatron's plan, the target: one all-reduce per attention block and per MLP block in forward
(2 per layer), no all-gather inside a block.  A model whose library is not installed is listed
as ``skip``.  Libraries: torchtitan (``pip install --no-deps torchtitan spmd_types tyro``),
litgpt (``pip install --no-deps litgpt`` and ``lightning``), diffusers.
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import os
import platform
import sys
import time
import traceback
from typing import Callable

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from autotp.verify import Case, verify  # noqa: E402

TOL = 1e-5
LAYERS = 2


def encoder(batch: int = 2, seq: int = 8):
    """``nn.TransformerEncoder`` (``nn.MultiheadAttention`` inside), batch first, with a padding mask."""
    layer = torch.nn.TransformerEncoderLayer(64, 4, 128, dropout=0.0, batch_first=True)
    return torch.nn.TransformerEncoder(layer, LAYERS, enable_nested_tensor=False)


def encoder_inputs(batch: int, seq: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, seq, 64, generator=g)
    pad = torch.zeros(batch, seq, dtype=torch.bool)
    pad[0, seq // 2:] = True                             # the first sequence is half padding
    return (x,), {"src_key_padding_mask": pad}


def bert(batch: int = 2, seq: int = 8, layers: int = LAYERS):
    from transformers import BertConfig, BertForMaskedLM
    cfg = BertConfig(vocab_size=128, hidden_size=64, num_hidden_layers=layers, num_attention_heads=4,
                     intermediate_size=128, max_position_embeddings=64, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0)
    return BertForMaskedLM(cfg)


def padded_ids(batch: int, seq: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 128, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[0, seq // 2:] = 0
    return (ids,), {"attention_mask": mask}


def t5(batch: int = 2, seq: int = 8, layers: int = LAYERS):
    from transformers import T5Config, T5ForConditionalGeneration
    cfg = T5Config(vocab_size=128, d_model=64, d_kv=16, d_ff=128, num_layers=layers, num_heads=4,
                   dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0)
    return T5ForConditionalGeneration(cfg)


def encoder_decoder_ids(batch: int, seq: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 128, (batch, seq), generator=g)
    return (ids,), {"decoder_input_ids": torch.randint(1, 128, (batch, seq), generator=g), "use_cache": False}


def titan_llama3(batch: int = 2, seq: int = 8, n_kv_heads: int = 2, layers: int = LAYERS):
    """torchtitan's own Llama 3: fused ``wqkv`` laid out per kv group, complex RoPE, GQA."""
    from torchtitan.models.common import ComplexRoPE, Embedding, Linear, RMSNorm, compute_ffn_hidden_dim
    from torchtitan.models.common.attention import ScaledDotProductAttention
    from torchtitan.models.llama3 import Llama3Model, _build_llama3_layers
    dim, heads = 64, 4
    cfg = Llama3Model.Config(
        dim=dim, vocab_size=128, tok_embeddings=Embedding.Config(num_embeddings=128, embedding_dim=dim),
        norm=RMSNorm.Config(normalized_shape=dim), lm_head=Linear.Config(in_features=dim, out_features=128),
        layers=_build_llama3_layers(fuse_qkv=True, n_layers=layers, dim=dim, n_heads=heads, n_kv_heads=n_kv_heads,
                                    hidden_dim=compute_ffn_hidden_dim(dim, multiple_of=32),
                                    rope=ComplexRoPE.Config(dim=dim // heads, max_seq_len=64, theta=500000,
                                                            scaling="llama"),
                                    attn_backend="flex"))
    for layer in cfg.layers:              # torchtitan's own SDPA backend (its language models default to flex)
        layer.attention.inner_attention = ScaledDotProductAttention.Config()
    model = cfg.build()
    model.init_weights() if hasattr(model, "init_weights") else None
    return model


def litgpt_gpt(batch: int = 2, seq: int = 8, layers: int = LAYERS):
    """litgpt's ``GPT`` with grouped queries: fused qkv ``[q | k | v]`` of unequal sizes, k/v repeated
    per query group by ``repeat_interleave``."""
    from litgpt.model import GPT, Config
    return GPT(Config(n_layer=layers, n_head=4, n_query_groups=2, n_embd=64, block_size=64, vocab_size=128,
                      padded_vocab_size=128, intermediate_size=128, bias=False, norm_class_name="RMSNorm",
                      mlp_class_name="LLaMAMLP", rotary_percentage=1.0, parallel_residual=False))


def ids(batch: int, seq: int, seed: int):
    return (torch.randint(0, 128, (batch, seq), generator=torch.Generator().manual_seed(seed)),), {}


def dit(batch: int = 2, seq: int = 8, layers: int = LAYERS):
    from diffusers import DiTTransformer2DModel
    model = DiTTransformer2DModel(num_attention_heads=4, attention_head_dim=16, in_channels=4, out_channels=4,
                                 num_layers=layers, sample_size=8, patch_size=2, num_embeds_ada_norm=10,
                                 norm_num_groups=1).eval()
    # eval: in training its class embedder drops labels at random (classifier-free guidance,
    # torch.rand), a draw that a reference run and a parallel run cannot share
    return model


def latents(batch: int, seq: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 4, 8, 8, generator=g),), {"timestep": torch.tensor([3] * batch),
                                                         "class_labels": torch.tensor([1] * batch),
                                                         "return_dict": False}


@dataclasses.dataclass
class Model:
    build: Callable
    inputs: Callable
    library: str


MODELS = {
    "encoder": Model(encoder, encoder_inputs, "torch"),
    "bert": Model(bert, padded_ids, "transformers"),
    "t5": Model(t5, encoder_decoder_ids, "transformers"),
    "titan_llama3": Model(titan_llama3, ids, "torchtitan"),
    "litgpt": Model(litgpt_gpt, ids, "litgpt"),
    "dit": Model(dit, latents, "diffusers"),
}


def plan_row(name: str, world: int) -> str:
    import autotp
    m = MODELS[name]
    torch.manual_seed(0)
    model = m.build()
    args, kwargs = m.inputs(2, 8, 1)
    plan = autotp.plan(model, args, kwargs, world_size=world)
    fwd = plan.counts()["forward"]
    counts = ", ".join(f"{v} {k}" for k, v in sorted(fwd.items())) or "none"
    replicated = [n.split(" (")[0].removeprefix("no sharding rule for ")
                  for n in plan.notes if n.startswith("no sharding rule")]
    return f"fwd: {counts}" + (f"; replicated: {', '.join(replicated)}" if replicated else "")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--world", default="2,4", help="comma-separated world sizes")
    ap.add_argument("--only", default="", help="comma-separated model names: " + ", ".join(MODELS))
    ap.add_argument("--verify", action="store_true", help="also run each model on gloo processes and compare "
                                                          "the output and every gradient with one device")
    args = ap.parse_args()
    names = args.only.split(",") if args.only else list(MODELS)
    worlds = [int(w) for w in args.world.split(",")]
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{LAYERS} layers (Megatron: {2 * LAYERS} all-reduce per forward in the blocks)")
    runnable = []
    for n in names:
        try:
            MODELS[n].build()
            runnable.append(n)
        except ImportError as e:
            print(f"{n:14s} skip: {MODELS[n].library} not installed ({e})")
    failures = 0
    for world in worlds:
        for n in runnable:
            t0 = time.time()
            try:
                row = plan_row(n, world)
            except Exception as e:  # noqa: BLE001 — reported in the table
                row = f"ERROR {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
                failures += 1
            print(f"{n:14s} N={world}  {row}  ({time.time() - t0:.1f} s)", flush=True)
    if args.verify:
        cases = [Case(n, MODELS[n].build, inputs=MODELS[n].inputs) for n in runnable]
        for world in worlds:
            per_rank = verify(cases, world, timeout_s=180)
            for j, n in enumerate(runnable):
                worst = collections.Counter()
                rs = [per_rank[r][j] for r in range(world)]
                bad = [r for r in rs if r.error]
                if bad:
                    print(f"{n:14s} N={world}  ERROR {bad[0].error.strip().splitlines()[-1][:200]}")
                    failures += 1
                    continue
                err = max(max(r.logits_err, r.grad_err, r.other_shape_err) for r in rs)
                worst.update(rs[0].forward_counts)
                ok = err <= TOL
                failures += not ok
                print(f"{n:14s} N={world}  {'exact' if ok else 'WRONG'} (worst relative error {err:.1e}, "
                      f"{rs[0].worst_grad}); CommDebugMode forward: {dict(worst)}", flush=True)
    print(f"# failures: {failures}")
    return 1 if failures else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Exception:  # noqa: BLE001
        traceback.print_exc()
        sys.exit(2)
