"""GLUE's official metrics as pure functions of (predictions, labels).

The metric set per task follows GLUE and the Hugging Face "glue" metric that transformers'
run_glue.py reports: accuracy everywhere except STS-B; CoLA adds Matthews correlation, its
headline number; MRPC and QQP add F1 of the positive class; STS-B reports Pearson and Spearman
correlation. Values are fractions in 0..1 (correlations in -1..1); tables scale them to percent.

We call scikit-learn and scipy directly rather than ``evaluate.load("glue", ...)``: that fetches
the metric script from the hub, which offline machines cannot reach, and it makes these same
library calls.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

from deltalora_repro.errors import ConfigError

_CLASSIFICATION_TASKS = ("mnli", "sst2", "mrpc", "cola", "qnli", "qqp", "rte")
_REGRESSION_TASKS = ("stsb",)


def glue_metrics(task: str, predictions: ArrayLike, labels: ArrayLike) -> dict[str, float]:
    """Score one GLUE task.

    predictions: class ids for classification tasks (take the argmax of the logits first),
    float scores for STS-B. labels: the gold labels, numbered as the hub numbers them.
    """
    if task not in _CLASSIFICATION_TASKS + _REGRESSION_TASKS:
        valid = ", ".join(_CLASSIFICATION_TASKS + _REGRESSION_TASKS)
        raise ConfigError(f"unknown GLUE task {task!r}; valid names: {valid}")
    preds = np.asarray(predictions)
    golds = np.asarray(labels)
    _check_shapes(preds, golds)

    if task in _REGRESSION_TASKS:
        if preds.size < 2:
            raise ValueError(f"{task}: correlation needs at least 2 pairs, got {preds.size}")
        preds = preds.astype(np.float64)
        golds = golds.astype(np.float64)
        pearson = float(pearsonr(preds, golds)[0])
        spearman = float(spearmanr(preds, golds)[0])
        return {"pearson": pearson, "spearman": spearman, "pearson_spearman_avg": (pearson + spearman) / 2}

    preds = _as_class_ids(preds, "predictions")
    golds = _as_class_ids(golds, "labels")
    scores = {"accuracy": float(accuracy_score(golds, preds))}
    if task == "cola":
        scores["matthews_correlation"] = float(matthews_corrcoef(golds, preds))
    if task in ("mrpc", "qqp"):
        # GLUE's F1 is binary F1 of class 1 (paraphrase / duplicate). zero_division=0 scores a
        # model that never predicts class 1 as 0 instead of warning and returning 0 anyway.
        scores["f1"] = float(f1_score(golds, preds, pos_label=1, average="binary", zero_division=0.0))
    return scores


def _check_shapes(preds: np.ndarray, golds: np.ndarray) -> None:
    if preds.ndim != 1 or golds.ndim != 1:
        raise ValueError(
            f"predictions and labels must be 1-D, got shapes {preds.shape} and {golds.shape} "
            "(for logits, pass argmax over the last axis)"
        )
    if preds.size == 0:
        raise ValueError("predictions and labels are empty; nothing to score")
    if preds.shape != golds.shape:
        raise ValueError(f"length mismatch: {preds.size} predictions but {golds.size} labels")


def _as_class_ids(values: np.ndarray, what: str) -> np.ndarray:
    """Integer class ids; floats are accepted only when they are whole numbers (e.g. 1.0)."""
    if values.dtype.kind in "iub":
        return values.astype(np.int64)
    if values.dtype.kind == "f" and np.all(np.isfinite(values)) and np.all(values == np.round(values)):
        return values.astype(np.int64)
    raise ValueError(f"{what} must be class ids (whole numbers), got dtype {values.dtype}: {values[:5]}")
