"""XSum scores (paper Table 3): ROUGE-1, ROUGE-2, ROUGE-L and ROUGE-Lsum as fractions (0..1).

The paper takes its XSum setting from AdaLoRA, whose summarisation script is Hugging Face's
run_summarization: predictions and references are split into sentences (nltk.sent_tokenize),
joined with "\\n", and scored by Google's `rouge_score` with the Porter stemmer. We call
`rouge_score` directly (RougeScorer, use_stemmer=True), with two deliberate differences:

- Aggregation: the mean F-measure over examples. The Hugging Face `rouge` metric by default
  reports the "mid" of rouge_score's BootstrapAggregator, the median of 1000 bootstrap resamples'
  means: a random estimate of the same mean (it moves in the fourth decimal), so the exact mean
  is reported instead.
- Sentence splitting: nltk's sent_tokenize needs the punkt model, which is not available offline
  (and nltk.download is never called here), so `split_sentences` below stands in for it. Only
  ROUGE-Lsum depends on it: rouge_score's tokenizer lowercases and replaces every character
  other than a-z and 0-9 by a space, so a newline changes nothing for ROUGE-1/2/L. XSum's
  references are single sentences by construction (the article's introductory sentence), so the
  splitter rarely has anything to split, which is why the paper's ROUGE-L and ROUGE-Lsum agree to
  0.01.
"""
from __future__ import annotations

import re
from collections.abc import Sequence

from rouge_score import rouge_scorer

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")

# Titles that end in a period without ending a sentence before a capitalised name; punkt learns
# abbreviations like these from data. Compared lowercased, without the period. (BBC style, and so
# XSum, mostly writes "Mr Smith" without one.)
_ABBREVIATIONS = frozenset({"mr", "mrs", "ms", "dr", "prof", "st", "sr", "jr", "rev", "gen", "col",
                            "lt", "sgt", "capt", "gov", "sen", "rep", "vs"})

# A candidate boundary: sentence-final punctuation, optionally closing quotes or brackets, then
# whitespace, then what can start a sentence (an uppercase letter or a digit, possibly behind an
# opening quote or bracket).
_BOUNDARY = re.compile(r"[.!?][\"'\u201d\u2019)\]]*(\s+)(?=[\"'\u201c\u2018(\[]?[A-Z0-9])")
_WORD_BEFORE = re.compile(r"(\w+)\.$")


def split_sentences(text: str) -> list[str]:
    """Sentences of `text`, deterministic and data-free (a stand-in for nltk.sent_tokenize).

    A sentence ends after ".", "!" or "?" (and any closing quotes or brackets) when whitespace and
    then an uppercase letter, a digit or an opening quote follow. A period does not end a sentence
    after a title abbreviation ("Mr. Smith") or a single capital initial ("J. K. Rowling").
    Whitespace inside a sentence is kept as it is; an empty or blank text has no sentences.
    """
    sentences, start = [], 0
    for match in _BOUNDARY.finditer(text):
        end = match.start(1)                       # just after the punctuation (and quotes)
        head = text[start:end].rstrip("\"'\u201d\u2019)]")
        word = _WORD_BEFORE.search(head)
        if word is not None and (word.group(1).lower() in _ABBREVIATIONS
                                 or re.fullmatch(r"[A-Z]", word.group(1))):
            continue
        sentences.append(text[start:end].strip())
        start = match.end(1)
    sentences.append(text[start:].strip())
    return [s for s in sentences if s]


def _check(predictions: Sequence[str], references: Sequence[str]) -> None:
    if isinstance(predictions, str) or isinstance(references, str):
        raise ValueError("predictions and references must be sequences of strings, not one string")
    if len(predictions) == 0:
        raise ValueError("no predictions to score")
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references; "
                         "XSum has exactly one reference per prediction")
    for name, texts in (("prediction", predictions), ("reference", references)):
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise ValueError(f"{name} {i} is a {type(t).__name__}, not a string")


def xsum_rouge(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """ROUGE-1/2/L/Lsum F-measures, each the mean over examples (fractions, not percentages).

    One reference per prediction. ROUGE-1, -2 and -L are scored on the texts as given; ROUGE-Lsum
    (summary-level LCS over sentences) on the texts split by `split_sentences` and joined with
    "\\n", which is how rouge_score reads sentence boundaries. Stemming is on, as in the paper's
    (AdaLoRA's) setup. An empty prediction scores 0.
    """
    _check(predictions, references)
    plain = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    summary = rouge_scorer.RougeScorer(["rougeLsum"], use_stemmer=True)
    totals = dict.fromkeys(ROUGE_TYPES, 0.0)
    for pred, ref in zip(predictions, references):
        scores = plain.score(ref, pred)              # rouge_score's order: (target, prediction)
        scores.update(summary.score("\n".join(split_sentences(ref)),
                                    "\n".join(split_sentences(pred))))
        for key in ROUGE_TYPES:
            totals[key] += scores[key].fmeasure
    return {key: value / len(predictions) for key, value in totals.items()}
