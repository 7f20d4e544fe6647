"""WebNLG 2017 loading: the dev conversion must equal the LoRA repository's dev.json pair for pair."""

from __future__ import annotations

import json
import sys
import types
from collections import Counter
from pathlib import Path

import pytest

from deltalora_repro.errors import ConfigError, DataError
from deltalora_repro.tasks.e2e_data import NLGExample, NLGSplit, group_references
from deltalora_repro.tasks.webnlg_data import (
    SEEN_CATEGORIES,
    WebNLGEntry,
    entry_examples,
    format_triples,
    load_webnlg,
    load_webnlg_entries,
    read_webnlg_xml,
)
from .conftest import DATA

SHARED_DATA = DATA   # beside the repository, never inside it (see shared/data/SOURCES.md)
WEBNLG_DIR = SHARED_DATA / "webnlg2017"
CHALLENGE_DIR = WEBNLG_DIR / "webnlg_challenge_2017"
LORA_DEV_JSON = WEBNLG_DIR / "lora_dev.json"

needs_webnlg = pytest.mark.skipif(
    not CHALLENGE_DIR.is_dir() or not LORA_DEV_JSON.is_file(),
    reason=f"WebNLG 2017 XML and lora_dev.json not found under {WEBNLG_DIR}",
)

# WebNLG 2017's five test-only categories (the challenge's documentation).
UNSEEN_CATEGORIES = frozenset({"Athlete", "Artist", "CelestialBody", "MeanOfTransportation", "Politician"})


@pytest.fixture(scope="module")
def splits() -> dict[str, tuple[list[WebNLGEntry], NLGSplit]]:
    out = {}
    for split in ("train", "validation", "test"):
        entries, source = load_webnlg_entries(split, WEBNLG_DIR)
        if split == "train":  # the largest split: parse its 52 files once, as load_webnlg would
            examples = [example for entry in entries for example in entry_examples(entry)]
            out[split] = (entries, NLGSplit(examples, source))
        else:
            out[split] = (entries, load_webnlg(split, WEBNLG_DIR))
    return out


def _lora_pairs(dev_json: dict) -> list[tuple[str, str, str, bool]]:
    """What the LoRA repository's format_converting_webnlg.py makes of its dev.json, re-stated:
    modified triples as ``s : p : o`` joined by `` | ``, one pair per lexicalisation marked good,
    and the flag "category is a seen one"."""
    seen = {"Airport", "Astronaut", "Building", "City", "ComicsCharacter", "Food", "Monument",
            "SportsTeam", "University", "WrittenWork"}
    pairs = []
    for number, wrapper in enumerate(dev_json["entries"], start=1):
        entry = wrapper[str(number)]
        context = " | ".join(
            f"{t['subject']} : {t['property']} : {t['object']}" for t in entry["modifiedtripleset"]
        )
        for lex in entry["lexicalisations"]:
            if lex["comment"] == "good":
                pairs.append((context, lex["lex"], entry["category"], entry["category"] in seen))
    return pairs


@needs_webnlg
def test_dev_conversion_equals_lora_dev_json(splits) -> None:
    expected = _lora_pairs(json.loads(LORA_DEV_JSON.read_text(encoding="utf-8")))
    ours = [(e.context, e.reference, e.category, e.seen) for e in splits["validation"][1].examples]
    assert len(expected) == 2258
    assert ours == expected


@needs_webnlg
def test_references_are_held_as_the_data_writes_them(splits) -> None:
    # The repository encodes " " + the lexicalisation as it stands. Nothing here strips it, and
    # no good lexicalisation of any split has surrounding whitespace that stripping would change.
    for entries, split in splits.values():
        good = [text for entry in entries for comment, text in entry.lexicalisations if comment == "good"]
        assert [example.reference for example in split.examples] == good
        assert all(text == text.strip() for text in good)


@needs_webnlg
def test_counts(splits) -> None:
    # SOURCES.md's 18,102 / 2,268 / 4,928 count every lexicalisation; the LoRA repository keeps
    # only the good ones, which drops 77 train and 10 dev lexicalisations (marked toFix).
    expected = {  # split: (entries, all lexicalisations, good ones, entries with a good one)
        "train": (6940, 18102, 18025, 6935),
        "validation": (872, 2268, 2258, 871),
        "test": (1862, 4928, 4928, 1862),
    }
    for split, (n_entries, n_lex, n_good, n_groups) in expected.items():
        entries, loaded = splits[split]
        assert len(entries) == n_entries
        assert sum(len(entry.lexicalisations) for entry in entries) == n_lex
        assert len(loaded.examples) == n_good
        assert len(group_references(loaded.examples)) == n_groups
        if split != "train":
            assert loaded.source.endswith(f"({n_entries} entries, {n_good} good lexicalisations)")
    test_entries = splits["test"][0]
    assert sum(entry.category in SEEN_CATEGORIES for entry in test_entries) == 971
    assert sum(entry.category in UNSEEN_CATEGORIES for entry in test_entries) == 891


@needs_webnlg
def test_seen_flags_follow_the_train_categories(splits) -> None:
    train_entries, train = splits["train"]
    assert {entry.category for entry in train_entries} == SEEN_CATEGORIES
    assert all(example.seen for example in train.examples + splits["validation"][1].examples)
    test = splits["test"][1]
    assert {e.category for e in test.examples if not e.seen} == UNSEEN_CATEGORIES
    seen_groups = [first for first, _ in group_references(test.examples) if first.seen]
    assert len(seen_groups) == 971
    assert Counter(e.seen for e in test.examples) == Counter({True: 2495, False: 2433})


@needs_webnlg
def test_unseen_file_repeats_the_unseen_test_entries(splits) -> None:
    unseen = read_webnlg_xml(CHALLENGE_DIR / "test" / "testdata_unseen_with_lex.xml")
    ours = [entry for entry in splits["test"][0] if entry.category in UNSEEN_CATEGORIES]
    key = lambda entry: (entry.category, entry.size, entry.triples, entry.lexicalisations)  # noqa: E731
    assert len(unseen) == 891
    assert [key(entry) for entry in unseen] == [key(entry) for entry in ours]


@needs_webnlg
def test_golden_examples(splits) -> None:
    test = splits["test"][1].examples
    assert test[0] == NLGExample(
        context="Abilene_Regional_Airport : cityServed : Abilene,_Texas",
        reference="Abilene, Texas is served by the Abilene regional airport.",
        group="1triples/Airport/Id1",
        category="Airport",
        seen=True,
    )
    # Strings are kept as the XML writes them: underscores, quotes and all.
    assert test[2].context == (
        'Adolfo_Suárez_Madrid–Barajas_Airport : location : "Madrid, Paracuellos de Jarama, '
        'San Sebastián de los Reyes and Alcobendas"'
    )
    dev = splits["validation"][1].examples
    references = {example.reference for example in dev}
    good = "AFC Ajax, who played in the 2014 season, have 5000 members and play in the Hoofdklasse league."
    assert good in references
    # ... but not the lexicalisation of the same entry marked toFix.
    to_fix = (
        "AFC Ajax (amateurs) has 5000 members play in the Hoofdklasse league and competed in the 2014 season."
    )
    assert to_fix not in references


@needs_webnlg
def test_data_dir_may_be_the_challenge_folder_itself() -> None:
    direct = load_webnlg("validation", CHALLENGE_DIR)
    assert len(direct.examples) == 2258
    assert direct.examples[0].context == "Aarhus : leaderName : Jacob_Bundsgaard"


def test_format_triples() -> None:
    triples = [
        ("Aarhus_Airport", "cityServed", "Aarhus,_Denmark"),
        ("Aarhus", "leaderName", "Jacob_Bundsgaard"),
    ]
    assert format_triples(triples) == (
        "Aarhus_Airport : cityServed : Aarhus,_Denmark | Aarhus : leaderName : Jacob_Bundsgaard"
    )


# --------------------------------------------------------------------------------------------
# Errors, on small hand-written files


_ENTRY = """<entry category="{category}" eid="Id1" size="1">
      <modifiedtripleset>
        <mtriple>{triple}</mtriple>
      </modifiedtripleset>
      <lex comment="good" lid="Id1">{lex}</lex>
      <lex comment="toFix" lid="Id2">Not this one.</lex>
    </entry>"""


def _tree(root: Path, entry: str) -> Path:
    for folder in ("train/1triples", "dev/1triples", "test"):
        (root / "webnlg_challenge_2017" / folder).mkdir(parents=True, exist_ok=True)
    xml = (
        "<?xml version='1.0' encoding='UTF-8'?>\n"
        f"<benchmark>\n  <entries>{entry}\n  </entries>\n</benchmark>\n"
    )
    path = root / "webnlg_challenge_2017" / "dev" / "1triples" / "1triple_allSolutions_Food_dev_challenge.xml"
    path.write_text(xml, encoding="utf-8")
    return path


def test_small_tree_round_trip(tmp_path: Path) -> None:
    lex = "Ajoblanco is from Spain."
    entry = _ENTRY.format(category="Food", triple="Ajoblanco | country | Spain", lex=lex)
    _tree(tmp_path, entry)
    split = load_webnlg("validation", tmp_path)
    assert split.examples == [
        NLGExample(
            context="Ajoblanco : country : Spain",
            reference="Ajoblanco is from Spain.",
            group="1triples/Food/Id1",
            category="Food",
            seen=True,
        )
    ]


def test_unknown_split_lists_valid_ones() -> None:
    with pytest.raises(ConfigError, match="train, validation, test"):
        load_webnlg("dev", "/nonexistent")


def test_missing_folder_and_file_name_the_paths(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="looked for: .*webnlg_challenge_2017/train, .*/train"):
        load_webnlg("train", tmp_path)
    _tree(tmp_path, _ENTRY.format(category="Food", triple="A | b | C", lex="A b C."))
    with pytest.raises(DataError, match="looked for: .*testdata_with_lex.xml"):
        load_webnlg("test", tmp_path)
    with pytest.raises(DataError, match=r"looked for: .*train/<n>triples/\*.xml"):
        load_webnlg("train", tmp_path)


def test_malformed_xml_names_file_and_line(tmp_path: Path) -> None:
    unclosed = _ENTRY.format(category="Food", triple="A | b | C", lex="A b C.").replace("</lex>", "", 1)
    path = _tree(tmp_path, unclosed)
    with pytest.raises(DataError, match=rf"{path.name}, line \d+, column \d+: malformed XML"):
        load_webnlg("validation", tmp_path)
    _tree(tmp_path, _ENTRY.format(category="Food", triple="A | b", lex="A b."))
    with pytest.raises(DataError, match=r"eid='Id1'.*is not 'subject \| property \| object'"):
        load_webnlg("validation", tmp_path)
    _tree(tmp_path, _ENTRY.format(category="Food", triple="A | b | C", lex=""))
    with pytest.raises(DataError, match=r"empty <lex lid='Id1'>"):
        load_webnlg("validation", tmp_path)


# --------------------------------------------------------------------------------------------
# Hub path (no network in tests: a fake `datasets` module stands in)


def test_hub_path_maps_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    row = {
        "category": "Politician",
        "size": 2,
        "eid": "Id7",
        "modified_triple_sets": {
            "mtriple_set": [["Ab_Klink | birthPlace | Stellendam", "Ab_Klink | party | CDA"]]
        },
        "lex": {
            "comment": ["good", "toFix"],
            "lid": ["Id1", "Id2"],
            "text": ["Ab Klink, born in Stellendam, is a CDA member.", "Broken."],
            "lang": ["", ""],
        },
    }

    def fake_load_dataset(name, config, split):
        calls.append((name, config, split))
        return [row]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=fake_load_dataset))
    split = load_webnlg("validation")
    assert calls == [("web_nlg", "webnlg_challenge_2017", "dev")]
    assert split.examples == [
        NLGExample(
            "Ab_Klink : birthPlace : Stellendam | Ab_Klink : party : CDA",
            "Ab Klink, born in Stellendam, is a CDA member.",
            "2triples/Politician/Id7",
            "Politician",
            False,
        )
    ]
    assert split.source == "hub web_nlg webnlg_challenge_2017 dev (1 entries, 1 good lexicalisations)"
