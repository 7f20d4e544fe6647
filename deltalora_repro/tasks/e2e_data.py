"""Load E2E NLG in the exact text form the LoRA repository trains and scores on.

The LoRA repository (whose NLG pipeline Delta-LoRA follows) does not feed the raw CSV to GPT-2.
Each line of its ``data/e2e/{train,valid,test}.txt`` is ``context||reference␠``:

* context: the meaning representation with three slots renamed (``eatType`` -> ``Type``,
  ``familyFriendly`` -> ``family friendly``, ``priceRange`` -> ``price``; the rest keep their
  name), rendered ``slot : value`` and joined by `` | ``, values word-tokenised
  (``£20-25`` -> ``£ 20 - 25``);
* reference: the human reference word-tokenised, tokens joined by one space; the file writes one
  space after it, but the repository strips every line before encoding it (format_converting_e2e.py),
  so the text it trains on, and the text held here, ends with the last token (``… .``). Keeping that
  space would add one token (GPT-2's ``Ġ``) before the end token of every target.

Reading the repository's own valid.txt and test.txt (shared/data/e2e/lora_format) shows that the
two files were tokenised by *different* tools, so one tokeniser cannot reproduce both:

* valid.txt (and so, we infer, train.txt, which came with it): Punkt sentence splitting, then
  Moses-style tokenisation with aggressive hyphen splitting and the ``@-@`` marks turned back into
  ``-``: ``isn't`` -> ``isn 't``, ``family-friendly`` -> ``family - friendly``, a word-final period
  kept before a lowercase word inside a sentence (``out of 5. in the city``) but split at a
  sentence end (``food. it is`` -> ``food . it is``), ``..`` kept as one token.
* test.txt: spaCy-2.0-style English rules: ``isn't`` -> ``is n't``, ``thats`` -> ``that s``,
  ``5-star`` and ``E20-E25`` left whole, ``Cricketers,located`` split at the comma.

Both tokenisers below are written from those observed rules (no tokenisation library reproduces
both, and neither tool is a dependency of this project); converting devset.csv and
testset_w_refs.csv reproduces valid.txt and test.txt line for line, up to the trailing space each
line carries (tests/test_e2e_data.py).
The train split uses the valid.txt rules: train.txt is not available to check against.

``data_dir=None`` reads ``tuetschek/e2e_nlg`` from the Hugging Face hub (same rows as the CSVs).
"""

from __future__ import annotations

import csv
import functools
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from deltalora_repro.errors import ConfigError, DataError

HUB_DATASET = "tuetschek/e2e_nlg"

SPLITS = ("train", "validation", "test")

# The official release's file for each split (tuetschek/e2e-dataset).
_CSV_FILES = {"train": "trainset.csv", "validation": "devset.csv", "test": "testset_w_refs.csv"}

# Which of the two observed tokenisations the LoRA repository's file for each split uses.
SPLIT_STYLE = {"train": "moses", "validation": "moses", "test": "spacy"}

# Slot names the LoRA repository renames; every other slot keeps its E2E name.
_SLOT_NAMES = {"eatType": "Type", "familyFriendly": "family friendly", "priceRange": "price"}


@dataclass(frozen=True)
class NLGExample:
    """One (input, reference) pair of a data-to-text task, in the LoRA repository's text form."""

    context: str  # what the model is conditioned on
    reference: str  # one reference text, what the model is trained to produce
    group: str  # groups the references of one input (raw MR for E2E; entry id for WebNLG)
    category: str | None = None  # WebNLG category
    seen: bool | None = None  # WebNLG: category present in train


@dataclass
class NLGSplit:
    examples: list[NLGExample]
    source: str  # provenance, e.g. "/abs/path/testset_w_refs.csv (4693 rows)"


def group_references(examples: list[NLGExample]) -> list[tuple[NLGExample, list[str]]]:
    """One entry per distinct group, in order of first appearance, with all its references.

    Scoring is one prediction per input against all of that input's references (630 inputs on
    the E2E test set); the example returned for a group is its first one.
    """
    firsts: dict[str, NLGExample] = {}
    references: dict[str, list[str]] = {}
    for example in examples:
        if example.group not in firsts:
            firsts[example.group] = example
            references[example.group] = []
        references[example.group].append(example.reference)
    return [(firsts[group], references[group]) for group in firsts]


def load_e2e(split: str, data_dir: str | Path | None = None) -> NLGSplit:
    """One E2E split in the LoRA repository's form.

    data_dir None reads ``tuetschek/e2e_nlg`` from the hub; otherwise it is the folder holding
    the official CSVs (trainset.csv, devset.csv, testset_w_refs.csv).
    """
    if split not in SPLITS:
        raise ConfigError(f"unknown E2E split {split!r}; valid splits: {', '.join(SPLITS)}")
    if data_dir is None:
        return _load_from_hub(split)
    path = Path(data_dir) / _CSV_FILES[split]
    if not path.is_file():
        raise DataError(f"missing E2E file for split {split!r}; looked for: {path.resolve()}")
    rows = _read_csv(path)
    style = SPLIT_STYLE[split]
    examples = []
    for line_number, mr, ref in rows:
        try:
            examples.append(convert_e2e(mr, ref, style))
        except ValueError as error:
            raise DataError(f"{path.resolve()}, line {line_number}: {error}") from None
    return NLGSplit(examples, f"{path.resolve()} ({len(examples)} rows)")


def convert_e2e(mr: str, ref: str, style: str) -> NLGExample:
    """One CSV row as an example; style is "moses" (train/valid files) or "spacy" (test file)."""
    if style not in _TOKENIZERS:
        valid = ", ".join(_TOKENIZERS)
        raise ConfigError(f"unknown E2E tokenisation style {style!r}; valid styles: {valid}")
    tokenize = _TOKENIZERS[style]
    # No trailing space: the repository's line is "context||reference " and it strips the line
    # before encoding, so the completion it encodes ends with the last word token.
    return NLGExample(context=_cached_mr(mr, style), reference=" ".join(tokenize(ref)), group=mr)


@functools.lru_cache(maxsize=16384)
def _cached_mr(mr: str, style: str) -> str:
    # Each MR comes with about nine references: render it once.
    return format_mr(mr, _TOKENIZERS[style])


def format_mr(mr: str, tokenize: Callable[[str], list[str]]) -> str:
    """``name[Blue Spice], eatType[pub]`` -> ``name : Blue Spice | Type : pub``."""
    slots = parse_mr(mr)
    return " | ".join(
        f"{_SLOT_NAMES.get(slot, slot)} : {_tokenized_value(value, tokenize)}" for slot, value in slots
    )


@functools.lru_cache(maxsize=4096)
def _tokenized_value(value: str, tokenize: Callable[[str], list[str]]) -> str:
    # E2E has a few hundred distinct slot values repeated over 50k rows: tokenise each once.
    return " ".join(tokenize(value))


_MR_SLOT = re.compile(r"\s*([^\[\],]+?)\s*\[([^\[\]]*)\]\s*(,|$)")


def parse_mr(mr: str) -> list[tuple[str, str]]:
    """The (slot, value) pairs of an E2E meaning representation, in order; ValueError if malformed."""
    slots = []
    position = 0
    while position < len(mr):
        match = _MR_SLOT.match(mr, position)
        if match is None:
            raise ValueError(f"malformed meaning representation {mr!r} at character {position}")
        slots.append((match.group(1), match.group(2)))
        position = match.end()
    if not slots:
        raise ValueError(f"empty meaning representation {mr!r}")
    return slots


# --------------------------------------------------------------------------------------------
# Reading


def _read_csv(path: Path) -> list[tuple[int, str, str]]:
    """(line number, mr, ref) rows of an official E2E CSV, checking its header and field counts."""
    rows = []
    with path.open(encoding="utf-8", newline="") as handle:
        reader = csv.reader(handle)
        try:
            header = next(reader, None)
            if header is None or [column.strip() for column in header] != ["mr", "ref"]:
                raise DataError(f"{path.resolve()}, line 1: expected the header 'mr,ref', found {header}")
            for fields in reader:
                if not fields:
                    continue
                if len(fields) != 2:
                    problem = f"expected 2 fields (mr, ref), found {len(fields)}"
                    raise DataError(f"{path.resolve()}, line {reader.line_num}: {problem}")
                rows.append((reader.line_num, fields[0], fields[1]))
        except csv.Error as error:
            raise DataError(f"{path.resolve()}, line {reader.line_num}: {error}") from None
    return rows


def _load_from_hub(split: str) -> NLGSplit:
    from deltalora_repro.tasks.base import load_hub_dataset
    dataset = load_hub_dataset(HUB_DATASET, split=split,
                               local_hint="point data_dir at a folder with the E2E CSVs (trainset.csv, "
                                          "devset.csv, testset_w_refs.csv), e.g. data_dir=../shared/data/e2e")
    style = SPLIT_STYLE[split]
    examples = [
        convert_e2e(mr, ref, style)
        for mr, ref in zip(dataset["meaning_representation"], dataset["human_reference"], strict=True)
    ]
    return NLGSplit(examples, f"hub {HUB_DATASET} {split} ({len(examples)} rows)")


# --------------------------------------------------------------------------------------------
# Tokenisation of valid.txt (and train): Punkt-style sentence ends, then Moses-style rules.
#
# The rules are those the file shows; where a rule needs a word list, the list holds the words
# that list holds in the tool the file was made with (Moses' English non-breaking prefixes,
# Punkt's English abbreviations), restricted to plain words.

# Words after which Moses never splits off a final period (titles, single capitals, ...).
_MOSES_KEEP_PERIOD = frozenset(
    [chr(code) for code in range(ord("A"), ord("Z") + 1)]
    + """Adj Adm Adv Asst Bart Bldg Brig Bros Capt Cmdr Col Comdr Con Corp Cpl DR Dr Drs Ens Gen Gov
    Hon Hr Hosp Insp Lt MM MR MRS MS Maj Messrs Mlle Mme Mr Mrs Ms Msgr Op Ord Pfc Ph Prof Pvt Rep
    Reps Res Rev Rt Sen Sens Sfc Sgt Sr St Supt Surg v vs i.e rev e.g Jan Feb Mar Apr Jun Jul Aug
    Sep Oct Nov Dec""".split()
)
# ... and the ones after which it keeps the period only before a number ("No. 5").
_MOSES_KEEP_PERIOD_BEFORE_NUMBER = frozenset("No Nos Art Nr pp".split())

# Punkt (English) ends a sentence at a word ending in "?" or "!", and at a word ending in one
# period, except after the abbreviations below, and except after a number or a single letter when
# the next word is lowercase. Moses then keeps the period on a word before a lowercase word inside
# a sentence (``out of 5. in the city``) but splits it off at a sentence end (``food . it is``).
# Punkt's further, data-driven exceptions (which capitalised words start sentences, collocations
# such as "5. Review") are not modelled: on every E2E text these rules give the same tokens as
# NLTK's Punkt model followed by Moses (checked on all 51,607 references and slot values).
_PUNKT_ABBREVIATIONS = frozenset(
    """adm ala ariz aug ave bros calif chg cie co col colo conn corp cos ct dec dr feb fla fri ft ga
    gen ill inc jan jr kan ky lt ltd maj messrs mg mich minn mr mrs ms nev nov oct ok okla ore pa
    prof rep reps sen sep sept sr st sw tenn tues va vs vt wash wed wis yr a.m p.m u.s u.k u.n
    u.s.a ph.d d.c""".split()
)
_PUNKT_NUMBER = re.compile(r"-?[.,]?\d[\d,.\-]*")
# Punkt cuts a word before these characters, so "(5." is the word "5." to it.
_PUNKT_WORD_BREAK = re.compile(r"""[)";}\]*:@'({\[!?]""")
_CLOSING = "\"')]}"

_LETTER = r"[^\W\d_]"
_NOT_LETTER = r"[\W\d_]"
# A marker for runs of dots while the other rules run: not a letter, digit, space or dot.
_DOT_MARK = "\ue000"


def _ends_sentence(word: str, next_word: str) -> bool:
    """Whether Punkt ends a sentence after ``word`` (space-delimited) when ``next_word`` follows."""
    core = word.rstrip(_CLOSING)
    if core.endswith(("?", "!")):
        return True
    if not core.endswith(".") or core.endswith(".."):
        return False
    token = _PUNKT_WORD_BREAK.split(core)[-1][:-1].lower()
    next_char = next_word[0] if core == word else word[len(core)]
    if len(token) == 1 and token.isalpha() or _PUNKT_NUMBER.fullmatch(token):
        # Punkt reads an ordinal or an initial here unless the next word looks like a new sentence.
        return not (next_char.islower() or next_char in ";:,.!?")
    if token in _PUNKT_ABBREVIATIONS or token.split("-")[-1] in _PUNKT_ABBREVIATIONS:
        return next_char.isupper()
    return True


def _sentences(text: str) -> list[str]:
    words = text.split()
    sentences: list[list[str]] = [[]]
    for index, word in enumerate(words):
        sentences[-1].append(word)
        if index + 1 < len(words) and word[-1] in ".?!\"')]}" and _ends_sentence(word, words[index + 1]):
            sentences.append([])
    return [" ".join(sentence) for sentence in sentences]


# (character that must occur for the step to do anything, pattern, replacement), in order.
_MOSES_STEPS = [
    # Every character that is not a letter, digit, space or one of . ' ` , - stands alone.
    ("", re.compile(r"[^\w\s.'`,\-]|_"), r" \g<0> "),
    # Hyphens between letters or digits stand alone (Moses writes them @-@; the file has -).
    ("-", re.compile(r"(?<=[^\W_])-(?=[^\W_])"), " - "),
    # A run of two or more dots is one token (kept as a marker until the period rule has run).
    ("..", re.compile(r"\.{2,}"), lambda run: " " + _DOT_MARK * len(run.group()) + " "),
    # Commas stand alone unless between digits (5,300).
    (",", re.compile(r"(\D),"), r"\1 , "),
    (",", re.compile(r",(\D)"), r" , \1"),
    (",", re.compile(r"(\d),$"), r"\1 , "),
    # English apostrophes: the clitic keeps its apostrophe (it 's, isn 't), quotes stand alone.
    ("'", re.compile(rf"({_NOT_LETTER})'({_NOT_LETTER})"), r"\1 ' \2"),
    ("'", re.compile(rf"([^\w]|_)'({_LETTER})"), r"\1 ' \2"),
    ("'", re.compile(rf"({_LETTER})'({_NOT_LETTER})"), r"\1 ' \2"),
    ("'", re.compile(rf"({_LETTER})'({_LETTER})"), r"\1 '\2"),
    ("'", re.compile(r"(\d)'(s)"), r"\1 '\2"),
]
_CONTROL_CHARACTERS = re.compile(r"[\x00-\x1f]")
_HAS_LETTER = re.compile(_LETTER)
_FINAL_PERIOD_QUOTE = re.compile(r"\.' ?$")


def _moses_final_periods(text: str) -> str:
    """Split the period off each word ending in one, unless Moses keeps it there."""
    words = text.split()
    for index, word in enumerate(words):
        if not word.endswith(".") or len(word) < 2:
            continue
        stem = word[:-1]
        next_char = words[index + 1][0] if index + 1 < len(words) else ""
        keep = (
            ("." in stem and _HAS_LETTER.search(stem))
            or stem in _MOSES_KEEP_PERIOD
            or next_char.islower()
            or (stem in _MOSES_KEEP_PERIOD_BEFORE_NUMBER and next_char.isdigit())
        )
        if not keep:
            words[index] = stem + " ."
    return " ".join(words)


def _moses_sentence(text: str) -> list[str]:
    """Moses-style tokens of one sentence (already on one line, single-spaced)."""
    for trigger, pattern, replacement in _MOSES_STEPS:
        if trigger in text:
            text = pattern.sub(replacement, text)
    if "." in text:
        text = _moses_final_periods(text)
    text = " ".join(text.split())
    if "'" in text:
        text = _FINAL_PERIOD_QUOTE.sub(" . ' ", text)
    return text.replace(_DOT_MARK, ".").split()


def tokenize_moses_style(text: str) -> list[str]:
    """Tokens as in the LoRA repository's valid.txt (and train.txt)."""
    text = " ".join(text.split())
    if _CONTROL_CHARACTERS.search(text):
        text = " ".join(_CONTROL_CHARACTERS.sub("", text).split())
    return [token for sentence in _sentences(text) for token in _moses_sentence(sentence)]


# --------------------------------------------------------------------------------------------
# Tokenisation of test.txt: spaCy-2.0-style English rules.
#
# Each space-separated chunk loses prefixes and suffixes one at a time until none is left or the
# rest is a listed exception (contractions); what remains is cut at infixes. Only the rules the
# E2E texts exercise are written out.

_QUOTES = "'\"”“`‘´’‚,„»«"
_ALPHA = "a-zA-Z\u00c0-\u024f"
_LOWER = "a-z\u00df-\u00ff"
_UPPER = "A-Z\u00c0-\u00de"
_PUNCT = r",:;!?¿¡()\[\]{}<>_#*&"
_CURRENCY = "$£€¥"
_QUOTE_CLASS = re.escape(_QUOTES)

_SPACY_PREFIX = re.compile(
    rf"(?:[§%=—–]|\+(?![0-9])|\.\.+|…|[{_PUNCT}]|[{_QUOTE_CLASS}]|US\$|C\$|A\$|[{_CURRENCY}])"
)
_SPACY_SUFFIX = re.compile(
    rf"(?:\.\.+|…|[{_PUNCT}]|[{_QUOTE_CLASS}]|['’][sS]|—|–|(?<=[0-9])\+|(?<=[0-9])[{_CURRENCY}]"
    rf"|(?<=[0-9])(?:km|m|cm|mm|kg|g|mg|lb|oz|mph|ft|%)"
    rf"|(?<=[0-9{_LOWER}%²\-)\]+{_QUOTE_CLASS}])\.|(?<=[{_UPPER}][{_UPPER}])\.)$"
)
_SPACY_INFIX = re.compile(
    rf"\.\.+|…|(?<=[0-9])[+\-*^](?=[0-9-])|(?<=[{_LOWER}])\.(?=[{_UPPER}])"
    rf"|(?<=[{_ALPHA}]),(?=[{_ALPHA}])|(?<=[{_ALPHA}])[?\";:=,.]*(?:---|--|-|–|—|~)(?=[{_ALPHA}])"
    rf"|(?<=[{_ALPHA}\"])[:<>=/](?=[{_ALPHA}])"
)
# Verbs whose negation spaCy splits as verb + "n't" (can't -> ca n't, won't -> wo n't).
_SPACY_NEGATED = frozenset(
    "is are was were do does did have has had could should would might must need ca wo ai sha".split()
)
_SPACY_CONTRACTION = re.compile(
    r"(it|he|she|that|there|what|who|where|here|how|let|i|you|we|they)('s|'re|'ll|'ve|'d|'m)", re.IGNORECASE
)


def _spacy_exception(chunk: str) -> list[str] | None:
    lower = chunk.lower()
    if lower.endswith("n't") and lower[:-3] in _SPACY_NEGATED:
        return [chunk[:-3], chunk[-3:]]
    if lower == "thats":
        return [chunk[:4], chunk[4:]]
    match = _SPACY_CONTRACTION.fullmatch(chunk)
    if match:
        return [match.group(1), match.group(2)]
    return None


_PLAIN_WORD = re.compile(r"[A-Za-z0-9]+")


@functools.lru_cache(maxsize=65536)
def _spacy_chunk(chunk: str) -> tuple[str, ...]:
    if _PLAIN_WORD.fullmatch(chunk) and _spacy_exception(chunk) is None:
        return (chunk,)  # most words: nothing to split (checked first only for speed)
    prefixes: list[str] = []
    suffixes: list[str] = []
    while chunk:
        exception = _spacy_exception(chunk)
        if exception is not None:
            return tuple(prefixes + exception + suffixes)
        match = _SPACY_PREFIX.match(chunk)
        if match:
            prefixes.append(match.group())
            chunk = chunk[match.end() :]
            continue
        match = _SPACY_SUFFIX.search(chunk)
        if match:
            suffixes.insert(0, match.group())
            chunk = chunk[: match.start()]
            continue
        break
    middle = []
    start = 0
    for match in _SPACY_INFIX.finditer(chunk):
        if match.start() == 0:
            continue
        middle += [chunk[start : match.start()], match.group()]
        start = match.end()
    middle.append(chunk[start:])
    return tuple(prefixes + [token for token in middle if token] + suffixes)


def tokenize_spacy_style(text: str) -> list[str]:
    """Tokens as in the LoRA repository's test.txt."""
    return [token for chunk in text.split() for token in _spacy_chunk(chunk)]


_TOKENIZERS: dict[str, Callable[[str], list[str]]] = {
    "moses": tokenize_moses_style,
    "spacy": tokenize_spacy_style,
}
