"""E2E NLG Challenge scores (paper Table 1) exactly as tuetschek/e2e-metrics' measure_scores.py
computes them: BLEU and NIST with mteval-v13a's definitions, METEOR 1.5, ROUGE-L and CIDEr(-D)
with the coco-caption code. All values are what measure_scores.py prints: BLEU, METEOR, ROUGE-L
as fractions (0..1), NIST on its own scale (about 8-9 for good E2E systems), CIDEr (about 2.5).
Nothing is rounded (measure_scores.py prints 4 decimals).

Two scoring procedures give E2E numbers, and they differ by several BLEU points on the same
outputs, so every number says which one produced it (PROCEDURES):

- "paper": the LoRA repository's README, whose pipeline the paper follows. Its decode step writes
  the references of the *tokenised* test file (the lora_format/test.txt form: `Spice .`,
  `it 's`), each stripped, grouped by input, a blank line after each group, and scores them with
  `measure_scores.py REF PRED -p`: the Python mteval (pymteval.py) for BLEU and NIST.
- "official": the E2E challenge's. measure_scores.py reads the raw references straight from
  testset_w_refs.csv (grouping the references of each MR) and, without -p, runs its edited
  mteval-v13a-sig.pl (Perl) for BLEU and NIST.
METEOR, ROUGE-L and CIDEr are computed the same way in both; only their references differ.

BLEU and NIST come in the two flavours measure_scores.py offers (`mteval=`):

- "perl" (measure_scores.py's default): its edited mteval-v13a-sig.pl. References are written
  as one SGML reference set per reference index, segments with fewer references padded with
  empty ones; the edit makes the brevity penalty skip empty references and makes NIST divide
  the total reference length by the mean number of non-empty references per segment.
- "python" (measure_scores.py -p): its pymteval.py re-implementation. Same BLEU on real outputs
  (corpus BLEU differs only for outputs shorter than 4 tokens or with no 4-gram match, where the
  two smooth differently); NIST differs in the average reference length of the length penalty
  (sum over segments of each segment's mean reference length), which matters only when outputs
  are shorter than the references on average. With a human reference as the "system" on all 630
  test inputs the official tools give NIST 9.0212 (perl) and 9.0185 (python), the same BLEU
  0.6183.

Both are written out here (pymteval is not on PyPI, the Perl script needs Perl, XML::Twig and
SGML files, and sacrebleu's 13a BLEU, which equals mteval's on ASCII text as a test shows, has no
NIST and lowercases beyond ASCII): they are small n-gram counts, and the details that decide the
last digits (mteval's tokenisation, ASCII-only lowercasing, the "closest reference, ties to the
shorter" length, NIST's information weights counted over all references of the test set and its
length penalty) are spelled out below. METEOR, ROUGE-L and CIDEr are the coco-caption code: its
PTB tokenizer and METEOR jar (java.py) and pycocoevalcap's Rouge and Cider classes.

An empty prediction is an output like any other, as in measure_scores.py: an empty hypothesis
(no tokens for the Perl mteval, one empty token for pymteval, which splits on " "; an empty line
for the PTB tokenizer and METEOR; one empty token for ROUGE-L and CIDEr). Only the references
must be non-empty.
"""

from __future__ import annotations

import csv
import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

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
                     mteval: str) -> tuple[float, float]:
    """Corpus BLEU (fraction) and NIST of e2e-metrics; `mteval` picks the Perl or Python scorer
    (no default: which one is part of the scoring procedure, see PROCEDURES)."""
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
                mteval: str) -> dict[str, float]:
    """The five E2E metrics of e2e-metrics' measure_scores.py for one prediction per input and
    that input's references: {"bleu", "nist", "meteor", "rouge_l", "cider"}.

    mteval="perl" is measure_scores.py as run without options; "python" is its -p flag (the LoRA
    README's command). A procedure (score_procedure) fixes both this and the references.
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


# ------------------------------------------------------------------------------------------------
# The two scoring procedures

@dataclass(frozen=True)
class Procedure:
    name: str
    mteval: str       # BLEU/NIST flavour
    references: str   # "tokenised" (the LoRA test file's form) or "raw" (testset_w_refs.csv)
    description: str  # one line, printed beside its numbers


PROCEDURES: dict[str, Procedure] = {
    "paper": Procedure(
        "paper", "python", "tokenised",
        "the LoRA repository's (the paper's numbers): references of the tokenised test file "
        "(lora_format/test.txt form), stripped, grouped by input; measure_scores.py -p "
        "(Python mteval BLEU/NIST)"),
    "official": Procedure(
        "official", "perl", "raw",
        "the E2E challenge's: raw references of testset_w_refs.csv grouped by MR; "
        "measure_scores.py (mteval-v13a Perl BLEU/NIST)"),
}
DEFAULT_PROCEDURE = "paper"
# Scores computed before the procedures were named: tokenised references with the Perl mteval.
# Neither procedure; kept only under this name, never shown as either.
LEGACY = "legacy"
LEGACY_DESCRIPTION = ("tokenised references with the Perl mteval: neither the paper's nor the "
                      "challenge's procedure (scored before the procedures were named)")


def get_procedure(name: str) -> Procedure:
    if name not in PROCEDURES:
        raise ValueError(f"unknown E2E scoring procedure {name!r}; valid: {', '.join(PROCEDURES)}")
    return PROCEDURES[name]


def score_procedure(name: str, predictions: Sequence[str],
                    references: Sequence[Sequence[str]]) -> dict[str, float]:
    """The five metrics with procedure `name`'s BLEU/NIST flavour. `references` must be that
    procedure's (paper: the tokenised test references; official: the raw ones)."""
    return e2e_metrics(list(predictions), [list(r) for r in references], mteval=get_procedure(name).mteval)


def score_procedures(predictions: Sequence[str], references: dict[str, Sequence[Sequence[str]]]) -> dict:
    """Scores of several procedures at once, {name: references} in, {name: metrics} out; each
    procedure's jars run in their own threads (METEOR loads its paraphrase table per run)."""
    for name in references:
        get_procedure(name)
    return java.run_parallel({name: (score_procedure, name, predictions, refs)
                              for name, refs in references.items()})


# ------------------------------------------------------------------------------------------------
# The input files of measure_scores.py

def split_lines(text: str) -> list[str]:
    """measure_scores.py's read_lines: it iterates a codecs reader, which breaks lines at every
    Unicode line boundary (as str.splitlines), and strips each line. A last line break ends the
    last line; it does not add an empty one."""
    return [line.strip() for line in text.splitlines()]


def read_reference_blocks(text: str, name: str = "references") -> list[list[str]]:
    """References in measure_scores.py's text format: one reference per line, a blank line after
    each input's group. A file without blank lines holds one reference per input (as
    measure_scores.py reads it). Two blank lines in a row would give e2e-metrics an input without
    references, which its scorers cannot score: a ValueError here."""
    blocks: list[list[str]] = [[]]
    for number, line in enumerate(split_lines(text), start=1):
        if line:
            blocks[-1].append(line)
        elif blocks[-1]:
            blocks.append([])
        else:
            raise ValueError(f"{name}: line {number} is blank after a blank line (or at the start): "
                             f"an input without references; separate groups by exactly one blank line")
    if not blocks[-1]:
        blocks.pop()
    if not blocks:
        raise ValueError(f"{name}: no references")
    if len(blocks) == 1:
        return [[ref] for ref in blocks[0]]
    return blocks


# Column names measure_scores.py recognises (matched at the start of the header, any case).
_MR_COLUMN = re.compile(r"(mr|src|source|meaning([_ .-]rep(resentation)?)?|da|dial(ogue)?[_ .-]act)s?", re.I)
_REF_COLUMN = re.compile(r"(trg|tgt|target|ref(erence)?|human([_ .-]ref(erence)?)?)s?", re.I)
# measure_scores.py repairs these mis-encodings of the official files before parsing.
_ENCODING_FIXES = (("Ł", "£"), ("Â£", "£"), ("Ã©", "é"), ("ã©", "é"))


def looks_like_reference_table(path: str, text: str) -> bool:
    """measure_scores.py takes a .csv/.tsv file name as a table of (MR, reference) rows; a file
    whose first line is such a header (e.g. the official `"mr","ref"`) is one too."""
    if re.search(r"\.[ct]sv$", path, re.I):
        return True
    lines = [line for line in split_lines(text) if line]
    if not lines:
        return False
    first = lines[0].lstrip("\ufeff")
    header = next(csv.reader([first], delimiter="\t" if "\t" in first else ","))
    return (len(header) >= 2 and sum(bool(_MR_COLUMN.match(c)) for c in header) == 1
            and sum(bool(_REF_COLUMN.match(c)) for c in header) == 1)


def read_reference_table(text: str, name: str = "references") -> list[tuple[str, str]]:
    """(MR, reference) rows of a CSV/TSV file as measure_scores.py's read_tsv reads it: stripped
    lines, a BOM and four mis-encodings repaired, blank lines dropped, tab-separated if the first
    line has a tab, and a header naming exactly one MR column and one reference column. (Without
    a header measure_scores.py fails, so a header is required here.)"""
    lines = split_lines(text)
    if lines:
        lines[0] = lines[0].replace("\ufeff", "")
    for bad, good in _ENCODING_FIXES:
        lines = [line.replace(bad, good) for line in lines]
    lines = [line for line in lines if line]
    if not lines:
        raise ValueError(f"{name}: no rows")
    rows = list(csv.reader(lines, delimiter="\t" if "\t" in lines[0] else ","))
    header = rows[0]
    mr_cols = [i for i, c in enumerate(header) if _MR_COLUMN.match(c)]
    ref_cols = [i for i, c in enumerate(header) if _REF_COLUMN.match(c)]
    if len(mr_cols) != 1 or len(ref_cols) != 1:
        raise ValueError(
            f"{name}: a references table needs a header with exactly one MR column (mr, src, source, "
            f"meaning_representation, da, dialogue_act) and one reference column (ref, reference, "
            f"target, trg, tgt, human_reference); found {header}")
    bad = [number for number, row in enumerate(rows[1:], start=1) if len(row) != len(header)]
    if bad:
        raise ValueError(f"{name}: rows {bad[:10]} do not have the header's {len(header)} columns")
    return [(row[mr_cols[0]], row[ref_cols[0]]) for row in rows[1:]]


def group_consecutive(rows: Sequence[tuple[str, str]]) -> list[list[str]]:
    """measure_scores.py's grouping for a plain-text prediction file (no MRs to match): the
    references of consecutive rows with the same MR form one input's group."""
    groups: list[list[str]] = []
    previous = None
    for mr, ref in rows:
        if not groups or mr != previous:
            groups.append([])
        groups[-1].append(ref)
        previous = mr
    return groups


def group_by_mr(rows: Sequence[tuple[str, str]]) -> dict[str, list[str]]:
    """measure_scores.py's grouping when the outputs come with their MRs: all references of an MR."""
    groups: dict[str, list[str]] = {}
    for mr, ref in rows:
        groups.setdefault(mr, []).append(ref)
    return groups


OFFICIAL_TEST_FILE = "testset_w_refs.csv"


def official_test_references(data_dir: str | Path | None) -> tuple[dict[str, list[str]], str]:
    """The official procedure's references, {raw MR: raw references}, and where they came from:
    data_dir/testset_w_refs.csv read as measure_scores.py reads it, or without data_dir the same
    rows from the hub dataset the E2E task loads (repaired the same way)."""
    if data_dir is not None:
        path = Path(data_dir) / OFFICIAL_TEST_FILE
        if not path.is_file():
            raise FileNotFoundError(f"the official procedure reads the raw E2E references from "
                                    f"{OFFICIAL_TEST_FILE}; not found: {path.resolve()}")
        rows = read_reference_table(path.read_text(encoding="utf-8"), str(path))
        return group_by_mr(rows), f"{path.resolve()} ({len(rows)} references)"
    from datasets import load_dataset

    from deltalora_repro.tasks.e2e_data import HUB_DATASET
    split = load_dataset(HUB_DATASET, split="test")
    fixed = []
    for mr, ref in zip(split["meaning_representation"], split["human_reference"], strict=True):
        for bad, good in _ENCODING_FIXES:
            mr, ref = mr.replace(bad, good), ref.replace(bad, good)
        fixed.append((mr, ref))
    return group_by_mr(fixed), f"hub {HUB_DATASET} test ({len(fixed)} references)"


def paper_references(references: Sequence[Sequence[str]]) -> list[list[str]]:
    """The paper procedure's references from the tokenised test references grouped by input:
    the LoRA decode step strips each one (the tokenised lines end with a space)."""
    return [[r.strip() for r in group] for group in references]


def score_test_procedures(predictions: Sequence[str], tokenised_references: Sequence[Sequence[str]],
                          mrs: Sequence[str], raw_references: dict[str, list[str]] | None,
                          names: Sequence[str] = tuple(PROCEDURES)) -> dict:
    """Test-set scores of a run under each named procedure: {"procedure": the reported one
    (paper when scored), "procedures": {name: metrics}, **the reported one's metrics}.
    `tokenised_references` are the task's references of each input (the LoRA test file's form),
    `mrs` each input's raw MR, by which the official procedure finds its raw references in
    `raw_references` (official_test_references)."""
    if len(mrs) != len(tokenised_references):
        raise ValueError(f"{len(mrs)} MRs but {len(tokenised_references)} reference groups")
    references: dict[str, list[list[str]]] = {}
    for name in names:
        if get_procedure(name).references == "tokenised":
            references[name] = paper_references(tokenised_references)
            continue
        if raw_references is None:
            raise ValueError(f"procedure {name!r} needs the raw test references")
        missing = [mr for mr in mrs if mr not in raw_references]
        if missing:
            raise ValueError(f"no raw references for the test MR {missing[0]!r} ({len(missing)} MRs missing)")
        references[name] = [raw_references[mr] for mr in mrs]
    by_procedure = score_procedures(predictions, references)
    primary = DEFAULT_PROCEDURE if DEFAULT_PROCEDURE in by_procedure else names[0]
    return {**by_procedure[primary], "procedure": primary,
            "procedures": {name: by_procedure[name] for name in references}}
