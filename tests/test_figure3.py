"""Figure 3 from saved runs: cosine similarity of fine-tuned vs pretrained Wq / Wv per block."""
from __future__ import annotations

import csv
import json

import pytest

from .conftest import DATA, make_cfg

E2E = DATA / "e2e"
pytestmark = pytest.mark.skipif(not E2E.is_dir(), reason=f"E2E data not found at {E2E}")

RUN = [f"data_dir={E2E}", "task=e2e", "model=tiny-gpt2", "task.train_max_examples=16",
       "task.eval_max_examples=8", "task.test_max_groups=2", "train.batch_size=8", "train.epochs=1",
       "device=cpu", "train.checkpoint=false", "task.decoding.num_beams=2",
       "task.decoding.max_new_tokens=4", "task.score=false", "save_weights=true",
       "train.warmup_steps=0"]


def test_figure3_from_saved_runs(tmp_path):
    from deltalora_repro import figure3
    from deltalora_repro.run import run
    results = tmp_path / "results"
    dirs = {}
    for method, extra in [("lora", ["train.lr=1e-2"]), ("delta-lora", ["train.lr=1e-2", "method.start_steps=0"]),
                          ("ft", ["train.lr=1e-12"])]:
        cfg = make_cfg(*RUN, f"method={method}", *extra, tmp_path=tmp_path / method)
        cfg.results_dir = str(results)
        record = run(cfg)
        dirs[method] = tmp_path / method / "out"
        assert record["weights"]["tensors"] > 0
    rows = {m: figure3.similarities(d) for m, d in dirs.items()}
    n_layers = 2                                           # tiny-gpt2: 2 blocks x (Wq, Wv)
    for m, r in rows.items():
        assert sorted((x["block"], x["proj"]) for x in r) == [(b, p) for b in range(n_layers) for p in "qv"]
    # lr 1e-12: nothing moves measurably, the similarity is 1; trained LoRA / Delta-LoRA moved every W.
    assert all(x["cosine"] == pytest.approx(1.0, abs=1e-6) for x in rows["ft"])
    for m in ("lora", "delta-lora"):
        assert all(-1.0 <= x["cosine"] < 1.0 - 1e-6 for x in rows[m]), m
    # `make tables` runs this command: it finds the three runs through their records and draws.
    assert figure3.main(["--results", str(results)]) == 0
    assert sorted(p.name for p in (results / "figures").iterdir()) == [
        "figure3_e2e__tiny-gpt2.csv", "figure3_e2e__tiny-gpt2.png"]
    with open(results / "figures" / "figure3_e2e__tiny-gpt2.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert sorted({r["method"] for r in table}) == ["delta-lora", "ft", "lora"] and len(table) == 12
    assert (results / "figures" / "figure3_e2e__tiny-gpt2.png").stat().st_size > 1000
    json.dumps(table)


def test_figure3_cli_names_a_missing_run(tmp_path, capsys):
    from deltalora_repro.figure3 import main
    assert main([str(tmp_path / "nope"), "--out", str(tmp_path / "fig")]) == 2
    assert "not found" in capsys.readouterr().err


@pytest.mark.parametrize("argv, says", [
    ([], "nothing to draw"),
    (["RUN"], "nothing to draw"),                       # run folders without --out
    (["RUN", "--out", "FIG", "--results", "RES"], "not both"),
    (["--out", "FIG", "--results", "RES"], "not both"),
    (["--results", "NOWHERE"], "no run records under"),
])
def test_figure3_cli_refuses_an_unclear_request(tmp_path, capsys, argv, says):
    from deltalora_repro.figure3 import main
    (tmp_path / "RES" / "records").mkdir(parents=True)
    argv = [str(tmp_path / a) if a.isupper() else a for a in argv]
    assert main(argv) == 2
    assert says in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["RES"]      # nothing written


def test_figure3_results_without_saved_weights_draws_nothing(tmp_path, capsys):
    """A completed run whose weights were not kept (or are gone) is passed over, not an error;
    a broken record file does not stop the figure either."""
    from deltalora_repro.figure3 import main
    records = tmp_path / "records" / "e2e"
    records.mkdir(parents=True)
    record = {"run_id": "20261122-160100-aaaaaa", "status": "completed", "task": "e2e",
              "model": "tiny-gpt2", "method": "lora", "seed": 0, "metrics": {},
              "weights": {"path": str(tmp_path / "gone" / "weights.safetensors")}}
    (records / "run.json").write_text(json.dumps(record))
    (records / "broken.json").write_text("{")
    assert main(["--results", str(tmp_path)]) == 0
    assert "no Figure 3" in capsys.readouterr().out
    assert not (tmp_path / "figures").exists()
