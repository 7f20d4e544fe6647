"""Beam search for decoder-only models with the LoRA repository's rules.

E2E (Table 1) and WebNLG (Table 2) are decoded the way the LoRA repository's
`examples/NLG/src/gpt2_beam.py` decodes them (the paper follows that pipeline; E2E: 10 beams,
length penalty 0.8, no-repeat 4; WebNLG: 5 / 1.0 / 4; at most 64 new tokens). Hugging Face's
`generate` differs in several rules below, the first of which costs BLEU on E2E, so the search
is written here. The rules, each as gpt2_beam.py applies it:

1. Length: at most `max_new_tokens` generated tokens (its `--eval_len 64`), end token included.
2. End tokens: a set (its `--eos_token_id` uses `action='append'` on a default of [50256], so
   the README's `--eos_token_id 628` gives {<|endoftext|>, "\\n\\n"}). A hypothesis ends the step
   it picks one; it is then a candidate and leaves the beam. The end token is kept in its stored
   sequence, but gpt2_decode.py cuts the text at it, so we return the tokens before it.
3. Score of a candidate: `sum of token log-probs / L ** length_penalty`, where L counts every
   generated token *including* the end token (it divides by `history.shape[-1]` after the end
   token was appended) and the sum includes the end token's log-prob. The prompt counts in neither.
4. Candidates come from the beam itself: each step takes the top `num_beams` of
   `beam score + log p` over all (beam, token) pairs (not 2 x beams as in Hugging Face); the
   picks that are end tokens become candidates and their slot is dead (score -inf) for the rest of
   the search, so the beam runs one slot short until the next step refills it from live beams.
5. The answer is the best normalised candidate over all steps (a later one must be strictly
   better to replace it; within a step the earlier top-k pick wins a tie). After the last step
   every live beam, unfinished, is a candidate too, with L = max_new_tokens: an unfinished
   64-token hypothesis can win, not only when nothing finished.
6. No-repeat-n-gram (fairseq's rule, as copied there): a token is banned if it would complete an
   n-gram that already occurs in the *generated* tokens of that beam. The prompt is never looked
   at: its history starts empty. (Hugging Face counts the prompt of a decoder-only model, so a
   name of 4+ tokens in the MR could not be copied into the text.)
7. Bans act on the logits *before* the softmax (it sets them to -inf and then normalises), so the
   log-probs that are summed are renormalised over the allowed tokens; Hugging Face's processors
   act after the log-softmax and do not renormalise. Same for the minimum-length rule.
8. Minimum length: end tokens are banned while fewer than `min_new_tokens` tokens were
   generated (its `--min_length`, default 0 and unset in the README, so off by default here).
9. Not replicated because they are identities at the settings used: repetition penalty (1.0 in
   the README; gpt2_beam.py would apply it only to generated tokens) and temperature (none: plain
   softmax). Sampling, top-k/p: none, it is pure beam search.
10. Numerics: log-probs are `log_softmax` of the logits cast to fp32 (gpt2_beam.py takes
   `log(softmax)` in the model's dtype; equal up to rounding) and beam scores are fp32 as there.

What is ours, not theirs, and changes no result:
- Early exit per prompt: all log-probs are <= 0, so a live beam with score s at length l can at
  best end as `s / max((l+1) ** lp, T ** lp)`; once the best candidate is at least that for every
  live beam, nothing later can replace it (rule 5) and the prompt leaves the batch. gpt2_beam.py
  always runs all 64 steps. A prompt whose beams all died is done as well.
- Batching: prompts are sorted by length, cut into chunks of `batch_size`, left-padded with an
  attention mask and explicit position ids (GPT-2's learned positions would otherwise count the
  pads), prefilled once per prompt (not once per beam) and decoded with the KV cache, which is
  re-indexed by parent beam (and shrunk by finished prompts) in one `index_select` per step. The
  cache is preallocated where transformers allows it (see `_preallocated_cache`).
- One host transfer per step (the per-prompt "done" flags); everything else stays on the device.
- In fp32 the answer does not depend on `batch_size` or padding beyond rounding; in bf16 the
  logits change in the last bits with the batch's shape, which can flip near-ties.

Text post-processing is the caller's: gpt2_decode.py decodes the tokens and keeps the text
before the first '<|endoftext|>' and the first '\\n\\n' (also one made of two '\\n' tokens), then
strips it.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .progress import bar


@dataclass
class BeamConfig:
    num_beams: int = 10
    length_penalty: float = 0.8
    no_repeat_ngram_size: int = 4
    max_new_tokens: int = 64
    end_token_ids: tuple[int, ...] = ()
    min_new_tokens: int = 0  # gpt2_beam.py's --min_length (rule 8); 0 = off, as in the paper's runs


def beam_search(model, prompts: list[list[int]], cfg: BeamConfig, pad_token_id: int,
                batch_size: int = 64, world=None) -> list[list[int]]:
    """Per prompt, the generated token ids of the best hypothesis, without the end token.

    `model` is a Hugging Face causal LM (or anything with the same call: input_ids,
    attention_mask, position_ids, past_key_values -> .logits, .past_key_values). `batch_size`
    counts prompts; one forward carries `batch_size * num_beams` rows. `world`: several
    processes share the chunks (World.take) and every process gets every output; each chunk is
    the one a single process searches, so the outputs are the same.
    """
    _check(cfg, prompts, batch_size)
    if pad_token_id is None:  # GPT-2's tokenizer has none; pads are masked, any valid id works
        pad_token_id = cfg.end_token_ids[0] if cfg.end_token_ids else 0
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # less padding per chunk
    out: dict[int, list[int]] = {}
    was_training = model.training
    model.eval()
    try:
        with _decode_attention():
            chunks = range(0, len(order), batch_size)
            mine = [chunks[j] for j in world.take(len(chunks))] if world is not None else chunks
            for start in bar(mine, desc=f"decode ({len(prompts)} prompts)", unit="chunk"):
                idx = order[start:start + batch_size]
                for i, toks in zip(idx, _search_chunk(model, [prompts[i] for i in idx], cfg,
                                                      pad_token_id)):
                    out[i] = toks
    finally:
        model.train(was_training)
    if world is not None:
        out = world.merge(out)
    return [out[i] for i in range(len(prompts))]


def _decode_attention():
    """SDPA without the cuDNN backend while decoding. A decode step is one query per row against
    a masked cache; on an H100 (torch 2.11) SDPA picked cuDNN's kernel for it, which took 38 % of
    the GPU time of a GPT-2-medium beam search (about 185 us per layer for 400 rows x ~100 cached
    positions, some 16 MB of keys and values). The memory-efficient kernel takes the same mask."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


def _check(cfg: BeamConfig, prompts: list[list[int]], batch_size: int) -> None:
    if cfg.num_beams < 1 or cfg.max_new_tokens < 1 or batch_size < 1:
        raise ValueError(f"num_beams, max_new_tokens and batch_size must be >= 1: {cfg}, {batch_size}")
    if cfg.no_repeat_ngram_size < 0 or cfg.min_new_tokens < 0:
        raise ValueError(f"no_repeat_ngram_size and min_new_tokens must be >= 0: {cfg}")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")


@torch.inference_mode()
def _search_chunk(model, prompts: list[list[int]], cfg: BeamConfig, pad_token_id: int) -> list[list[int]]:
    device = _device(model)
    n_prompts, beams, max_new, lp = len(prompts), cfg.num_beams, cfg.max_new_tokens, cfg.length_penalty
    ends = torch.tensor(cfg.end_token_ids, dtype=torch.long, device=device)

    # Prefill: one row per prompt, left-padded; positions count real tokens only.
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_token_id] * (width - len(p)) + list(p) for p in prompts], device=device)
    prompt_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    prompt_len = prompt_mask.sum(1)                                     # (P,)
    positions = (prompt_mask.cumsum(1) - 1).clamp_(min=0)
    extra = {"logits_to_keep": 1} if _takes_logits_to_keep(model) else {}
    out = model(input_ids=ids, attention_mask=prompt_mask, position_ids=positions, use_cache=True,
                past_key_values=_preallocated_cache(model, width + max_new), **extra)
    cache, logits = out.past_key_values, out.logits[:, -1]

    # Per-prompt results of the whole chunk, filled as prompts finish.
    res_tokens = torch.zeros(n_prompts, max_new, dtype=torch.long, device=device)
    res_len = torch.zeros(n_prompts, dtype=torch.long, device=device)
    # State of the prompts still searching (P of them); `alive` maps them to chunk rows.
    alive = torch.arange(n_prompts, device=device)
    best_score = torch.full((n_prompts,), float("-inf"), device=device)
    best_tokens = torch.zeros(n_prompts, max_new, dtype=torch.long, device=device)
    best_len = torch.zeros(n_prompts, dtype=torch.long, device=device)
    hist = torch.zeros(n_prompts, max_new, dtype=torch.long, device=device)  # generated tokens per row
    beam_scores = torch.zeros(n_prompts, 1, device=device)               # step 0: one row per prompt

    for t in range(max_new):                                           # t tokens generated so far
        P, rows_per_prompt = alive.numel(), beam_scores.shape[1]
        logits = logits.float()
        if t < cfg.min_new_tokens and ends.numel():                    # rule 8 (on logits: rule 7)
            logits[:, ends] = float("-inf")
        _ban_repeated_ngrams(logits, hist[:, :t], cfg.no_repeat_ngram_size)  # rules 6-7
        logp = F.log_softmax(logits, dim=-1)
        vocab = logp.shape[-1]
        total = (beam_scores.unsqueeze(-1) + logp.view(P, rows_per_prompt, vocab)).view(P, -1)
        top_scores, top_idx = total.topk(beams, dim=1)                 # rule 4, sorted
        parent = top_idx // vocab + torch.arange(P, device=device).unsqueeze(1) * rows_per_prompt
        token = top_idx % vocab                                        # (P, beams)
        hist = hist[parent.view(-1)]
        hist[:, t] = token.view(-1)

        # Rules 2, 3, 5: picks that are end tokens become candidates and leave the beam.
        finished = torch.isin(token, ends)
        normed = (top_scores / float(t + 1) ** lp).masked_fill(~finished, float("-inf"))
        _update_best(normed, hist, t, best_score, best_tokens, best_len)
        beam_scores = top_scores.masked_fill(finished, float("-inf"))
        if t == max_new - 1:                                           # rule 5: unfinished at the cap
            _update_best(beam_scores / float(max_new) ** lp, hist, max_new, best_score, best_tokens, best_len)
            break

        # Early exit (exact): the best any live beam can still reach is below the best candidate.
        reachable = beam_scores.max(1).values / max(float(t + 2) ** lp, float(max_new) ** lp)
        done = (best_score >= reachable).cpu()                         # the one host sync per step
        if done.all():
            break
        rows = parent.view(-1)                                         # cache rows of the parents
        if done.any():
            d = done.nonzero().squeeze(1).to(device)
            res_tokens[alive[d]], res_len[alive[d]] = best_tokens[d], best_len[d]
            keep = (~done).nonzero().squeeze(1).to(device)
            alive, beam_scores, token = alive[keep], beam_scores[keep], token[keep]
            best_score, best_tokens, best_len = best_score[keep], best_tokens[keep], best_len[keep]
            prompt_mask, prompt_len = prompt_mask[keep], prompt_len[keep]
            keep_rows = (keep.unsqueeze(1) * beams + torch.arange(beams, device=device)).view(-1)
            rows, hist = rows.view(-1, beams)[keep].view(-1), hist[keep_rows]
        cache = _reorder(cache, rows)

        # Next forward: the token just picked, at position prompt_len + t, attending to the
        # prompt's real tokens and to every generated token.
        n_rows = alive.numel() * beams
        mask = torch.cat([prompt_mask.repeat_interleave(beams, 0),
                          prompt_mask.new_ones(n_rows, t + 1)], dim=1)
        pos = (prompt_len + t).repeat_interleave(beams).unsqueeze(1)
        out = model(input_ids=token.reshape(n_rows, 1), attention_mask=mask, position_ids=pos,
                    past_key_values=cache, use_cache=True)
        cache, logits = out.past_key_values, out.logits[:, -1]

    res_tokens[alive], res_len[alive] = best_tokens, best_len
    return [row[:n] for row, n in zip(res_tokens.tolist(), res_len.tolist())]


def _ban_repeated_ngrams(logits: torch.Tensor, hist: torch.Tensor, n: int) -> None:
    """-inf (in place) on every token that would repeat an n-gram of the row's generated tokens."""
    t = hist.shape[1]
    if n == 0 or t < n:                                                # no complete n-gram yet
        return
    follow = hist[:, n - 1:]                                           # token after each (n-1)-gram
    if n == 1:
        match = torch.ones_like(follow, dtype=torch.bool)
    else:
        grams = hist.unfold(1, n - 1, 1)[:, :t - n + 1]                # (rows, t-n+1, n-1)
        match = (grams == hist[:, t - n + 1:].unsqueeze(1)).all(-1)    # equal to the last n-1 tokens
    # scatter_add, not scatter: a token can follow several prefixes, matching or not.
    penalty = torch.zeros(follow.shape, dtype=logits.dtype, device=logits.device)
    logits.scatter_add_(1, follow, penalty.masked_fill_(match, float("-inf")))


def _update_best(normed: torch.Tensor, hist: torch.Tensor, length: int, best_score: torch.Tensor,
                 best_tokens: torch.Tensor, best_len: torch.Tensor) -> None:
    """Keep, per prompt, the strictly better of the current best and this step's best candidate."""
    P, beams = normed.shape
    score, beam = normed.max(1)                                        # first maximum on ties
    better = score > best_score
    best_score.copy_(torch.where(better, score, best_score))
    chosen = hist.view(P, beams, -1)[torch.arange(P, device=hist.device), beam]
    best_tokens.copy_(torch.where(better.unsqueeze(1), chosen, best_tokens))
    best_len.copy_(torch.where(better, torch.full_like(best_len, length), best_len))


def _preallocated_cache(model, length: int):
    """A cache written in place, or None (the model then makes a DynamicCache).

    DynamicCache appends with torch.cat, which copies the whole cache every step: on an H100 that
    was over half the GPU time of a GPT-2-medium beam search. A StaticCache (transformers >= 5
    signature, filled lazily so the batch may shrink) writes one position per step instead; the
    2-D attention mask we pass is padded by transformers to its length, so unused slots stay masked.
    """
    try:
        from transformers import StaticCache
        cache = StaticCache(config=model.config, max_cache_len=length)
    except (ImportError, TypeError, ValueError, AttributeError):
        return None
    layers = getattr(cache, "layers", None)
    if not layers or not all(hasattr(layer, "lazy_initialization") for layer in layers):
        return None  # an older StaticCache that sizes the batch up front
    return cache


def _reorder(cache, rows: torch.Tensor):
    if hasattr(cache, "reorder_cache"):                                # transformers Cache objects
        cache.reorder_cache(rows)
        return cache
    return tuple(tuple(x.index_select(0, rows) for x in layer) for layer in cache)  # legacy tuples


def _device(model) -> torch.device:
    return getattr(model, "device", None) or next(model.parameters()).device


def _takes_logits_to_keep(model) -> bool:
    """Prefill logits for the last position only (P x V, not P x L x V); PEFT wrappers hide it."""
    for m in (model, getattr(model, "get_base_model", lambda: None)()):
        if m is not None and "logits_to_keep" in inspect.signature(m.forward).parameters:
            return True
    return False
