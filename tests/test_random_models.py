"""Random small transformers: the right answer or a clear error, never a wrong number.

Hypothesis draws model configs — family (llama, mistral, qwen2, gpt2), heads and head size,
kv heads (MHA, GQA, MQA), hidden and ffn sizes that may not divide the world, 1-2 layers,
tied or untied embeddings, biases where the family has the option, odd vocabularies, the
example's batch/sequence and another batch/sequence to run after planning — and every draw
must, on a real gloo group of 2, 3 or 4 ranks, either

* match one device: logits, every gradient, and the logits at the other input shape within
  ``TOL`` of their scale, or
* fail inside ``autotp.parallelize`` with an ``AutoTPError`` whose text says what to do.

Why hypothesis only draws, and one process start checks everything: starting gloo processes
costs 10-20 s here, so checking each example inside ``@given`` (and shrinking a failure by
re-running it) would cost minutes.  Instead hypothesis draws the whole batch as one example,
``st.lists(draws(), n)``, recorded by an inner ``@given`` (``max_examples=2``: hypothesis's
first example is always the simplest one, every draw minimal; the second is random), and we
run the simplest draw plus ``n - 1`` random ones.  Hypothesis still brings its seeded,
database-free reproducibility and its bias towards boundary values.  Then ``max(world)``
processes start once; each world size runs on a sub-mesh of the first ``world`` ranks
(``parallelize(mesh=...)``; the largest on the default mesh of every rank) through
``autotp.verify.run_case``, the checks ``verify`` makes.  A failure names the draw and prints
its config; re-run one with ``python benchmarks/random_models.py --config '<json>' --world W``,
or draw more with ``python benchmarks/random_models.py --draws 50 --world 3 --seed 7``.

``AUTOTP_RANDOM_SEED`` picks other draws (default: a fixed seed, so CI is deterministic).
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import os
import pickle
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st

from autotp.verify import Case, HFModel, Result, run_case

TOL = 1e-5                    # max abs error relative to the output (or gradient) scale, fp32
DRAWS = {2: 5, 3: 4, 4: 3}    # draws per world size in CI (budget: <= 120 s for this file)
SEED = int(os.environ.get("AUTOTP_RANDOM_SEED", "20240613"))
FAMILIES = ("llama", "mistral", "qwen2", "gpt2")


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@st.composite
def model_configs(draw) -> dict:
    """A small Hugging Face causal-LM config (a dict for ``AutoConfig.for_model``)."""
    family = draw(st.sampled_from(FAMILIES))
    heads = draw(st.integers(1, 8))
    head_dim = draw(st.sampled_from([4, 6, 8, 16]))           # even: RoPE rotates pairs
    vocab = draw(st.integers(17, 160))                         # odd ones too
    layers = draw(st.integers(1, 2))
    tied = draw(st.booleans())
    if family == "gpt2":
        return dict(model_type="gpt2", vocab_size=vocab, n_embd=heads * head_dim, n_layer=layers, n_head=heads,
                    n_inner=draw(st.one_of(st.none(), st.integers(8, 160))), n_positions=32,
                    tie_word_embeddings=tied, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                    bos_token_id=0, eos_token_id=0)
    cfg = dict(model_type=family, vocab_size=vocab, hidden_size=heads * head_dim,
               intermediate_size=draw(st.integers(8, 160)), num_hidden_layers=layers,
               num_attention_heads=heads, num_key_value_heads=draw(st.sampled_from(_divisors(heads))),
               tie_word_embeddings=tied, max_position_embeddings=64)
    if family in ("llama", "mistral") and draw(st.booleans()):
        # head_dim given explicitly: heads x head_dim need not equal hidden (Gemma/Qwen3-style);
        # transformers still wants hidden to be a multiple of heads
        cfg["hidden_size"] = heads * draw(st.sampled_from([2, 4, 6, 8, 12]))
        cfg["head_dim"] = head_dim
    if family == "llama":
        cfg["attention_bias"] = draw(st.booleans())
        cfg["mlp_bias"] = draw(st.booleans())
    if family == "mistral":
        cfg["sliding_window"] = draw(st.one_of(st.none(), st.integers(1, 8)))
    return cfg


# The example's batch and sequence start at 2 and 3, not 1:
# * torch.export specialises a size-1 example dim (its 0/1 rule), so a plan made from batch 1
#   or sequence 1 refuses every other batch / sequence at run time (docs/reliability.md, known
#   gap 1); set ``AUTOTP_RANDOM_SIZE_ONE=1`` (or ``--size-one`` in the benchmark) to draw them.
# * with sequence 2 the loss reads position 0 only, whose attention sees one key: the q/k
#   gradients are exactly 0 and their error relative to scale is rounding noise over noise.
# The *other* shape, run after planning (forward only), may be anything, 1 included.
SIZE_ONE = os.environ.get("AUTOTP_RANDOM_SIZE_ONE") == "1"


@st.composite
def draws(draw, size_one: bool = SIZE_ONE) -> dict:
    """A config plus the example's (batch, seq) and another (batch, seq) to run after planning."""
    return dict(config=draw(model_configs()),
                batch=draw(st.integers(1 if size_one else 2, 3)), seq=draw(st.integers(1 if size_one else 3, 12)),
                other=(draw(st.integers(1, 4)), draw(st.integers(1, 12))))


def collect(n: int, world: int, seed_: int = SEED, size_one: bool = SIZE_ONE) -> list[dict]:
    """``n`` draws, the same ones for the same (n, world, seed): the simplest draw hypothesis
    knows (1 head, head size 4, ffn 8, vocab 17, ...) and ``n - 1`` random ones."""
    examples: list[list[dict]] = []

    @seed(seed_ * 10 + world)
    @settings(max_examples=2, database=None, deadline=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(st.lists(draws(size_one), min_size=max(n - 1, 1), max_size=max(n - 1, 1)))
    def record(batch):
        examples.append(batch)

    record()
    simplest, randoms = examples[0][0], examples[-1]
    return ([simplest] + randoms)[:n]


def case_of(i: int, d: dict) -> Case:
    return Case(f"draw{i}", HFModel(d["config"]), batch=d["batch"], seq=d["seq"], other_shapes=(tuple(d["other"]),))


def _worker(rank: int, size: int, store_path: str, out_dir: str, cases: dict, timeout_s: float) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(store_path, size), rank=rank, world_size=size,
                            timeout=datetime.timedelta(seconds=timeout_s))
    from torch.distributed.device_mesh import DeviceMesh
    results = {}
    for world, todo in sorted(cases.items()):
        # every rank creates every group (new_group is collective); ranks < world use it
        group = dist.new_group(list(range(world))) if world < size else None
        if rank < world:
            extra = {"mesh": DeviceMesh.from_group(group, "cpu", mesh_dim_names=("tp",))} if group else {}
            results[world] = [run_case(dataclasses.replace(c, kwargs={**c.kwargs, **extra}), rank, world)
                              for c in todo]
        dist.barrier()                           # idle ranks wait here for the others
    with open(os.path.join(out_dir, f"rank{rank}.pkl"), "wb") as f:
        pickle.dump(results, f)
    dist.destroy_process_group()


def run_draws(by_world: dict[int, list[dict]], timeout_s: float = 300) -> dict[int, list[list[Result]]]:
    """Check every draw at its world size, all in one start of ``max(world)`` processes;
    returns results[world][rank][draw]."""
    size = max(by_world)
    cases = {w: [case_of(i, d) for i, d in enumerate(ds)] for w, ds in by_world.items()}
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(_worker, args=(size, os.path.join(tmp, "store"), tmp, cases, timeout_s), nprocs=size,
                           join=True, start_method="spawn")
        per_rank = []
        for r in range(size):
            with open(os.path.join(tmp, f"rank{r}.pkl"), "rb") as f:
                per_rank.append(pickle.load(f))
    return {w: [per_rank[r][w] for r in range(w)] for w in by_world}


def _clear(text: str) -> bool:
    """An AutoTPError a user can act on: names what (a node, parameter, input or dimension)
    and says what to do."""
    return any(w in text for w in ("node `", "input `", "dimension", "dim ", "parameter")) and \
        any(w in text.lower() for w in ("what to do", "pass ", "call ", "use ", "try ", "must"))


def outcome(results: list[Result]) -> tuple[str, str]:
    """The verdict on one draw from every rank's result: ('ok' | 'clear-error' | 'WRONG' |
    'BAD-ERROR', detail).  WRONG is a number over ``TOL``; BAD-ERROR any error that is not an
    AutoTPError raised by ``parallelize`` with a message a user can act on."""
    verdicts = []
    for rank, r in enumerate(results):
        if r.error:
            last = r.error.strip().splitlines()[-1]
            text = r.error[r.error.find("AutoTPError"):].strip()
            planned = "autotp.parallelize(" in r.error and not r.summary    # raised inside parallelize
            if "AutoTPError" in last and planned and _clear(text):
                verdicts.append(("clear-error", text))
            else:
                verdicts.append(("BAD-ERROR", f"rank {rank}:\n{r.error}"))
            continue
        errs = dict(logits=r.logits_err, grad=r.grad_err, other_shape=r.other_shape_err)
        bad = {k: v for k, v in errs.items() if not v <= TOL}
        if bad:
            verdicts.append(("WRONG", f"rank {rank}: errors over {TOL}: {bad} (worst gradient {r.worst_grad})"))
        else:
            verdicts.append(("ok", ", ".join(f"{k} {v:.1e}" for k, v in errs.items())))
    return next((v for v in verdicts if v[0] in ("WRONG", "BAD-ERROR")), verdicts[0])


def describe(i: int, d: dict) -> str:
    return f"draw{i}: batch {d['batch']} seq {d['seq']} other {tuple(d['other'])}\n  config {json.dumps(d['config'])}"


@pytest.fixture(scope="module")
def checked() -> dict:
    """{world: [(draw, verdict, detail)]} for the CI draws, checked in one process start."""
    chosen = {w: collect(n, w) for w, n in DRAWS.items()}
    results = run_draws(chosen)
    return {w: [(d, *outcome([results[w][r][i] for r in range(w)])) for i, d in enumerate(ds)]
            for w, ds in chosen.items()}


@pytest.mark.timeout(600)
@pytest.mark.parametrize("world", sorted(DRAWS))
def test_random_configs_match_one_device_or_fail_clearly(checked, world):
    problems = [f"{describe(i, d)}\n  {kind}: {detail}" for i, (d, kind, detail) in enumerate(checked[world])
                if kind not in ("ok", "clear-error")]
    assert not problems, f"world {world}:\n" + "\n".join(problems)
