"""Data-to-text with decoder-only models: E2E (Table 1) and WebNLG 2017 (Table 2).

Layout and loss as in the LoRA repository's NLG pipeline (microsoft/LoRA examples/NLG), which the
paper follows:
each training sequence is `context <eos> ␠reference <eos>`, and the loss covers only the reference
tokens and the final end token. After training, every distinct test input is decoded once with
beam search (decoding.py) and the outputs are scored with the official metric definitions.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn.functional as F

from ..decoding import BeamConfig, beam_search
from ..errors import DataError
from ..metrics import e2e as e2e_metrics
from ..metrics import webnlg as webnlg_metrics
from ..progress import stage
from .base import Task, pad_inputs, register_task, validation_loss, write_predictions

log = logging.getLogger(__name__)


class _RightPaddingIsIntended(logging.Filter):
    """Hugging Face warns once when padded input_ids come without a mask; here that is deliberate
    (see causal_logits), so the warning would only mislead."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "passing in an `attention_mask`" not in record.getMessage()


logging.getLogger("transformers.modeling_utils").addFilter(_RightPaddingIsIntended())


def causal_logits(model, batch) -> torch.Tensor:
    """Logits of a right-padded batch under causal attention, without the padding mask.

    Padding sits after every real token, and causal attention only looks back, so no real
    position ever attends to padding: the logits at real positions are those of the masked
    forward, and padded positions carry no loss. Without a mask the attention runs as plain
    causal SDPA (flash kernels), and nothing in the forward reads tensor values on the host
    (Hugging Face inspects a padding mask to decide whether it can be dropped), which the CUDA-graph
    step needs. tests/test_nlg_task.py checks the logits against the masked forward.
    use_cache=False: a training forward has no use for a KV cache (Llama builds one otherwise).

    The forward runs under CAUSAL_SDPA, Hugging Face's own SDPA attention registered under a name
    that has no mask builder, so no mask is built and SDPA runs with is_causal. Under plain "sdpa"
    some transformers versions (5.17 among them) build a full 4-D causal mask whenever a CUDA
    stream is being captured (it cannot tell a CUDA-graph capture from torch.export), so the
    recorded step would differ from the warm-up: a slower masked kernel, and under
    train.compile=blocks a recompilation in the middle of the capture, which CUDA refuses.
    """
    config = model.config
    if config._attn_implementation != "sdpa":
        return model(input_ids=batch["input_ids"], use_cache=False).logits
    config._attn_implementation = CAUSAL_SDPA
    try:
        return model(input_ids=batch["input_ids"], use_cache=False).logits
    finally:
        config._attn_implementation = "sdpa"


CAUSAL_SDPA = "deltalora_causal_sdpa"


def _register_causal_sdpa() -> None:
    """Once, at import: not per training step."""
    from transformers import AttentionInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    if CAUSAL_SDPA not in ALL_ATTENTION_FUNCTIONS:
        AttentionInterface.register(CAUSAL_SDPA, ALL_ATTENTION_FUNCTIONS["sdpa"])


_register_causal_sdpa()


class NLGTask(Task):
    head = "causal-lm"
    metric = "val_loss"
    metric_mode = "min"

    # -- data -------------------------------------------------------------------------------------
    def _load(self, split: str):
        raise NotImplementedError

    def load(self) -> None:
        self.splits = {name: self._load(name) for name in ("train", "validation", "test")}
        self.rows = {
            "train": self.splits["train"].examples[:self.cfg.get("train_max_examples")],
            "validation": self.splits["validation"].examples[:self.cfg.get("eval_max_examples")],
        }
        from .e2e_data import group_references
        groups = group_references(self.splits["test"].examples)
        self.test_groups = groups[:self.cfg.get("test_max_groups")]

    def describe(self) -> dict:
        out = {name: {"source": s.source, "rows_used": len(self.rows.get(name, s.examples))}
               for name, s in self.splits.items()}
        out["test"]["groups_decoded"] = len(self.test_groups)
        return out

    # -- tokenisation -----------------------------------------------------------------------------
    def end_token_ids(self) -> tuple[int, ...]:
        """The tokenizer's end token, and "\\n\\n" when it is a single token (GPT-2: 628)."""
        ids = {self.tokenizer.eos_token_id}
        nn_ids = self.tokenizer.encode("\n\n", add_special_tokens=False)
        if len(nn_ids) == 1:
            ids.add(nn_ids[0])
        return tuple(sorted(ids))

    def encode_context(self, context: str) -> list[int]:
        """The context's tokens, then the end token as the separator (the LoRA repository appends
        GPT-2's <|endoftext|> here too: one token serves as separator and as end)."""
        return self.tokenizer.encode(context, add_special_tokens=False) + [self.tokenizer.eos_token_id]

    def _encode(self, ex) -> dict:
        """`context <eos>` + `␠reference <eos>`, each part tokenised on its own as the LoRA
        repository's encoder does: the completion string is " " + reference (so its first word is
        one space-prefixed token) and nothing follows the reference but the end token. The
        sequence keeps its first max_length tokens, as the repository's fine-tuning data loader
        does with its seq_len (512); the loss covers positions n_context.. (collate)."""
        ctx = self.encode_context(ex.context)
        if len(ctx) >= self.cfg.max_length:
            # Nothing of the reference would be left to train on: every label of the row ignored.
            raise DataError(
                f"context {ex.context[:80]!r}... is {len(ctx)} tokens with its separator, which leaves "
                f"no reference token within task.max_length={self.cfg.max_length}; set "
                f"task.max_length above {len(ctx)}")
        ref = self.tokenizer.encode(" " + ex.reference, add_special_tokens=False) + [
            self.tokenizer.eos_token_id]
        ids = (ctx + ref)[:self.cfg.max_length]
        return {"input_ids": ids, "n_context": len(ctx)}

    def prepare(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.encoded = {name: [self._encode(ex) for ex in rows] for name, rows in self.rows.items()}

    def collate(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        ids, mask = pad_inputs(examples, self.cfg.pad_to_multiple_of, self.tokenizer.pad_token_id)
        labels = torch.full(ids.shape, -100, dtype=torch.long)
        for i, e in enumerate(examples):
            # Loss on the reference and its end token only (not the context or the separator).
            n = len(e["input_ids"])
            labels[i, e["n_context"]:n] = ids[i, e["n_context"]:n]
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    def loss_units(self, example: dict) -> int:
        return len(example["input_ids"]) - example["n_context"]     # the reference and end token

    def loss(self, model, batch) -> torch.Tensor:
        logits = causal_logits(model, batch)
        return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch["labels"][:, 1:].flatten(),
                               ignore_index=-100,
                               label_smoothing=float(self.cfg.label_smoothing))

    def evaluate(self, model, device, batch_size: int) -> dict[str, float]:
        """Per-epoch: token-level loss on the validation references (cheap; decoding is for test)."""
        return validation_loss(model, self.encoded["validation"], self.collate, causal_logits,
                               device, batch_size, shift=True, world=self.world)

    # -- test: decode every distinct input once, then score ----------------------------------------
    def beam_config(self) -> BeamConfig:
        d = self.cfg.decoding
        return BeamConfig(num_beams=d.num_beams, length_penalty=d.length_penalty,
                          no_repeat_ngram_size=d.no_repeat_ngram_size,
                          max_new_tokens=d.max_new_tokens, end_token_ids=self.end_token_ids())

    @torch.no_grad()
    def decode(self, model, contexts: list[str]) -> list[str]:
        prompts = [self.encode_context(c) for c in contexts]
        outs = beam_search(model, prompts, self.beam_config(), pad_token_id=self.tokenizer.pad_token_id,
                           batch_size=self.cfg.decoding.batch_size, world=self.world)
        # As the LoRA repository's decode step: the text before the first end marker, stripped.
        texts = [self.tokenizer.decode(o, skip_special_tokens=True) for o in outs]
        return [t.split("\n\n")[0].strip() for t in texts]

    decodes = True

    def test(self, model, device, output_dir: Path | None) -> dict:
        model.eval()
        predictions = self.decode(model, [ex.context for ex, _ in self.test_groups])
        rows = [{"context": ex.context, "prediction": pred, "references": refs, "group": ex.group,
                 "seen": ex.seen} for (ex, refs), pred in zip(self.test_groups, predictions)]
        if output_dir is not None:
            write_predictions(output_dir, rows)
        if self.world is not None and not self.world.is_main:
            return {}                     # every process has the outputs; the main one scores
        if not self.cfg.get("score", True):
            # Decoded on a machine without Java (METEOR, PTB tokenizer): score later from the
            # kept predictions with `python -m deltalora_repro.score_run RECORD`.
            return {}
        with stage(f"scoring {len(predictions)} test outputs"):
            return self.score(rows, self.default_procedures, self.data_dir)


@register_task("e2e")
class E2ETask(NLGTask):
    def _load(self, split):
        from .e2e_data import load_e2e
        return load_e2e(split, self.data_dir)

    def load(self) -> None:
        super().load()
        if self.cfg.get("score", True):
            # The official procedure's raw references, read now so that a missing file stops the
            # run before training rather than after decoding.
            try:
                e2e_metrics.official_test_references(self.data_dir)
            except (OSError, ValueError) as exc:
                raise DataError(f"{exc} (or run with task.score=false and score later with "
                                f"python -m deltalora_repro.score_run)") from None

    procedures = tuple(e2e_metrics.PROCEDURES)
    default_procedures = ("paper", "official")

    @classmethod
    def score(cls, rows, procedures=(), data_dir=None):
        """The named procedures (metrics/e2e.py; default both): the paper's on the tokenised test
        references, the challenge's on the raw ones of testset_w_refs.csv in `data_dir`; the
        paper's are the reported numbers (the flat keys), each procedure's under `procedures`."""
        names = tuple(procedures) or cls.default_procedures
        raw = e2e_metrics.official_test_references(data_dir)[0] if "official" in names else None
        return e2e_metrics.score_test_procedures([r["prediction"] for r in rows],
                                     [r["references"] for r in rows], [r["group"] for r in rows],
                                     raw, names)

    @classmethod
    def describe_procedure(cls, name):
        if name == e2e_metrics.LEGACY:
            return e2e_metrics.LEGACY_DESCRIPTION
        return e2e_metrics.PROCEDURES[name].description


@register_task("webnlg")
class WebNLGTask(NLGTask):
    def _load(self, split):
        from .webnlg_data import load_webnlg
        return load_webnlg(split, self.data_dir)

    procedures = tuple(webnlg_metrics.PROCEDURES)
    # The official procedure needs nltk's punkt data, rarely present where models are trained:
    # `score_run --procedures official` adds it.
    default_procedures = ("paper",)

    @classmethod
    def score(cls, rows, procedures=(), data_dir=None):
        """Table 2's nine numbers per named procedure (default: the paper's, the LoRA decode step
        before GenerationEval)."""
        names = tuple(procedures) or cls.default_procedures
        by_name = {name: webnlg_metrics.webnlg_metrics_by_split(
            [r["prediction"] for r in rows], [r["references"] for r in rows],
            [bool(r["seen"]) for r in rows], lora_preprocess=webnlg_metrics.get_procedure(name).lora_preprocess)
            for name in names}
        primary = "paper" if "paper" in by_name else names[0]
        return {**by_name[primary], "procedure": primary, "procedures": by_name}

    @classmethod
    def describe_procedure(cls, name):
        return webnlg_metrics.PROCEDURES[name].description
