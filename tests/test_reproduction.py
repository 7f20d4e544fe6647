"""The reproduction report: synthetic run records and score records written as the code writes them
(a committed E2E record as the template), the report's numbers against hand computations."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from deltalora_repro import reproduction as rep
from deltalora_repro.config import compose

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = ROOT / "results/records/e2e/smollm2-135m/lora/20261129-215451-8f8c93.json"
E2E = ("bleu", "nist", "meteor", "rouge_l", "cider")


def _write(results: Path, method: str, seed: int, run_id: str, bleu: float, *, lr: float | None = None,
           method_overrides: dict | None = None, train_overrides: dict | None = None,
           experiment: str | None = None, scored: bool = True) -> None:
    """One completed E2E run of smollm2-135m at the paper's settings for `method` (its config the
    composed paper config, as a run records it), BLEU as given, the other metrics constant."""
    record = json.loads(TEMPLATE.read_text())
    record.update(run_id=run_id, method=method, seed=seed, experiment=experiment)
    cfg = compose("task=e2e", f"method={method}")
    record["config"]["method"] = {**OmegaConf.to_container(cfg.method, resolve=True),
                                  **(method_overrides or {})}
    record["config"]["seed"] = seed
    record["config"]["train"].update(lr=cfg.train.lr if lr is None else lr, **(train_overrides or {}))
    path = results / "records" / "e2e" / "smollm2-135m" / method / f"{run_id}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1))
    if scored:
        metrics = dict(bleu=bleu, nist=8.7, meteor=0.46, rouge_l=0.70, cider=2.5)
        score = {"kind": "score", "run_id": run_id, "task": "e2e", "model": "smollm2-135m",
                 "method": method, "procedure": "paper", "metrics": metrics,
                 "procedures": {"paper": {"metrics": metrics}}}
        spath = results / "scores" / "e2e" / "smollm2-135m" / method / f"{run_id}.json"
        spath.parent.mkdir(parents=True, exist_ok=True)
        spath.write_text(json.dumps(score, indent=1))


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("results")
    # LoRA BLEU 68, 69, 70 (x100); seed 1 ran twice, the older run (earlier id) had 50.
    _write(root, "lora", 0, "20260101-000000-aaaa00", 0.680)
    _write(root, "lora", 1, "20260101-000000-aaaa01", 0.500)
    _write(root, "lora", 1, "20260102-000000-aaaa11", 0.690)
    _write(root, "lora", 2, "20260101-000000-aaaa02", 0.700)
    # Delta-LoRA 69, 70.5, 71.5: differences 1, 1.5, 1.5.
    _write(root, "delta-lora", 0, "20260101-000000-bbbb00", 0.690)
    _write(root, "delta-lora", 1, "20260101-000000-bbbb01", 0.705)
    _write(root, "delta-lora", 2, "20260101-000000-bbbb02", 0.715)
    # A trial run (1 epoch) of Delta-LoRA seed 0, newer, with a far-off number: never used.
    _write(root, "delta-lora", 0, "20260103-000000-cccc00", 0.100, train_overrides={"epochs": 1})
    # Delta-LoRA at lambda 1: its own arm.
    _write(root, "delta-lora", 0, "20260101-000000-dddd00", 0.600, method_overrides={"update_ratio": 1})
    # Scaled LoRA 69.5, 70, 71.5: differences -0.5, 0.5, 0.
    _write(root, "scaled-lora", 0, "20260101-000000-eeee00", 0.695)
    _write(root, "scaled-lora", 1, "20260101-000000-eeee01", 0.700)
    _write(root, "scaled-lora", 2, "20260101-000000-eeee02", 0.715)
    # LoRA at lr 6e-4 (Table 6's study), seed 0 only.
    _write(root, "lora", 0, "20260101-000000-ffff00", 0.670, lr=6e-4, experiment="table6/lora-lr")
    return root


@pytest.fixture(scope="module")
def report(results) -> str:
    return rep.render(results)


@pytest.fixture(scope="module")
def group(results):
    from deltalora_repro import tables
    groups = rep.build_groups(tables.scan_records(results), "paper")
    return next(g for g in groups if (g.task, g.model) == ("e2e", "smollm2-135m"))


def _arm(group, label):
    return next(a for a in group.arms if a.label == label)


def test_arms_means_and_sample_sd(group, report):
    labels = [a.label for a in group.arms]
    assert labels == ["LoRA", "LoRA, lr 6e-4", "Scaled LoRA (control)", "Delta-LoRA", "Delta-LoRA, λ 1"]
    lora = _arm(group, "LoRA")
    assert lora.values["bleu"] == pytest.approx({0: 68.0, 1: 69.0, 2: 70.0})
    # mean 69, sample sd sqrt(((-1)^2 + 0 + 1^2) / 2) = 1
    assert "| LoRA | 69.00 ± 1.00 (n=3) | 8.700 ± 0.000 (n=3) | 46.00 ± 0.00 (n=3) |" in report
    # 69, 70.5, 71.5: mean 70.333..., squared deviations 16/9 + 1/36 + 49/36 = 19/6, sd sqrt(19/12)
    assert f"| Delta-LoRA | 70.33 ± {math.sqrt(19 / 12):.2f} (n=3) |" in report
    # The paper's numbers (Table 1, Table 6's lr 6e-4 row), labelled with the paper's model.
    assert "| paper, gpt2-medium (Table 1): LoRA | 69.60 | 8.780 | 45.61 | 71.12 | 2.450 |" in report
    assert "| paper, gpt2-medium (Table 1): Delta-LoRA | 70.84 |" in report
    assert "| paper, gpt2-medium (Table 6): LoRA, lr 6e-4 | 69.63 |" in report
    # every seed's value
    assert "| Delta-LoRA | 2 | 71.50 | 8.700 | 46.00 | 70.00 | 2.500 |" in report


def test_trial_run_left_out(group, report):
    delta = _arm(group, "Delta-LoRA")
    assert delta.runs[0]["run_id"] == "20260101-000000-bbbb00"
    assert "`20260103-000000-cccc00` (train.epochs=1 (paper: 5))" in report
    assert all(r["run_id"] != "20260103-000000-cccc00" for a in group.arms for r in a.runs.values())


def test_other_lambda_is_its_own_arm(group):
    other = _arm(group, "Delta-LoRA, λ 1")
    assert [r["run_id"] for r in other.runs.values()] == ["20260101-000000-dddd00"]
    assert other.values["bleu"] == pytest.approx({0: 60.0})
    assert _arm(group, "Delta-LoRA").values["bleu"][0] == pytest.approx(69.0)


def test_newest_of_duplicate_seeds_used_and_said(group, report):
    assert _arm(group, "LoRA").runs[1]["run_id"] == "20260102-000000-aaaa11"
    assert ("- LoRA, seed 1: the newest run `20260102-000000-aaaa11` is used; the older "
            "`20260101-000000-aaaa01` is not.") in report


def test_paired_differences_and_t_test(group, report):
    c = next(c for c in group.comparisons if c.other.method == "lora" and not c.other.departures
             and c.column.key == "bleu")
    assert c.differences == pytest.approx([1.0, 1.5, 1.5])
    sd = math.sqrt(1 / 12)  # deviations -1/3, 1/6, 1/6
    t = (4 / 3) / (sd / math.sqrt(3))  # = 8
    # Student's t with 2 degrees of freedom has the closed form P(|T| > t) = 1 - t / sqrt(t^2 + 2).
    p = 1 - t / math.sqrt(t * t + 2)
    assert t == pytest.approx(8.0)
    assert c.p == pytest.approx(p, rel=1e-9)
    assert (f"| Delta-LoRA − LoRA | BLEU | 0, 1, 2 | +1.33 | {sd:.2f} | 3 | {p:.3f} | 3 of 3 |"
            in report)
    # Metrics equal on every seed: no spread, no test.
    assert "| Delta-LoRA − LoRA | NIST | 0, 1, 2 | +0.000 | 0.000 | 3 | n/a | 0 of 3 |" in report
    # Only shared seeds pair: lr 6e-4 ran seed 0 only.
    assert "| Delta-LoRA − LoRA, lr 6e-4 | BLEU | 0 | +2.00 | n/a | 1 | n/a | 1 of 1 |" in report


def test_reading_follows_the_rules(report):
    p = 1 - 8 / math.sqrt(66)
    assert (f"- BLEU, Delta-LoRA − LoRA: 3 of 3 seeds higher (sign consistent: higher on every "
            f"seed); mean +1.33, sd 0.29, standard error 0.17; |mean| exceeds its standard error; "
            f"p = {p:.3f}: below 0.05 at n = 3, one test among several, so indicative only.") in report
    assert ("- BLEU, Delta-LoRA − LoRA, lr 6e-4: one paired seed (higher; difference +2.00): no "
            "spread and no test with one seed.") in report
    # Scaled LoRA: differences -0.5, +0.5, 0: mean 0, p = 1 on BLEU, zero elsewhere.
    assert ("- BLEU, Delta-LoRA − Scaled LoRA (control): 1 of 3 seeds higher (sign not consistent "
            "across seeds); mean +0.00, sd 0.50, standard error 0.29; |mean| does not exceed its "
            "standard error; p = 1.000: not distinguishable from zero at n = 3.") in report
    assert ("On no metric is Delta-LoRA − Scaled LoRA distinguishable from zero at n = 3. If that "
            "holds with more seeds, what Delta-LoRA gains over LoRA would be attributable to the "
            "larger branch scale rather than to updating W") in report


def test_reading_mixed_signs_hand_computed():
    from deltalora_repro import tables
    column = tables.Column("bleu", "BLEU", "e2e", "bleu", 100.0)
    diffs = [1.0, -0.5, 2.0]
    mean = 2.5 / 3
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / 2)
    t = mean / (sd / math.sqrt(3))
    p = 1 - t / math.sqrt(t * t + 2)
    ours, theirs = [70.0, 69.5, 72.0], [69.0, 70.0, 70.0]
    c = rep.Comparison(rep.make_arm("lora", ()), column, [0, 1, 2], diffs,
                       rep.paired_p(diffs, ours, theirs))
    assert c.p == pytest.approx(p, rel=1e-9)
    assert rep.reading(c, "Delta-LoRA", "LoRA") == (
        f"BLEU, Delta-LoRA − LoRA: 2 of 3 seeds higher (sign not consistent across seeds); mean "
        f"+0.83, sd {sd:.2f}, standard error {sd / math.sqrt(3):.2f}; |mean| exceeds its standard "
        f"error; p = {p:.3f}: not distinguishable from zero at n = 3.")


def test_missing_seeds_listed_with_commands(report):
    assert "- LoRA, lr 6e-4: seeds 1, 2 missing. One run (seed 1;" in report
    assert ("  python -m deltalora_repro experiment=table6/lora-lr train.lr=6e-4 model=smollm2-135m "
            "data_dir=../shared/data/e2e task.score=false seed=1") in report
    assert ("  python -m deltalora_repro -m launch=gpus experiment=table6/lora-lr train.lr=6e-4 "
            "model=smollm2-135m data_dir=../shared/data/e2e task.score=false seed=1,2") in report
    assert "- LoRA, α 96 (= α(1+λ)): seeds 0, 1, 2 missing." in report
    assert "- Fine-Tuning‡ (ft-qv): seeds 0, 1, 2 missing." in report
    assert ("  python -m deltalora_repro.score_run outputs/results/records/e2e/smollm2-135m/ft-qv/"
            "<run_id>.json") in report
    # arms with all three seeds are not listed
    assert "- LoRA: seeds" not in report.split("## e2e · smollm2-135m")[1].split("## glue")[0]
    assert "- Scaled LoRA (control): seeds" not in report
    # planned groups without any run are listed too
    assert ("  python -m deltalora_repro task=glue/stsb method=delta-lora model=minilm-l6 "
            "data_dir=../shared/data/glue seed=0") in report


@pytest.mark.parametrize("group_key", sorted(rep.EXPECTED))
def test_planned_commands_make_protocol_runs_of_their_arm(group_key):
    """Each planned arm's command, composed as Hydra composes it, is a run of that arm that the
    tables' rules accept (not a trial)."""
    from deltalora_repro import tables
    task, model = group_key
    for method, deps, overrides in rep.EXPECTED[group_key]:
        words = rep.run_command(task, model, overrides, 0)[0].split()[3:]
        cfg = compose(*[w for w in words if not w.startswith("data_dir=")])
        record = {"task": cfg.task.name, "model": cfg.model.name, "method": cfg.method.name,
                  "experiment": next((w.split("=")[1] for w in words if w.startswith("experiment=")), None),
                  "config": {"method": OmegaConf.to_container(cfg.method, resolve=True),
                             "train": OmegaConf.to_container(cfg.train, resolve=True),
                             "task": {"version": cfg.task.get("version")}},
                  "metrics": {"final": {}}}
        assert (record["task"], record["model"]) == group_key
        assert rep.arm_of(record) == rep.make_arm(method, deps), overrides
        assert tables.exclusion_reasons(record) == [], overrides


def test_committed_report_is_current():
    """results/REPRODUCTION.md is what the command makes from the committed records."""
    committed = (ROOT / "results" / rep.OUT_NAME).read_text(encoding="utf-8")
    assert rep.render(ROOT / "results") == committed


def test_cli_bad_input(tmp_path, capsys):
    assert rep.main(["--results", str(tmp_path)]) == 2
    assert "no run records under" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        rep.main(["--results", str(tmp_path), "--procedure", "bogus"])
    assert exc.value.code == 2
    assert "paper" in capsys.readouterr().err


def test_cli_writes_the_report(results, report, capsys):
    assert rep.main(["--results", str(results)]) == 0
    assert (results / "REPRODUCTION.md").read_text(encoding="utf-8") == report


def test_figure3_lists_protocol_runs_of_the_paper_arms_and_says_what_it_lacks(report):
    section = report.split("## Figure 3")[1]
    for run_id in ("aaaa00", "aaaa11", "bbbb00", "bbbb02"):        # LoRA, Delta-LoRA at the paper's settings
        assert f"`20260101-000000-{run_id}`" in section or f"`20260102-000000-{run_id}`" in section
    # a trial run, Delta-LoRA at lambda 1, the control and the lr arm are not Figure 3's
    for run_id in ("cccc00", "dddd00", "eeee00", "ffff00"):
        assert run_id not in section
    assert ("- smollm2-135m: not drawn (no `figures/figure3_e2e__smollm2-135m.csv`). The paper's "
            "figure compares one run each of ft-qv, lora, delta-lora; no protocol run of ft-qv has "
            "saved weights.") in section
    assert ("python -m deltalora_repro.figure3 OUT_FT_QV OUT_LORA OUT_DELTA_LORA --out "
            "results/figures/figure3_e2e__smollm2-135m") in section


def test_figure3_takes_the_latest_run_at_the_papers_settings_of_each_method(tmp_path):
    """figure3 --results: of LoRA runs with weights present, the latest protocol run at the paper's
    settings, not a newer trial run or a newer run at another alpha; without such a run, the
    latest of the others."""
    from deltalora_repro.figure3 import runs_with_weights
    root = tmp_path / "results"
    _write(root, "lora", 0, "20260101-000000-aaaa00", 0.68)                       # protocol
    _write(root, "lora", 1, "20260105-000000-aaaa01", 0.10, train_overrides={"epochs": 1})
    _write(root, "lora", 2, "20260106-000000-aaaa02", 0.69, method_overrides={"alpha": 96})
    _write(root, "delta-lora", 0, "20260103-000000-bbbb00", 0.10, train_overrides={"epochs": 1})
    _write(root, "delta-lora", 1, "20260104-000000-bbbb01", 0.60, method_overrides={"update_ratio": 1})
    for path in (root / "records").rglob("*.json"):
        record = json.loads(path.read_text())
        weights = tmp_path / "runs" / record["run_id"] / "weights.safetensors"
        weights.parent.mkdir(parents=True)
        weights.write_bytes(b"x")
        record["weights"] = {"path": str(weights)}
        path.write_text(json.dumps(record))
    chosen = [d.name for d in runs_with_weights(root)[("e2e", "smollm2-135m")]]
    # LoRA: the protocol run (oldest); Delta-LoRA has none, so its latest run.
    assert chosen == ["20260101-000000-aaaa00", "20260104-000000-bbbb01"]


def _span(run_id: str, start: str, end: str, device: str | None, host: str = "node1",
          kind: str = "cuda", size: int = 1, cpus: int = 32) -> dict:
    return {"run_id": run_id, "started_at": f"2026-01-01T{start}+0000",
            "finished_at": f"2026-01-01T{end}+0000", "config": {"device": device or "auto"},
            "world": {"size": size, "device": device},
            "machine": {"hostname": host, "platform": "Linux-x", "cpu_count": cpus,
                        "device": kind, "device_name": "GPU X"}}


def test_gpu_neighbours_from_hosts_devices_and_times():
    records = [
        _span("a", "10:00:00", "10:10:00", "cuda:0"),
        _span("b", "10:05:00", "10:20:00", "cuda:0"),      # a and b: 10:05-10:10 on one GPU
        _span("c", "10:00:00", "10:30:00", "cuda:1"),      # beside both, on the other GPU
        _span("d", "10:09:00", "10:11:00", None),          # device auto: GPU not recorded
        _span("e", "10:00:00", "10:30:00", "cuda:0", host="node2"),   # another host
        _span("f", "10:00:00", "10:30:00", None, kind="cpu"),         # no GPU
        _span("g", "10:10:00", "10:15:00", "cuda:0"),      # starts as a ends: no overlap with a
        _span("h", "10:19:00", "10:25:00", "cuda:1", size=2),         # 2 processes: several GPUs
        _span("i", "10:00:00", "10:30:00", "cuda:0", cpus=16),        # same hostname, other machine
    ]
    found = rep.gpu_neighbours(records)
    as_tuples = {k: [(n.run_id, n.how, n.seconds) for n in v] for k, v in found.items()}
    assert as_tuples["a"] == [("b", "same GPU", 300.0), ("d", "GPU not recorded", 60.0)]
    assert as_tuples["b"] == [("a", "same GPU", 300.0), ("d", "GPU not recorded", 120.0),
                              ("g", "same GPU", 300.0), ("h", "on several GPUs", 60.0)]
    assert as_tuples["c"] == [("d", "GPU not recorded", 120.0), ("h", "on several GPUs", 360.0)]
    assert as_tuples["d"] == [("a", "GPU not recorded", 60.0), ("b", "GPU not recorded", 120.0),
                              ("c", "GPU not recorded", 120.0), ("g", "GPU not recorded", 60.0)]
    assert "e" not in found and "f" not in found and "i" not in found
    assert rep._neighbours_text(found["a"]) == "`b` (same GPU, 300 s); `d` (GPU not recorded, 60 s)"
    assert rep._neighbours_text([]) == "none found"


def test_gpu_neighbours_skip_what_the_records_do_not_say():
    odd = [
        {**_span("j", "10:00:00", "10:10:00", "cuda:0"), "world": "broken", "machine": None},
        {**_span("k", "10:00:00", "10:10:00", "cuda:0"), "started_at": "2026-01-01T10:00:00"},  # no zone
        {**_span("l", "10:00:00", "10:10:00", "cuda:0"), "finished_at": None},
        _span("m", "10:00:00", "10:10:00", "cuda:0"),
    ]
    odd[3]["machine"]["hostname"] = ""                                            # no hostname
    assert rep.gpu_neighbours(odd) == {}
    # A size that is no number is not read as several processes; the config still names the GPU.
    sizes = [{**_span("p", "10:00:00", "10:10:00", "cuda:0"), "world": {"size": "2"}},
             _span("q", "10:05:00", "10:20:00", "cuda:0")]
    assert [(x.run_id, x.how) for x in rep.gpu_neighbours(sizes)["p"]] == [("q", "same GPU")]
    # 'Z' and fractional seconds are times too.
    pair = [{**_span("n", "10:00:00", "10:10:00", "cuda:0"), "started_at": "2026-01-01T10:00:00Z"},
            {**_span("o", "10:00:00", "10:10:00", "cuda:0"),
             "finished_at": "2026-01-01T10:05:00.500+00:00"}]
    assert [(x.run_id, x.seconds) for x in rep.gpu_neighbours(pair)["n"]] == [("o", 300.5)]


def test_cost_table_names_runs_that_shared_the_gpu(tmp_path):
    for run_id, seed, device, start, end in (("20260101-000000-aaaa00", 0, "cuda:0", "10:00:00", "10:05:00"),
                                             ("20260101-000000-aaaa01", 1, "cuda:1", "10:00:00", "10:08:00"),
                                             ("20260101-000000-aaaa02", 2, "cuda:1", "10:01:00", "10:08:30")):
        _write(tmp_path, "lora", seed, run_id, 0.68)
        path = tmp_path / "records/e2e/smollm2-135m/lora" / f"{run_id}.json"
        record = json.loads(path.read_text())
        record.update(_span(run_id, start, end, device))
        record["machine"]["device_name"] = "NVIDIA H200"
        path.write_text(json.dumps(record))
    text = rep.render(tmp_path)
    assert "| run_id | shared its GPU (inferred) |" in text
    assert "`20260101-000000-aaaa00` | none found |" in text
    # seeds 1 and 2 overlapped from 10:01:00 to 10:08:00 on cuda:1: 420 s.
    assert "`20260101-000000-aaaa01` | `20260101-000000-aaaa02` (same GPU, 420 s) |" in text
    assert "`20260101-000000-aaaa02` | `20260101-000000-aaaa01` (same GPU, 420 s) |" in text
