"""Every number of Tables 1-8 of Delta-LoRA (arXiv 2309.02411), transcribed from the paper text.

Plain data, typed by hand once and never computed: `tables.py` prints these beside our numbers.
Numbers are as printed (the LoRA paper's own rows carry one decimal where it printed one).
Parameter counts are strings as printed. Where the paper marks "no extra updatable parameters"
the mark was lost in the text copy; it is stored as None.

Row keys: `ft` = Full Fine-Tuning, `ft-noembed` = Fine-Tuning† (embeddings frozen),
`ft-qv` = Fine-Tuning‡ (only Wq and Wv trained), `lora` = LoRA as reproduced by the paper
("LoRA (repr.)"), `lora-paper` = the number quoted from the LoRA paper, then `dylora`, `adalora`,
`delta-lora`. Tables 7 and 8 key their rows by the swept value, as a string ("0", "500").
"""

from __future__ import annotations

from typing import Any, TypedDict


class PaperTable(TypedDict, total=False):
    caption: str
    model: str  # the backbone the paper used for this table
    task: str  # our task name for the table's records (GLUE: one task per column, see tables.py)
    columns: list[str]  # metric keys, in the paper's order
    rows: dict[str, dict[str, float]]  # row key -> column -> number as printed
    params: dict[str, dict[str, str | None]]  # row key -> {"trainable", "extra_updated"}
    settings: dict[str, dict[str, str]]  # Table 6 only: row key -> {"lr", "update_ratio"}


E2E_COLUMNS = ["bleu", "nist", "meteor", "rouge_l", "cider"]
WEBNLG_COLUMNS = [
    f"{metric}_{split}" for metric in ("bleu", "meteor", "ter") for split in ("seen", "unseen", "all")
]
XSUM_COLUMNS = ["rouge1", "rouge2", "rougeL", "rougeLsum"]
GLUE_TASKS = ["mnli", "sst2", "mrpc", "cola", "qnli", "qqp", "rte", "stsb"]
GLUE_COLUMNS = [*GLUE_TASKS, "avg"]


def _row(columns: list[str], *values: float) -> dict[str, float]:
    """One printed row; refuses a row whose length does not match the header (a transcription slip)."""
    if len(values) != len(columns):
        raise ValueError(f"row has {len(values)} values for {len(columns)} columns {columns}")
    return dict(zip(columns, values))


def _params(trainable: str, extra_updated: str | None = None) -> dict[str, str | None]:
    return {"trainable": trainable, "extra_updated": extra_updated}


# The Delta-LoRA row of Table 1 recurs in Tables 5-8 (λ = 2, K = 500 are its settings), LoRA's in
# Tables 5-6. Each table gets its own dict, so editing one table's data cannot change another's.
_E2E_DELTA_LORA = (70.84, 8.91, 46.47, 72.24, 2.53)
_E2E_LORA_REPR = (69.60, 8.78, 45.61, 71.12, 2.45)


def _e2e_table(caption: str, rows: dict[str, tuple[float, ...]], **fields: Any) -> dict:
    """A table of E2E runs on GPT2-Medium (the ablations), rows given as value tuples."""
    return {"caption": caption, "model": "gpt2-medium", "task": "e2e", "columns": E2E_COLUMNS,
            "rows": {name: _row(E2E_COLUMNS, *values) for name, values in rows.items()}, **fields}

PAPER_TABLES: dict[int, PaperTable] = {
    1: {
        "caption": "E2E NLG Challenge test set, GPT2-Medium: fine-tuning variants, PEFT baselines "
        "and Delta-LoRA",
        "model": "gpt2-medium",
        "task": "e2e",
        "columns": E2E_COLUMNS,
        "rows": {
            "ft": _row(E2E_COLUMNS, 69.58, 8.75, 46.34, 71.66, 2.47),
            "ft-noembed": _row(E2E_COLUMNS, 69.37, 8.76, 46.05, 71.97, 2.44),
            "ft-qv": _row(E2E_COLUMNS, 69.77, 8.84, 46.29, 71.96, 2.49),
            "lora": _row(E2E_COLUMNS, *_E2E_LORA_REPR),
            "lora-paper": _row(E2E_COLUMNS, 70.4, 8.85, 46.8, 71.8, 2.53),
            "dylora": _row(E2E_COLUMNS, 67.89, 8.50, 44.07, 70.52, 2.26),
            "adalora": _row(E2E_COLUMNS, 68.16, 8.58, 44.10, 70.66, 2.35),
            "delta-lora": _row(E2E_COLUMNS, *_E2E_DELTA_LORA),
        },
        "params": {
            "ft": _params("354.92M"),
            "ft-noembed": _params("305.84M"),
            "ft-qv": _params("48M"),
            "lora": _params("0.375M"),
            "lora-paper": _params("0.35M"),
            "dylora": _params("0.375M"),
            "adalora": _params("0.375M"),
            "delta-lora": _params("0.375M", "48M"),
        },
    },
    2: {
        "caption": "WebNLG Challenge 2017 test set, GPT2-Medium: BLEU, METEOR and TER on Seen (S), "
        "Unseen (U) and All (A) categories",
        "model": "gpt2-medium",
        "task": "webnlg",
        "columns": WEBNLG_COLUMNS,
        "rows": {
            "ft": _row(WEBNLG_COLUMNS, 61.38, 45.11, 54.48, 0.44, 0.38, 0.41, 0.36, 0.53, 0.44),
            "ft-noembed": _row(WEBNLG_COLUMNS, 63.53, 46.66, 55.92, 0.45, 0.39, 0.42, 0.34, 0.49, 0.41),
            "ft-qv": _row(WEBNLG_COLUMNS, 64.55, 48.06, 57.08, 0.46, 0.39, 0.43, 0.33, 0.47, 0.40),
            "lora": _row(WEBNLG_COLUMNS, 62.08, 46.61, 55.05, 0.44, 0.38, 0.41, 0.35, 0.49, 0.42),
            "lora-paper": _row(WEBNLG_COLUMNS, 62.1, 46.7, 55.3, 0.44, 0.38, 0.41, 0.33, 0.46, 0.39),
            "dylora": _row(WEBNLG_COLUMNS, 58.39, 46.02, 52.77, 0.42, 0.37, 0.40, 0.38, 0.49, 0.43),
            "adalora": _row(WEBNLG_COLUMNS, 56.39, 44.14, 50.82, 0.41, 0.37, 0.39, 0.40, 0.49, 0.44),
            "delta-lora": _row(WEBNLG_COLUMNS, 62.87, 47.68, 55.96, 0.45, 0.39, 0.42, 0.34, 0.48, 0.40),
        },
        "params": {
            "ft": _params("354.92M"),
            "ft-noembed": _params("305.84M"),
            "ft-qv": _params("48M"),
            "lora": _params("0.375M"),
            "lora-paper": _params("0.375M"),
            "dylora": _params("0.375M"),
            "adalora": _params("0.375M"),
            "delta-lora": _params("0.375M", "48M"),
        },
    },
    3: {
        "caption": "XSum, BART-Large: ROUGE-1/2/L/Lsum",
        "model": "bart-large",
        "task": "xsum",
        "columns": XSUM_COLUMNS,
        "rows": {
            "ft": _row(XSUM_COLUMNS, 45.36, 22.16, 37.23, 37.24),
            "ft-noembed": _row(XSUM_COLUMNS, 45.04, 22.05, 36.92, 36.94),
            "ft-qv": _row(XSUM_COLUMNS, 44.95, 21.43, 36.35, 36.37),
            "lora": _row(XSUM_COLUMNS, 43.27, 20.13, 35.12, 35.12),
            "dylora": _row(XSUM_COLUMNS, 41.84, 18.76, 33.56, 33.57),
            "adalora": _row(XSUM_COLUMNS, 42.91, 19.76, 34.71, 34.72),
            "delta-lora": _row(XSUM_COLUMNS, 43.49, 20.23, 35.26, 35.26),
        },
        "params": {
            "ft": _params("387.5M"),
            "ft-noembed": _params("338.4M"),
            "ft-qv": _params("72M"),
            "lora": _params("0.45M"),
            "dylora": _params("0.56M"),
            "adalora": _params("0.56M"),
            "delta-lora": _params("0.56M", "72M"),
        },
    },
    4: {
        "caption": "GLUE dev sets, RoBERTa-base: MNLI, SST-2, MRPC, QNLI, QQP, RTE accuracy; "
        "CoLA Matthews corr.; STS-B Pearson corr.; AVG over the 8 tasks",
        "model": "roberta-base",
        "task": "glue",
        "columns": GLUE_COLUMNS,
        "rows": {
            "ft": _row(GLUE_COLUMNS, 87.51, 94.26, 88.23, 64.57, 92.73, 91.96, 84.11, 90.56, 86.74),
            "ft-noembed": _row(
                GLUE_COLUMNS, 87.58, 94.02, 89.95, 62.99, 92.73, 91.90, 86.64, 90.22, 87.01
            ),
            "ft-qv": _row(GLUE_COLUMNS, 87.48, 95.06, 89.21, 61.07, 92.76, 91.19, 84.83, 89.85, 86.43),
            "lora": _row(GLUE_COLUMNS, 87.40, 94.62, 89.97, 63.17, 93.02, 90.67, 86.64, 91.54, 87.12),
            "dylora": _row(GLUE_COLUMNS, 86.33, 94.26, 89.46, 61.12, 92.22, 90.17, 84.47, 91.06, 86.14),
            "adalora": _row(
                GLUE_COLUMNS, 87.34, 94.49, 90.19, 61.64, 93.08, 90.14, 85.19, 91.16, 86.65
            ),
            "delta-lora": _row(
                GLUE_COLUMNS, 87.50, 95.06, 90.19, 63.82, 93.09, 90.87, 87.00, 91.57, 87.38
            ),
        },
        "params": {
            "ft": _params("118.87M"),
            "ft-noembed": _params("82.05M"),
            "ft-qv": _params("13.5M"),
            "lora": _params("0.28M"),
            "dylora": _params("0.28M"),
            "adalora": _params("0.28M"),
            "delta-lora": _params("0.28M", "13.5M"),
        },
    },
    5: _e2e_table(
        "Ablation on E2E, GPT2-Medium: LoRA, Delta-LoRA with the LoRA module (dropout kept in the "
        "low-rank branch), Delta-LoRA",
        rows={"lora": _E2E_LORA_REPR,
              "delta-lora-branch-dropout": (70.29, 8.88, 46.38, 71.88, 2.51),
              "delta-lora": _E2E_DELTA_LORA},
        params={"lora": _params("0.375M"), "delta-lora-branch-dropout": _params("0.375M", "48M"),
                "delta-lora": _params("0.375M", "48M")},
    ),
    6: _e2e_table(
        "E2E, GPT2-Medium: LoRA at learning rate 2e-4 and 6e-4 vs Delta-LoRA (lr 2e-4, update "
        "ratio 2)",
        settings={"lora-lr2e-4": {"lr": "2e-4", "update_ratio": "-"},
                  "lora-lr6e-4": {"lr": "6e-4", "update_ratio": "-"},
                  "delta-lora": {"lr": "2e-4", "update_ratio": "2"}},
        rows={"lora-lr2e-4": _E2E_LORA_REPR, "lora-lr6e-4": (69.63, 8.79, 45.70, 71.55, 2.39),
              "delta-lora": _E2E_DELTA_LORA},
    ),
    7: {
        "caption": "E2E, GPT2-Medium, Delta-LoRA: sweep of the update ratio λ (K = 500)",
        "model": "gpt2-medium",
        "task": "e2e",
        "columns": E2E_COLUMNS,
        "rows": {
            "0": _row(E2E_COLUMNS, 68.94, 8.73, 45.27, 70.81, 2.41),
            "1": _row(E2E_COLUMNS, 69.77, 8.81, 45.99, 71.58, 2.46),
            "2": _row(E2E_COLUMNS, *_E2E_DELTA_LORA),
            "3": _row(E2E_COLUMNS, 70.14, 8.84, 46.39, 71.45, 2.45),
            "4": _row(E2E_COLUMNS, 70.03, 8.83, 46.21, 71.56, 2.47),
            "5": _row(E2E_COLUMNS, 70.13, 8.85, 46.35, 71.72, 2.48),
        },
    },
    8: {
        "caption": "E2E, GPT2-Medium, Delta-LoRA: sweep of the start steps K (λ = 2)",
        "model": "gpt2-medium",
        "task": "e2e",
        "columns": E2E_COLUMNS,
        "rows": {
            "0": _row(E2E_COLUMNS, 69.10, 8.75, 45.54, 71.31, 2.41),
            "100": _row(E2E_COLUMNS, 69.97, 8.84, 46.07, 71.40, 2.46),
            "200": _row(E2E_COLUMNS, 69.72, 8.83, 45.82, 71.41, 2.43),
            "300": _row(E2E_COLUMNS, 69.73, 8.86, 45.98, 71.09, 2.46),
            "400": _row(E2E_COLUMNS, 70.18, 8.89, 46.30, 71.66, 2.49),
            "500": _row(E2E_COLUMNS, *_E2E_DELTA_LORA),
            "600": _row(E2E_COLUMNS, 70.38, 8.86, 46.38, 71.70, 2.47),
            "700": _row(E2E_COLUMNS, 70.61, 8.89, 46.43, 72.13, 2.51),
            "800": _row(E2E_COLUMNS, 70.70, 8.89, 46.30, 71.97, 2.51),
            "900": _row(E2E_COLUMNS, 71.00, 8.92, 46.47, 72.04, 2.52),
            "1000": _row(E2E_COLUMNS, 70.87, 8.89, 46.31, 72.06, 2.50),
        },
    },
}
