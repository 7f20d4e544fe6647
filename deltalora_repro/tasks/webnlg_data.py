"""Load WebNLG Challenge 2017 in the text form the LoRA repository trains and scores on.

What the LoRA repository does (its format_converting_webnlg.py, applied to the challenge's XML
converted entry for entry to JSON; shared/data/webnlg2017/lora_dev.json is its dev.json):

* context: the entry's *modified* triples, each ``subject : property : object`` with the strings
  exactly as the XML writes them (underscores, quotes and all), joined by `` | ``;
* reference: the lexicalisation text, untouched; only lexicalisations with ``comment="good"``
  are kept (train has 77 and dev 10 marked ``toFix``; all test ones are good). The repository
  encodes " " + this text and the end token, stripping nothing (no lexicalisation of the 2017 data
  starts or ends with whitespace);
* seen: the category is one of the 10 training categories (Table 2 reports Seen / Unseen / All).

Files: ``train/<n>triples/*.xml`` and ``dev/<n>triples/*.xml`` read in order of n, then file name
(the order of the LoRA repository's dev.json); the test set is ``test/testdata_with_lex.xml``,
which holds all 1862 test entries (971 seen, 891 unseen). ``testdata_unseen_with_lex.xml`` repeats
the 891 unseen ones, so it is not read again.

``data_dir=None`` reads ``web_nlg`` (config ``webnlg_challenge_2017``) from the Hugging Face hub.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from deltalora_repro.errors import ConfigError, DataError
from deltalora_repro.tasks.e2e_data import NLGExample, NLGSplit

HUB_DATASET = "web_nlg"
HUB_CONFIG = "webnlg_challenge_2017"

SPLITS = ("train", "validation", "test")
_SPLIT_FOLDERS = {"train": "train", "validation": "dev", "test": "test"}  # also the hub's names
_TEST_FILE = "testdata_with_lex.xml"
_FOLDER_NAME = "webnlg_challenge_2017"

# The categories of the training data ("seen") and the five that only the test set has.
SEEN_CATEGORIES = frozenset(
    {"Airport", "Astronaut", "Building", "City", "ComicsCharacter", "Food", "Monument", "SportsTeam",
     "University", "WrittenWork"}
)


@dataclass(frozen=True)
class WebNLGEntry:
    """One entry of the challenge data: a set of triples and its lexicalisations."""

    category: str
    size: int  # number of triples
    eid: str  # "Id1", ...: unique within one file
    triples: tuple[tuple[str, str, str], ...]  # modified triples (subject, property, object)
    lexicalisations: tuple[tuple[str, str], ...]  # (comment, text)

    @property
    def group(self) -> str:
        # eid repeats across the train/dev files (one per size and category); this key does not.
        return f"{self.size}triples/{self.category}/{self.eid}"


def format_triples(triples: Iterable[tuple[str, str, str]]) -> str:
    """The LoRA repository's context: ``subj : prop : obj`` joined by `` | ``."""
    return " | ".join(f"{subject} : {prop} : {obj}" for subject, prop, obj in triples)


def entry_examples(entry: WebNLGEntry) -> list[NLGExample]:
    """One example per good lexicalisation of an entry."""
    context = format_triples(entry.triples)
    seen = entry.category in SEEN_CATEGORIES
    return [
        NLGExample(context=context, reference=text, group=entry.group, category=entry.category, seen=seen)
        for comment, text in entry.lexicalisations
        if comment == "good"
    ]


def load_webnlg(split: str, data_dir: str | Path | None = None) -> NLGSplit:
    """One WebNLG 2017 split in the LoRA repository's form.

    data_dir None reads the hub; otherwise it is the folder holding ``webnlg_challenge_2017/``,
    or that folder itself.
    """
    entries, source = load_webnlg_entries(split, data_dir)
    examples = [example for entry in entries for example in entry_examples(entry)]
    return NLGSplit(examples, f"{source} ({len(entries)} entries, {len(examples)} good lexicalisations)")


def load_webnlg_entries(split: str, data_dir: str | Path | None = None) -> tuple[list[WebNLGEntry], str]:
    """All entries of a split (every lexicalisation, good or not) and where they came from."""
    if split not in SPLITS:
        raise ConfigError(f"unknown WebNLG split {split!r}; valid splits: {', '.join(SPLITS)}")
    if data_dir is None:
        return _entries_from_hub(split)
    root = _find_root(Path(data_dir), split)
    paths = _split_files(root, split)
    entries = [entry for path in paths for entry in read_webnlg_xml(path)]
    folder = (root / _SPLIT_FOLDERS[split]).resolve()
    return entries, f"{folder} ({len(paths)} XML files)"


# --------------------------------------------------------------------------------------------
# Local files


def _find_root(data_dir: Path, split: str) -> Path:
    folder = _SPLIT_FOLDERS[split]
    candidates = [data_dir / _FOLDER_NAME, data_dir]
    for candidate in candidates:
        if (candidate / folder).is_dir():
            return candidate
    looked = ", ".join(str((candidate / folder).resolve()) for candidate in candidates)
    raise DataError(f"no WebNLG 2017 {folder}/ folder for split {split!r}; looked for: {looked}")


def _split_files(root: Path, split: str) -> list[Path]:
    folder = root / _SPLIT_FOLDERS[split]
    if split == "test":
        path = folder / _TEST_FILE
        if not path.is_file():
            raise DataError(f"missing WebNLG test file; looked for: {path.resolve()}")
        return [path]
    size_folders = [p for p in folder.glob("*triples") if p.is_dir() and p.name[: -len("triples")].isdigit()]
    size_folders.sort(key=lambda p: int(p.name[: -len("triples")]))
    paths = [path for size_folder in size_folders for path in sorted(size_folder.glob("*.xml"))]
    if not paths:
        looked = f"{folder.resolve()}/<n>triples/*.xml"
        raise DataError(f"no WebNLG XML files for split {split!r}; looked for: {looked}")
    return paths


def read_webnlg_xml(path: Path) -> list[WebNLGEntry]:
    """The entries of one challenge XML file; DataError (with file and line) if malformed."""
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as error:
        line, column = error.position
        raise DataError(f"{path.resolve()}, line {line}, column {column}: malformed XML ({error})") from None
    except OSError as error:
        raise DataError(f"cannot read {path.resolve()}: {error}") from None
    file_name = str(path.resolve())
    entries = [_parse_entry(element, file_name) for element in root.iter("entry")]
    if not entries:
        raise DataError(f"{path.resolve()}: no <entry> elements")
    return entries


def _parse_entry(element: ET.Element, file_name: str) -> WebNLGEntry:
    where = f"{file_name}, entry eid={element.get('eid')!r}"
    category, eid, size = element.get("category"), element.get("eid"), element.get("size")
    if not category or not eid or not size or not size.isdigit():
        attributes = {"category": category, "eid": eid, "size": size}
        raise DataError(f"{where}: entry lacks a category, eid or numeric size ({attributes})")
    tripleset = element.find("modifiedtripleset")
    if tripleset is None:
        raise DataError(f"{where}: no <modifiedtripleset>")
    triples = tuple(_split_triple(mtriple.text or "", where) for mtriple in tripleset.findall("mtriple"))
    if len(triples) != int(size):
        raise DataError(f"{where}: size={size} but {len(triples)} <mtriple> elements")
    lexicalisations = []
    for lex in element.findall("lex"):
        if not lex.text or not lex.text.strip():
            raise DataError(f"{where}: empty <lex lid={lex.get('lid')!r}>")
        lexicalisations.append((lex.get("comment", ""), lex.text))
    return WebNLGEntry(category, int(size), eid, triples, tuple(lexicalisations))


def _split_triple(text: str, where: str) -> tuple[str, str, str]:
    parts = text.split(" | ")
    if len(parts) != 3:
        raise DataError(f"{where}: <mtriple> {text!r} is not 'subject | property | object'")
    return parts[0], parts[1], parts[2]


# --------------------------------------------------------------------------------------------
# Hub


def _entries_from_hub(split: str) -> tuple[list[WebNLGEntry], str]:
    hub_split = _SPLIT_FOLDERS[split]
    from deltalora_repro.tasks.base import load_hub_dataset
    dataset = load_hub_dataset(HUB_DATASET, HUB_CONFIG, split=hub_split,
                               local_hint="point data_dir at the WebNLG 2017 challenge folder, e.g. "
                                          "data_dir=../shared/data/webnlg2017")
    entries = []
    for row in dataset:
        where = f"hub {HUB_DATASET} {HUB_CONFIG} {hub_split}, entry eid={row['eid']!r}"
        # The hub keeps the modified triples as one list of "s | p | o" strings per entry.
        triple_sets = row["modified_triple_sets"]["mtriple_set"]
        if len(triple_sets) != 1:
            raise DataError(f"{where}: expected one modified triple set, found {len(triple_sets)}")
        (mtriples,) = triple_sets
        triples = tuple(_split_triple(text, where) for text in mtriples)
        lex = row["lex"]
        lexicalisations = tuple(zip(lex["comment"], lex["text"], strict=True))
        entries.append(WebNLGEntry(row["category"], int(row["size"]), row["eid"], triples, lexicalisations))
    return entries, f"hub {HUB_DATASET} {HUB_CONFIG} {hub_split}"
