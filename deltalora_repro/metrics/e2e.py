"""E2E NLG Challenge scores (paper Table 1) exactly as tuetschek/e2e-metrics' measure_scores.py
computes them: BLEU and NIST with mteval-v13a's definitions, METEOR 1.5, ROUGE-L and CIDEr(-D)
with the coco-caption code. All values are what measure_scores.py prints: BLEU, METEOR, ROUGE-L
as fractions (0..1), NIST on its own scale (about 8-9 for good E2E systems), CIDEr (about 2.5).
Nothing is rounded (measure_scores.py prints 4 decimals).

BLEU and NIST come in the two flavours measure_scores.py offers (`mteval=`):

- "perl" (measure_scores.py's default): its edited mteval-v13a-sig.pl. References are written
  as one SGML reference set per reference index, segments with fewer references padded with
  empty ones; the edit makes the brevity penalty skip empty references and makes NIST divide
  the total reference length by the mean number of non-empty references per segment.
- "python" (measure_scores.py -p, the command the LoRA repository's README runs for E2E): its
  pymteval.py re-implementation. Same BLEU on real outputs (corpus BLEU differs only for
  outputs shorter than 4 tokens or with no 4-gram match, where the two smooth differently);
  NIST differs in the average reference length of the length penalty (sum over segments of
  each segment's mean reference length), which matters only when outputs are shorter than the
  references on average. With a human reference as the "system" on all 630 test inputs the
  official tools give NIST 9.0212 (perl) and 9.0185 (python), the same BLEU 0.6183.

Both are written out here (pymteval is not on PyPI, the Perl script needs Perl and SGML files,
and sacrebleu's 13a BLEU, which equals mteval's on ASCII text as a test shows, has no NIST and
lowercases beyond ASCII): they are small n-gram counts, and the details that decide the last digits
(mteval's tokenisation, ASCII-only lowercasing, the "closest reference, ties to the shorter"
length, NIST's information weights counted over all references of the test set and its
length penalty) are spelled out below. METEOR, ROUGE-L and CIDEr are the coco-caption code:
its PTB tokenizer and METEOR jar (java.py) and pycocoevalcap's Rouge and Cider classes.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence

from deltalora_repro.metrics import java

MTEVAL_VARIANTS = ("perl", "python")

# ------------------------------------------------------------------------------------------------
# mteval-v13a tokenisation (sub tokenization; identical in multi-bleu-detok.perl and pymteval.py)

_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")
# Every ASCII punctuation and symbol except the apostrophe, hyphen, period and comma:
# the ranges {-~, [-`, space-&, (-+, :-@ and "/".
_PUNCT = re.compile(r"([\{-\~\[-\` -\&\(-\+\:-\@\/])")
_PERIOD_COMMA_AFTER_NON_DIGIT = re.compile(r"([^0-9])([\.,])")
_PERIOD_COMMA_BEFORE_NON_DIGIT = re.compile(r"([\.,])([^0-9])")
_DASH_AFTER_DIGIT = re.compile(r"([0-9])(-)")
_SPACES = re.compile(r"\s+")


def mteval_normalize(text: str, lowercase: bool) -> str:
    """mteval-v13a's `tokenization` (not the --international-tokenization): returns the
    normalised string, tokens separated by single spaces. Lowercasing, as Perl's tr/[A-Z]/[a-z]/,
    touches ASCII letters only."""
    text = text.replace("<skipped>", "")
    text = text.replace("-\n", "").replace("\n", " ")
    text = (text.replace("&quot;", '"').replace("&amp;", "&")
            .replace("&lt;", "<").replace("&gt;", ">"))
    text = f" {text} "
    if lowercase:
        text = text.translate(_ASCII_LOWER)
    text = _PUNCT.sub(r" \1 ", text)
    text = _PERIOD_COMMA_AFTER_NON_DIGIT.sub(r"\1 \2 ", text)
    text = _PERIOD_COMMA_BEFORE_NON_DIGIT.sub(r" \1 \2", text)
    text = _DASH_AFTER_DIGIT.sub(r"\1 \2 ", text)
    return _SPACES.sub(" ", text).strip()


def mteval_tokenize(text: str, lowercase: bool = True) -> list[str]:
    """Tokens as the Perl scripts see them (`split /\\s+/`): an empty text has no tokens."""
    norm = mteval_normalize(text, lowercase)
    return norm.split(" ") if norm else []


def _ngrams(tokens: Sequence[str], n: int) -> Counter:
    return Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


def _max_ref_counts(refs: list[list[str]], n: int) -> Counter:
    merged: Counter = Counter()
    for ref in refs:
        for gram, c in _ngrams(ref, n).items():
            if c > merged[gram]:
                merged[gram] = c
    return merged


def _clipped_matches(hyp: list[str], refs: list[list[str]], n: int) -> Counter:
    ref_max = _max_ref_counts(refs, n)
    return Counter({g: min(c, ref_max[g]) for g, c in _ngrams(hyp, n).items() if ref_max[g] > 0})


def _closest_ref_length(hyp_len: int, ref_lens: list[int]) -> int:
    """The reference length closest to the hypothesis length, ties to the shorter one (mteval-v13a
    --brevity-penalty closest, its default; multi-bleu-detok and pymteval do the same)."""
    return min(ref_lens, key=lambda r: (abs(hyp_len - r), r))


def _nist_length_penalty(ratio: float) -> float:
    """mteval's nist_length_penalty: 1 above ratio 1, 0.5 at ratio 2/3 (beta = -ln 0.5 / ln² 1.5)."""
    if ratio >= 1:
        return 1.0
    if ratio <= 0:
        return 0.0
    beta = -math.log(0.5) / math.log(1.5) / math.log(1.5)
    return math.exp(-beta * math.log(ratio) * math.log(ratio))


# ------------------------------------------------------------------------------------------------
# BLEU and NIST, mteval-v13a-sig.pl (measure_scores.py default)

def _mteval_perl(predictions: list[str], references: list[list[str]]) -> tuple[float, float]:
    hyps = [mteval_tokenize(p) for p in predictions]
    refs = [[mteval_tokenize(r) for r in group] for group in references]
    bleu_n, nist_n = 4, 5

    # NIST information weights from every reference segment of the test set (compute_ngram_info):
    # info(w_1..w_n) = log2(count(w_1..w_n-1) / count(w_1..w_n)), count(empty prefix) = #words.
    counts: Counter = Counter()
    total_words = 0
    for group in refs:
        for ref in group:
            total_words += len(ref)
            for n in range(1, nist_n + 1):
                counts.update(_ngrams(ref, n))

    def info(gram: tuple[str, ...]) -> float:
        # Perl tests the prefix string for truth: the one-word prefix "0" is false, so such a
        # bigram is weighed against the total word count, as for unigrams.
        prefix = gram[:-1]
        denom = counts[prefix] if prefix and prefix != ("0",) else total_words
        return -math.log(counts[gram] / denom) / math.log(2)

    match = [0] * (nist_n + 1)        # clipped n-gram matches
    tst = [0] * (nist_n + 1)          # hypothesis n-grams
    tst_info = [0.0] * (nist_n + 1)   # information of the matched n-grams
    ref_words = 0                     # all reference words (ref_count[1])
    bleu_ref_len = 0                  # sum of closest reference lengths
    n_refs = 0                        # non-empty references
    for hyp, group in zip(hyps, refs):
        for n in range(1, nist_n + 1):
            tst[n] += max(0, len(hyp) - n + 1)
            for gram, c in _clipped_matches(hyp, group, n).items():
                match[n] += c
                tst_info[n] += info(gram) * c
        ref_words += sum(len(r) for r in group)
        # brevity_penalty_closest skips empty references (the e2e-metrics edit).
        bleu_ref_len += _closest_ref_length(len(hyp), [len(r) for r in group if r] or [0])
        n_refs += sum(1 for r in group if r)

    # bleu_score (smoothed by default): a zero match count at order n is replaced by 1/2^k.
    log_sum, smooth = 0.0, 1
    for n in range(1, bleu_n + 1):
        if tst[n] == 0:
            continue                  # log(p_n) = 0
        if match[n] == 0:
            smooth *= 2
            log_sum += math.log(1 / (smooth * tst[n]))
        else:
            log_sum += math.log(match[n] / tst[n])
    bp = math.exp(min(0.0, 1 - bleu_ref_len / tst[1])) if tst[1] > 0 else 0.0
    bleu = math.exp(log_sum / bleu_n) * bp

    # nist_score: sum over n of matched information per hypothesis n-gram, times the length
    # penalty of (hypothesis words) / (reference words / mean non-empty references per segment).
    nist = sum(tst_info[n] / max(tst[n], 1) for n in range(1, nist_n + 1))
    mean_refs = n_refs / len(hyps)
    nist *= _nist_length_penalty(tst[1] / (ref_words / mean_refs))
    return bleu, nist


# ------------------------------------------------------------------------------------------------
# BLEU and NIST, pymteval.py (measure_scores.py -p)

def _pymteval_tokenize(text: str) -> list[str]:
    # pymteval splits on " " without dropping empties: an empty text is one empty token.
    return [t.lower() for t in mteval_normalize(text, lowercase=False).split(" ")]


def _mteval_python(predictions: list[str], references: list[list[str]]) -> tuple[float, float]:
    hyps = [_pymteval_tokenize(p) for p in predictions]
    refs = [[_pymteval_tokenize(r) for r in group] for group in references]
    bleu_n, nist_n = 4, 5

    # BLEUScore: counts may go negative for hypotheses shorter than n (len - n + 1 is not clipped).
    hits, cand, ref_len = [0] * bleu_n, [0] * bleu_n, 0
    for hyp, group in zip(hyps, refs):
        for i in range(bleu_n):
            hits[i] += sum(_clipped_matches(hyp, group, i + 1).values())
            cand[i] += len(hyp) - i
        ref_len += _closest_ref_length(len(hyp), [len(r) for r in group])
    bp = 1.0
    if cand[0] <= ref_len:
        bp = math.exp(1.0 - ref_len / (float(cand[0]) if cand[0] else 1e-5))
    log_sum = sum(math.log(max(h, 1e-15) / max(c, 1e-9)) for h, c in zip(hits, cand))
    bleu = bp * math.exp(log_sum / bleu_n)

    # NISTScore: info(ngram) = log2(count(prefix) / count(ngram)) over all reference n-grams,
    # count(()) = all reference words; length penalty against the sum of per-segment mean
    # reference lengths.
    counts: Counter = Counter()
    avg_ref_len = 0.0
    for group in refs:
        for ref in group:
            for n in range(1, nist_n + 1):
                counts.update(_ngrams(ref, n))
        words = sum(len(r) for r in group)
        counts[()] += words
        avg_ref_len += words / float(len(group))
    hit_info, cand_n = [0.0] * nist_n, [0] * nist_n
    for hyp, group in zip(hyps, refs):
        for n in range(nist_n):
            cand_n[n] += len(hyp) - n
            for gram, c in _clipped_matches(hyp, group, n + 1).items():
                hit_info[n] += math.log(counts[gram[:-1]] / float(counts[gram]), 2) * c
    nist = sum(h / (c if c != 0 else 1) for h, c in zip(hit_info, cand_n))
    nist *= _nist_length_penalty(cand_n[0] / float(avg_ref_len))
    return bleu, nist


def mteval_bleu_nist(predictions: Sequence[str], references: Sequence[Sequence[str]],
                     mteval: str = "perl") -> tuple[float, float]:
    """Corpus BLEU (fraction) and NIST of e2e-metrics; `mteval` picks the Perl or Python scorer."""
    preds, refs = _check(predictions, references)
    if mteval == "perl":
        return _mteval_perl(preds, refs)
    if mteval == "python":
        return _mteval_python(preds, refs)
    raise ValueError(f"unknown mteval variant {mteval!r}; valid: {', '.join(MTEVAL_VARIANTS)}")


# ------------------------------------------------------------------------------------------------
# METEOR, ROUGE-L, CIDEr (coco-caption, as e2e-metrics' pycocoevalcap/eval.py runs them)

def coco_scores(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """METEOR, ROUGE-L and CIDEr as COCOEvalCap.evaluate computes them for e2e-metrics: PTB
    tokenisation (references and predictions in two tokenizer runs, as coco does), METEOR 1.5
    over coco's -stdio protocol, pycocoevalcap's Rouge (beta 1.2) and Cider (CIDEr-D: sigma 6,
    clipping, x10, document frequencies from this test set's references)."""
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    preds, refs = _check(predictions, references)
    flat_refs = [r for group in refs for r in group]
    tok_refs_flat = java.ptb_tokenize(flat_refs)
    tok_preds = java.ptb_tokenize(preds)
    gts, res, pos = {}, {}, 0
    for i, group in enumerate(refs):
        gts[i] = tok_refs_flat[pos:pos + len(group)]
        pos += len(group)
        res[i] = [tok_preds[i]]
    meteor, _ = java.meteor_stdio([res[i][0] for i in res], [gts[i] for i in res])
    rouge_l, _ = Rouge().compute_score(gts, res)
    cider, _ = Cider().compute_score(gts, res)
    return {"meteor": float(meteor), "rouge_l": float(rouge_l), "cider": float(cider)}


def e2e_metrics(predictions: list[str], references: list[list[str]], *,
                mteval: str = "perl") -> dict[str, float]:
    """The five E2E metrics of e2e-metrics' measure_scores.py for one prediction per input and
    that input's references: {"bleu", "nist", "meteor", "rouge_l", "cider"}.

    mteval="perl" (default) is measure_scores.py as run without options; "python" is its -p flag
    (the LoRA README's command). They differ only in BLEU/NIST corner cases (module docstring).
    """
    preds, refs = _check(predictions, references)
    bleu, nist = mteval_bleu_nist(preds, refs, mteval)
    return {"bleu": bleu, "nist": nist, **coco_scores(preds, refs)}


def check_shapes(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> None:
    """One prediction string per input, one list of reference strings per input."""
    if isinstance(predictions, str) or any(isinstance(r, str) for r in references):
        raise TypeError("predictions must be a list of strings and references a list of lists of strings")
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} reference groups")
    if not predictions:
        raise ValueError("nothing to score: no predictions")


def _check(predictions: Sequence[str], references: Sequence[Sequence[str]]):
    """measure_scores.py reads lines and strips them: a segment never holds a line break (one
    inside a string here becomes a space) and has no outer whitespace; references must be
    non-empty."""
    check_shapes(predictions, references)

    def line(text: str) -> str:
        return text.replace("\r", " ").replace("\n", " ").strip()

    preds = [line(p) for p in predictions]
    refs = [[line(r) for r in group] for group in references]
    for i, group in enumerate(refs):
        if not group or any(not r for r in group):
            raise ValueError(f"reference group {i} is empty or holds an empty reference")
    return preds, refs
