"""Beam search (decoding.py) against a plain reference and hand-built cases of each rule."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from deltalora_repro import decoding
from deltalora_repro.decoding import BeamConfig, beam_search

NEG = float("-inf")


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: intra-op threads cost more than they save, and stall on a busy machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# -- a plain reference: one prompt, no cache, full recomputation, Python bookkeeping --------------
def reference_beam(model, prompt: list[int], cfg: BeamConfig) -> list[int]:
    """gpt2_beam.py's rules written out directly (see the decoding.py docstring)."""
    ends = set(cfg.end_token_ids)
    n = cfg.no_repeat_ngram_size

    def next_logprobs(gen: list[int]) -> torch.Tensor:
        with torch.no_grad():
            logits = model(torch.tensor([prompt + gen])).logits[0, -1].float()
        banned = set(ends) if len(gen) < cfg.min_new_tokens else set()
        if n and len(gen) >= n:
            last = gen[len(gen) - n + 1:]
            for j in range(len(gen) - n + 1):
                if gen[j:j + n - 1] == last:
                    banned.add(gen[j + n - 1])
        logits[sorted(banned)] = NEG            # on the logits, before the softmax
        return torch.log_softmax(logits, -1)

    beams = [([], torch.tensor(0.0))]           # (generated tokens, fp32 score); dead: -inf
    best = None                                 # (normalised score, tokens)
    for t in range(cfg.max_new_tokens):
        cands = []
        for b, (gen, score) in enumerate(beams):
            if score == NEG:                    # a dead beam's children are all -inf
                cands += [(NEG, b, tok) for tok in range(model.config.vocab_size)]
                continue
            for tok, s in enumerate((score + next_logprobs(gen)).tolist()):
                cands.append((s, b, tok))
        cands.sort(key=lambda c: -c[0])
        new = []
        for s, b, tok in cands[:cfg.num_beams]:
            gen = beams[b][0] + [tok]
            if tok in ends:
                normed = s / (t + 1) ** cfg.length_penalty
                if best is None or normed > best[0]:
                    best = (normed, gen[:-1])
                s = NEG
            new.append((gen, torch.tensor(s)))
        beams = new
    for gen, score in beams:                    # unfinished beams at the cap are candidates too
        normed = float(score) / cfg.max_new_tokens ** cfg.length_penalty
        if best is None or normed > best[0]:
            best = (normed, gen)
    return best[1]


# -- tiny models ------------------------------------------------------------------------------
def random_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    # initializer_range 0.5: peaked next-token distributions, so no near-ties decide the test
    cfg = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=128,
                     initializer_range=0.5, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg).eval()


def random_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      initializer_range=0.5, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return LlamaForCausalLM(cfg).eval()


def bigram_gpt2(table: torch.Tensor) -> GPT2LMHeadModel:
    """A real GPT-2 whose next-token logits are exactly table[current token] (V x V).

    Attention and MLP outputs and positions are zeroed, so the last hidden state is
    LN(10 e_k) = (d e_k - 1) / sqrt(d - 1) with d = V + 1; an extra, never-hot embedding column
    lets each lm_head row sum to 0, which removes the -1 term.
    """
    V = table.shape[0]
    d = V + 1
    cfg = GPT2Config(n_layer=1, n_head=1, n_embd=d, vocab_size=V, n_positions=128,
                     tie_word_embeddings=False, bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.transformer.wte.weight[:, :V] = 10 * torch.eye(V)
        for ln in [model.transformer.ln_f] + [m for b in model.transformer.h for m in (b.ln_1, b.ln_2)]:
            ln.weight.fill_(1.0)
        head = torch.zeros(V, d)
        head[:, :V] = table.T * math.sqrt(d - 1) / d
        head[:, V] = -head[:, :V].sum(1)
        model.lm_head.weight.copy_(head)
    return model


def chain_table(V: int, links: dict[tuple[int, int], float]) -> torch.Tensor:
    """Logit 0 everywhere except table[a, b] = v for each (a, b): v."""
    table = torch.zeros(V, V)
    for (a, b), v in links.items():
        table[a, b] = v
    return table


def seq_logprob(model, prompt: list[int], seq: list[int]) -> float:
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([prompt + seq])).logits[0].float(), -1)
    return sum(float(logp[len(prompt) - 1 + i, tok]) for i, tok in enumerate(seq))


PROMPTS = [[5], [1, 2, 3], [7, 8, 9, 10, 11, 12, 13], [40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50, 51],
           [3, 3], [60, 2, 61, 9, 33]]
# (config, which of the model's most likely tokens are end tokens): a random model seldom picks an
# arbitrary id, so the end tokens are taken among its favourites to make hypotheses end.
CONFIGS = [(BeamConfig(num_beams=4, length_penalty=0.8, no_repeat_ngram_size=3, max_new_tokens=12), (0, 2)),
           (BeamConfig(num_beams=3, length_penalty=1.0, no_repeat_ngram_size=2, max_new_tokens=10), (0,)),
           (BeamConfig(num_beams=5, length_penalty=0.8, no_repeat_ngram_size=4, max_new_tokens=14,
                       min_new_tokens=2), (0, 3, 5))]


def favourite_tokens(model) -> list[int]:
    """Token ids by mean log-prob over random contexts, most likely first."""
    x = torch.randint(0, model.config.vocab_size, (64, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return torch.log_softmax(model(x).logits.float(), -1).mean((0, 1)).argsort(descending=True).tolist()


# -- (1) and (6): batched + cached == reference ------------------------------------------------
@pytest.mark.parametrize("build", [random_gpt2, random_llama], ids=["gpt2", "llama"])
@pytest.mark.parametrize("cfg_ends", CONFIGS, ids=["e2e-like", "webnlg-like", "min-length"])
def test_matches_reference(build, cfg_ends):
    model = build()
    ranks = favourite_tokens(model)
    cfg = dataclasses.replace(cfg_ends[0], end_token_ids=tuple(ranks[i] for i in cfg_ends[1]))
    want = [reference_beam(model, p, cfg) for p in PROMPTS]
    assert beam_search(model, PROMPTS, cfg, pad_token_id=0) == want
    assert beam_search(model, PROMPTS, cfg, pad_token_id=0, batch_size=2) == want  # other chunks
    assert all(len(w) <= cfg.max_new_tokens for w in want)
    assert len({len(w) for w in want}) > 1      # some hypotheses ended early, others did not


def test_dynamic_cache_fallback_matches(monkeypatch):
    """Older transformers get a DynamicCache instead of the preallocated one: same answers."""
    model = random_gpt2()
    ranks = favourite_tokens(model)
    cfg = dataclasses.replace(CONFIGS[0][0], end_token_ids=tuple(ranks[i] for i in CONFIGS[0][1]))
    preallocated = beam_search(model, PROMPTS, cfg, pad_token_id=0)
    monkeypatch.setattr(decoding, "_preallocated_cache", lambda model, length: None)
    assert beam_search(model, PROMPTS, cfg, pad_token_id=0) == preallocated


def test_finished_prompts_leave_the_batch():
    model = random_gpt2()
    cfg = dataclasses.replace(CONFIGS[0][0], end_token_ids=tuple(favourite_tokens(model)[:3]))
    rows = []
    hook = model.register_forward_pre_hook(lambda m, a, kw: rows.append(kw["input_ids"].shape[0]),
                                           with_kwargs=True)
    beam_search(model, PROMPTS, cfg, pad_token_id=0)
    hook.remove()
    assert rows[0] == len(PROMPTS)              # prefill once per prompt, not per beam
    assert all(r % cfg.num_beams == 0 for r in rows[1:])  # then num_beams rows per live prompt
    assert rows[-1] < len(PROMPTS) * cfg.num_beams       # finished prompts stopped costing compute
    assert len(rows) <= cfg.max_new_tokens


def test_processes_search_their_share_of_the_chunks_and_get_every_output():
    """Several processes: each searches every size-th chunk of the ones a single process would
    search (same prompts per chunk, so the same answers) and every process ends with all of
    them. The two processes are played in turn here (World.merge's exchange: the first one played
    is handed the one-process outputs for the share it has not received yet)."""
    from deltalora_repro.world import World
    model = random_gpt2()
    cfg = dataclasses.replace(CONFIGS[0][0], end_token_ids=tuple(favourite_tokens(model)[:2]))
    one = beam_search(model, PROMPTS, cfg, pad_token_id=0, batch_size=2)   # 6 prompts: 3 chunks
    shares: dict[int, dict] = {}

    class Played(World):
        def merge(self, mine):
            shares[self.rank] = dict(mine)
            got = {k: v for part in shares.values() for k, v in part.items()}
            return {**dict(enumerate(one)), **got} if self.rank == 1 else got

    searched = []
    real = decoding._search_chunk
    with pytest.MonkeyPatch.context() as m:
        m.setattr(decoding, "_search_chunk", lambda model, prompts, *a: searched.append(prompts)
                  or real(model, prompts, *a))
        beam_search(model, PROMPTS, cfg, pad_token_id=0, batch_size=2,
                    world=Played(rank=1, size=2, local_rank=1, device=torch.device("cpu")))
        assert len(searched) == 1                  # chunk 1 of 0, 1, 2
        two = beam_search(model, PROMPTS, cfg, pad_token_id=0, batch_size=2,
                          world=Played(rank=0, size=2, local_rank=0, device=torch.device("cpu")))
    assert len(searched) == 3                      # chunks 0 and 2: each chunk once in all
    by_length = sorted(PROMPTS, key=len)           # chunks hold the prompts sorted by length
    assert searched == [by_length[2:4], by_length[0:2], by_length[4:6]]
    assert two == one


def test_left_padding_does_not_change_answers():
    """The property the batching relies on (GPT-2 needs explicit position ids for it)."""
    for model in (random_gpt2(), random_llama()):
        short, long_ = [4, 5, 6], [9, 8, 7, 6, 5, 4]
        out = beam_search(model, [short, long_], BeamConfig(num_beams=1, no_repeat_ngram_size=0,
                                                             max_new_tokens=6), pad_token_id=0)
        assert out == [beam_search(model, [p], BeamConfig(num_beams=1, no_repeat_ngram_size=0,
                                                           max_new_tokens=6), pad_token_id=0)[0]
                       for p in (short, long_)]


# -- (2) the no-repeat ban looks at generated tokens only ------------------------------------------
V, SEP, END = 16, 15, 14


def test_bigram_model_is_what_it_claims():
    table = torch.randn(V, V) * 3
    model = bigram_gpt2(table)
    logits = model(torch.tensor([[3, 9, 2]])).logits[0]
    torch.testing.assert_close(logits, table[[3, 9, 2]], atol=1e-3, rtol=0)


def test_no_repeat_ignores_the_prompt():
    # The best continuation copies "1 2 3 4 5" (a name in the MR) from the prompt.
    model = bigram_gpt2(chain_table(V, {(SEP, 1): 8, (1, 2): 8, (2, 3): 8, (3, 4): 8, (4, 5): 8,
                                        (5, END): 8}))
    prompt = [9, 1, 2, 3, 4, 5, 10, SEP]
    cfg = BeamConfig(num_beams=4, length_penalty=0.8, no_repeat_ngram_size=4, max_new_tokens=10,
                     end_token_ids=(END,))
    assert beam_search(model, [prompt], cfg, pad_token_id=0) == [[1, 2, 3, 4, 5]]
    # Hugging Face's generate counts the prompt's 4-grams and cannot copy the span.
    hf = model.generate(torch.tensor([prompt]), num_beams=4, length_penalty=0.8, do_sample=False,
                        no_repeat_ngram_size=4, max_new_tokens=10, eos_token_id=END, pad_token_id=0)
    hf_new = hf[0, len(prompt):].tolist()
    assert hf_new[:5] != [1, 2, 3, 4, 5]


def test_generated_ngrams_never_repeat():
    model = bigram_gpt2(chain_table(V, {(SEP, 1): 8, (1, 2): 8, (2, 3): 8, (3, 4): 8, (4, 1): 8}))
    base = BeamConfig(num_beams=3, length_penalty=1.0, max_new_tokens=20, end_token_ids=(END,))
    free = beam_search(model, [[SEP]], dataclasses.replace(base, no_repeat_ngram_size=0), 0)[0]
    assert free == [1, 2, 3, 4] * 5             # without the ban the cycle repeats
    for n in (2, 3, 4):
        out = beam_search(model, [[SEP]], dataclasses.replace(base, no_repeat_ngram_size=n), 0)[0]
        grams = [tuple(out[i:i + n]) for i in range(len(out) - n + 1)]
        assert len(grams) == len(set(grams)), (n, out)
        assert out[:n] == [1, 2, 3, 4][:n]


@pytest.mark.parametrize("ban", ["no-repeat", "min-length"])
def test_bans_act_before_the_softmax(ban):
    """A banned token's probability mass goes to the others (gpt2_beam.py bans on the logits).

    A = SEP 1 1 END: after "1 1", token 1 is banned (no-repeat 2), or END is banned after "1"
    (min length 2), and the allowed continuation then holds almost all the mass: log p ~ -0.1 if
    renormalised, ~ -5 if not. B (SEP 3 END, or SEP 3 4 END under the min length) costs about one
    nat more than A's first step. Renormalised, A wins; banning after the log-softmax (Hugging
    Face's order) B would.
    """
    if ban == "no-repeat":
        links = {(SEP, 1): 10, (SEP, 3): 9, (1, 1): 10, (1, END): 5, (3, END): 10}
        cfg = BeamConfig(num_beams=3, length_penalty=0.0, no_repeat_ngram_size=2, max_new_tokens=6,
                         end_token_ids=(END,))
    else:
        links = {(SEP, 1): 10, (SEP, 3): 9, (1, END): 10, (1, 1): 5, (3, 4): 10, (4, END): 10}
        cfg = BeamConfig(num_beams=3, length_penalty=0.0, no_repeat_ngram_size=0, max_new_tokens=6,
                         end_token_ids=(END,), min_new_tokens=2)
    model = bigram_gpt2(chain_table(V, links))
    assert beam_search(model, [[SEP]], cfg, 0) == [[1, 1]] == [reference_beam(model, [SEP], cfg)]


# -- (3) length penalty ----------------------------------------------------------------------
def test_length_penalty_picks_by_the_formula():
    # Short: SEP -> 1 -> END (L = 2 with the end token); long: SEP -> 2 3 4 5 6 -> END (L = 6).
    A, B = 1, 2
    links = {(SEP, A): 10.5, (SEP, B): 10.0, (A, END): 10, (B, 3): 10, (3, 4): 10, (4, 5): 10,
             (5, 6): 10, (6, END): 10}
    model = bigram_gpt2(chain_table(V, links))
    short, long_ = [A], [B, 3, 4, 5, 6]
    s_short = seq_logprob(model, [SEP], short + [END])
    s_long = seq_logprob(model, [SEP], long_ + [END])
    assert s_short > s_long                     # raw sums prefer the short one
    switch = math.log(s_long / s_short) / math.log(6 / 2)  # s_short/2^lp == s_long/6^lp
    assert 0.3 < switch < 0.9
    seen = set()
    for lp in (0.0, 0.5, 0.8, 1.0, 2.0):
        cfg = BeamConfig(num_beams=2, length_penalty=lp, no_repeat_ngram_size=4, max_new_tokens=10,
                         end_token_ids=(END,))
        want = short if s_short / 2 ** lp > s_long / 6 ** lp else long_
        got = beam_search(model, [[SEP]], cfg, pad_token_id=0)[0]
        assert got == want == reference_beam(model, [SEP], cfg), lp
        seen.add(tuple(got))
    assert seen == {tuple(short), tuple(long_)}  # the penalty really moved the choice


# -- (4) end tokens ----------------------------------------------------------------------------
def test_end_tokens_stop_and_are_dropped():
    END2 = 13
    cfg = BeamConfig(num_beams=3, length_penalty=0.8, no_repeat_ngram_size=4, max_new_tokens=10,
                     end_token_ids=(END, END2))
    for end in (END, END2):                     # either id of the set ends a hypothesis
        model = bigram_gpt2(chain_table(V, {(SEP, 1): 8, (1, 2): 8, (2, end): 8}))
        assert beam_search(model, [[SEP]], cfg, pad_token_id=0) == [[1, 2]]
    # Not an end token: generation runs through it.
    model = bigram_gpt2(chain_table(V, {(SEP, 1): 8, (1, 2): 8, (2, END): 8}))
    out = beam_search(model, [[SEP]], dataclasses.replace(cfg, end_token_ids=(END2,)), 0)[0]
    assert out[:3] == [1, 2, END] and len(out) > 3


def test_min_new_tokens_bans_end_tokens_early():
    model = bigram_gpt2(chain_table(V, {(SEP, 1): 8, (1, END): 8, (2, END): 8, (1, 2): 4}))
    cfg = BeamConfig(num_beams=3, length_penalty=1.0, no_repeat_ngram_size=0, max_new_tokens=8,
                     end_token_ids=(END,))
    assert beam_search(model, [[SEP]], cfg, 0) == [[1]]
    cfg = dataclasses.replace(cfg, min_new_tokens=2)
    out = beam_search(model, [[SEP]], cfg, 0)[0]
    assert out == [1, 2] == reference_beam(model, [SEP], cfg)


# -- (5) max_new_tokens --------------------------------------------------------------------------
@pytest.mark.parametrize("max_new", [1, 3, 7])
def test_max_new_tokens(max_new):
    model = bigram_gpt2(chain_table(V, {(SEP, 1): 8, (1, 2): 8, (2, 3): 8, (3, 1): 8}))
    cfg = BeamConfig(num_beams=2, no_repeat_ngram_size=0, max_new_tokens=max_new, end_token_ids=(END,))
    assert beam_search(model, [[SEP], [4, SEP]], cfg, 0) == [([1, 2, 3] * 3)[:max_new]] * 2
    out = beam_search(random_gpt2(), PROMPTS, BeamConfig(num_beams=3, max_new_tokens=max_new), 0)
    assert all(len(o) == max_new for o in out)  # no end tokens: every answer runs to the cap


def test_model_mode_is_restored():
    model = random_gpt2().train()
    beam_search(model, [[1, 2]], BeamConfig(num_beams=2, max_new_tokens=3), 0)
    assert model.training
