"""Bad input through the real command lines: a clear one-line message, exit status 2, no
traceback, nothing written, nothing existing changed.

Every case runs as its own process in its own empty working folder; the processes run a few at a
time (each one loads Python, Hydra and, for checks on the composed config, torch).
"""
from __future__ import annotations

import hashlib
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from .conftest import DATA, GLUE, ROOT, child_env

E2E = DATA / "e2e"
pytestmark = pytest.mark.skipif(not GLUE.is_dir(), reason=f"GLUE data not found at {GLUE}")
TINY = ["model=tiny-roberta", f"data_dir={GLUE}"]


def _data_with(fixtures: Path, name: str, train_text: bytes) -> str:
    """A GLUE folder whose RTE train.tsv is `train_text` (dev.tsv is the real one)."""
    folder = fixtures / name / "RTE"
    folder.mkdir(parents=True)
    (folder / "train.tsv").write_bytes(train_text)
    (folder / "dev.tsv").write_bytes((GLUE / "RTE" / "dev.tsv").read_bytes())
    return str(fixtures / name)


def _cases(fixtures: Path) -> dict[str, tuple[list[str], str]]:
    """name -> (command line after `python`, expected words in stderr)."""
    header = (GLUE / "RTE" / "train.tsv").read_bytes().split(b"\n", 1)[0] + b"\n"
    rows = b"\n".join((GLUE / "RTE" / "train.tsv").read_bytes().split(b"\n")[:4]) + b"\n"
    bad_byte = _data_with(fixtures, "u", rows + b"9\tbad \xff\tx\tentailment\n")
    header_only = _data_with(fixtures, "h", header)
    existing = fixtures / "existing-run"
    existing.mkdir()
    (existing / "run.json").write_text('{"run_id": "earlier"}\n')
    main = ["-m", "deltalora_repro"]
    return {
        "task typo": ([*main, "task=glue/rtx"], "did you mean task=glue/rte"),
        "experiment sweep, task unnamed": ([*main, "-m", "experiment=table1/lora,table1/delta-lora",
                                            "task.score=false"], "add task=e2e"),
        "experiment typo": ([*main, "experiment=table1/lorra"], "did you mean experiment=table1/lora"),
        "model typo": ([*main, "model=tiny-gtp2"], "did you mean model=tiny-gpt2"),
        "unknown method": ([*main, "method=nope"], "method=nope is not a config"),
        "+key typo": ([*main, *TINY, "+method.rnak=4"], "did you mean method.rank"),
        "key typo": ([*main, *TINY, "method.rnak=4"], "did you mean method.rank"),
        "train key typo": ([*main, *TINY, "train.lrr=1e-3"], "did you mean train.lr"),
        "seed not a number": ([*main, *TINY, "seed=abc"], "seed must be an integer >= 0, got 'abc'"),
        "negative seed": ([*main, *TINY, "seed=-1"], "seed must be an integer >= 0, got -1"),
        "negative warmup": ([*main, *TINY, "train.warmup_steps=-5"], "train.warmup_steps must be"),
        "warmup ratio 1": ([*main, *TINY, "train.warmup_ratio=1.0"], "train.warmup_ratio must be in [0, 1)"),
        "max_length 0": ([*main, *TINY, "task.max_length=0"], "task.max_length must be a positive"),
        "eval batch 0": ([*main, *TINY, "train.eval_batch_size=0"], "train.eval_batch_size must be"),
        "log_every 0": ([*main, *TINY, "train.log_every=0"], "train.log_every must be a positive"),
        "no training rows": ([*main, *TINY, "task.train_max_examples=0"], "task.train_max_examples must be"),
        "lr not a number": ([*main, *TINY, "train.lr=abc"], "train.lr must be > 0"),
        "negative lr": ([*main, *TINY, "train.lr=-1"], "train.lr must be > 0"),
        "rank 0": ([*main, *TINY, "method.rank=0"], "method.rank must be a positive integer"),
        "dropout 1.5": ([*main, *TINY, "method.lora_dropout=1.5"], "method.lora_dropout must be in [0, 1)"),
        "batch 0": ([*main, *TINY, "train.batch_size=0"], "train.batch_size must be a positive"),
        "epochs 0": ([*main, *TINY, "train.epochs=0"], "train.epochs must be a positive"),
        "grad_accum not dividing": ([*main, *TINY, "train.batch_size=8", "train.grad_accum=3"],
                                    "not divisible by train.grad_accum 3"),
        "max_steps 0": ([*main, *TINY, "train.max_steps=0"], "train.max_steps must be null or a positive"),
        "precision fp16": ([*main, *TINY, "train.precision=fp16"], "fp32, bf16 or auto"),
        "device tpu": ([*main, *TINY, "device=tpu"], "auto, cpu or cuda[:N]"),
        "compile layers": ([*main, *TINY, "train.compile=layers"], "valid: auto, false, true, model, blocks"),
        "checkpoint maybe": ([*main, *TINY, "train.checkpoint=maybe"], "train.checkpoint must be true or false"),
        "missing data_dir": ([*main, "model=tiny-roberta", "data_dir=/nonexistent/glue"],
                             "data_dir '/nonexistent/glue' is not a directory"),
        "delta-lora update mode": ([*main, *TINY, "method=delta-lora", "method.update=later"],
                                   "one of auto, explicit, deferred"),
        "adalora target above rank": ([*main, *TINY, "method=adalora", "method.target_rank=99"],
                                      "method.target_rank must be in 1..8"),
        "e2e beams 0": ([*main, "task=e2e", "model=tiny-gpt2", f"data_dir={E2E}",
                         "task.decoding.num_beams=0"], "task.decoding.num_beams must be a positive"),
        "results_dir unwritable": ([*main, *TINY, "results_dir=/proc/deltalora-results"],
                                   "results_dir='/proc/deltalora-results' cannot be written"),
        "output_dir holds a run": ([*main, *TINY, f"output_dir={existing}"],
                                   "already holds a run (run.json)"),
        "header-only train file": ([*main, "model=tiny-roberta", f"data_dir={header_only}"],
                                   "train.tsv has a header but no rows"),
        "non-UTF-8 byte": ([*main, "model=tiny-roberta", f"data_dir={bad_byte}"],
                           "train.tsv, line 5: not UTF-8 text (byte 0xff"),
        "dataset not on the hub offline": ([*main, "model=tiny-roberta"],
                                           "cannot load nyu-mll/glue from the Hugging Face hub"),
        "score: no predictions": (["-m", "deltalora_repro.score", "task=e2e"], "predictions"),
        "score: unknown task": (["-m", "deltalora_repro.score", "task=wmt", "predictions=x"],
                                "valid tasks: e2e, webnlg"),
        "promote: not a record": (["-m", "deltalora_repro.promote", str(existing / "run.json")],
                                  "not a run record"),
    }


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    fixtures = tmp_path_factory.mktemp("fixtures")
    cases = _cases(fixtures)
    before = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in fixtures.rglob("*") if p.is_file()}
    env = child_env(HF_DATASETS_OFFLINE="1")

    def one(name: str):
        cwd = tmp_path_factory.mktemp("cwd")
        args, _ = cases[name]
        done = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True,
                              text=True, timeout=300, stdin=subprocess.DEVNULL)
        return name, (done, sorted(str(p.relative_to(cwd)) for p in cwd.rglob("*")))

    with ThreadPoolExecutor(max_workers=3) as pool:
        results = dict(pool.map(one, cases))
    after = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in fixtures.rglob("*") if p.is_file()}
    return cases, results, before == after


def test_at_least_thirty_cases(tmp_path):
    assert len(_cases(tmp_path)) >= 30


def test_every_bad_input_is_refused_cleanly(outcomes):
    cases, results, fixtures_unchanged = outcomes
    problems = []
    for name, (done, written) in sorted(results.items()):
        _, expected = cases[name]
        err = done.stderr
        lines = [line for line in err.strip().splitlines() if line.startswith("error:")]
        if done.returncode != 2:
            problems.append(f"{name}: exit {done.returncode}: {err[-600:]}")
        elif "Traceback" in err:
            problems.append(f"{name}: traceback: {err[-600:]}")
        elif expected not in err:
            problems.append(f"{name}: message lacks {expected!r}: {err[-600:]}")
        elif len(lines) != 1:
            problems.append(f"{name}: expected one error line, got {lines}")
        if written:
            problems.append(f"{name}: wrote {written}")
    assert not problems, "\n".join(problems)
    assert fixtures_unchanged


COMMANDS = ["deltalora_repro", "deltalora_repro.score", "deltalora_repro.score_run",
            "deltalora_repro.tables", "deltalora_repro.promote", "deltalora_repro.export",
            "deltalora_repro.bench", "deltalora_repro.figure3"]


def test_every_command_has_help_with_its_usage():
    env = child_env()

    def one(module):
        return module, subprocess.run([sys.executable, "-m", module, "--help"], env=env, cwd=ROOT,
                                      capture_output=True, text=True, timeout=120)

    with ThreadPoolExecutor(max_workers=3) as pool:
        for module, done in pool.map(one, COMMANDS):
            assert done.returncode == 0, (module, done.stderr[-500:])
            assert f"python -m {module}" in done.stdout, module


def test_an_experiment_sweep_setting_a_key_its_default_group_lacks_is_refused():
    """Hydra composes a multirun's shared settings without the swept experiment, so a task key
    that only the experiments' task has fails there; one the default task (glue/rte) has too,
    or a sweep that names the task, composes."""
    from deltalora_repro.__main__ import check_experiment_sweep
    sweep = ["-m", "experiment=table1/lora,controls/scaled-lora"]
    assert "add task=e2e" in check_experiment_sweep([*sweep, "task.score=false"])
    assert check_experiment_sweep([*sweep, "task=e2e", "task.score=false"]) is None
    assert check_experiment_sweep([*sweep, "task.max_length=64"]) is None       # glue/rte has it
    assert check_experiment_sweep([*sweep, "task.train_max_examples=96"]) is None  # null there
    assert check_experiment_sweep([*sweep, "++task.score=false"]) is None       # adds if absent
    assert check_experiment_sweep(["experiment=table1/lora", "task.score=false"]) is None
    assert check_experiment_sweep(["-m", "experiment=table1/lora", "task.score=false"]) is None
