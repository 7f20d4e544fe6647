"""`python -m deltalora_repro.score`: argument parsing, input files, errors (exit status 2).

The metric functions are replaced by stubs that echo what they were given, so these tests check
the command's plumbing; the metrics themselves are tested in test_nlg_metrics.py. One slow test
runs the real command end to end.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from deltalora_repro import score
from deltalora_repro.metrics import e2e as e2e_module
from deltalora_repro.metrics import java
from deltalora_repro.metrics import webnlg as webnlg_module
from .conftest import DATA, java_available

ROOT = Path(__file__).resolve().parents[1]
needs_e2e = pytest.mark.skipif(not (DATA / "e2e" / "testset_w_refs.csv").is_file(), reason="E2E data not found")
needs_webnlg = pytest.mark.skipif(not (DATA / "webnlg2017").is_dir(), reason="WebNLG data not found")


@pytest.fixture
def stub_metrics(monkeypatch):
    """Replace the metric functions; each returns counts describing its inputs."""
    calls = {}

    def e2e_stub(predictions, references, *, mteval):
        calls["e2e"] = (predictions, references, mteval)
        return {"bleu": 0.5}

    def webnlg_stub(predictions, references, seen, *, lora_preprocess):
        calls["webnlg"] = (predictions, references, seen, lora_preprocess)
        return {"bleu_all": 0.5, "n_seen": sum(seen) if seen is not None else -1}

    monkeypatch.setattr(e2e_module, "e2e_metrics", e2e_stub)
    monkeypatch.setattr(webnlg_module, "webnlg_metrics_by_split", webnlg_stub)
    return calls


def run(capsys, *args: str) -> tuple[int, dict | None, str]:
    code = score.main(list(args))
    out, err = capsys.readouterr()
    return code, (json.loads(out) if out.strip() else None), err


def write(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_explicit_reference_blocks(tmp_path, capsys, stub_metrics) -> None:
    preds = write(tmp_path, "p.txt", "pred one\npred two\n")
    refs = write(tmp_path, "r.txt", "ref 1a\nref 1b\n\nref 2a\n\n")
    code, out, _ = run(capsys, "task=e2e", f"predictions={preds}", f"references={refs}", "procedure=paper")
    assert code == 0
    assert (out["procedure"], out["bleu"], out["n"], out["n_empty"]) == ("paper", 0.5, 2, 0)
    assert "blank-line-separated blocks" in out["references"] and "measure_scores.py -p" in out["description"]
    assert stub_metrics["e2e"] == (["pred one", "pred two"], [["ref 1a", "ref 1b"], ["ref 2a"]], "python")


def test_procedure_picks_the_mteval_flavour_paper_by_default(tmp_path, capsys, stub_metrics) -> None:
    """paper (the default) is measure_scores.py -p, the Python mteval; official the Perl one.
    (The command used to default to the Perl flavour whatever the references.)"""
    preds = write(tmp_path, "p.txt", "pred one\npred two\n")
    refs = write(tmp_path, "r.txt", "ref 1a\nref 1b\n\nref 2a\n")
    code, out, _ = run(capsys, "task=e2e", f"predictions={preds}", f"references={refs}")
    assert code == 0 and out["procedure"] == "paper" and stub_metrics["e2e"][2] == "python"
    code, out, _ = run(capsys, "task=e2e", f"predictions={preds}", f"references={refs}", "procedure=official")
    assert code == 0 and out["procedure"] == "official" and stub_metrics["e2e"][2] == "perl"


def test_bad_procedure_and_retired_keys(tmp_path, capsys, stub_metrics) -> None:
    code, _, err = run(capsys, "task=e2e", "predictions=x", "procedure=lora")
    assert code == 2 and "unknown procedure 'lora'" in err and "paper, official" in err
    code, _, err = run(capsys, "task=e2e", "predictions=x", "mteval=perl")
    assert code == 2 and "procedure=" in err and "Perl" in err
    code, _, err = run(capsys, "task=webnlg", "predictions=x", "lora_preprocess=false")
    assert code == 2 and "procedure=" in err
    assert not stub_metrics


def test_single_reference_file_without_blank_lines(tmp_path, capsys, stub_metrics) -> None:
    # measure_scores.py reads a file without blank lines as one reference per input.
    preds = write(tmp_path, "p.txt", "a\nb\n")
    refs = write(tmp_path, "r.txt", "ref a\nref b\n")
    code, out, _ = run(capsys, "task=e2e", f"predictions={preds}", f"references={refs}")
    assert code == 0 and stub_metrics["e2e"][1] == [["ref a"], ["ref b"]]


def test_two_blank_lines_are_an_input_without_references(tmp_path, capsys, stub_metrics) -> None:
    preds = write(tmp_path, "p.txt", "a\nb\n")
    refs = write(tmp_path, "r.txt", "ref a\n\n\nref b\n")
    code, _, err = run(capsys, "task=e2e", f"predictions={preds}", f"references={refs}")
    assert code == 2 and "line 3 is blank after a blank line" in err and "CSV" in err
    assert "e2e" not in stub_metrics


def test_reference_csv_is_grouped_by_consecutive_mr(tmp_path, capsys, stub_metrics) -> None:
    # The official file's layout: a quoted "mr","ref" header, one row per reference.
    preds = write(tmp_path, "p.txt", "pred one\npred two\n")
    refs = write(tmp_path, "refs.csv", '"mr","ref"\n"name[A], food[Thai]","A serves Thai food."\n'
                 '"name[A], food[Thai]","Thai food, at A."\n"name[B]","B it is."\n')
    code, out, _ = run(capsys, "task=e2e", f"predictions={preds}", f"references={refs}", "procedure=official")
    assert code == 0 and "table of 3 MR, reference rows" in out["references"]
    assert stub_metrics["e2e"] == (["pred one", "pred two"],
                                   [["A serves Thai food.", "Thai food, at A."], ["B it is."]], "perl")
    # Detected by its header too, whatever the file name; a TSV works the same way.
    tsv = write(tmp_path, "refs.txt", "src\ttrg\nname[A]\tA one.\nname[B]\tB one.\n")
    code, out, _ = run(capsys, "task=e2e", f"predictions={preds}", f"references={tsv}")
    assert code == 0 and stub_metrics["e2e"][1] == [["A one."], ["B one."]]


def test_reference_csv_without_known_columns_is_refused(tmp_path, capsys, stub_metrics) -> None:
    preds = write(tmp_path, "p.txt", "pred one\n")
    refs = write(tmp_path, "refs.csv", "input,text\nname[A],A one.\n")
    code, _, err = run(capsys, "task=e2e", f"predictions={preds}", f"references={refs}")
    assert code == 2 and "exactly one MR column" in err and "['input', 'text']" in err
    assert "e2e" not in stub_metrics


def test_unknown_task_lists_valid_ones(capsys) -> None:
    code, out, err = run(capsys, "task=xsum", "predictions=x")
    assert code == 2 and out is None
    assert "unknown task 'xsum'" in err and "e2e, webnlg" in err


def test_unknown_key_and_bad_syntax(capsys) -> None:
    code, _, err = run(capsys, "task=e2e", "predictions=x", "beam=3")
    assert code == 2 and "unknown argument 'beam'" in err
    code, _, err = run(capsys, "task=e2e", "predictions")
    assert code == 2 and "key=value" in err


def test_missing_file(tmp_path, capsys) -> None:
    code, _, err = run(capsys, "task=e2e", f"predictions={tmp_path / 'nope.txt'}", f"references={tmp_path / 'r'}")
    assert code == 2 and "predictions file not found" in err and "nope.txt" in err


def test_unreadable_file(tmp_path, capsys) -> None:
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"\xff\xfe\xfa not utf-8\n")
    refs = write(tmp_path, "r.txt", "a\n")
    code, _, err = run(capsys, "task=e2e", f"predictions={bad}", f"references={refs}")
    assert code == 2 and "cannot read predictions file" in err


def test_count_mismatch_names_both_counts(tmp_path, capsys, stub_metrics) -> None:
    preds = write(tmp_path, "p.txt", "one\ntwo\nthree\n")
    refs = write(tmp_path, "r.txt", "a\n\nb\n")
    code, _, err = run(capsys, "task=e2e", f"predictions={preds}", f"references={refs}")
    assert code == 2 and "3 predictions" in err and "2 reference groups" in err
    assert "e2e" not in stub_metrics


def test_empty_prediction_lines_are_scored_and_counted(tmp_path, capsys, stub_metrics) -> None:
    """An empty line is an empty output, as e2e-metrics and GenerationEval read it (the command
    used to refuse it); a last line break adds no prediction, a blank last line does."""
    preds = write(tmp_path, "p.txt", "one\n\nthree\n  \n")
    refs = write(tmp_path, "r.txt", "a\n\nb\n\nc\n\nd\n")
    code, out, _ = run(capsys, "task=e2e", f"predictions={preds}", f"references={refs}")
    assert code == 0 and (out["n"], out["n_empty"]) == (4, 2)
    assert stub_metrics["e2e"][0] == ["one", "", "three", ""]
    code, out, _ = run(capsys, "task=webnlg", f"predictions={preds}", f"references={refs}")
    assert code == 0 and (out["n"], out["n_empty"]) == (4, 2)
    assert stub_metrics["webnlg"][0] == ["one", "", "three", "  "]
    # A wrong number of lines is still an error.
    short = write(tmp_path, "q.txt", "one\n\n")
    code, _, err = run(capsys, "task=e2e", f"predictions={short}", f"references={refs}")
    assert code == 2 and "2 predictions" in err and "4 reference groups" in err


def test_missing_java_is_a_clean_error(tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.delenv("JAVA_HOME", raising=False)
    monkeypatch.setattr(java.shutil, "which", lambda name: None)
    preds = write(tmp_path, "p.txt", "a cat\n")
    refs = write(tmp_path, "r.txt", "a cat\n")
    code, _, err = run(capsys, "task=e2e", f"predictions={preds}", f"references={refs}")
    assert code == 2 and "Java runtime" in err


@needs_e2e
def test_e2e_default_references_and_csv_predictions(tmp_path, capsys, stub_metrics) -> None:
    data_dir = str(DATA / "e2e")
    lines = write(tmp_path, "p.txt", "".join(f"prediction {i}\n" for i in range(630)))
    code, out, _ = run(capsys, "task=e2e", f"predictions={lines}", f"data_dir={data_dir}")
    assert code == 0 and out["n"] == 630 and out["procedure"] == "paper"
    _, refs, mteval = stub_metrics["e2e"]
    assert len(refs) == 630 and sum(map(len, refs)) == 4693 and mteval == "python"
    # paper: the tokenised test file's references, stripped (lora_format/test.txt, lines 1-2).
    assert refs[0] == ["A coffee shop in the city centre area called Blue Spice .",
                       "Blue Spice is a coffee shop in city centre ."]
    code, out, _ = run(capsys, "task=e2e", f"predictions={lines}", f"data_dir={data_dir}", "procedure=official")
    assert code == 0 and out["procedure"] == "official" and "testset_w_refs.csv" in out["references"]
    _, refs, mteval = stub_metrics["e2e"]
    assert len(refs) == 630 and sum(map(len, refs)) == 4693 and mteval == "perl"
    # official: testset_w_refs.csv's raw references (its lines 2-3), in the same input order.
    assert refs[0] == ["A coffee shop in the city centre area called Blue Spice.",
                       "Blue Spice is a coffee shop in city centre."]

    # The official file itself as references= (e2e-metrics reads it as it is).
    code, out, _ = run(capsys, "task=e2e", f"predictions={lines}",
                       f"references={DATA / 'e2e' / 'testset_w_refs.csv'}", "procedure=official")
    assert code == 0 and stub_metrics["e2e"][1] == refs

    # CSV rows in any order, keyed by the raw MR: put back in test order.
    from deltalora_repro.tasks.e2e_data import group_references, load_e2e
    groups = group_references(load_e2e("test", data_dir).examples)
    rows = [(ex.group, f"pred for {i}") for i, (ex, _) in enumerate(groups)][::-1]
    import csv
    with open(tmp_path / "p.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["mr", "prediction"])
        writer.writerows(rows)
    code, out, _ = run(capsys, "task=e2e", f"predictions={tmp_path / 'p.csv'}", f"data_dir={data_dir}")
    assert code == 0
    preds, _, _ = stub_metrics["e2e"]
    assert preds[:2] == ["pred for 0", "pred for 1"]

    # Too few lines: both counts in the message.
    short = write(tmp_path, "short.txt", "x\n" * 629)
    code, _, err = run(capsys, "task=e2e", f"predictions={short}", f"data_dir={data_dir}")
    assert code == 2 and "629 predictions" in err and "630 reference groups" in err


@needs_webnlg
def test_webnlg_default_references_carry_seen_flags(tmp_path, capsys, stub_metrics) -> None:
    preds = write(tmp_path, "p.txt", "".join(f"prediction {i}\n" for i in range(1862)))
    code, out, _ = run(capsys, "task=webnlg", f"predictions={preds}", f"data_dir={DATA / 'webnlg2017'}")
    assert code == 0 and (out["bleu_all"], out["n_seen"], out["procedure"]) == (0.5, 971, "paper")
    refs = write(tmp_path, "r.txt", "a\n\nb\n")
    two = write(tmp_path, "two.txt", "x\ny\n")
    code, out, _ = run(capsys, "task=webnlg", f"predictions={two}", f"references={refs}", "procedure=official")
    assert code == 0 and out["n_seen"] == -1  # no categories without the test set
    assert stub_metrics["webnlg"][3] is False and out["procedure"] == "official"
    code, out, _ = run(capsys, "task=webnlg", f"predictions={two}", f"references={refs}")
    assert code == 0 and stub_metrics["webnlg"][3] is True and out["procedure"] == "paper"


@pytest.mark.slow
@needs_e2e
def test_real_command_end_to_end(tmp_path) -> None:
    # The real metrics on a 3-input E2E sample; e2e-metrics' values for it come from
    # test_nlg_metrics.py's machinery, here we check the command runs and prints the five keys.
    if not java_available():
        pytest.skip("no Java runtime")
    preds = write(tmp_path, "p.txt", "Blue Spice is a coffee shop in the city centre.\n"
                                     "There is a coffee shop Blue Spice in the riverside area.\n")
    refs = write(tmp_path, "r.txt", "A coffee shop in the city centre area called Blue Spice.\n"
                                    "Blue Spice is a coffee shop in city centre.\n\n"
                                    "At the riverside, there is a coffee shop called The Blue Spice.\n")
    proc = subprocess.run([sys.executable, "-m", "deltalora_repro.score", "task=e2e", f"predictions={preds}",
                           f"references={refs}"], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert set(out) == {"bleu", "nist", "meteor", "rouge_l", "cider", "task", "procedure", "description",
                        "references", "n", "n_empty"}
    assert (out["procedure"], out["n"], out["n_empty"]) == ("paper", 2, 0)
    assert 0 < out["bleu"] < 1 and 0 < out["meteor"] < 1


def test_score_run_scores_kept_xsum_predictions_and_checks_their_count(tmp_path):
    """score_run re-scores a run's kept predictions into results/scores/ (never touching the run
    record) and refuses a predictions file of the wrong length."""
    from deltalora_repro.metrics.xsum import xsum_rouge
    from deltalora_repro.score_run import main
    rows = [{"id": "1", "prediction": "The cat sat on the mat.", "reference": "A cat sat on a mat."},
            {"id": "2", "prediction": "Rain is due.", "reference": "Heavy rain is expected today."}]
    preds = tmp_path / "preds.jsonl"
    preds.write_text("".join(json.dumps(r) + "\n" for r in rows))
    record = {"run_id": "r1", "task": "xsum", "model": "tiny-bart", "method": "lora",
              "data": {"test": {"rows_used": 2}}, "output_dir": str(tmp_path)}
    rec = tmp_path / "r1.json"
    rec.write_text(json.dumps(record))
    assert main([str(rec), "--predictions", str(preds), "--results", str(tmp_path / "results")]) == 0
    out = json.loads((tmp_path / "results/scores/xsum/tiny-bart/lora/r1.json").read_text())
    assert out["metrics"] == xsum_rouge([r["prediction"] for r in rows], [r["reference"] for r in rows])
    assert 0 < out["metrics"]["rouge1"] < 1 and out["predictions"]["n"] == 2
    record["data"]["test"]["rows_used"] = 3
    rec.write_text(json.dumps(record))
    assert main([str(rec), "--predictions", str(preds), "--results", str(tmp_path / "r2")]) == 2
