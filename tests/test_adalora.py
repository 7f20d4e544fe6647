"""AdaLoRA's budget schedule: the authors' own settings per task, carried over as fractions of
their run, and a clear error (never a silent change) when a schedule does not fit the run."""
from __future__ import annotations

import json
import math

import pytest

from deltalora_repro.errors import ConfigError
from deltalora_repro.methods import build_method
from deltalora_repro.methods.adalora import reference_steps
from deltalora_repro.run import run, validate

from .conftest import DATA, SMALL, build, make_cfg, needs_glue

# Flags of QingruZhang/AdaLoRA's scripts, read off NLU/scripts/run_debertav3_<task>.sh and
# NLG_QA/scripts/run_bart_xsum.sh: --init_warmup, --final_warmup, --mask_interval,
# --reg_orth_coef, --beta1, --beta2, the global batch (--per_device_train_batch_size x processes)
# and --num_train_epochs.
AUTHORS = {
    "glue/rte": (600, 1800, 1, 0.3, 0.85, 0.85, 32, 50),
    "glue/mrpc": (600, 1800, 1, 0.1, 0.85, 0.85, 32, 30),
    "glue/stsb": (800, 2000, 10, 0.3, 0.85, 0.85, 32, 25),
    "glue/cola": (800, 3500, 10, 0.1, 0.85, 0.85, 32, 25),
    "glue/sst2": (6000, 22000, 100, 0.1, 0.85, 0.85, 32, 24),
    "glue/qnli": (2000, 8000, 100, 0.1, 0.85, 0.85, 32, 5),
    "glue/qqp": (8000, 25000, 100, 0.1, 0.85, 0.85, 32, 5),
    "glue/mnli": (8000, 50000, 100, 0.1, 0.85, 0.85, 32, 7),
    "xsum": (6000, 25000, 100, 0.1, 0.85, 0.85, 8 * 8, 25),   # 8 per device x 8 processes
}
# Training-set sizes: counted in the data files where we have them (header line off), else the
# Hugging Face glue dataset card's num_examples of the train split.
COUNTED = {"glue/rte": ("glue/RTE/train.tsv", 1), "glue/sst2": ("glue/SST-2/train.tsv", 1),
           "glue/cola": ("glue/CoLA/train.tsv", 0), "glue/stsb": ("glue/STS-B/train.tsv", 1)}
CARD = {"glue/mrpc": 3668, "glue/qnli": 104743, "glue/qqp": 363846, "glue/mnli": 392702}


def train_rows(task: str) -> int:
    if task in COUNTED:
        path, header = COUNTED[task]
        with open(DATA / path, encoding="utf-8") as f:
            return sum(1 for _ in f) - header
    if task == "xsum":
        split = json.loads((DATA / "xsum" / "XSum-TRAINING-DEV-TEST-SPLIT-90-5-5.json").read_text())
        return len(split["train"])
    return CARD[task]


@needs_glue
@pytest.mark.parametrize("task", sorted(AUTHORS))
def test_composed_config_carries_the_authors_schedule(task):
    cfg = make_cfg("method=adalora", f"task={task}")
    s = cfg.method.schedule                            # its one address
    assert "adalora" not in cfg.task
    assert (s.tinit, s.tfinal, s.delta_t, s.orth_reg_weight, s.beta1, s.beta2, s.batch_size,
            s.epochs) == AUTHORS[task]
    assert s.train_size == train_rows(task)
    # Their trainer's step count: epochs x batches per epoch (last batch short, kept).
    assert reference_steps(s) == s.epochs * math.ceil(train_rows(task) / s.batch_size)


def test_reference_steps_by_hand():
    cfg = make_cfg("method=adalora", "task=glue/rte")
    assert reference_steps(cfg.method.schedule) == 3900       # 50 x ceil(2490 / 32) = 50 x 78
    cfg = make_cfg("method=adalora", "task=xsum")
    assert reference_steps(cfg.method.schedule) == 79725      # 25 x ceil(204045 / 64) = 25 x 3189


@pytest.mark.parametrize("task,total,expected", [
    # The paper's RTE run: 80 epochs x ceil(2490 / 128) = 1600 steps;
    # 1600 x 600 / 3900 = 246.15 -> 246, 1600 x 1800 / 3900 = 738.46 -> 738.
    ("glue/rte", 1600, (246, 738)),
    # The paper's MNLI run: 30 x ceil(392702 / 128) = 30 x 3068 = 92040 steps;
    # x 8000 / 85904 = 8571.4, x 50000 / 85904 = 53571.4.
    ("glue/mnli", 92040, (8571, 53571)),
    # Table 11's XSum run is the authors' own length (batch 64, 25 epochs): their steps come back.
    ("xsum", 79725, (6000, 25000)),
    # E2E (rule: the XSum fractions): 5 x ceil(42061 / 8) = 26290 steps; x 6000 / 79725 = 1978.6,
    # x 25000 / 79725 = 8243.9.
    ("e2e", 26290, (1979, 8244)),
])
def test_schedule_carries_over_as_fractions_of_the_run(task, total, expected):
    method = build_method(make_cfg("method=adalora", f"task={task}").method, total)
    assert (method.tinit, method.tfinal) == expected


def test_explicit_steps_override_the_fractions():
    cfg = make_cfg("method=adalora", "task=glue/rte", "method.tinit=5", "method.tfinal=7")
    method = build_method(cfg.method, 100)
    assert (method.tinit, method.tfinal) == (5, 7)
    cfg = make_cfg("method=adalora", "task=glue/rte", "method.tfinal=7")
    method = build_method(cfg.method, 100)
    assert (method.tinit, method.tfinal) == (15, 7)          # 100 x 600 / 3900 = 15.4 -> 15


def test_a_schedule_that_does_not_fit_is_an_error_naming_the_values():
    """tinit + tfinal >= total steps: once silently replaced by (0, total / 2), now refused."""
    cfg = make_cfg("method=adalora", "task=glue/rte", "method.tinit=4", "method.tfinal=3")
    with pytest.raises(ConfigError) as e:
        build_method(cfg.method, 6)
    msg = str(e.value)
    assert "tinit=4" in msg and "tfinal=3" in msg and ">= 6 optimizer steps" in msg
    assert "method.tinit=4" in msg                              # where the values came from
    # From the task's fractions: 3 steps of RTE's 600/3900 and 1800/3900 round to 0 and 1, which
    # fits; with the authors' values pushed to 1000 + 2800 of 3900 they give 1 + 2 >= 3.
    cfg = make_cfg("method=adalora", "task=glue/rte", "method.schedule.tinit=1000",
                   "method.schedule.tfinal=2800")
    with pytest.raises(ConfigError, match=r"tinit=1 \+ tfinal=2 >= 3 optimizer steps.*"
                                          r"tinit 1000 and tfinal 2800 of the 3900 steps"):
        build_method(cfg.method, 3)
    build_method(make_cfg("method=adalora", "task=glue/rte").method, 3)   # the real values fit


def test_no_step_for_importance_scores_is_an_error():
    cfg = make_cfg("method=adalora", "task=glue/rte", "method.tinit=0", "method.tfinal=1")
    with pytest.raises(ConfigError, match="at least one optimizer step before its final budget"):
        build_method(cfg.method, 2)


@pytest.mark.parametrize("override,message", [
    ("method.schedule.tfinal=3400", r"method.schedule.tinit \+ method.schedule.tfinal must be < "
                                    r"the 3900 steps of the run they were written for, got 4000"),
    ("method.schedule.delta_t=0", "method.schedule.delta_t must be a positive integer, got 0"),
    ("method.schedule.beta1=1.0", r"method.schedule.beta1 must be in \[0, 1\), got 1.0"),
    ("method.schedule.orth_reg_weight=-0.1", "method.schedule.orth_reg_weight must be >= 0"),
    ("method.tinit=-1", "method.tinit must be null or an integer >= 0, got -1"),
])
def test_bad_schedule_values_are_rejected_before_loading(override, message):
    with pytest.raises(ConfigError, match=message):
        validate(make_cfg("method=adalora", "task=glue/rte", override))


def test_a_task_without_a_schedule_is_named():
    with pytest.raises(ConfigError, match=r"adalora needs a budget schedule for the task "
                                          r"\(method.schedule: .*configs/paper/method/adalora/"):
        validate(make_cfg("method=adalora", "task=glue/rte", "~method.schedule"))


@needs_glue
def test_run_record_carries_the_schedule_and_peft_gets_the_scaled_steps(tmp_path):
    cfg = make_cfg("model=tiny-roberta", "method=adalora", *SMALL, "train.epochs=2",
                   "train.checkpoint=false", "save_weights=false", tmp_path=tmp_path)
    record = run(cfg)
    expected = {"tinit": 600, "tfinal": 1800, "delta_t": 1, "orth_reg_weight": 0.3,
                "batch_size": 32, "epochs": 50, "train_size": 2490}
    schedule = record["config"]["method"]["schedule"]
    assert {k: schedule[k] for k in expected} == expected
    assert "adalora" not in record["config"]["task"]
    assert record["total_steps"] == 12                          # 2 epochs x 48 rows / 8
    *_, method, _ = build(cfg)
    # 12 x 600 / 3900 = 1.85 -> 2; 12 x 1800 / 3900 = 5.54 -> 6.
    assert (method.peft_config.tinit, method.peft_config.tfinal) == (2, 6)
    assert record["method_settings"] == {"tinit": 2, "tfinal": 6, "reference_steps": 3900}
    assert method.peft_config.deltaT == 1 and method.peft_config.total_step == 12
