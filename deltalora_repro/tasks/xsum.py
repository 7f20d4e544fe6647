"""XSum abstractive summarisation with BART (Table 3).

The paper runs XSum "by using the setting provided by" AdaLoRA (Sec. 5.2), whose script
(QingruZhang/AdaLoRA NLG_QA/scripts/run_bart_xsum.sh) runs Hugging Face's
run_summarization_no_trainer.py: the article is the encoder input (at most 768
tokens), the one-sentence summary the decoder target (at most 64), trained with token-level cross
entropy under teacher forcing; test summaries come from beam search (8 beams, Table 12) and are
scored with ROUGE (metrics/xsum.py). The per-epoch check is the validation loss only: decoding the
11k-article validation set with 8 beams every epoch would cost more than the epoch itself.

Data: `EdinburghNLP/xsum` from the hub (data_dir null), or a folder of JSONL files with the hub's
fields (`id`, `document`, `summary`): `train.jsonl`, `validation.jsonl`, `test.jsonl`. Offline
only a 321-article sample of the test set exists (shared/data/xsum/test_sample.jsonl), so the
three splits can also be carved out of one file by index ranges (`task.local_file`,
`task.local_split`), which the run record then names exactly: numbers from such a run are a
smoke test of the pipeline, not comparable to the paper's.
"""
from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers.models.bart.modeling_bart import shift_tokens_right

from ..errors import ConfigError, DataError
from ..progress import bar, stage
from .base import (Task, length_mask, pad_rows, pad_to, padding_mask, register_task, validation_loss,
                   write_predictions)

log = logging.getLogger(__name__)

HUB_DATASET = "EdinburghNLP/xsum"
SPLITS = ("train", "validation", "test")
FIELDS = ("id", "document", "summary")


# -- reading the splits ---------------------------------------------------------------------------
def read_jsonl(path: Path) -> list[dict]:
    """Rows {"id", "document", "summary"} of a JSONL file; other fields (split, url) are dropped."""
    rows = []
    with path.open(encoding="utf-8") as f:
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path.resolve()}, line {line_number}: not JSON ({e.msg})") from None
            missing = [k for k in FIELDS if k not in obj] if isinstance(obj, dict) else list(FIELDS)
            if missing:
                raise DataError(f"{path.resolve()}, line {line_number}: lacks fields {missing}; "
                                f"each line needs {list(FIELDS)}")
            rows.append({"id": str(obj["id"]), "document": obj["document"],
                         "summary": obj["summary"]})
    if not rows:
        raise DataError(f"{path.resolve()} has no rows; expected JSONL with fields {list(FIELDS)}")
    return rows


def parse_local_split(spec, n_rows: int, path: Path) -> dict[str, tuple[int, int]]:
    """`task.local_split` as {split: (start, stop)}: half-open row ranges [start, stop) of one file.

    Every split needs a range, and the ranges must not overlap: a test article seen in training
    would inflate the scores without any sign of it in the numbers.
    """
    if not hasattr(spec, "keys") or set(spec.keys()) != set(SPLITS):
        raise ConfigError(f"task.local_split must map each of {list(SPLITS)} to [start, stop], "
                          f"got {spec!r}")
    ranges = {}
    for split in SPLITS:
        given = spec[split]
        value = list(given) if isinstance(given, Sequence) and not isinstance(given, str) else None
        if (value is None or len(value) != 2 or not all(isinstance(v, int) for v in value)
                or not 0 <= value[0] < value[1] <= n_rows):
            raise ConfigError(f"task.local_split.{split} must be [start, stop] with "
                              f"0 <= start < stop <= {n_rows} (the rows of {path.resolve()}), "
                              f"got {given!r}")
        ranges[split] = (value[0], value[1])
    ordered = sorted(ranges.items(), key=lambda kv: kv[1])
    for (a, (_, stop_a)), (b, (start_b, _)) in zip(ordered, ordered[1:]):
        if start_b < stop_a:
            raise ConfigError(f"task.local_split: the ranges of {a} {list(ranges[a])} and {b} "
                              f"{list(ranges[b])} overlap")
    return ranges


def load_xsum(data_dir: str | Path | None, local_file: str | None = None,
              local_split=None) -> dict[str, dict]:
    """{split: {"rows": [...], "source": provenance}} for train, validation and test."""
    if data_dir is None:
        if local_file or local_split:
            raise ConfigError("task.local_file / task.local_split need data_dir (the folder "
                              "holding the file)")
        return _load_from_hub()
    folder = Path(data_dir)
    if not folder.is_dir():
        raise DataError(f"XSum data_dir {str(folder.resolve())!r} is not a folder; expected one "
                        f"holding {', '.join(s + '.jsonl' for s in SPLITS)} (or set "
                        "task.local_file and task.local_split)")
    if local_split is not None and not local_file:
        raise ConfigError("task.local_split needs task.local_file (the JSONL file to carve)")
    if local_file:
        if local_split is None:
            raise ConfigError(f"task.local_file={local_file!r} needs task.local_split, e.g. "
                              "{train: [0, 200], validation: [200, 240], test: [240, 321]}")
        path = folder / local_file
        if not path.is_file():
            raise DataError(f"missing XSum file {str(path.resolve())!r} (task.local_file); "
                            f"expected JSONL with fields {list(FIELDS)}")
        rows = read_jsonl(path)
        ranges = parse_local_split(local_split, len(rows), path)
        return {split: {"rows": rows[start:stop],
                        "source": f"{path.resolve()} rows [{start}, {stop}) of {len(rows)}"}
                for split, (start, stop) in ranges.items()}
    out = {}
    for split in SPLITS:
        path = folder / f"{split}.jsonl"
        if not path.is_file():
            present = sorted(p.name for p in folder.glob("*.jsonl"))
            hint = (f"; the folder has {present}: carve the splits from one of them with "
                    "task.local_file and task.local_split") if present else ""
            raise DataError(f"missing XSum file for split {split!r}: {str(path.resolve())!r}; "
                            f"expected JSONL with fields {list(FIELDS)}{hint}")
        rows = read_jsonl(path)
        out[split] = {"rows": rows, "source": f"{path.resolve()} ({len(rows)} rows)"}
    return out


def _load_from_hub() -> dict[str, dict]:
    from datasets import load_dataset      # slow to import; only hub users need it
    try:
        dataset = load_dataset(HUB_DATASET)
    except (OSError, ValueError) as e:
        first = str(e).splitlines()[0] if str(e) else ""
        raise DataError(f"cannot load {HUB_DATASET} from the hub ({type(e).__name__}: {first}); "
                        "offline, point data_dir at a folder of JSONL files") from e
    out = {}
    for split in SPLITS:
        ds = dataset[split]
        # Column access: much faster than iterating 204k examples.
        rows = [{"id": str(i), "document": doc, "summary": summ}
                for i, doc, summ in zip(ds["id"], ds["document"], ds["summary"], strict=True)]
        out[split] = {"rows": rows, "source": f"hub {HUB_DATASET} {split} ({len(rows)} rows)"}
    return out


# -- the task -------------------------------------------------------------------------------------
def seq2seq_logits(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Teacher-forced logits of a padded batch. The encoder and cross-attention get the padding
    mask in the form the CUDA-graph step can record (base.padding_mask). The decoder gets none:
    its inputs are right-padded and its attention causal, so no real target position sees padding
    (as in nlg.causal_logits), and padded positions carry no loss."""
    return model(input_ids=batch["input_ids"],
                 attention_mask=padding_mask(model, batch["attention_mask"]),
                 decoder_input_ids=batch["decoder_input_ids"], use_cache=False).logits


@register_task("xsum")
class XSumTask(Task):
    head = "seq2seq"
    metric = "val_loss"
    metric_mode = "min"

    def load(self) -> None:
        c = self.cfg
        self.splits = load_xsum(self.data_dir, c.get("local_file"), c.get("local_split"))
        limits = {"train": c.get("train_max_examples"), "validation": c.get("eval_max_examples"),
                  "test": c.get("test_max_examples")}
        self.rows = {name: s["rows"][:limits[name]] for name, s in self.splits.items()}

    def describe(self) -> dict:
        out = {name: {"source": s["source"], "rows": len(s["rows"]),
                      "rows_used": len(self.rows[name])} for name, s in self.splits.items()}
        if self.cfg.get("local_file"):
            out["local_file"] = self.cfg.local_file
            out["local_split"] = {k: list(self.cfg.local_split[k]) for k in SPLITS}
        return out

    # -- tokenisation -----------------------------------------------------------------------------
    def prepare(self, tokenizer) -> None:
        """Source and target with the tokenizer's special tokens (BART: `<s> … </s>`), each cut
        to its maximum length as run_summarization does (the end token is kept)."""
        self.tokenizer = tokenizer
        # BART decodes from </s> (config.decoder_start_token_id == eos for facebook/bart-large and
        # for tiny-bart). The model is not at hand here; _check_decoder_start compares later.
        self.decoder_start_token_id = tokenizer.eos_token_id
        c = self.cfg
        self.encoded = {}
        for name, rows in self.rows.items():
            encoded = []
            # In chunks, kept as int32 tensors: XSum's 204k training articles as Python lists of
            # token ids would take several GB of host memory.
            for i in range(0, len(rows), 4096):
                chunk = rows[i:i + 4096]
                src = tokenizer([r["document"] for r in chunk], max_length=c.max_source_length,
                                truncation=True)["input_ids"]
                tgt = tokenizer(text_target=[r["summary"] for r in chunk],
                                max_length=c.max_target_length, truncation=True)["input_ids"]
                encoded += [{"input_ids": torch.tensor(s, dtype=torch.int32),
                             "labels": torch.tensor(t, dtype=torch.int32)} for s, t in zip(src, tgt)]
            self.encoded[name] = encoded

    def _check_decoder_start(self, model) -> None:
        start = getattr(model.config, "decoder_start_token_id", None)
        if start != self.decoder_start_token_id:
            raise ConfigError(f"model's decoder_start_token_id is {start}, the task shifts targets "
                              f"with {self.decoder_start_token_id} (the tokenizer's eos)")

    def collate(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        """Sources and labels right-padded to buckets (few distinct shapes: one CUDA graph each);
        decoder inputs are the labels shifted right behind the decoder start token."""
        multiple = self.cfg.pad_to_multiple_of
        src_len = pad_to(max(len(e["input_ids"]) for e in examples), multiple)
        tgt_len = pad_to(max(len(e["labels"]) for e in examples), multiple)
        pad = self.tokenizer.pad_token_id
        ids = pad_rows([e["input_ids"] for e in examples], src_len, pad)
        mask = length_mask([len(e["input_ids"]) for e in examples], src_len)
        labels = pad_rows([e["labels"] for e in examples], tgt_len, -100)
        # shift_tokens_right turns the -100 it shifts in into padding.
        decoder_ids = shift_tokens_right(labels, pad, self.decoder_start_token_id)
        return {"input_ids": ids, "attention_mask": mask, "decoder_input_ids": decoder_ids,
                "labels": labels}

    def loss_units(self, example: dict) -> int:
        return len(example["labels"])                                # summary tokens

    def loss(self, model, batch) -> torch.Tensor:
        self._check_decoder_start(model)
        logits = seq2seq_logits(model, batch)
        return F.cross_entropy(logits.flatten(0, 1).float(), batch["labels"].flatten(),
                               ignore_index=-100,
                               label_smoothing=float(self.cfg.label_smoothing))

    def evaluate(self, model, device, batch_size: int) -> dict[str, float]:
        """Per-epoch: token-level loss on the validation summaries (decoding is for test)."""
        self._check_decoder_start(model)
        return validation_loss(model, self.encoded["validation"], self.collate, seq2seq_logits,
                               device, batch_size, shift=False, world=self.world)

    # -- test: beam search over the test articles, then ROUGE -------------------------------------
    def generation_kwargs(self) -> dict:
        """Table 12's decoding. early_stopping=True (a beam is done once num_beams hypotheses are
        finished) is BART's own generation setting, which run_summarization keeps. The rest of
        the model's generation config stays: bart-large forces `<s>` as the first generated token
        (forced_bos_token_id), as every training target starts."""
        d = self.cfg.decoding
        return {"num_beams": d.num_beams, "length_penalty": d.length_penalty,
                "no_repeat_ngram_size": d.no_repeat_ngram_size, "max_new_tokens": d.max_new_tokens,
                "early_stopping": True}

    @torch.no_grad()
    def decode(self, model, device, examples: list[dict]) -> list[str]:
        """Summaries of the given encoded articles, in their order. Articles are batched longest
        first (little padding per batch, and the largest batch comes first: an out-of-memory error
        shows at once)."""
        self._check_decoder_start(model)
        order = sorted(range(len(examples)), key=lambda i: -len(examples[i]["input_ids"]))
        size = self.cfg.decoding.batch_size
        starts = range(0, len(order), size)
        # Several processes: each decodes its share of the chunks one process would decode.
        mine = [starts[j] for j in self.world.take(len(starts))] if self.world else starts
        out: dict[int, str] = {}
        kwargs = self.generation_kwargs()
        for start in bar(mine, desc="decode test", unit="chunk"):
            chunk = order[start:start + size]
            batch = self.collate([examples[i] for i in chunk])
            # generate() expands the 2-D mask over the beams itself.
            generated = model.generate(input_ids=batch["input_ids"].to(device),
                                       attention_mask=batch["attention_mask"].to(device), **kwargs)
            texts = self.tokenizer.batch_decode(generated, skip_special_tokens=True)
            for i, text in zip(chunk, texts):
                out[i] = text.strip()
            log.info("decoded %d/%d test articles", min(start + size, len(order)), len(order))
        if self.world:
            out = self.world.merge(out)
        return [out[i] for i in range(len(examples))]

    decodes = True

    @classmethod
    def score(cls, rows, procedures=(), data_dir=None):
        """ROUGE-1/2/L of the summaries (XSum has one way of scoring: no named procedures)."""
        if procedures:
            raise ValueError("XSum has no named scoring procedures")
        from ..metrics.xsum import xsum_rouge
        return xsum_rouge([r["prediction"] for r in rows], [r["reference"] for r in rows])

    def test(self, model, device, output_dir: Path | None) -> dict:
        model.eval()
        predictions = self.decode(model, device, self.encoded["test"])
        rows = [{"id": row["id"], "document": row["document"], "prediction": pred,
                 "reference": row["summary"]} for row, pred in zip(self.rows["test"], predictions)]
        if output_dir is not None:
            write_predictions(output_dir, rows)
        if self.world is not None and not self.world.is_main:
            return {}                     # every process has the outputs; the main one scores
        if not self.cfg.get("score", True):
            return {}
        with stage(f"scoring {len(predictions)} test summaries (ROUGE)"):
            return self.score(rows)
