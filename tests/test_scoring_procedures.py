"""The two E2E scoring procedures ("paper", "official"), empty predictions, and how the procedure
names travel through run records, score records (score_run) and tables.

Expected numbers come from tuetschek/e2e-metrics' measure_scores.py, run outside this repository
(in /tmp, never committed) on a real sample: the first 20 inputs of the E2E test set, with the
outputs a committed run (results/predictions/e2e/smollm2-135m/lora/20261122-221722-95f4c2.jsonl)
gave them, three of them (inputs 3, 12 and 20, the last) replaced by empty lines:
- paper: `measure_scores.py REF PRED -p`, REF = the first 20 groups of the file the LoRA repository's
  gpt2_decode.py writes from lora_format/test.txt (each reference stripped, a blank line after each
  group);
- official: `measure_scores.py testset_w_refs_first20.csv PRED`, the CSV holding the header and the
  rows of the first 20 MRs of testset_w_refs.csv, copied unchanged.
The values are measure_scores.py's own floats (printed in full instead of with 4 decimals; the
Perl mteval's printf was widened to 10 decimals).
"""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import pytest

from deltalora_repro import records, score, score_run, tables
from deltalora_repro.metrics import e2e, java
from .conftest import DATA, java_available

E2E = DATA / "e2e"
needs_e2e = pytest.mark.skipif(not (E2E / "testset_w_refs.csv").is_file(), reason="E2E data not found")
needs_java = pytest.mark.skipif(not java_available(), reason="no Java runtime for the METEOR/PTB jars")

# The sample's predictions (see the module docstring); "" are the emptied ones.
SAMPLE_PREDICTIONS = [
    "Blue Spice is a coffee shop in the city centre .",
    "Blue Spice is a coffee shop in the riverside area .",
    "",
    "Blue Spice is an average coffee shop near Burger King .",
    "Blue Spice is a coffee shop near Crowne Plaza Hotel . It has an average customer rating .",
    "Blue Spice is a pub located in the city centre .",
    "Blue Spice is a pub in the riverside area .",
    "Blue Spice is a pub near Crowne Plaza Hotel with a customer rating of 5 out of 5 .",
    "Blue Spice is a pub near Burger King with an average customer rating .",
    "Blue Spice is a pub near Crowne Plaza Hotel with an average customer rating .",
    "Blue Spice is a pub located in the city centre near Rainbow Vegetarian Café . It is not family - "
    "friendly and serves Chinese food .",
    "",
    "Blue Spice is a pub located near Rainbow Vegetarian Café . It is not family - friendly and serves "
    "Chinese food .",
    "Blue Spice is a family - friendly pub located near Rainbow Vegetarian Café in the riverside area .",
    "Blue Spice is a pub located in the city centre near the Rainbow Vegetarian Café . It is not family - "
    "friendly and serves English food .",
    "Blue Spice is a family - friendly pub located in the city centre near Rainbow Vegetarian Café .",
    "Blue Spice is an English pub near Rainbow Vegetarian Café in the riverside area . It is not family - "
    "friendly .",
    "Blue Spice is a family - friendly pub in the riverside area near Rainbow Vegetarian Café .",
    "Blue Spice is a Chinese restaurant in the city centre near Rainbow Vegetarian Café . It is not family - "
    "friendly .",
    "",
]

# measure_scores.py's output on the sample (module docstring); it prints these to 4 decimals as
# paper 0.5451 4.7145 0.3892 0.6143 2.4059, official 0.4965 3.4254 0.3892 0.6076 2.3583.
SAMPLE_OFFICIAL = {
    "paper": {"bleu": 0.5450572374113807, "nist": 4.714512815178696, "meteor": 0.38924192947975866,
              "rouge_l": 0.6143011645305044, "cider": 2.4058559264479498},
    # BLEU and NIST as mteval-v13a-sig.pl printed them with 10 decimals.
    "official": {"bleu": 0.4964544350, "nist": 3.4253741699, "meteor": 0.38924192947975866,
                 "rouge_l": 0.6076476082336152, "cider": 2.35832949463723},
}


def _sample_reference_files(tmp_path: Path) -> tuple[Path, Path]:
    """The two reference files measure_scores.py was given, rebuilt from the data files."""
    groups: dict[str, list[str]] = {}
    for line in (E2E / "lora_format" / "test.txt").read_text(encoding="utf-8").splitlines():
        context, reference = line.strip().split("||")
        groups.setdefault(context, []).append(reference.strip())
    first = list(groups.values())[:20]
    paper = tmp_path / "e2e_ref.txt"
    paper.write_text("".join("".join(r + "\n" for r in refs) + "\n" for refs in first), encoding="utf-8")
    lines = (E2E / "testset_w_refs.csv").read_text(encoding="utf-8").split("\n")
    kept, mrs = [lines[0]], []
    for line in lines[1:]:
        if not line:
            continue
        mr = next(csv.reader([line]))[0]
        if mr not in mrs:
            if len(mrs) == 20:
                break
            mrs.append(mr)
        kept.append(line)
    official = tmp_path / "testset_w_refs_first20.csv"
    official.write_text("\n".join(kept) + "\n", encoding="utf-8")
    return paper, official


# ------------------------------------------------------------------------------------------------
# Reference sources of the two procedures


@needs_e2e
def test_reference_sources_of_the_two_procedures() -> None:
    """paper: the tokenised test file's references, stripped and grouped by input, exactly as the
    LoRA decode step writes them; official: testset_w_refs.csv's raw references grouped by MR,
    as measure_scores.py reads that file. Same 630 inputs in the same order."""
    groups, source = score.load_test_groups("e2e", str(E2E))
    paper, _ = score.e2e_test_references("paper", groups, source, str(E2E))
    official, _ = score.e2e_test_references("official", groups, source, str(E2E))
    lora: dict[str, list[str]] = {}
    for line in (E2E / "lora_format" / "test.txt").read_text(encoding="utf-8").splitlines():
        context, reference = line.strip().split("||")
        lora.setdefault(context, []).append(reference.strip())
    assert paper == list(lora.values())
    table = e2e.read_reference_table((E2E / "testset_w_refs.csv").read_text(encoding="utf-8"))
    assert official == e2e.group_consecutive(table) == list(e2e.group_by_mr(table).values())
    assert (len(official), sum(map(len, official))) == (630, 4693)
    # testset_w_refs.csv, lines 2-3 (the raw text; paper's has "Spice ." instead).
    assert official[0] == ["A coffee shop in the city centre area called Blue Spice.",
                           "Blue Spice is a coffee shop in city centre."]


def test_procedures_name_their_mteval_flavour() -> None:
    assert (e2e.get_procedure("paper").mteval, e2e.get_procedure("official").mteval) == ("python", "perl")
    assert e2e.DEFAULT_PROCEDURE == "paper"
    with pytest.raises(ValueError, match="unknown E2E scoring procedure 'legacy'; valid: paper, official"):
        e2e.get_procedure("legacy")
    # No hidden default flavour: the caller (a procedure) must say which.
    with pytest.raises(TypeError):
        e2e.e2e_metrics(["a"], [["a"]])  # type: ignore[call-arg]


# ------------------------------------------------------------------------------------------------
# Runs, score records and tables keep each procedure's numbers under its name


def _stub_metrics(monkeypatch):
    """e2e_metrics replaced by a stub whose BLEU says which flavour ran and whose NIST counts
    references ending in " ." (the tokenised form), so the plumbing can be checked without Java."""
    def stub(predictions, references, *, mteval):
        tokenised = sum(r.endswith(" .") for group in references for r in group)
        return {"bleu": {"python": 0.7, "perl": 0.6}[mteval], "nist": float(tokenised),
                "meteor": 0.4, "rouge_l": 0.6, "cider": 2.0}
    monkeypatch.setattr(e2e, "e2e_metrics", stub)


def test_score_test_procedures_reports_paper_and_keeps_both(monkeypatch) -> None:
    _stub_metrics(monkeypatch)
    tokenised = [["Blue Spice is a pub . "], ["A pub . ", "It is a pub . "]]
    raw = {"name[Blue Spice]": ["Blue Spice is a pub."], "name[A]": ["A pub.", "It is a pub."]}
    out = e2e.score_test_procedures(["x", ""], tokenised, ["name[Blue Spice]", "name[A]"], raw)
    assert out["procedure"] == "paper" and out["bleu"] == 0.7
    assert out["procedures"]["paper"]["nist"] == 3.0      # three tokenised references
    assert out["procedures"]["official"] == {"bleu": 0.6, "nist": 0.0, "meteor": 0.4, "rouge_l": 0.6,
                                             "cider": 2.0}
    with pytest.raises(ValueError, match="no raw references for the test MR 'name\\[A\\]'"):
        e2e.score_test_procedures(["x", "y"], tokenised, ["name[Blue Spice]", "name[A]"],
                                  {"name[Blue Spice]": ["x"]})


def test_unnamed_scores_are_labelled_by_the_code_that_wrote_them() -> None:
    flat = {"val_loss": 1.0, "bleu": 0.66, "nist": 8.4, "meteor": 0.43, "rouge_l": 0.68, "cider": 2.2}
    assert records.scores_by_procedure("e2e", flat) == {
        "legacy": {"bleu": 0.66, "nist": 8.4, "meteor": 0.43, "rouge_l": 0.68, "cider": 2.2}}
    assert set(records.scores_by_procedure("webnlg", {"bleu_all": 0.5})) == {"paper"}
    assert records.scores_by_procedure("e2e", {**flat, "procedure": "paper"}).keys() == {"paper"}
    named = {"procedure": "paper", "procedures": {"paper": {"bleu": 0.7}, "official": {"bleu": 0.6}}}
    assert records.scores_by_procedure("e2e", named) == named["procedures"]
    assert records.scores_by_procedure("glue/rte", {"accuracy": 0.7}) == {}
    assert records.scores_by_procedure("e2e", {"val_loss": 1.0}) == {}


def _run_record(tmp_path: Path, run_id: str, rows: list[dict], final: dict | None = None) -> Path:
    pred = tmp_path / "results" / "predictions" / f"{run_id}.jsonl"
    pred.parent.mkdir(parents=True, exist_ok=True)
    pred.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    record = {"schema": 1, "run_id": run_id, "status": "completed", "task": "e2e", "model": "gpt2-medium",
              "method": "lora", "seed": 0, "experiment": None,
              "config": {"task": {"score": final is not None, "test_max_groups": None},
                         "train": {"lr": 2e-4}, "data_dir": str(E2E)},
              "metrics": {"primary": "val_loss", "final": final or {"val_loss": 1.0}},
              "data": {"test": {"groups_decoded": len(rows)}}, "predictions": f"predictions/{run_id}.jsonl",
              "git": {"commit": "0123456789", "dirty": False}, "machine": {}}
    path = tmp_path / "results" / "records" / "e2e" / f"{run_id}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record), encoding="utf-8")
    return path


@needs_e2e
def test_score_run_adds_the_missing_procedures_to_an_old_score_record(tmp_path, monkeypatch) -> None:
    """An old score record (unnamed: tokenised references, Perl mteval) keeps its numbers as
    "legacy" and gains paper and official; the reported numbers become the paper procedure's."""
    _stub_metrics(monkeypatch)
    rows = [{"context": "name : Blue Spice | Type : coffee shop | area : city centre", "prediction": "p",
             "references": ["A coffee shop in the city centre area called Blue Spice . ",
                            "Blue Spice is a coffee shop in city centre . "],
             "group": "name[Blue Spice], eatType[coffee shop], area[city centre]", "seen": None}]
    record = _run_record(tmp_path, "20261122-000000-old", rows)
    sha = hashlib.sha256((tmp_path / "results/predictions/20261122-000000-old.jsonl").read_bytes()).hexdigest()
    old = {"kind": "score", "run_id": "20261122-000000-old", "task": "e2e", "model": "gpt2-medium",
           "method": "lora", "metrics": {"bleu": 0.66, "nist": 8.4, "meteor": 0.43, "rouge_l": 0.68, "cider": 2.2},
           "predictions": {"sha256": sha, "n": 1}, "git": {"commit": "old"}, "command": "old command",
           "scored_at": "2026-11-22"}
    dst = tmp_path / "results/scores/e2e/gpt2-medium/lora/20261122-000000-old.json"
    dst.parent.mkdir(parents=True)
    dst.write_text(json.dumps(old))
    args = [str(record), "--results", str(tmp_path / "results")]
    assert score_run.main(args) == 0
    new = json.loads(dst.read_text())
    assert new["procedure"] == "paper" and new["metrics"]["bleu"] == 0.7
    assert set(new["procedures"]) == {"legacy", "paper", "official"}
    assert new["procedures"]["legacy"]["metrics"] == old["metrics"]
    assert new["procedures"]["legacy"]["git"] == {"commit": "old"}
    assert "neither" in new["procedures"]["legacy"]["description"]
    # paper scored the two tokenised references, official the raw ones of testset_w_refs.csv.
    assert new["procedures"]["paper"]["metrics"]["nist"] == 2.0
    assert new["procedures"]["official"]["metrics"]["nist"] == 0.0
    assert new["procedures"]["official"]["metrics"]["bleu"] == 0.6
    # Nothing missing: a second call changes nothing; other predictions are refused.
    assert score_run.main(args) == 0 and json.loads(dst.read_text()) == new
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps({**rows[0], "prediction": "q"}) + "\n")
    assert score_run.main([*args, "--predictions", str(other)]) == 2
    assert score_run.main([*args, "--procedures", "paper,bogus"]) == 2


def test_score_run_skips_procedures_the_run_record_has(tmp_path, monkeypatch) -> None:
    _stub_metrics(monkeypatch)
    rows = [{"context": "c", "prediction": "p", "references": ["r . "], "group": "name[X]", "seen": None}]
    final = {"val_loss": 1.0, "bleu": 0.7, "procedure": "paper",
             "procedures": {"paper": {"bleu": 0.7}, "official": {"bleu": 0.6}}}
    record = _run_record(tmp_path, "20261122-000000-scored", rows, final)
    assert score_run.main([str(record), "--results", str(tmp_path / "results")]) == 0
    assert not (tmp_path / "results" / "scores").exists()


def test_score_run_official_needs_the_raw_references(tmp_path, monkeypatch, capsys) -> None:
    _stub_metrics(monkeypatch)
    rows = [{"context": "c", "prediction": "p", "references": ["r . "], "group": "name[X]", "seen": None}]
    record = _run_record(tmp_path, "20261122-000000-new", rows)
    code = score_run.main([str(record), "--results", str(tmp_path / "results"),
                           "--data-dir", str(tmp_path / "nowhere")])
    err = capsys.readouterr().err
    assert code == 2 and "testset_w_refs.csv" in err and "pass --data-dir" in err
    assert not (tmp_path / "results" / "scores").exists()


def _e2e_run(run_id: str, final: dict) -> dict:
    return {"run_id": run_id, "status": "completed", "task": "e2e", "model": "gpt2-medium", "method": "lora",
            "seed": 0, "experiment": None, "config": {"train": {"lr": 2e-4}, "task": {"score": True}},
            "metrics": {"primary": "val_loss", "final": final}, "git": {"commit": "0123456789"}, "machine": {}}


def _cells(markdown: str, label: str) -> list[str]:
    line = next(line for line in markdown.splitlines() if line.startswith(f"| {label} |"))
    return [cell.strip() for cell in line.strip("|").split("|")][1:]


def test_tables_show_one_procedure_per_column_and_name_it() -> None:
    both = _e2e_run("20261122-000001-both", {
        "bleu": 0.70, "nist": 8.5, "meteor": 0.45, "rouge_l": 0.70, "cider": 2.4, "procedure": "paper",
        "procedures": {"paper": {"bleu": 0.70, "nist": 8.5, "meteor": 0.45, "rouge_l": 0.70, "cider": 2.4},
                       "official": {"bleu": 0.62, "nist": 8.0, "meteor": 0.45, "rouge_l": 0.67, "cider": 2.2}}})
    # A later run scored before the procedures had names (tokenised references, Perl mteval).
    legacy = _e2e_run("20261122-000002-legacy", {"bleu": 0.99, "nist": 9.9, "meteor": 0.5, "rouge_l": 0.8,
                                                 "cider": 3.0})
    spec = tables.SPECS_BY_NUMBER[1]
    paper = tables.render_table(spec, [both, legacy], "gpt2-medium")
    assert _cells(paper, "LoRA")[2:4] == ["70.00 (paper 69.60)", "8.50 (paper 8.78)"]
    assert "Scoring procedure of every E2E number: `paper`" in paper and "-p" in paper
    assert "Scored with other procedures only, not shown" in paper and "`20261122-000002-legacy` (legacy)" in paper
    official = tables.render_table(spec, [both, legacy], "gpt2-medium", procedures={"e2e": "official"})
    assert _cells(official, "LoRA")[2:4] == ["62.00 (paper 69.60)", "8.00 (paper 8.78)"]
    assert "Scoring procedure of every E2E number: `official`" in official
    assert "paper's numbers in parentheses come from its own procedure" in official
    assert "paper's numbers in parentheses" not in paper
    tex = tables.render_table_latex(spec, [both], "gpt2-medium", procedures={"e2e": "official"})
    assert "62.00" in tex and "procedure of every E2E number: official" in tex


def test_tables_merge_score_records_per_procedure(tmp_path) -> None:
    results = tmp_path / "results"
    run = _e2e_run("20261122-000003-later", {"val_loss": 1.0})
    run["config"]["task"]["score"] = False
    (results / "records").mkdir(parents=True)
    (results / "records" / "run.json").write_text(json.dumps(run))
    scores = results / "scores" / "e2e" / "gpt2-medium" / "lora"
    scores.mkdir(parents=True)
    old = {"run_id": run["run_id"], "metrics": {"bleu": 0.99, "nist": 9.9, "meteor": 0.5, "rouge_l": 0.8,
                                                "cider": 3.0}}
    (scores / f"{run['run_id']}.json").write_text(json.dumps(old))
    loaded = tables.scan_records(results).completed
    assert set(loaded[0]["metrics"]["final"]["procedures"]) == {"legacy"}
    assert "– (paper 69.60)" in _cells(tables.render_all(results, latex=False)["table1_e2e__gpt2-medium.md"], "LoRA")[2]
    new = {"run_id": run["run_id"], "procedure": "paper", "metrics": {"bleu": 0.71},
           "procedures": {"legacy": {"metrics": old["metrics"]}, "paper": {"metrics": {"bleu": 0.71}},
                          "official": {"metrics": {"bleu": 0.63}}}}
    (scores / f"{run['run_id']}.json").write_text(json.dumps(new))
    final = tables.scan_records(results).completed[0]["metrics"]["final"]
    assert final["procedure"] == "paper" and final["bleu"] == 0.71
    assert final["procedures"]["official"] == {"bleu": 0.63}
    files = tables.render_all(results, latex=False, procedure="official")
    assert set(files) == {f"table{n}__gpt2-medium__official.md" for n in
                          ("1_e2e", "2_webnlg", "5_ablation_branch_dropout", "6_lora_lr", "7_update_ratio",
                           "8_start_steps")}
    with pytest.raises(ValueError, match="valid: paper, official"):
        tables.render_all(results, procedure="legacy")



# ------------------------------------------------------------------------------------------------
# Both procedures against measure_scores.py, empty predictions included


@needs_e2e
def test_bleu_nist_of_both_procedures_match_measure_scores(tmp_path) -> None:
    """BLEU and NIST (no Java needed) of each procedure on the sample with three empty outputs.
    The Perl flavour on the paper's references, the old default, is neither number."""
    paper_file, official_file = _sample_reference_files(tmp_path)
    paper_refs = e2e.read_reference_blocks(paper_file.read_text(encoding="utf-8"))
    official_refs = e2e.group_consecutive(e2e.read_reference_table(official_file.read_text(encoding="utf-8")))
    assert len(paper_refs) == len(official_refs) == 20
    for name, refs, tol in (("paper", paper_refs, 1e-12), ("official", official_refs, 1e-9)):
        bleu, nist = e2e.mteval_bleu_nist(SAMPLE_PREDICTIONS, refs, e2e.get_procedure(name).mteval)
        assert bleu == pytest.approx(SAMPLE_OFFICIAL[name]["bleu"], abs=tol), name
        assert nist == pytest.approx(SAMPLE_OFFICIAL[name]["nist"], abs=tol), name
    _, perl_nist_on_paper_refs = e2e.mteval_bleu_nist(SAMPLE_PREDICTIONS, paper_refs, "perl")
    assert abs(perl_nist_on_paper_refs - SAMPLE_OFFICIAL["paper"]["nist"]) > 0.01


@needs_java
def test_ptb_tokenizer_keeps_empty_lines_in_place() -> None:
    # The Stanford jar, run by hand with -preserveLines -lowerCase on "Hello, world.", "", "A cat."
    # (a file ending in an empty line), prints "hello , world .", "", "a cat ." and then an empty
    # line; coco-caption drops the punctuation tokens.
    assert java.ptb_tokenize(["Hello, world.", "", "A cat."]) == ["hello world", "", "a cat"]
    assert java.ptb_tokenize(["A cat.", ""]) == ["a cat", ""]


@pytest.mark.slow
@needs_java
@needs_e2e
def test_both_procedures_match_measure_scores_through_the_command(tmp_path, capsys) -> None:
    """All five metrics, as `python -m deltalora_repro.score` computes them from the same files
    measure_scores.py read (the official CSV as it is), equal measure_scores.py's."""
    paper_file, official_file = _sample_reference_files(tmp_path)
    preds = tmp_path / "pred.txt"
    preds.write_text("".join(p + "\n" for p in SAMPLE_PREDICTIONS), encoding="utf-8")
    for name, refs in (("paper", paper_file), ("official", official_file)):
        assert score.main(["task=e2e", f"predictions={preds}", f"references={refs}", f"procedure={name}"]) == 0
        out = json.loads(capsys.readouterr().out)
        assert (out["procedure"], out["n"], out["n_empty"]) == (name, 20, 3)
        for key, expected in SAMPLE_OFFICIAL[name].items():
            tol = 1e-9 if name == "official" and key in ("bleu", "nist") else 1e-12
            assert out[key] == pytest.approx(expected, abs=tol), (name, key)
