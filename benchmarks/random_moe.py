"""Random small MoE models under sequence parallelism on real gloo groups: each matches one
device (logits, every gradient, the auxiliary loss, another shape) or fails clearly.

    python benchmarks/random_moe.py --world 2 --draws 8 --seed 0
    python benchmarks/random_moe.py --world 4 --replicated --wide     # plain TP, wider models

Families Mixtral, Qwen2-MoE (shared expert), OLMoE, Qwen3-MoE; random heads / kv heads / head
size, experts E in {2, 3, 4, 6, 8}, top-k up to 3, ffn sizes (multiples of 4: torch's grouped
matmul wants 16-byte strides), tied embeddings, router logits returned, batch 1-3 and sequences
that do or do not divide by the world size.  The plan may dispatch by all-to-all, keep experts
whole with a combine, split inside the experts or replicate, whatever the sizes allow; the
numbers must match.  Prints one line per draw: verdict, family, batch, seq, expert placements,
all-to-alls measured in forward, errors.
"""
import argparse
import json
import os
import random
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

from autotp.verify import Case, HFModel, verify  # noqa: E402

TOL = 1e-5


def draw(rng: random.Random, world: int, i: int, sp: bool = True, wide: bool = False) -> Case:
    fam = rng.choice(["mixtral", "qwen2_moe", "olmoe", "qwen3_moe"])
    heads, hd = rng.choice([2, 4, 6, 8]), rng.choice([64, 96, 128] if wide else [4, 8, 16])
    experts = rng.choice([2, 3, 4, 6, 8])
    k = rng.choice([1, 2, 3]) if experts >= 3 else 1
    ffn = lambda lo, hi: 4 * rng.randint(lo, hi)  # noqa: E731
    cfg = dict(model_type=fam, vocab_size=rng.randint(40, 130), hidden_size=heads * hd,
               num_hidden_layers=rng.choice([1, 2]), num_attention_heads=heads,
               num_key_value_heads=rng.choice([d for d in range(1, heads + 1) if heads % d == 0]),
               max_position_embeddings=64, tie_word_embeddings=rng.random() < 0.3)
    if fam == "mixtral":
        cfg.update(intermediate_size=ffn(2, 25), num_local_experts=experts, num_experts_per_tok=k,
                   output_router_logits=rng.random() < 0.3, router_aux_loss_coef=0.02)
    elif fam == "qwen2_moe":
        cfg.update(intermediate_size=ffn(2, 25), moe_intermediate_size=ffn(2, 16),
                   shared_expert_intermediate_size=ffn(2, 16), num_experts=experts, num_experts_per_tok=k,
                   norm_topk_prob=rng.random() < 0.5, decoder_sparse_step=1)
    elif fam == "olmoe":
        cfg.update(intermediate_size=ffn(2, 16), num_experts=experts, num_experts_per_tok=k)
    else:
        cfg.update(head_dim=hd, intermediate_size=ffn(2, 25), moe_intermediate_size=ffn(2, 16),
                   num_experts=experts, num_experts_per_tok=k)
    seq = max(3, world * rng.randint(1, 4) + (0 if rng.random() < 0.8 else 1))   # 2: q/k grads are 0, noise
    if wide:              # experts as wide as the model: the dispatch pays at the planning shape
        for key in ("intermediate_size", "moe_intermediate_size", "shared_expert_intermediate_size"):
            if key in cfg:
                cfg[key] = heads * hd * rng.choice([1, 2])
    return Case(f"{i}-{fam}", HFModel(cfg), batch=rng.randint(1, 3), seq=seq, kwargs={"sequence_parallel": sp},
                other_shapes=((rng.randint(1, 3), world * rng.randint(1, 3)),))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--draws", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--replicated", action="store_true", help="plain TP (tokens on every rank), not sequence parallel")
    ap.add_argument("--wide", action="store_true", help="d 128-1024: sizes where a dispatch can pay off")
    args = ap.parse_args()
    rng = random.Random(args.seed)
    cases = [draw(rng, args.world, i, not args.replicated, args.wide) for i in range(args.draws)]
    failures = 0
    for c, r in zip(cases, verify(cases, args.world)[0]):
        experts = sorted({p for n, p in r.placements.items() if "experts" in n})
        if r.error:
            last = r.error.strip().splitlines()[-1]
            verdict = "clear-error" if "AutoTPError" in r.error else "BAD-ERROR"
            detail = last[:160]
        else:
            worst = max(r.logits_err, r.grad_err, r.other_shape_err, r.aux_err or 0.0)
            verdict = "ok" if worst <= TOL else "WRONG"
            detail = f"logits {r.logits_err:.1e} grads {r.grad_err:.1e} other {r.other_shape_err:.1e}" + \
                (f" aux {r.aux_err:.1e}" if r.aux_err is not None else "")
        failures += verdict in ("WRONG", "BAD-ERROR")
        print(f"{verdict:<11} {c.name:<12} batch {c.batch} seq {c.seq:>2} experts {','.join(experts) or '-':<12} "
              f"a2a {r.forward_counts.get('all_to_all_single', 0):>2}  {detail}")
        if verdict in ("WRONG", "BAD-ERROR"):
            print("   ", json.dumps(c.build.config))
    print(f"{failures} failure(s) in {len(cases)} draws at world {args.world}")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
