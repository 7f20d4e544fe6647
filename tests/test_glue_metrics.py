"""Golden values for the GLUE metrics, each worked out by hand in the comments."""

from __future__ import annotations

import math

import numpy as np
import pytest

from deltalora_repro.errors import ConfigError
from deltalora_repro.metrics.glue import glue_metrics
from deltalora_repro.tasks.glue_data import GLUE_SPECS

# Shared binary example. Pairs (label, pred):
#   (1,1) (1,1) (0,1) (0,0) (1,0) (1,1)
#   TP = 3 (idx 0, 1, 5), FP = 1 (idx 2), TN = 1 (idx 3), FN = 1 (idx 4)
LABELS = [1, 1, 0, 0, 1, 1]
PREDS = [1, 1, 1, 0, 0, 1]


def test_accuracy_only_for_plain_classification() -> None:
    # 4 of 6 correct (TP + TN).
    assert glue_metrics("rte", PREDS, LABELS) == {"accuracy": pytest.approx(4 / 6)}


def test_cola_matthews_correlation() -> None:
    # MCC = (TP*TN - FP*FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN))
    #     = (3*1 - 1*1) / sqrt(4 * 4 * 2 * 2) = 2 / 8 = 0.25
    scores = glue_metrics("cola", np.array(PREDS), np.array(LABELS))
    assert set(scores) == {"accuracy", "matthews_correlation"}
    assert scores["matthews_correlation"] == pytest.approx(0.25)
    assert scores["accuracy"] == pytest.approx(4 / 6)


@pytest.mark.parametrize("task", ["mrpc", "qqp"])
def test_f1_of_positive_class(task: str) -> None:
    # precision = TP/(TP+FP) = 3/4, recall = TP/(TP+FN) = 3/4, F1 = 3/4.
    scores = glue_metrics(task, PREDS, LABELS)
    assert set(scores) == {"accuracy", "f1"}
    assert scores["f1"] == pytest.approx(0.75)


def test_f1_uses_class_one_as_positive() -> None:
    # labels [1,1,1,0], preds [1,1,0,1]
    #   class 1: TP=2, FP=1, FN=1 -> F1 = 2*TP / (2*TP + FP + FN) = 4/6 = 2/3
    #   class 0: TP=0            -> F1 = 0, so a wrong positive class would show.
    assert glue_metrics("mrpc", [1, 1, 0, 1], [1, 1, 1, 0])["f1"] == pytest.approx(2 / 3)


def test_mnli_three_classes() -> None:
    # 3 of 5 correct.
    assert glue_metrics("mnli", [0, 1, 2, 2, 0], [0, 1, 2, 1, 1]) == {"accuracy": pytest.approx(0.6)}


def test_stsb_correlations() -> None:
    # x = [1,2,3,4], y = [2,4,5,9]; means 2.5 and 5.
    # dx = [-1.5,-0.5,0.5,1.5], dy = [-3,-1,0,4]
    # sum dx*dy = 4.5 + 0.5 + 0 + 6 = 11; sum dx^2 = 5; sum dy^2 = 26
    # pearson = 11 / sqrt(5 * 26) = 11 / sqrt(130); y rises with x, so spearman = 1.
    scores = glue_metrics("stsb", [1.0, 2.0, 3.0, 4.0], [2.0, 4.0, 5.0, 9.0])
    assert set(scores) == {"pearson", "spearman", "pearson_spearman_avg"}
    pearson = 11 / math.sqrt(130)
    assert scores["pearson"] == pytest.approx(pearson)
    assert scores["spearman"] == pytest.approx(1.0)
    assert scores["pearson_spearman_avg"] == pytest.approx((pearson + 1.0) / 2)
    assert all(isinstance(value, float) for value in scores.values())


def test_stsb_spearman_on_swapped_ranks() -> None:
    # x = [1,2,3,4], y = [1,3,2,4]: rank differences d = [0,-1,1,0], sum d^2 = 2
    # spearman = 1 - 6*2 / (4*(16-1)) = 1 - 12/60 = 0.8. Values are already ranks, so pearson = 0.8.
    scores = glue_metrics("stsb", [1, 2, 3, 4], [1, 3, 2, 4])
    assert scores["spearman"] == pytest.approx(0.8)
    assert scores["pearson"] == pytest.approx(0.8)


def test_whole_number_floats_count_as_class_ids() -> None:
    assert glue_metrics("sst2", [1.0, 0.0], [1, 1])["accuracy"] == pytest.approx(0.5)


def test_every_spec_primary_metric_is_returned() -> None:
    # Ties the task specs to the metric keys: the primary metric of each task must exist.
    for name, spec in GLUE_SPECS.items():
        if spec.num_labels == 1:
            scores = glue_metrics(name, [0.1, 0.5, 0.9], [1.0, 2.5, 4.0])
        else:
            scores = glue_metrics(name, [0, 1, 1], [0, 1, 0])
        assert spec.metric in scores, name


@pytest.mark.parametrize(
    ("predictions", "labels", "message"),
    [
        ([], [], "empty"),
        ([0, 1, 1], [0, 1], "length mismatch: 3 predictions but 2 labels"),
        ([[0.1, 0.9], [0.8, 0.2]], [1, 0], "1-D"),
        ([0.5, 1.0], [0, 1], "class ids"),
    ],
)
def test_bad_inputs_raise_value_error(predictions: list, labels: list, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        glue_metrics("rte", predictions, labels)


def test_stsb_needs_two_pairs() -> None:
    with pytest.raises(ValueError, match="at least 2"):
        glue_metrics("stsb", [1.0], [2.0])


def test_unknown_task_lists_valid_names() -> None:
    with pytest.raises(ConfigError, match="valid names: mnli, sst2, mrpc, cola, qnli, qqp, rte, stsb"):
        glue_metrics("wnli", [0], [0])
