"""GLUE loading: real files from ../shared/data/glue, plus tiny hand-written files in tmp_path."""

from __future__ import annotations

import sys
import types
import warnings
from collections import Counter
from pathlib import Path

import pytest

from deltalora_repro.errors import ConfigError, DataError
from deltalora_repro.tasks.glue_data import (
    GLUE_SPECS,
    MRPC_NO_DEV_IDS_NOTE,
    GlueSplit,
    load_glue_split,
    valid_splits,
)
from .conftest import DATA

SHARED_DATA = DATA   # beside the repository, never inside it (see shared/data/SOURCES.md)
GLUE_DIR = SHARED_DATA / "glue"

needs_glue = pytest.mark.skipif(
    not GLUE_DIR.is_dir(), reason=f"real GLUE files not found at {GLUE_DIR} (see shared/data/SOURCES.md)"
)


def _write(path: Path, lines: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def _check_rows(split: GlueSplit, labels: set, pair: bool) -> None:
    for row in split.rows:
        assert set(row) == {"text_a", "text_b", "label"}
        assert isinstance(row["text_a"], str) and row["text_a"]
        assert (isinstance(row["text_b"], str) and row["text_b"]) if pair else row["text_b"] is None
    assert set(Counter(row["label"] for row in split.rows)) == labels


# --------------------------------------------------------------------------------------------
# Specs and argument checking


def test_specs_cover_the_eight_tasks() -> None:
    assert set(GLUE_SPECS) == {"mnli", "sst2", "mrpc", "cola", "qnli", "qqp", "rte", "stsb"}
    assert GLUE_SPECS["stsb"].num_labels == 1 and GLUE_SPECS["stsb"].metric == "pearson"
    assert GLUE_SPECS["cola"].metric == "matthews_correlation"
    assert GLUE_SPECS["mnli"].eval_split == "validation_matched"
    assert GLUE_SPECS["mnli"].num_labels == 3
    assert GLUE_SPECS["sst2"].text_keys == ("sentence", None)
    assert valid_splits("mnli") == ("train", "validation_matched", "validation_mismatched")


def test_unknown_task_lists_valid_names(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="valid names: mnli, sst2, mrpc, cola, qnli, qqp, rte, stsb"):
        load_glue_split("wnli", "train", tmp_path)


def test_unknown_split_lists_valid_splits(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="valid splits: train, validation_matched, validation_mismatched"):
        load_glue_split("mnli", "validation", tmp_path)
    with pytest.raises(ConfigError, match="valid splits: train, validation"):
        load_glue_split("rte", "test", tmp_path)


def test_hub_path_maps_columns(monkeypatch: pytest.MonkeyPatch) -> None:
    # No network in tests: stand in a fake `datasets` module and check the call and the mapping.
    calls = []

    def fake_load_dataset(path: str, name: str, split: str) -> dict:
        calls.append((path, name, split))
        return {"premise": ["p0", "p1"], "hypothesis": ["h0", "h1"], "label": [2, 0], "idx": [0, 1]}

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=fake_load_dataset))
    split = load_glue_split("mnli", "validation_matched")
    assert calls == [("nyu-mll/glue", "mnli", "validation_matched")]
    assert split.rows == [
        {"text_a": "p0", "text_b": "h0", "label": 2},
        {"text_a": "p1", "text_b": "h1", "label": 0},
    ]
    assert split.source == "hub nyu-mll/glue mnli validation_matched (2 rows)"
    assert split.note is None


# --------------------------------------------------------------------------------------------
# Real files


@needs_glue
def test_sst2_real() -> None:
    dev = load_glue_split("sst2", "validation", GLUE_DIR)
    assert len(dev.rows) == 872
    # GLUE keeps the tokenised text with its trailing space; so does the hub, so we keep it too.
    first = {"text_a": "it 's a charming and often affecting journey . ", "text_b": None, "label": 1}
    assert dev.rows[0] == first
    path, _, count = dev.source.partition(" (")
    assert Path(path).resolve() == (GLUE_DIR / "SST-2" / "dev.tsv").resolve() and count == "872 rows)"
    _check_rows(dev, {0, 1}, pair=False)
    assert len(load_glue_split("sst2", "train", GLUE_DIR).rows) == 67349


@needs_glue
def test_rte_real() -> None:
    train = load_glue_split("rte", "train", GLUE_DIR)
    dev = load_glue_split("rte", "validation", GLUE_DIR)
    assert (len(train.rows), len(dev.rows)) == (2490, 277)
    # First dev row is labelled not_entailment, which is 1 on the hub.
    assert dev.rows[0]["text_a"].startswith("Dana Reeve, the widow of the actor Christopher Reeve")
    assert dev.rows[0]["text_b"] == "Christopher Reeve had an accident."
    assert dev.rows[0]["label"] == 1
    assert train.rows[1]["label"] == 0  # "Pope Benedict XVI is the new leader ..." is entailment
    _check_rows(train, {0, 1}, pair=True)
    _check_rows(dev, {0, 1}, pair=True)


@needs_glue
def test_cola_real() -> None:
    train = load_glue_split("cola", "train", GLUE_DIR)
    dev = load_glue_split("cola", "validation", GLUE_DIR)
    assert (len(train.rows), len(dev.rows)) == (8551, 1043)
    first = {"text_a": "The sailors rode the breeze clear of the rocks.", "text_b": None, "label": 1}
    assert dev.rows[0] == first
    _check_rows(train, {0, 1}, pair=False)
    _check_rows(dev, {0, 1}, pair=False)
    # Known CoLA dev balance: 322 unacceptable, 721 acceptable.
    assert Counter(row["label"] for row in dev.rows) == {0: 322, 1: 721}


@needs_glue
def test_stsb_real_falls_back_to_original_dev() -> None:
    train = load_glue_split("stsb", "train", GLUE_DIR)
    dev = load_glue_split("stsb", "validation", GLUE_DIR)
    assert (len(train.rows), len(dev.rows)) == (5749, 1500)
    first = {"text_a": "A plane is taking off.", "text_b": "An air plane is taking off.", "label": 5.0}
    assert train.rows[0] == first
    assert dev.rows[0] == {
        "text_a": "A man with a hard hat is dancing.",
        "text_b": "A man wearing a hard hat is dancing.",
        "label": 5.0,
    }
    # GLUE's dev.tsv is absent here, so the STS-benchmark original must be the source.
    assert "original/sts-dev.tsv" in dev.source
    for split in (train, dev):
        scores = [row["label"] for row in split.rows]
        assert all(isinstance(score, float) and 0.0 <= score <= 5.0 for score in scores)
        assert min(scores) == 0.0 and max(scores) == 5.0


@needs_glue
def test_mrpc_raw_without_dev_ids_uses_msrp_test_with_note() -> None:
    with pytest.warns(UserWarning, match="dev ids"):
        train = load_glue_split("mrpc", "train", GLUE_DIR)
    with pytest.warns(UserWarning, match="dev ids"):
        dev = load_glue_split("mrpc", "validation", GLUE_DIR)
    assert (len(train.rows), len(dev.rows)) == (4076, 1725)
    assert train.note == dev.note == MRPC_NO_DEV_IDS_NOTE
    assert "MSRP test set" in dev.note and "not GLUE's dev" in dev.note
    # The byte-order mark must not leak into the header (it would hide the "Quality" column).
    assert train.rows[0]["text_a"].startswith("Amrozi accused his brother")
    assert train.rows[0]["label"] == 1
    assert train.rows[1]["label"] == 0
    assert dev.rows[0]["text_a"].startswith("PCCW's chief operating officer, Mike Butcher")
    _check_rows(train, {0, 1}, pair=True)
    _check_rows(dev, {0, 1}, pair=True)


@needs_glue
def test_mrpc_dev_ids_rebuild_the_exact_split(tmp_path: Path) -> None:
    # Link the real raw files next to a fake two-pair id list, so GLUE's split logic runs for real.
    mrpc = tmp_path / "MRPC"
    mrpc.mkdir()
    (mrpc / "msr_paraphrase_train.txt").symlink_to(GLUE_DIR / "MRPC" / "msr_paraphrase_train.txt")
    _write(mrpc / "mrpc_dev_ids.tsv", ["702876\t702977", "2108705\t2108831"])

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the fallback warning must not fire
        train = load_glue_split("mrpc", "train", tmp_path)
        dev = load_glue_split("mrpc", "validation", tmp_path)

    assert [row["text_a"][:22] for row in dev.rows] == ["Amrozi accused his bro", "Yucaipa owned Dominick"]
    assert [row["label"] for row in dev.rows] == [1, 0]
    assert len(train.rows) == 4074
    held_out = {row["text_a"] for row in dev.rows}
    assert not held_out & {row["text_a"] for row in train.rows}
    assert train.note is None and dev.note is None
    assert "mrpc_dev_ids.tsv" in dev.source


def test_mrpc_dev_ids_not_in_train_fail(tmp_path: Path) -> None:
    header = "\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String"
    _write(tmp_path / "MRPC" / "msr_paraphrase_train.txt", [header, "1\t1\t2\tA a.\tA b."])
    _write(tmp_path / "MRPC" / "mrpc_dev_ids.tsv", ["1\t2", "8\t9"])
    with pytest.raises(DataError, match="1 of 2 dev id pairs are not in"):
        load_glue_split("mrpc", "validation", tmp_path)


# --------------------------------------------------------------------------------------------
# Tiny files for the layouts we have no real copy of, and for the error paths


def test_mnli_label_order_matches_hub(tmp_path: Path) -> None:
    header = "index\tpromptID\tpairID\tgenre\tsentence1\tsentence2\tlabel1\tgold_label"
    _write(
        tmp_path / "MNLI" / "dev_mismatched.tsv",
        [
            header,
            "0\t1\t1e\tfiction\tP0\tH0\tneutral\tentailment",
            "1\t2\t2n\tfiction\tP1\tH1\tneutral\tneutral",
            "2\t3\t3c\tfiction\t\"P2\tH2\tcontradiction\tcontradiction",  # lone quote: tab split only
        ],
    )
    split = load_glue_split("mnli", "validation_mismatched", tmp_path)
    assert [row["label"] for row in split.rows] == [0, 1, 2]
    assert split.rows[2] == {"text_a": '"P2', "text_b": "H2", "label": 2}


def test_qnli_and_qqp_layouts(tmp_path: Path) -> None:
    _write(
        tmp_path / "QNLI" / "dev.tsv",
        ["index\tquestion\tsentence\tlabel", "0\tQ?\tS.\tnot_entailment", "1\tQ2?\tS2.\tentailment"],
    )
    _write(
        tmp_path / "QQP" / "train.tsv",
        ["id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate", "5\t1\t2\tA?\tB?\t1", "6\t3\t4\tC?\tD?\t0"],
    )
    qnli = load_glue_split("qnli", "validation", tmp_path)
    assert qnli.rows == [
        {"text_a": "Q?", "text_b": "S.", "label": 1},
        {"text_a": "Q2?", "text_b": "S2.", "label": 0},
    ]
    qqp = load_glue_split("qqp", "train", tmp_path)
    assert [(row["text_a"], row["label"]) for row in qqp.rows] == [("A?", 1), ("C?", 0)]


def test_stsb_original_ignores_extra_columns(tmp_path: Path) -> None:
    _write(
        tmp_path / "STS-B" / "original" / "sts-dev.tsv",
        [
            "main-news\theadlines\t2016\t0281\t3.4\tOne.\tTwo.\tsource a\tsource b",
            "g\tf\t2012\t0001\t0\tA.\tB.",
        ],
    )
    split = load_glue_split("stsb", "validation", tmp_path)
    assert split.rows == [
        {"text_a": "One.", "text_b": "Two.", "label": 3.4},
        {"text_a": "A.", "text_b": "B.", "label": 0.0},
    ]


def test_missing_task_folder_names_paths(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="looked for: .*RTE.*rte"):
        load_glue_split("rte", "train", tmp_path)


def test_missing_file_names_paths(tmp_path: Path) -> None:
    (tmp_path / "STS-B").mkdir()
    with pytest.raises(DataError, match=r"STS-B/dev\.tsv.*STS-B/original/sts-dev\.tsv"):
        load_glue_split("stsb", "validation", tmp_path)
    (tmp_path / "MRPC").mkdir()
    with pytest.raises(DataError, match=r"MRPC/dev\.tsv.*msr_paraphrase_test\.txt"):
        load_glue_split("mrpc", "validation", tmp_path)


def test_malformed_line_names_file_and_line(tmp_path: Path) -> None:
    _write(
        tmp_path / "RTE" / "train.tsv",
        ["index\tsentence1\tsentence2\tlabel", "0\tA.\tB.\tentailment", "1\tA.\tB. not_entailment"],
    )
    with pytest.raises(DataError, match=r"RTE/train\.tsv, line 3: expected 4 tab-separated fields, found 3"):
        load_glue_split("rte", "train", tmp_path)


def test_malformed_cola_line(tmp_path: Path) -> None:
    _write(tmp_path / "CoLA" / "dev.tsv", ["gj04\t1\t\tFine.", "gj04\t1\tToo short."])
    with pytest.raises(DataError, match=r"CoLA/dev\.tsv, line 2: expected 4"):
        load_glue_split("cola", "validation", tmp_path)


@pytest.mark.parametrize(
    ("task", "folder", "lines", "message"),
    [
        ("sst2", "SST-2", ["sentence\tlabel", "good .\t1", "odd .\t2"], r"line 3: label '2' is not 0 or 1"),
        ("rte", "RTE", ["index\tsentence1\tsentence2\tlabel", "0\tA\tB\tneutral"], "line 2: label 'neutral'"),
        ("stsb", "STS-B", ["sentence1\tsentence2\tscore", "A\tB\t7.5"], r"line 2: score '7\.5' is outside"),
    ],
)
def test_bad_label_names_file_and_line(
    tmp_path: Path, task: str, folder: str, lines: list[str], message: str
) -> None:
    _write(tmp_path / folder / "dev.tsv", lines)
    with pytest.raises(DataError, match=rf"{folder}/dev\.tsv, {message}"):
        load_glue_split(task, "validation", tmp_path)


def test_missing_header_column(tmp_path: Path) -> None:
    _write(tmp_path / "SST-2" / "train.tsv", ["text\tlabel", "good .\t1"])
    with pytest.raises(DataError, match=r"header lacks columns \['sentence'\]"):
        load_glue_split("sst2", "train", tmp_path)
