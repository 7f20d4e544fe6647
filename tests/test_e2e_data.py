"""E2E loading: the conversion must rebuild the LoRA repository's valid.txt and test.txt exactly."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest

from deltalora_repro.errors import ConfigError, DataError
from deltalora_repro.tasks.e2e_data import (
    NLGExample,
    NLGSplit,
    format_mr,
    group_references,
    load_e2e,
    parse_mr,
    tokenize_moses_style,
    tokenize_spacy_style,
)
from .conftest import DATA

SHARED_DATA = DATA   # beside the repository, never inside it (see shared/data/SOURCES.md)
E2E_DIR = SHARED_DATA / "e2e"
LORA_DIR = E2E_DIR / "lora_format"

needs_e2e = pytest.mark.skipif(
    not (E2E_DIR / "devset.csv").is_file() or not (LORA_DIR / "valid.txt").is_file(),
    reason=f"E2E CSVs and the LoRA repository's valid/test.txt not found under {E2E_DIR}",
)


def _lora_lines(name: str) -> list[str]:
    text = (LORA_DIR / name).read_text(encoding="utf-8")
    assert text.endswith("\n")
    return text[:-1].split("\n")


def _as_lines(split: NLGSplit) -> list[str]:
    # The repository's files end every line with one space after the reference; the reference
    # text itself (what gets encoded) has none.
    return [f"{example.context}||{example.reference} " for example in split.examples]


@pytest.fixture(scope="module")
def validation() -> NLGSplit:
    return load_e2e("validation", E2E_DIR)


@pytest.fixture(scope="module")
def test_split() -> NLGSplit:
    return load_e2e("test", E2E_DIR)


# --------------------------------------------------------------------------------------------
# The hard requirement: line-for-line equality with the LoRA repository's files


def _assert_same_lines(ours: list[str], theirs: list[str]) -> None:
    assert len(ours) == len(theirs)
    mismatches = [(i + 1, a, b) for i, (a, b) in enumerate(zip(ours, theirs)) if a != b]
    assert not mismatches, f"{len(mismatches)} lines differ; first: {mismatches[0]}"


def _assert_encoded_strings(split: NLGSplit, lines: list[str]) -> None:
    # What format_converting_e2e.py hands on for each line: the line stripped, then cut at "||".
    expected = [tuple(line.strip().split("||")) for line in lines]
    assert [(e.context, e.reference) for e in split.examples] == expected


@needs_e2e
def test_devset_conversion_equals_lora_valid_txt(validation: NLGSplit) -> None:
    lines = _lora_lines("valid.txt")
    assert len(lines) == 4672
    _assert_same_lines(_as_lines(validation), lines)
    _assert_encoded_strings(validation, lines)
    assert validation.source == f"{(E2E_DIR / 'devset.csv').resolve()} (4672 rows)"


@needs_e2e
def test_testset_conversion_equals_lora_test_txt(test_split: NLGSplit) -> None:
    lines = _lora_lines("test.txt")
    assert len(lines) == 4693
    _assert_same_lines(_as_lines(test_split), lines)
    _assert_encoded_strings(test_split, lines)


@needs_e2e
def test_golden_lines(validation: NLGSplit, test_split: NLGSplit) -> None:
    # Written out so a reader sees the format without opening the files.
    assert _as_lines(validation)[0] == (
        "name : Alimentum | area : city centre | family friendly : no||There is a place in the city "
        "centre , Alimentum , that is not family - friendly . "
    )
    assert _as_lines(test_split)[0] == (
        "name : Blue Spice | Type : coffee shop | area : city centre||A coffee shop in the city centre "
        "area called Blue Spice . "
    )
    first = test_split.examples[0]
    assert first.group == "name[Blue Spice], eatType[coffee shop], area[city centre]"
    assert first.category is None and first.seen is None


@needs_e2e
def test_test_references_group_by_mr(test_split: NLGSplit) -> None:
    groups = group_references(test_split.examples)
    assert len(groups) == 630  # the official number of test MRs: one prediction each
    assert sum(len(references) for _, references in groups) == 4693
    first, references = groups[0]
    assert first.context == "name : Blue Spice | Type : coffee shop | area : city centre"
    assert references == [
        "A coffee shop in the city centre area called Blue Spice .",
        "Blue Spice is a coffee shop in city centre .",
    ]
    assert max(len(references) for _, references in groups) == 45
    assert len({example.group for example, _ in groups}) == 630


@needs_e2e
def test_train_is_built_with_the_valid_txt_rules() -> None:
    train = load_e2e("train", E2E_DIR)
    assert len(train.examples) == 42061
    assert len(group_references(train.examples)) == 4862
    lines = _as_lines(train)
    assert lines[0] == (
        "name : The Vaults | Type : pub | price : more than £ 30 | customer rating : 5 out of 5 | "
        "near : Café Adriatic||The Vaults pub near Café Adriatic has a 5 star rating . Prices start "
        "at £ 30 . "
    )
    # valid.txt's clitic style (isn 't), not test.txt's (is n't).
    assert lines[101] == (
        "name : Loch Fyne | Type : restaurant | food : Fast food | family friendly : no||Loch Fyne is "
        "a restaurant providing fast food services , but it isn 't family - friendly . "
    )
    assert all(line.endswith(" ") and "  " not in line for line in lines)
    # Stripping the rebuilt line would change no reference, and none holds the "||" separator.
    assert not [e.reference for e in train.examples
                if e.reference != e.reference.strip() or "||" in e.reference]


# --------------------------------------------------------------------------------------------
# The rules themselves, on small inputs


def test_mr_rendering() -> None:
    mr = "name[Blue Spice], eatType[pub], familyFriendly[no]"
    assert parse_mr(mr) == [("name", "Blue Spice"), ("eatType", "pub"), ("familyFriendly", "no")]
    expected = "name : Blue Spice | Type : pub | family friendly : no"
    assert format_mr(mr, tokenize_moses_style) == expected
    assert format_mr(mr, tokenize_spacy_style) == expected
    priced = "name[Cocum], priceRange[£20-25], customer rating[high], near[Café Sicilia]"
    assert format_mr(priced, tokenize_moses_style) == (
        "name : Cocum | price : £ 20 - 25 | customer rating : high | near : Café Sicilia"
    )


@pytest.mark.parametrize(
    "text, valid_style, test_style",
    [
        ("Blue Spice.", "Blue Spice .", "Blue Spice ."),
        ("it's near", "it 's near", "it 's near"),
        ("It isn't non-family", "It isn 't non - family", "It is n't non - family"),
        ("a  5-star  pub", "a 5 - star pub", "a 5-star pub"),
        ("coffee shop thats", "coffee shop thats", "coffee shop that s"),
        ("near it,they", "near it , they", "near it , they"),
        ("rated 5. in the city", "rated 5. in the city", "rated 5 . in the city"),
        ("serves food. it is", "serves food . it is", "serves food . it is"),
        ("rated high.. Yes", "rated high .. Yes", "rated high .. Yes"),
        ("costs £20-£25.", "costs £ 20- £ 25 .", "costs £ 20-£25 ."),
    ],
)
def test_two_tokenisations(text: str, valid_style: str, test_style: str) -> None:
    assert " ".join(tokenize_moses_style(text)) == valid_style
    assert " ".join(tokenize_spacy_style(text)) == test_style


def test_group_references_keeps_first_appearance_order() -> None:
    examples = [
        NLGExample("b", "r1", "B"),
        NLGExample("a", "r2", "A"),
        NLGExample("b", "r3", "B"),
    ]
    groups = group_references(examples)
    pairs = [(first.context, references) for first, references in groups]
    assert pairs == [("b", ["r1", "r3"]), ("a", ["r2"])]
    assert group_references([]) == []


# --------------------------------------------------------------------------------------------
# Errors


def _write_csv(folder: Path, name: str, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(text, encoding="utf-8")
    return path


def test_unknown_split_lists_valid_ones() -> None:
    with pytest.raises(ConfigError, match="train, validation, test"):
        load_e2e("dev", "/nonexistent")


def test_missing_file_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="looked for: .*testset_w_refs.csv"):
        load_e2e("test", tmp_path)


def test_malformed_rows_name_file_and_line(tmp_path: Path) -> None:
    _write_csv(tmp_path, "devset.csv", 'mr,ref\n"name[A], food[B]",Fine.\n"name[A]",x,extra\n')
    with pytest.raises(DataError, match=r"devset.csv, line 3: expected 2 fields"):
        load_e2e("validation", tmp_path)
    _write_csv(tmp_path, "devset.csv", 'mr,ref\n"name[A], food[B]",Fine.\n"name[A], food B",Bad MR.\n')
    with pytest.raises(DataError, match=r"devset.csv, line 3: malformed meaning representation"):
        load_e2e("validation", tmp_path)
    _write_csv(tmp_path, "devset.csv", "meaning,text\nname[A],x\n")
    with pytest.raises(DataError, match=r"devset.csv, line 1: expected the header 'mr,ref'"):
        load_e2e("validation", tmp_path)


def test_small_local_file_round_trip(tmp_path: Path) -> None:
    row = '"name[Zizzi], eatType[pub]","Zizzi isn\'t a pub.  It\'s a café."'
    _write_csv(tmp_path, "trainset.csv", f"mr,ref\r\n{row}\r\n")
    split = load_e2e("train", tmp_path)
    assert split.examples == [
        NLGExample(
            context="name : Zizzi | Type : pub",
            reference="Zizzi isn 't a pub . It 's a café .",
            group="name[Zizzi], eatType[pub]",
        )
    ]
    assert split.source.endswith("trainset.csv (1 rows)")


# --------------------------------------------------------------------------------------------
# Hub path (no network in tests: a fake `datasets` module stands in)


def test_hub_path_uses_the_same_conversion(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def fake_load_dataset(name, split):
        calls.append((name, split))
        return {
            "meaning_representation": ["name[Blue Spice], eatType[pub], familyFriendly[no]"],
            "human_reference": ["Blue Spice isn't family-friendly."],
        }

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=fake_load_dataset))
    test = load_e2e("test")
    validation = load_e2e("validation")
    assert calls == [("tuetschek/e2e_nlg", "test"), ("tuetschek/e2e_nlg", "validation")]
    context = "name : Blue Spice | Type : pub | family friendly : no"
    assert test.examples[0].context == validation.examples[0].context == context
    assert test.examples[0].reference == "Blue Spice is n't family - friendly ."
    assert validation.examples[0].reference == "Blue Spice isn 't family - friendly ."
    assert test.source == "hub tuetschek/e2e_nlg test (1 rows)"
