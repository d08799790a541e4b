"""Hugging Face's ``generate`` vocabulary over autotp's decode step (``autotp.generation``).

    out = pmodel.generate(ids, attention_mask=mask, max_new_tokens=32, do_sample=True, top_p=0.9, seed=0)

The arguments mean what they mean to ``model.generate`` of a decoder-only Hugging Face model,
because the preparation is Hugging Face's own: the source model's ``GenerationMixin`` methods
merge ``generation_config`` with the model's defaults and the keyword arguments, fill in special
tokens, infer a missing attention mask, compute position ids from the mask, repeat the batch for
``num_return_sequences``, settle ``max_length`` / ``min_length`` and build the
``LogitsProcessorList`` and ``StoppingCriteriaList``.  None of these runs the model.  The loop is
Hugging Face's ``_sample``: processors on the ``(batch, vocab)`` fp32 logits of the last
position, argmax or one multinomial draw, finished rows padded with ``pad_token_id``.

The decode step leaves the logits split by vocab (``Generator.vocab``); the loop moves only what
the next token needs (``_route``):

* greedy with no processor: each rank's argmax over its slice, then one all-gather of a
  (value, global index) pair per row and rank; the first maximum in rank order is the lowest
  index among the maxima, so the token is ``argmax`` of the full row, ties and NaN included;
* sampling with ``temperature`` and ``top_k`` only: the temperature on the slice, each rank's
  top k, one all-gather of k pairs per row and rank, and the full row rebuilt from them
  (-inf elsewhere): exactly ``TopKLogitsWarper``'s scores, so the draw is the same.  When a
  rank may hold more ties at the k-th value than it sent, that step gathers the full row;
* anything else (``top_p``, ``min_p``, penalties, ``min_new_tokens``, custom processors,
  ``output_scores`` of greedy, ``output_logits``): the full row is all-gathered and Hugging
  Face's processors run on it.

Every rank runs the same loop on the same tokens and scores, so every rank must draw the same
random numbers: sampling uses one ``torch.Generator`` per call, seeded from ``generator=`` (a
``torch.Generator``, used as is) or ``seed=`` (an int); with neither, rank 0 draws a seed from
torch's global generator and broadcasts it once over the tensor-parallel group.  The multinomial
draw then uses the same stream as Hugging Face's ``generate`` after ``torch.manual_seed(seed)``.
"""
from __future__ import annotations


import torch

from autotp.base import AutoTPError

# generation_config fields that would change what is computed in ways this loop does not do,
# with the value that means "off" (checked after Hugging Face merged the config)
_UNSUPPORTED = {"num_beams": 1, "penalty_alpha": None, "guidance_scale": 1.0, "output_attentions": False,
                "output_hidden_states": False, "max_time": None, "prompt_lookup_num_tokens": None,
                "assistant_early_exit": None, "cache_implementation": None, "token_healing": False}
# keyword arguments of model.generate that are not generation_config fields and that autotp takes
_OWN = ("streamer", "tokenizer", "logits_processor", "stopping_criteria", "generator", "seed", "return_logits",
        "compile")


def decode(gen, input_ids, *args, attention_mask=None, generation_config=None, **kwargs):
    """``model.generate(input_ids, attention_mask, generation_config, **kwargs)`` on the
    ``Generator`` ``gen``'s decode step (see the module docstring).  Returns the token ids
    ``(batch * num_return_sequences, length)``, or with ``return_dict_in_generate=True`` a
    ``GenerateDecoderOnlyOutput`` with ``sequences`` and, if asked, ``scores`` / ``logits``.
    ``return_logits=True`` (autotp's own) returns ``(ids, [per-step fp32 logits])``.
    ``compile=True`` (or a dict of ``torch.compile`` arguments) runs the decode step under
    ``torch.compile``.  A positional int after ``input_ids`` is ``max_new_tokens`` (see ``_bind``)."""
    hf = gen.pmodel.source_model
    if not hasattr(hf, "_prepare_generation_config"):
        raise AutoTPError(f"generate needs a Hugging Face model with GenerationMixin ({type(hf).__name__} has none)")
    attention_mask, generation_config = _bind(args, attention_mask, generation_config, kwargs)
    ids = _check_ids(input_ids, gen.device)
    mask = _check_mask(attention_mask, ids)
    if gen.mesh.size() > 1:
        _check_same_on_ranks(gen, ids, mask, kwargs)
    own = {k: kwargs.pop(k) for k in _OWN if k in kwargs}
    if kwargs.get("max_new_tokens") == 0:          # autotp returns the prompt (Hugging Face 5 raises)
        return (ids, []) if own.get("return_logits") else ids
    config, model_kwargs = _prepare_config(hf, generation_config, kwargs)
    if model_kwargs:
        raise AutoTPError(f"autotp.generate does not support the argument(s) {sorted(model_kwargs)} "
                          f"(neither generation_config fields nor {list(_OWN)})")
    _check_supported(config)

    batch = ids.shape[0]
    model_kwargs = {"attention_mask": mask} if mask is not None else {}
    hf._prepare_special_tokens(config, mask is not None, device=ids.device, batch_size=batch)
    if mask is None:                               # Hugging Face infers it from pad tokens
        mask = hf._prepare_attention_mask_for_generation(ids, config, model_kwargs)
        model_kwargs["attention_mask"] = mask
    positions = hf._prepare_position_ids_for_generation(ids, model_kwargs) if gen.takes_positions else None
    if positions is not None:
        model_kwargs["position_ids"] = positions
    ids, model_kwargs = hf._expand_inputs_for_generation(input_ids=ids, expand_size=config.num_return_sequences,
                                                         **model_kwargs)
    mask, positions = model_kwargs["attention_mask"].long(), model_kwargs.get("position_ids")
    prompt = ids.shape[1]
    _lengths(hf, config, generation_config, kwargs, ids)
    if prompt >= config.max_length:
        raise AutoTPError(f"the prompt has {prompt} tokens but max_length is {config.max_length}: raise max_length "
                          f"or pass max_new_tokens=")
    limit = getattr(hf.config, "max_position_embeddings", None)
    if limit is not None and config.max_length > limit and _learned_positions(hf):
        raise AutoTPError(f"input_ids ({prompt} tokens) + max_new_tokens ({config.max_length - prompt}) exceed the "
                          f"model's max_position_embeddings ({limit}), the longest sequence its position table holds")
    processors = hf._get_logits_processor(generation_config=config, input_ids_seq_length=prompt,
                                          encoder_input_ids=ids, logits_processor=own.get("logits_processor") or [],
                                          device=ids.device, model_kwargs=model_kwargs)
    stopping = hf._get_stopping_criteria(generation_config=config, stopping_criteria=own.get("stopping_criteria") or [],
                                         tokenizer=own.get("tokenizer"))
    rng = _sampling_generator(gen, own) if config.do_sample else None
    streamer = own.get("streamer") if gen.mesh.get_local_rank() == 0 else None
    return _sample(gen, ids, mask, positions, config, processors, stopping, rng, streamer,
                   bool(own.get("return_logits")), _compile_options(own.get("compile")))


def _compile_options(value) -> dict | None:
    if value is None or value is False:
        return None
    if value is True:
        return {}
    if isinstance(value, dict):
        return dict(value)
    raise AutoTPError(f"compile must be True, False or a dict of torch.compile arguments, got {value!r}")


def _sample(gen, ids, mask, positions, config, processors, stopping, rng, streamer, return_logits,
            compile_options=None):
    """Hugging Face's ``_sample`` loop, with the decode step in place of the model."""
    batch, prompt = ids.shape
    pad = config._pad_token_tensor
    has_eos = any(hasattr(c, "eos_token_id") for c in stopping)
    want_scores = config.return_dict_in_generate and config.output_scores
    want_logits = config.return_dict_in_generate and config.output_logits
    route, scale, top_k = _route(gen.vocab, processors, rng is not None, want_scores, want_logits or return_logits)
    scores, raw, step_logits = [], [], []
    run = gen.run(batch, config.max_length, compile_options)      # the cache and the weights, for this call
    # the whole cache's mask: the prompt's, then 1 for every generated token (and for the slots
    # past max_length a compiled step's cache has: never written, hidden by causality)
    full_mask = torch.ones(batch, run.slots, dtype=torch.long, device=ids.device)
    full_mask[:, :prompt] = mask
    unfinished = torch.ones(batch, dtype=torch.long, device=ids.device)
    if streamer is not None:
        streamer.put(ids.cpu())
    tokens, start = ids, 0
    while True:
        pos = positions[:, start:] if positions is not None else None
        logits = run(tokens, full_mask, pos, start)               # (B, 1, V/N) or (B, 1, V)
        start += tokens.shape[1]
        if route == "argmax":
            nxt = sharded_argmax(gen.vocab, logits[:, -1].to(torch.float32))
        else:
            step_scores = None
            if route == "top_k":
                local = logits[:, -1].to(torch.float32, copy=True)          # (B, V/N)
                for p in scale:
                    local = p(ids, local)
                step_scores = sharded_top_k(gen.vocab, local, top_k)
            if step_scores is None:
                last = gathered(gen.vocab, logits)[:, -1].to(torch.float32, copy=True)   # (B, V)
                step_scores = processors(ids, last)
                if return_logits:
                    step_logits.append(last)
                if want_logits:
                    raw.append(last)
            if want_scores:
                scores.append(step_scores)
            if rng is not None:
                nxt = torch.multinomial(step_scores.softmax(-1), num_samples=1, generator=rng).squeeze(1)
            else:
                nxt = step_scores.argmax(-1)
        if has_eos:
            nxt = nxt * unfinished + pad * (1 - unfinished)
        ids = torch.cat([ids, nxt[:, None]], dim=-1)
        if streamer is not None:
            streamer.put(nxt.cpu())
        unfinished = unfinished & ~stopping(ids, tuple(scores))
        if not bool(unfinished.any()) or ids.shape[1] >= config.max_length:
            break
        tokens = nxt[:, None]
        if positions is not None:                 # Hugging Face: the next position is the last + 1
            positions = torch.cat([positions, positions[:, -1:] + 1], dim=-1)
    if streamer is not None:
        streamer.end()
    if return_logits:
        return ids, step_logits
    if config.return_dict_in_generate:
        from transformers.generation.utils import GenerateDecoderOnlyOutput
        return GenerateDecoderOnlyOutput(sequences=ids, scores=tuple(scores) if want_scores else None,
                                         logits=tuple(raw) if want_logits else None)
    return ids


# ---------------------------------------------------------------- the token from vocab-split logits
def _route(vocab, processors, sampling: bool, want_scores: bool, want_full: bool):
    """("argmax" | "top_k" | "full", temperature warpers to apply to the slice, the top-k
    warper): what the loop needs moved (see the module docstring)."""
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper
    if not (vocab.sharded and vocab.contiguous) or want_full:
        return "full", [], None
    if not sampling:
        return ("argmax" if len(processors) == 0 and not want_scores else "full"), [], None
    *scale, last = list(processors) or [None]
    if type(last) is TopKLogitsWarper and all(type(p) is TemperatureLogitsWarper for p in scale):
        return "top_k", scale, last
    return "full", [], None


def _exchange(vocab, local: torch.Tensor, k: int) -> torch.Tensor:
    """Each rank's ``k`` largest (value, global index) pairs of its slice ``local`` (B, V/N),
    all-gathered: (B, N, k, 2) float64 (exact for fp32 values and indices below 2**53), rank-major.
    ``k = 1``: the slice's argmax, the first of its maxima."""
    from autotp.comm import all_gather
    if k == 1:
        index = local.argmax(-1, keepdim=True)                            # (B, 1)
    else:
        index = local.topk(k, -1).indices                                 # (B, k), largest first
    pairs = torch.stack([local.gather(-1, index).double(), (index + vocab.offset).double()], -1)   # (B, k, 2)
    if vocab.world == 1:
        return pairs[:, None]
    everyone = all_gather(pairs, 1, 1, vocab.group, vocab.world, vocab.rank)                 # (B, N*k, 2)
    return everyone.view(local.shape[0], vocab.world, k, 2)


def sharded_argmax(vocab, local: torch.Tensor) -> torch.Tensor:
    """``full_logits.argmax(-1)`` from this rank's slice ``local`` (B, V/N): (B,) token ids.
    Slices are contiguous and in rank order, so the first maximum over the ranks' first maxima
    is the full row's first maximum (the lowest index wins a tie; NaN counts as the maximum, as
    in ``torch.argmax``)."""
    everyone = _exchange(vocab, local, 1)[:, :, 0]                        # (B, N, 2)
    best = everyone[..., 0].argmax(-1, keepdim=True)                      # (B, 1): the rank
    return everyone[..., 1].gather(-1, best).squeeze(-1).long()


def sharded_top_k(vocab, local: torch.Tensor, warper) -> torch.Tensor | None:
    """``TopKLogitsWarper`` on the full row, from this rank's slice ``local`` (B, V/N) of the
    (already temperature-scaled) scores: (B, V) fp32, the k largest values in place and the
    warper's ``filter_value`` elsewhere.  None when a rank sent k values ending at the k-th
    value: it may hold more ties there (the warper keeps every value >= the k-th), so the
    caller gathers the full row."""
    k = min(warper.top_k, vocab.size)
    sent = min(k, vocab.local)
    everyone = _exchange(vocab, local, sent)                              # (B, N, sent, 2)
    values = everyone[..., 0].flatten(1)                                  # (B, N*sent)
    index = everyone[..., 1].flatten(1).long()
    kth = values.topk(k, -1).values[:, -1:]                               # (B, 1)
    if sent < vocab.local and bool((everyone[:, :, -1, 0] == kth).any()):
        return None
    full = torch.full((local.shape[0], vocab.size), warper.filter_value, dtype=local.dtype, device=local.device)
    return full.scatter_(-1, index, values.to(local.dtype).masked_fill(values < kth, warper.filter_value))


def gathered(vocab, logits: torch.Tensor) -> torch.Tensor:
    """This rank's piece of the step's logits (B, 1, .) -> the full (B, 1, V) on every rank."""
    from autotp import comm
    from autotp.placement import is_shard, shard_dim, split_factor
    if not vocab.sharded:
        return logits
    p = vocab.placement
    if is_shard(p):
        return comm.all_gather(logits, shard_dim(p), split_factor(p), vocab.group, vocab.world, vocab.rank)
    # the step is planned with sharded_outputs, whose outputs are never pending sums (solve.settle)
    raise AutoTPError(f"the decode step's logits come out as {p}; autotp.generate gathers Shard or Replicate "
                      f"logits only")


# ---------------------------------------------------------------- preparation
def _bind(args, attention_mask, generation_config, kwargs):
    """(attention_mask, generation_config) from the positional arguments after ``input_ids``.
    A leading int is ``max_new_tokens`` (autotp's older signature, and how
    ``ParallelModule.generate`` forwards its default of 20); it gives way to an explicit
    ``max_new_tokens`` / ``max_length`` or a ``generation_config``.  Updates ``kwargs``."""
    args = list(args)
    if args and isinstance(args[0], int) and not isinstance(args[0], bool):
        legacy = args.pop(0)
        config_given = generation_config is not None or (len(args) > 1 and args[1] is not None)
        if not config_given and "max_new_tokens" not in kwargs and "max_length" not in kwargs:
            kwargs["max_new_tokens"] = legacy
    if len(args) > 2:
        raise AutoTPError(f"generate takes (input_ids, attention_mask, generation_config) positionally; "
                          f"got {len(args) + 1} positional arguments")
    if args and args[0] is not None:
        attention_mask = args[0]
    if len(args) > 1 and args[1] is not None:
        generation_config = args[1]
    return attention_mask, generation_config


def _check_same_on_ranks(gen, ids, mask, kwargs) -> None:
    """The ranks of the tensor-parallel group generate together: with different prompts their
    steps would pair collectives of different sizes (an error or a hang in a collective) or
    silently pick different tokens.  One small all-gather per call compares the prompts, the
    masks and the plain-valued arguments (objects such as a streamer, which only rank 0 uses,
    or a tokenizer are not compared)."""
    from autotp.program import check_same_inputs
    plain = (int, float, str, bool, type(None))
    named = [("input_ids", ids), ("attention_mask", mask)]
    named += [(k, v) for k, v in sorted(kwargs.items())
              if isinstance(v, plain) or (isinstance(v, (list, tuple)) and all(isinstance(x, plain) for x in v))]
    check_same_inputs(named, gen.mesh, "every rank of the tensor-parallel group must call generate with the same "
                                       "prompts and arguments (they generate the same tokens together); split "
                                       "prompts over a data-parallel mesh dim, not 'tp'")


def _check_supported(config) -> None:
    from transformers.generation.configuration_utils import GenerationMode
    unsupported = [f"{k}={getattr(config, k)!r}" for k, off in _UNSUPPORTED.items()
                   if getattr(config, k, None) not in (off, None, False)]
    mode = config.get_generation_mode()
    if unsupported or mode not in (GenerationMode.GREEDY_SEARCH, GenerationMode.SAMPLE):
        raise AutoTPError(f"autotp.generate does greedy search and sampling only; got "
                          f"{', '.join(unsupported) or mode}")


def _check_ids(input_ids, device) -> torch.Tensor:
    if not isinstance(input_ids, torch.Tensor) or input_ids.ndim != 2 or input_ids.dtype != torch.long:
        raise AutoTPError("input_ids must be a (batch, seq) LongTensor")
    if input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
        raise AutoTPError(f"input_ids is empty (shape {tuple(input_ids.shape)}): give at least one prompt of at "
                          f"least one token")
    return input_ids.to(device)


def _check_mask(mask, ids):
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != tuple(ids.shape):
        shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise AutoTPError(f"attention_mask must have input_ids' shape {tuple(ids.shape)}, got {shape}")
    mask = mask.to(ids.device)
    if bool((mask[:, -1] == 0).any()):
        raise AutoTPError("attention_mask: a row ends in padding; decoder-only generation needs left padding "
                          "(tokenizer padding_side='left')")
    return mask


def _prepare_config(hf, generation_config, kwargs):
    try:
        return hf._prepare_generation_config(generation_config, **kwargs)
    except (ValueError, TypeError) as e:
        raise AutoTPError(f"generation_config / keyword arguments: {e}") from e


def _lengths(hf, config, generation_config, kwargs, ids) -> None:
    """``max_length`` / ``min_length`` from ``max_new_tokens`` / ``min_new_tokens`` as Hugging Face
    settles them (its default: 20 tokens in all, capped by ``max_position_embeddings``)."""
    has_default_max = kwargs.get("max_length") is None and (generation_config is None or
                                                           generation_config.max_length is None) \
        and hf.generation_config.max_length is None
    has_default_min = kwargs.get("min_length") is None and (generation_config is None or
                                                           generation_config.min_length is None) \
        and hf.generation_config.min_length is None
    hf._prepare_generated_length(config, has_default_max_length=has_default_max,
                                 has_default_min_length=has_default_min, model_input_name="input_ids",
                                 input_ids_length=ids.shape[1], inputs_tensor=ids)


def _learned_positions(hf) -> bool:
    """Whether positions index a learned table (GPT-2's ``wpe``), where a longer sequence is an
    index error; rotary models run past ``max_position_embeddings`` as in Hugging Face."""
    n = getattr(hf.config, "max_position_embeddings", None)
    return any(isinstance(m, torch.nn.Embedding) and m.num_embeddings == n for m in hf.modules())


def _sampling_generator(gen, own) -> torch.Generator:
    """One ``torch.Generator`` for the whole call, the same on every rank."""
    if own.get("generator") is not None:
        rng = own["generator"]
        if not isinstance(rng, torch.Generator):
            raise AutoTPError(f"generator must be a torch.Generator, got {type(rng).__name__}")
        return rng
    seed = own.get("seed")
    if seed is None:
        drawn = torch.randint(0, 2 ** 62, (1,), dtype=torch.long)
        if gen.mesh.size() > 1:
            import torch.distributed as dist
            group = gen.mesh.get_group()
            drawn = drawn.to(gen.device)
            dist.broadcast(drawn, src=dist.get_global_rank(group, 0), group=group)
        seed = int(drawn.item())
    rng = torch.Generator(device=gen.device)
    rng.manual_seed(int(seed))
    return rng
