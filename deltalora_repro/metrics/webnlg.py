"""WebNLG 2017 scores (paper Table 2) as WebNLG/GenerationEval's eval.py computes them, after the
LoRA repository's decode step, which the paper's pipeline runs first (microsoft/LoRA
examples/NLG).

The pipeline, step by step:

1. LoRA's gpt2_decode.py `--tokenize --lower --ref_num 6` (lora_postprocess, lora_references):
   predictions and references are lowercased (str.lower) and split on every non-word character
   (`" ".join(re.split(r"(\\W)", s))`, whitespace collapsed); each entry gets exactly 6
   references: its first 6, padded with copies of the first one. Without this step
   (lora_preprocess=False) references are padded with empty strings, as in GenerationEval's own
   reference files.
2. GenerationEval, `-nr 6 -m bleu,meteor,ter`:
   - BLEU: Moses' multi-bleu-detok.perl on the step-1 text: mteval-v13a tokenisation, case
     sensitive, 4-grams, closest reference length (ties to the shorter), no smoothing. The tool
     prints 100 x BLEU with 2 decimals; here BLEU is a fraction, unrounded.
   - METEOR 1.5 (file mode, `-l en -norm -r 6`, java.meteor_files) on nltk.word_tokenize'd text.
   - TER: pyter's TER (defined below, re-implemented) of the word_tokenize'd hypothesis against
     each of the 6 references, the minimum per entry (an empty reference counts as 1), averaged
     over entries. A fraction.
   Seen / Unseen / All (webnlg_scores): each subset scored on its own, as the LoRA README does
   with gpt2_decode.py --filter.

nltk.word_tokenize first splits sentences with the punkt model, which is not available offline.
On step-1 text the split changes nothing: every punctuation mark is already a token of its own
and no NLTKWordTokenizer rule looks across a sentence boundary, so punkt is skipped there
(tested in tests/test_nlg_metrics.py). Raw text (lora_preprocess=False) needs punkt
(`nltk.download("punkt_tab")`) and fails with a clear message without it.

Two procedures, named as for E2E (PROCEDURES): "paper" runs step 1 before step 2 (the LoRA
README's pipeline, which the paper follows); "official" is GenerationEval on the plain texts
(lora_preprocess=False). An empty prediction is scored as an empty hypothesis, as GenerationEval
scores an empty line.

Not reproduced, on purpose: (a) with the LoRA decode files ending in a newline GenerationEval
scores one extra empty entry (TER 1 for it) and METEOR fails (-1, issue #138); (b) if those files
end without a newline, multi-bleu-detok.perl's `chop` removes the last character of the last line.
Both are artefacts of the file handling, worth < 0.001 on the full test set.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from deltalora_repro.metrics import java
from deltalora_repro.metrics.e2e import (_clipped_matches, _closest_ref_length, _ngrams, check_shapes,
                                         mteval_normalize)

NUM_REFS = 6  # the LoRA README runs gpt2_decode.py --ref_num 6 and eval.py -nr 6


@dataclass(frozen=True)
class Procedure:
    name: str
    lora_preprocess: bool
    description: str


PROCEDURES: dict[str, Procedure] = {
    "paper": Procedure("paper", True,
                       "the LoRA repository's: its decode step (lowercase, split on non-word "
                       "characters, references padded to 6 with the first), then GenerationEval "
                       "-nr 6 (BLEU multi-bleu-detok, METEOR 1.5, TER pyter)"),
    "official": Procedure("official", False,
                          "GenerationEval -nr 6 on the plain texts (references padded with empty "
                          "ones; nltk's punkt tokenizer needed)"),
}
DEFAULT_PROCEDURE = "paper"


def get_procedure(name: str) -> Procedure:
    if name not in PROCEDURES:
        raise ValueError(f"unknown WebNLG scoring procedure {name!r}; valid: {', '.join(PROCEDURES)}")
    return PROCEDURES[name]

# ------------------------------------------------------------------------------------------------
# Step 1: the LoRA repository's decode post-processing


def lora_postprocess(text: str, tokenize: bool = True, lower: bool = True) -> str:
    """gpt2_decode.py's post_process: lowercase first, then split on non-word characters."""
    if lower:
        text = text.lower()
    if tokenize:
        text = " ".join(" ".join(re.split(r"(\W)", text)).split())
    return text


def lora_references(references: Sequence[str], num_refs: int = NUM_REFS) -> list[str]:
    """gpt2_decode.py's reference files: the first num_refs references, padded with the first."""
    if not references:
        raise ValueError("an entry needs at least one reference")
    return [references[i] if i < len(references) else references[0] for i in range(num_refs)]


# ------------------------------------------------------------------------------------------------
# Step 2a: BLEU, multi-bleu-detok.perl


def multi_bleu_detok(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Corpus BLEU of multi-bleu-detok.perl (without -lc), as a fraction. An empty reference
    takes part in the closest-length choice with length 0, as in the script."""
    correct, total = [0] * 5, [0] * 5
    hyp_len = ref_len = 0
    for hyp_text, refs_text in zip(hypotheses, references, strict=True):
        hyp = mteval_normalize(hyp_text, lowercase=False).split()
        refs = [mteval_normalize(r, lowercase=False).split() for r in refs_text]
        hyp_len += len(hyp)
        ref_len += _closest_ref_length(len(hyp), [len(r) for r in refs])
        for n in range(1, 5):
            total[n] += sum(_ngrams(hyp, n).values())
            correct[n] += sum(_clipped_matches(hyp, refs, n).values())
    if ref_len == 0:
        raise ValueError("all references are empty: multi-bleu-detok.perl stops with 'BLEU = 0'")
    if hyp_len == 0:
        return 0.0  # the script divides by zero here
    bp = math.exp(1 - ref_len / hyp_len) if hyp_len < ref_len else 1.0
    # The script's my_log(0) is -9999999999: any order without a match gives BLEU 0.
    if any(correct[n] == 0 or total[n] == 0 for n in range(1, 5)):
        return 0.0
    return bp * math.exp(sum(math.log(correct[n] / total[n]) for n in range(1, 5)) / 4)


# ------------------------------------------------------------------------------------------------
# Step 2c: TER as pyter (pyter3 0.3) defines it


def ter(hypothesis: Sequence[str], reference: Sequence[str]) -> float:
    """pyter's Translation Edit Rate of two token lists: (number of shifts + Levenshtein distance
    after the shifts) / len(reference).

    Shifts are chosen greedily: every pair of positions (i in the hypothesis, j in the
    reference) with i != j and equal words proposes to move the longest run of words matching
    from there, hyp[i:i+L], so that it starts at index j of the remaining words; the proposal
    that lowers the edit distance most is applied (ties go to the largest resulting word list in
    Python's list order, as pyter's sort does), until no proposal lowers it. Unlike tercom there
    is no limit on shift distance or phrase length and the edit distance is plain Levenshtein.
    Raises ZeroDivisionError for an empty reference, as pyter does.
    """
    ids: dict[str, int] = {}
    hyp = [ids.setdefault(w, len(ids)) for w in hypothesis]
    ref = [ids.setdefault(w, len(ids)) for w in reference]
    words = list(ids)
    ref_arr = np.array(ref, dtype=np.int64)
    shifts = 0
    current = int(_edit_distances(np.array([hyp], dtype=np.int64).reshape(1, -1), ref_arr)[0])
    while True:
        candidates: dict[tuple[int, ...], None] = {}  # distinct shifted sequences, in pyter's order
        for i in range(len(hyp)):
            for j in range(len(ref)):
                if i == j or hyp[i] != ref[j]:
                    continue
                length = 1
                while i + length < len(hyp) and j + length < len(ref) and hyp[i + length] == ref[j + length]:
                    length += 1
                shifted = hyp[:i] + hyp[i + length:]
                shifted[j:j] = hyp[i:i + length]
                candidates[tuple(shifted)] = None
        if not candidates:
            break
        cands = list(candidates)
        gains = current - _edit_distances(np.array(cands, dtype=np.int64), ref_arr)
        gain = int(gains.max())
        if gain <= 0:
            break
        tied = [c for c, g in zip(cands, gains.tolist()) if g == gain]
        hyp = list(max(tied, key=lambda c: [words[t] for t in c]))
        shifts += 1
        current -= gain
    return (shifts + current) / len(ref)  # ZeroDivisionError for an empty reference, as pyter


def _edit_distances(candidates: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """Levenshtein distance (unit costs) of each row of `candidates` (word ids, all of one
    length) to `ref`: one dynamic-programming row per candidate word, all candidates at once."""
    k, n = candidates.shape
    m = len(ref)
    cols = np.arange(m + 1)
    row = np.broadcast_to(cols, (k, m + 1)).copy()
    best = np.empty_like(row)
    for i in range(n):
        mismatch = candidates[:, i:i + 1] != ref[None, :]
        best[:, 0] = row[:, 0] + 1
        np.minimum(row[:, 1:] + 1, row[:, :-1] + mismatch, out=best[:, 1:])
        # insertions: row[j] = min over k <= j of (best[k] + j - k)
        row = np.minimum.accumulate(best - cols, axis=1) + cols
    return row[:, m]


def generation_eval_ter(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> list[float]:
    """GenerationEval's ter_score, per entry: min over references of pyter TER on whitespace
    tokens; an empty reference (or any pyter failure) counts as 1."""
    scores = []
    for hyp, refs in zip(hypotheses, references, strict=True):
        cache: dict[str, float] = {}
        for r in refs:
            if r not in cache:
                if len(r) == 0:
                    cache[r] = 1.0
                else:
                    try:
                        cache[r] = ter(hyp.split(), r.split())
                    except ZeroDivisionError:
                        cache[r] = 1.0
        scores.append(min(cache[r] for r in refs))
    return scores


# ------------------------------------------------------------------------------------------------
# GenerationEval end to end


def nltk_tokenize(text: str, sentence_split: bool) -> str:
    """GenerationEval's `' '.join(nltk.word_tokenize(text))`."""
    from nltk.tokenize import word_tokenize

    if not sentence_split:
        return " ".join(word_tokenize(text, preserve_line=True))
    try:
        return " ".join(word_tokenize(text))
    except LookupError:
        raise java.MetricToolError(
            "scoring raw (not LoRA-preprocessed) WebNLG text needs nltk's punkt sentence splitter "
            "(nltk data 'punkt_tab'), as GenerationEval's nltk.word_tokenize does: run "
            "`python -m nltk.downloader punkt_tab`, or score with lora_preprocess=True") from None


def prepare(predictions: Sequence[str], references: Sequence[Sequence[str]], *,
            lora_preprocess: bool = True, num_refs: int = NUM_REFS):
    """The texts GenerationEval scores: (hypotheses, references) as step 1 writes them and
    (hypotheses, references) after its word_tokenize, each entry with exactly num_refs references."""
    check_shapes(predictions, references)
    if lora_preprocess:
        hyps = [lora_postprocess(p.strip()) for p in predictions]
        refs = [[lora_postprocess(r) for r in lora_references(group, num_refs)] for group in references]
    else:
        hyps = [p.strip() for p in predictions]
        refs = [[(list(group) + [""] * num_refs)[i] for i in range(num_refs)] for group in references]
    split = not lora_preprocess
    tok = {s: nltk_tokenize(s, split) for s in {*hyps, *(r for g in refs for r in g)}}
    return hyps, refs, [tok[h] for h in hyps], [[tok[r] for r in g] for g in refs]


def webnlg_metrics(predictions: Sequence[str], references: Sequence[Sequence[str]], *,
                   lora_preprocess: bool = True, num_refs: int = NUM_REFS) -> dict[str, float]:
    """{"bleu", "meteor", "ter"} of GenerationEval for one set of entries (fractions)."""
    hyps, refs, hyps_tok, refs_tok = prepare(predictions, references,
                                             lora_preprocess=lora_preprocess, num_refs=num_refs)
    return {"bleu": multi_bleu_detok(hyps, refs),
            "meteor": java.meteor_files(hyps_tok, refs_tok),
            "ter": float(np.mean(generation_eval_ter(hyps_tok, refs_tok)))}


def webnlg_metrics_by_split(predictions: Sequence[str], references: Sequence[Sequence[str]],
                            seen: Sequence[bool] | None, *, lora_preprocess: bool = True,
                            num_refs: int = NUM_REFS) -> dict[str, float]:
    """Metrics with keys `{metric}_{subset}`; subsets seen/unseen/all, or all only if seen is None."""
    hyps, refs, hyps_tok, refs_tok = prepare(predictions, references,
                                             lora_preprocess=lora_preprocess, num_refs=num_refs)
    if seen is not None and len(seen) != len(hyps):
        raise ValueError(f"{len(seen)} seen flags for {len(hyps)} predictions")
    subsets = {"all": list(range(len(hyps)))}
    if seen is not None:
        subsets = {"seen": [i for i, s in enumerate(seen) if s],
                   "unseen": [i for i, s in enumerate(seen) if not s], **subsets}
    subsets = {name: idx for name, idx in subsets.items() if idx}
    ter_per_entry = generation_eval_ter(hyps_tok, refs_tok)  # per entry, so shared by all subsets
    # One METEOR JVM per subset (each loads the paraphrase table), run side by side.
    meteors = java.run_parallel({name: (java.meteor_files, [hyps_tok[i] for i in idx], [refs_tok[i] for i in idx])
                                 for name, idx in subsets.items()})
    out: dict[str, float] = {}
    for metric in ("bleu", "meteor", "ter"):
        for name, idx in subsets.items():
            if metric == "bleu":
                value = multi_bleu_detok([hyps[i] for i in idx], [refs[i] for i in idx])
            elif metric == "meteor":
                value = meteors[name]
            else:
                value = float(np.mean([ter_per_entry[i] for i in idx]))
            out[f"{metric}_{name}"] = value
    return out
