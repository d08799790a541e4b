"""``pmodel.generate`` speaks Hugging Face's ``generate``: left-padded batches, several end tokens,
lengths, repetition penalty, seeded sampling, streamer, ``return_dict_in_generate`` and clear
errors.  Compared with the unsharded model's own ``generate`` at N = 1 and N = 2 (real gloo
processes: each rank also plans a 1-rank tensor-parallel mesh for N = 1), for Llama, GPT-2,
Qwen2 (tied embeddings), Mixtral (MoE) and Mistral (sliding window).

One start of 2 processes runs those cases (CPU CI budget); one start of 4 (``run_cases``) runs the
N = 4 cases: equality with the logits split by vocab, tie-breaking of the (value, index) exchange,
``stop_strings``, the collectives of a decode step, and the step under ``torch.compile`` (Llama);
left-padded greedy with two end tokens and with ``repetition_penalty`` (Qwen2, GPT-2, Mixtral and
the sliding-window Mistral)."""
import copy
import datetime
import os
import pickle
import tempfile
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from scipy.stats import chi2

from models import build, build_any

WORLD = 2
NEW = 6
# tests/models.py's configs, with what makes them split at N = 2 and 4 (heads, kv heads so that the
# cache splits, vocab, experts), most with one layer: each rank plans each family's decode step,
# most of a family's time on CI's 2 cores
FAMILIES = {
    "llama": dict(),
    # untied GPT-2: a random model with tied embeddings mostly repeats its last input token, which a
    # broken cache would do as well; untied, the generated tokens depend on the cached context
    "gpt2": dict(tie_word_embeddings=False, n_layer=1),
    # 4 heads, 4 kv heads, tied embeddings; at the default initializer_range (0.02) the tied random
    # model repeats each row's last prompt token, which a broken cache would do too
    "qwen2": dict(num_hidden_layers=1, initializer_range=0.2),
    "mixtral": dict(num_hidden_layers=1, num_key_value_heads=4),   # 4 experts, one a rank at N = 4; top-2 routing
    # sliding_window 4 < the 12 positions generated; 8 heads, 4 kv heads; vocab 128 (the config's 96
    # is below the prompts' ids)
    "mistral": dict(num_hidden_layers=1, vocab_size=128),
}
# chi-square test of sampled next tokens: draws, vocab, and the p-value below which it fails
DRAWS, TINY_VOCAB, P_FAIL = 4000, 16, 1e-3
SAMPLING = dict(do_sample=True, temperature=0.7, top_k=40, top_p=0.95, min_p=0.02)


class Recorder:
    """A streamer (transformers' ``BaseStreamer`` interface): records what ``put`` receives."""

    def __init__(self):
        self.puts, self.ended = [], False

    def put(self, value):
        self.puts.append(value.tolist())

    def end(self):
        self.ended = True


def _prompts(gen):
    """Three left-padded prompts (pad 5) of lengths 3, 6 and 5, and their mask."""
    ids = torch.randint(6, 100, (3, 6), generator=gen)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    mask[2, :1] = 0
    return ids.masked_fill(mask == 0, 5), mask


def _greedy_cases(reference, pmodel, ids, mask) -> dict:
    out = {}

    def compare(key, **kw):
        want = reference.generate(ids, attention_mask=mask, **kw)
        got = pmodel.generate(ids, attention_mask=mask, **kw)
        out[key] = (got.tolist(), want.tolist())

    plain = reference.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=NEW, pad_token_id=1)
    # two end tokens: the ones rows 0 and 1 emit at their steps 2 and 3 (rows end early, then padded)
    eos = [int(plain[0, ids.shape[1] + 1]), int(plain[1, ids.shape[1] + 2])]
    out["eos_ids"] = eos
    compare("padded", do_sample=False, max_new_tokens=NEW, pad_token_id=1)
    compare("two_eos", do_sample=False, max_new_tokens=NEW, eos_token_id=eos, pad_token_id=1)
    compare("min_new_tokens", do_sample=False, max_new_tokens=NEW, eos_token_id=eos, pad_token_id=1, min_new_tokens=4)
    compare("max_length", do_sample=False, max_length=ids.shape[1] + 3, pad_token_id=1)
    compare("repetition_penalty", do_sample=False, max_new_tokens=NEW, repetition_penalty=1.5, pad_token_id=1)
    from transformers import GenerationConfig
    config = GenerationConfig(do_sample=False, max_new_tokens=4, eos_token_id=eos, pad_token_id=1)
    compare("generation_config", generation_config=config)
    # positionally, as model.generate(input_ids, attention_mask, generation_config)
    import autotp
    out["positional"] = (autotp.generate(pmodel, ids, mask, config).tolist(), out["generation_config"][1])
    # sampling with a seed: the same stream as Hugging Face's after torch.manual_seed(seed)
    torch.manual_seed(1234)
    want = reference.generate(ids, attention_mask=mask, max_new_tokens=NEW, num_return_sequences=2, pad_token_id=1,
                              **SAMPLING)
    got = pmodel.generate(ids, attention_mask=mask, max_new_tokens=NEW, num_return_sequences=2, pad_token_id=1,
                          seed=1234, **SAMPLING)
    out["sampled_seed"] = (got.tolist(), want.tolist())
    # no seed: rank 0's draw, broadcast (compared across ranks by the test)
    out["sampled_noseed"] = pmodel.generate(ids, attention_mask=mask, max_new_tokens=NEW, pad_token_id=1,
                                            **SAMPLING).tolist()
    # streamer and return_dict_in_generate with scores
    hf_stream, stream = Recorder(), Recorder()
    want = reference.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=NEW, eos_token_id=eos,
                              pad_token_id=1, streamer=hf_stream, return_dict_in_generate=True, output_scores=True,
                              repetition_penalty=1.2)
    got = pmodel.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=NEW, eos_token_id=eos,
                          pad_token_id=1, streamer=stream, return_dict_in_generate=True, output_scores=True,
                          repetition_penalty=1.2)
    err = max(((a - b).abs().nan_to_num(0.0).max()).item() for a, b in zip(got.scores, want.scores))
    out["dict"] = dict(got=got.sequences.tolist(), want=want.sequences.tolist(),
                       steps=(len(got.scores), len(want.scores)), scores_err=err,
                       stream=(stream.puts, stream.ended), hf_stream=(hf_stream.puts, hf_stream.ended))
    return out


def _errors(pmodel, ids, mask) -> dict:
    import autotp
    cases = {
        "unknown_kwarg": dict(frobnicate=3),
        "beams": dict(num_beams=2),
        "mask_shape": dict(attention_mask=mask[:, 1:]),
        "empty": dict(input_ids=ids[:0]),
        "too_long": dict(max_new_tokens=40),
    }
    out = {}
    for key, kw in cases.items():
        kw = {"input_ids": ids, "attention_mask": mask, "max_new_tokens": 2, **kw}
        try:
            pmodel.generate(**kw)
            out[key] = "no error"
        except autotp.AutoTPError as e:
            out[key] = str(e)
    out["zero_new"] = (pmodel.generate(ids, attention_mask=mask, max_new_tokens=0).tolist(), ids.tolist())
    # a decode plan made for other weight placements (all replicated here) is refused
    from autotp.generation import DecodePlan, generator
    from autotp.placement import R
    other = DecodePlan(pmodel.source_model, {n: R for n in pmodel.plan.placements}, dist.get_world_size())
    try:
        generator(pmodel, decode=other)
        out["other_decode_plan"] = "no error"
    except autotp.AutoTPError as e:
        out["other_decode_plan"] = str(e)
    # ranks that pass different prompts, or different arguments, are told so (not paired collectives
    # of different sizes, a hang, or different tokens on each rank)
    rank = dist.get_rank()
    for key, kw in {"other_prompt": dict(input_ids=ids.roll(rank, dims=1)),
                    "other_length": dict(max_new_tokens=2 + rank)}.items():
        try:
            pmodel.generate(**{"input_ids": ids, "attention_mask": mask, "max_new_tokens": 2, **kw})
            out[key] = "no error"
        except autotp.AutoTPError as e:
            out[key] = str(e)
    return out


def _chi_square(mesh) -> dict:
    """Next-token draws of a tiny-vocab model vs the unsharded model's processed softmax."""
    import autotp
    torch.manual_seed(3)
    model = build("llama", vocab_size=TINY_VOCAB).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(6.0)                 # a peaked distribution: the control below must fail
    reference = copy.deepcopy(model)
    ids = torch.tensor([[7, 3, 9, 4]])
    with torch.no_grad():
        logits = reference(ids).logits[0, -1]
    probs = (logits / SAMPLING["temperature"]).softmax(-1)
    control = logits.softmax(-1)                       # the distribution without the temperature
    pmodel = autotp.parallelize(model, (ids,), mesh=mesh)
    out = pmodel.generate(ids, max_new_tokens=1, num_return_sequences=DRAWS, seed=7, do_sample=True,
                          temperature=SAMPLING["temperature"], pad_token_id=0, eos_token_id=None)
    counts = torch.bincount(out[:, -1], minlength=TINY_VOCAB).double()

    def statistic(p):
        expected = p.double() * DRAWS
        keep = expected >= 5                           # pool the rare tokens into one bin
        obs = torch.cat([counts[keep], counts[~keep].sum()[None]])
        exp = torch.cat([expected[keep], expected[~keep].sum()[None]])
        if exp[-1] < 5:
            obs, exp = obs[:-1], exp[:-1]
        return float(((obs - exp) ** 2 / exp).sum()), len(obs) - 1

    stat, df = statistic(probs)
    wrong, wrong_df = statistic(control)
    return dict(stat=stat, df=df, threshold=float(chi2.ppf(1 - P_FAIL, df)), control=wrong,
                control_threshold=float(chi2.ppf(1 - P_FAIL, wrong_df)), tokens=out[:, -1].tolist())


def _run(rank) -> dict:
    import autotp
    from torch.distributed.device_mesh import init_device_mesh
    meshes = {2: init_device_mesh("cpu", (WORLD,), mesh_dim_names=("tp",)),
              1: init_device_mesh("cpu", (WORLD, 1), mesh_dim_names=("dp", "tp"))["tp"]}
    results = {}
    for world, mesh in meshes.items():
        for name, overrides in FAMILIES.items():
            key = f"{name}/{world}"
            try:
                torch.manual_seed(0)
                model = build_any(name, **overrides).eval()
                reference = copy.deepcopy(model)
                ids, mask = _prompts(torch.Generator().manual_seed(1))
                pmodel = autotp.parallelize(model, (ids,), mesh=mesh)
                results[key] = _greedy_cases(reference, pmodel, ids, mask)
                if world == WORLD:
                    results[key]["errors"] = _errors(pmodel, ids, mask)
            except Exception:  # noqa: BLE001 — reported by the test
                results[key] = {"error": traceback.format_exc()}
        try:
            results[f"chi2/{world}"] = _chi_square(mesh)
        except Exception:  # noqa: BLE001
            results[f"chi2/{world}"] = {"error": traceback.format_exc()}
    return results


def _worker(rank, world, tmp):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(os.path.join(tmp, "store"), world), rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=300))
    results = _run(rank)
    with open(os.path.join(tmp, f"{rank}.pkl"), "wb") as f:
        pickle.dump(results, f)
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def per_rank():
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(_worker, args=(WORLD, tmp), nprocs=WORLD, start_method="fork")
        return [pickle.load(open(os.path.join(tmp, f"{r}.pkl"), "rb")) for r in range(WORLD)]


KEYS = [f"{name}/{world}" for world in (1, WORLD) for name in FAMILIES]
GREEDY = ["padded", "two_eos", "min_new_tokens", "max_length", "repetition_penalty", "generation_config", "positional"]


def _result(per_rank, rank, key):
    r = per_rank[rank][key]
    assert "error" not in r, f"{key} rank {rank}:\n{r.get('error')}"
    return r


@pytest.mark.parametrize("key", KEYS)
def test_greedy_with_padding_eos_and_penalty_equals_hf(per_rank, key):
    for rank in range(WORLD):
        r = _result(per_rank, rank, key)
        for case in GREEDY:
            got, want = r[case]
            assert got == want, f"{key} {case} rank {rank}:\n{got}\n!= HF\n{want}"
    r = _result(per_rank, 0, key)
    # the cases have teeth: both end tokens ended a row early (the rest of the row padded with 1),
    # min_new_tokens held them off, the penalty changed the tokens, max_length cut the rows short
    prompt = len(r["padded"][1][0]) - NEW
    assert _end_tokens(r["two_eos"][1], prompt, r["eos_ids"]) == set(r["eos_ids"]), (r["two_eos"][1], r["eos_ids"])
    assert r["min_new_tokens"][1] != r["two_eos"][1]
    if not key.startswith("gpt2"):
        # their greedy tokens repeat (Llama's 21, 81, 21, 81, ...), so the penalty must change them;
        # the 1-layer GPT-2's do not repeat, and the penalised scores are compared in the dict test
        assert r["repetition_penalty"][1] != r["padded"][1]
    assert len(r["max_length"][1][0]) == prompt + 3


def _end_tokens(rows, prompt, eos) -> set:
    """The end tokens that ended a row before its last step, every later token being the pad 1."""
    ended = set()
    for row in rows:
        new = row[prompt:]
        first = next((i for i, t in enumerate(new) if t in eos), None)
        if first is not None and first < NEW - 1:
            assert new[first + 1:] == [1] * (len(new) - first - 1), row
            ended.add(new[first])
    return ended


@pytest.mark.parametrize("key", KEYS)
def test_seeded_sampling_equals_hf_and_is_the_same_on_every_rank(per_rank, key):
    r0, r1 = _result(per_rank, 0, key), _result(per_rank, 1, key)
    got, want = r0["sampled_seed"]
    assert got == want, f"{key}: seeded sampling\n{got}\n!= HF after torch.manual_seed\n{want}"
    assert r1["sampled_seed"][0] == got
    assert len(got) == 3 * 2                                  # num_return_sequences=2
    assert r0["sampled_noseed"] == r1["sampled_noseed"]       # rank 0's seed, broadcast
    # N = 1 and N = 2 draw the same tokens
    other = key.replace(f"/{WORLD}", "/1") if key.endswith(f"/{WORLD}") else key.replace("/1", f"/{WORLD}")
    assert _result(per_rank, 0, other)["sampled_seed"][0] == got


@pytest.mark.parametrize("key", KEYS)
def test_streamer_on_rank0_and_scores_in_the_dict(per_rank, key):
    r0, r1 = _result(per_rank, 0, key)["dict"], _result(per_rank, 1, key)["dict"]
    assert r0["got"] == r0["want"]
    assert r0["steps"][0] == r0["steps"][1]
    assert r0["scores_err"] <= 1e-4, r0["scores_err"]
    assert r0["stream"] == r0["hf_stream"], (r0["stream"], r0["hf_stream"])
    if key.endswith(f"/{WORLD}"):
        assert r1["stream"] == ([], False)                    # tp rank 1 streams nothing
    else:
        assert r1["stream"] == r0["stream"]                   # at N = 1 each rank is rank 0 of its own mesh


def test_bad_input_gets_clear_errors(per_rank):
    errors = _result(per_rank, 0, f"llama/{WORLD}")["errors"]
    assert "frobnicate" in errors["unknown_kwarg"]
    assert "num_beams" in errors["beams"] or "beam" in errors["beams"]
    assert "attention_mask" in errors["mask_shape"]
    assert "input_ids is empty" in errors["empty"]
    assert "the decode plan places `" in errors["other_decode_plan"] and "make the DecodePlan from this module's plan" \
        in errors["other_decode_plan"], errors["other_decode_plan"]
    assert "ranks passed different inputs: `input_ids` differs" in errors["other_prompt"], errors["other_prompt"]
    assert "`max_new_tokens` differs (rank 0: 2, rank 1: 3)" in errors["other_length"], errors["other_length"]
    got, prompt = errors["zero_new"]
    assert got == prompt                                     # max_new_tokens=0: the prompt back
    gpt2 = _result(per_rank, 0, f"gpt2/{WORLD}")["errors"]
    assert "max_position_embeddings" in gpt2["too_long"], gpt2["too_long"]


@pytest.mark.parametrize("world", [1, WORLD])
def test_sampled_next_tokens_follow_the_unsharded_softmax(per_rank, world):
    for rank in range(WORLD):
        r = _result(per_rank, rank, f"chi2/{world}")
        print(f"N={world} rank {rank}: chi-square {r['stat']:.2f} (df {r['df']}, threshold {r['threshold']:.2f}); "
              f"against the untempered softmax {r['control']:.1f} (threshold {r['control_threshold']:.2f})")
        assert r["stat"] < r["threshold"], f"chi-square {r['stat']:.1f} >= {r['threshold']:.1f} (df {r['df']})"
        # the test has teeth: the same draws against the distribution without the temperature fail
        assert r["control"] > r["control_threshold"], (r["control"], r["control_threshold"])
    assert per_rank[0][f"chi2/{world}"]["tokens"] == per_rank[1][f"chi2/{world}"]["tokens"]


# ---------------------------------------------------------------- N = 4: exactness and what a decode step moves
WORLD4 = 4
TOP_K = dict(do_sample=True, temperature=0.7, top_k=5)     # the sampling that needs no full row


def _collectives():
    """A dispatch mode that records every functional collective run while active, as
    ``(op, numel, bytes)`` of the tensor it makes.  (``CommDebugMode`` counts the same ops, but its
    module tracker fails on the step's ``GraphModule``; and it gives no sizes.)"""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Collectives(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func.namespace == "_c10d_functional" and func._opname != "wait_tensor":
                self.seen.append((func._opname, out.numel(), out.numel() * out.element_size()))
            return out

    return Collectives()


def _char_tokenizer(vocab_size: int):
    """A character-level tokenizer built here (no download): token i is one character (the
    printable ASCII ones, then CJK), split one character a token and decoded by concatenation."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    chars = [chr(c) for c in range(33, 127)] + [chr(0x4E00 + i) for i in range(vocab_size)]
    tokenizer = Tokenizer(models.WordLevel({c: i for i, c in enumerate(chars[:vocab_size])}, unk_token="!"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex("."), "isolated")
    tokenizer.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer)


def _n4_example():
    torch.manual_seed(0)
    model = build("llama", num_key_value_heads=4).eval()     # 4 kv heads: the cache splits at N = 4
    return model, *_prompts(torch.Generator().manual_seed(1))


# The other families at N = 4, as at N = 1 and 2 (Llama has its own fixture above).
N4_FAMILIES = {name: overrides for name, overrides in FAMILIES.items() if name != "llama"}


def _n4_family_example(name):
    torch.manual_seed(0)
    model = build_any(name, **N4_FAMILIES[name]).eval()
    return model, *_prompts(torch.Generator().manual_seed(1))


def _n4_family_greedy(name) -> dict:
    """Left-padded greedy of one family at N = 4: plain, with two end tokens, and with
    ``repetition_penalty``, each against the unsharded model's ``generate`` with the same kwargs."""
    import autotp
    from autotp.generation import generator
    from ranks import planned, planned_decode
    model, ids, mask = _n4_family_example(name)
    reference = copy.deepcopy(model)
    pmodel = autotp.parallelize(model, (ids,), **planned(f"n4/{name}"))
    generator(pmodel, decode=planned_decode(f"n4/{name}"))

    def equal(**kw):
        kw = dict(do_sample=False, max_new_tokens=NEW, pad_token_id=1, **kw)
        want = reference.generate(ids, attention_mask=mask, **kw)
        return pmodel.generate(ids, attention_mask=mask, **kw).tolist(), want.tolist()

    padded = equal()
    # the tokens rows 0 and 1 emit at their steps 2 and 3 end those rows early
    eos = [padded[1][0][ids.shape[1] + 1], padded[1][1][ids.shape[1] + 2]]
    return dict(padded=padded, two_eos=equal(eos_token_id=eos), penalty=equal(repetition_penalty=1.5), eos=eos,
                prompt=ids.shape[1], layout=str(generator(pmodel).vocab.placement))


def _n4_cases():
    import autotp
    from autotp.generation import generator
    from ranks import planned, planned_decode
    model, ids, mask = _n4_example()
    reference = copy.deepcopy(model)
    pmodel = autotp.parallelize(model, (ids,), **planned("n4"))
    gen = generator(pmodel, decode=planned_decode("n4"))

    def equal(**kw):
        torch.manual_seed(1234)
        want = reference.generate(ids, attention_mask=mask, max_new_tokens=NEW, pad_token_id=1, **kw)
        if kw.get("do_sample"):
            kw["seed"] = 1234
        got = pmodel.generate(ids, attention_mask=mask, max_new_tokens=NEW, pad_token_id=1, **kw)
        return got.tolist(), want.tolist()

    def greedy():
        plain = reference.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=NEW, pad_token_id=1)
        eos = [int(plain[0, ids.shape[1] + 1]), int(plain[1, ids.shape[1] + 2])]
        return dict(padded=equal(do_sample=False), two_eos=equal(do_sample=False, eos_token_id=eos),
                    penalty=equal(do_sample=False, repetition_penalty=1.5), top_k=equal(**TOP_K),
                    layout=str(gen.vocab.placement))

    def stop_strings():
        tokenizer = _char_tokenizer(model.config.vocab_size)
        plain = reference.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=NEW, pad_token_id=1)
        stop = tokenizer.convert_ids_to_tokens(int(plain[0, ids.shape[1] + 1]))   # row 0's second new token
        return dict(stop=stop, prompt=ids.shape[1],
                    tokens=equal(do_sample=False, stop_strings=[stop], tokenizer=tokenizer))

    def moved():
        """Collectives of prompts of one token (so prefill is a decode-sized step) x 4 steps."""
        prompt, steps, out = ids[:, -1:], 4, {}
        for name, kw in {"greedy": dict(do_sample=False), "top_k": dict(TOP_K, seed=0),
                         "top_p": dict(do_sample=True, top_p=0.9, seed=0)}.items():
            with _collectives() as c:
                pmodel.generate(prompt, max_new_tokens=steps, eos_token_id=None, pad_token_id=1, **kw)
            out[name] = dict(seen=c.seen)
        out["steps"], out["batch"], out["vocab"] = steps, prompt.shape[0], model.config.vocab_size
        out["planned"] = {k: gen.decode_traffic(prompt.shape[0], 1 + steps, k=k) for k in (1, TOP_K["top_k"])}
        out["layers"] = model.config.num_hidden_layers
        return out

    def ties():
        """``sharded_argmax`` / ``sharded_top_k`` on crafted rows split in 4 slices of 4, against
        ``argmax`` and ``TopKLogitsWarper`` on the whole row."""
        from transformers.generation.logits_process import TopKLogitsWarper
        from autotp.generation import VocabLayout
        from autotp.decoding import sharded_argmax, sharded_top_k
        from autotp.placement import S
        vocab = VocabLayout(S(2), 16, WORLD4, gen.rank, gen.group_name)
        nan = float("nan")
        crafted = torch.zeros(4, 16)
        crafted[1, [6, 13]] = 5.0                      # a tie across ranks 1 and 3: 6 wins
        crafted[2, [3, 4]] = 2.0                       # across a slice boundary: 3 wins
        crafted[3, 2], crafted[3, [9, 14]] = 7.0, nan  # NaN is the maximum, the first one wins
        rows = torch.cat([crafted, torch.randint(0, 3, (24, 16), generator=torch.Generator().manual_seed(2)).float(),
                          torch.randn(8, 16, generator=torch.Generator().manual_seed(3))])
        mine = rows[:, vocab.offset:vocab.offset + vocab.local]
        out = dict(argmax=(sharded_argmax(vocab, mine).tolist(), rows.argmax(-1).tolist()), top_k=[])
        warper = TopKLogitsWarper(3)                 # k < the 4 ids a rank holds
        for i in range(4, rows.shape[0]):              # per row: a tie at the k-th value gathers that row
            got = sharded_top_k(vocab, mine[i:i + 1], warper)
            out["top_k"].append(None if got is None else bool(torch.equal(got, warper(None, rows[i:i + 1]))))
        return out

    def compiled():
        """The decode step under torch.compile (aot_eager, which functionalizes the in-place cache
        writes as Inductor does), its graphs counted: calls with other prompt and output lengths
        in the same cache bucket reuse the one graph; another batch size makes a second."""
        graphs = []

        def backend(gm, example_inputs):
            graphs.append(next(t.shape for t in example_inputs if isinstance(t, torch.Tensor) and t.ndim == 4))
            return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)

        out = []
        for rows, cut, new in ((3, 0, NEW), (3, 2, NEW + 3), (3, 1, 20), (2, 0, NEW)):
            kw = dict(attention_mask=mask[:rows, cut:], max_new_tokens=new, do_sample=False, pad_token_id=1)
            got = pmodel.generate(ids[:rows, cut:], compile={"backend": backend}, **kw)
            want = reference.generate(ids[:rows, cut:], **kw)
            out.append((got.tolist(), want.tolist(), len(graphs)))
        return dict(calls=out, graphs=[list(g) for g in graphs])

    return {"greedy": greedy, "stop_strings": stop_strings, "moved": moved, "ties": ties, "compiled": compiled,
            **{f"greedy/{name}": (lambda n=name: _n4_family_greedy(n)) for name in N4_FAMILIES}}


@pytest.fixture(scope="module")
def n4():
    from ranks import plan_ahead, run_cases
    model, ids, _ = _n4_example()
    plan_ahead("n4", model, (ids,), world=WORLD4, decode=True)
    for name in N4_FAMILIES:                                # each family's forward and decode step, planned once here
        model, ids, _ = _n4_family_example(name)
        plan_ahead(f"n4/{name}", model, (ids,), world=WORLD4, decode=True)
    return run_cases(_n4_cases, WORLD4, timeout_s=300)


def test_n4_greedy_and_top_k_equal_hf_from_vocab_slices(n4):
    from ranks import case
    for rank, r in enumerate(case(n4, "greedy")):
        assert r["layout"] == "S(2)", r["layout"]            # the logits stay split by vocab
        for key in ("padded", "two_eos", "penalty", "top_k"):
            got, want = r[key]
            assert got == want, f"rank {rank} {key}:\n{got}\n!= HF\n{want}"


@pytest.mark.parametrize("name", list(N4_FAMILIES))
def test_n4_greedy_with_padding_two_eos_and_penalty_equals_hf(n4, name):
    from ranks import case
    for rank, r in enumerate(case(n4, f"greedy/{name}")):
        assert r["layout"] == "S(2)", r["layout"]            # the logits stay split by vocab
        for key in ("padded", "two_eos", "penalty"):
            got, want = r[key]
            assert got == want, f"{name} rank {rank} {key}:\n{got}\n!= HF\n{want}"
    r = case(n4, f"greedy/{name}")[0]
    # the cases have teeth: both end tokens ended a row early, and the penalty changed the tokens
    # (not GPT-2's: its one-layer greedy tokens do not repeat, as at N = 1 and 2)
    assert _end_tokens(r["two_eos"][1], r["prompt"], r["eos"]) == set(r["eos"]), (r["two_eos"][1], r["eos"])
    if name != "gpt2":
        assert r["penalty"][1] != r["padded"][1]
    if name == "mistral":                       # and the sliding window: without it the tokens differ
        torch.manual_seed(0)
        unwindowed = build_any(name, **N4_FAMILIES[name], sliding_window=None).eval()
        ids, mask = _prompts(torch.Generator().manual_seed(1))
        plain = unwindowed.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=NEW, pad_token_id=1)
        assert plain.tolist() != r["padded"][1]


def test_n4_ties_broken_as_argmax_and_top_k_on_the_full_row(n4):
    from ranks import case
    for r in case(n4, "ties"):
        got, want = r["argmax"]
        assert got == want, (got, want)
        assert want[:4] == [0, 6, 3, 9]
        exact = r["top_k"]
        assert all(e in (True, None) for e in exact), exact    # never a wrong row
        assert None in exact[:24] and True in exact[:24]        # ties at the k-th value: some rows gathered
        assert exact[24:] == [True] * 8                         # distinct values: all from the exchange


def test_n4_stop_strings_with_a_local_tokenizer(n4):
    from ranks import case
    for r in case(n4, "stop_strings"):
        got, want = r["tokens"]
        assert got == want, (got, want)
        # the stop string ended row 0 after its second new token; the rest is padding
        new = want[0][r["prompt"]:]
        assert new[2:] == [1] * (len(new) - 2) and 1 not in new[:2], (new, r["stop"])


def test_n4_decode_step_moves_no_logits(n4):
    """Greedy and top-k: 2 all-reduces per layer + 2 (the embedding's all-gather and the token
    exchange), none the size of the (batch, vocab) logits; top-p gathers them (the control)."""
    from ranks import case
    for r in case(n4, "moved"):
        batch, vocab, steps = r["batch"], r["vocab"], r["steps"]
        for name, k in (("greedy", 1), ("top_k", TOP_K["top_k"])):
            seen = r[name]["seen"]
            counts, step_bytes = r["planned"][k]
            assert counts == {"all_reduce": 2 * r["layers"], "all_gather": 2}, counts
            assert len(seen) == steps * sum(counts.values()), seen
            assert max(n for _, n, _ in seen) < batch * vocab, seen
            assert sum(b for _, _, b in seen) == steps * step_bytes, (seen, step_bytes)
        assert any(n == batch * vocab for _, n, _ in r["top_p"]["seen"]), r["top_p"]["seen"]


def test_n4_decode_step_under_torch_compile(n4):
    """The same tokens as Hugging Face, and one graph per batch size: prompts of 6, 4 and 5
    tokens with 6 to 20 new ones all fit the 64-slot cache bucket (``cache_slots``)."""
    from ranks import case
    for r in case(n4, "compiled"):
        for got, want, _ in r["calls"]:
            assert got == want, (got, want)
        assert [graphs for _, _, graphs in r["calls"]] == [1, 1, 1, 2], r
        # batch 3 then 2, 64 slots, this rank's quarter of the 4 kv heads
        assert [g[:3] for g in r["graphs"]] == [[3, 64, 1], [2, 64, 1]], r["graphs"]


def test_cache_slots_buckets():
    from autotp.generation import cache_slots
    assert [cache_slots(n) for n in (1, 12, 64, 65, 1000, 1024, 1025, 5000)] == [64, 64, 64, 128, 1024, 1024, 2048,
                                                                                   5120]
