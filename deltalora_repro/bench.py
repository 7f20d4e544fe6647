"""Measure the training step: time per optimizer step, real tokens per second, peak memory.

    python -m deltalora_repro.bench --shape gpt2-medium --methods lora,delta-lora \
        --lengths e2e --batch 8 --precision bf16 --compile off,on

Random-init weights of the paper's shapes (timing does not depend on the values); batches drawn
from real E2E / RTE lengths (tokenised from the local data with the tiny BPE tokenizer, rescaled
to GPT-2 token counts, see `_lengths`) or a fixed length. The step is the real one
(`Trainer.train_step`: forward, backward, AdamW, scheduler, the method's hooks). Each setting
reports the median over `--steps` steps after `--warmup` steps, timed with CUDA events. Writes a
JSON record to results/bench/ and prints a Markdown table.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from . import records
from .methods import build_method
from .models import head_prefixes
from .train import Trainer

SHAPES = {
    # name: (model_type, head, config kwargs) — the paper's three backbones and our stand-ins
    "gpt2-medium": ("gpt2", "causal-lm", dict(n_embd=1024, n_layer=24, n_head=16, vocab_size=50257,
                                              resid_pdrop=0.0, attn_pdrop=0.0, embd_pdrop=0.0)),
    "smollm2-135m": ("llama", "causal-lm", dict(hidden_size=576, intermediate_size=1536,
                                                num_hidden_layers=30, num_attention_heads=9,
                                                num_key_value_heads=3, vocab_size=49152,
                                                tie_word_embeddings=True)),
    "roberta-base": ("roberta", "classification", dict(vocab_size=50265, max_position_embeddings=514,
                                                       type_vocab_size=1, num_labels=2)),
    "bart-large": ("bart", "seq2seq", dict(vocab_size=50265, d_model=1024, encoder_layers=12,
                                           decoder_layers=12, encoder_attention_heads=16,
                                           decoder_attention_heads=16, encoder_ffn_dim=4096,
                                           decoder_ffn_dim=4096, dropout=0.0,
                                           attention_dropout=0.0, activation_dropout=0.0)),
}
METHOD_DEFAULTS = {"rank": 4, "alpha": 32, "lora_dropout": 0.0, "update_ratio": 2, "start_steps": 0}


def _lengths(kind: str, data_dir: Path) -> list[int]:
    """Token counts of real examples. Fixed: `--lengths 512`. E2E: context + reference + 2."""
    if kind.isdigit():
        return [int(kind)]
    from transformers import AutoTokenizer  # noqa: F401  (the hub tokenizer when cached)
    from .models import tiny_tokenizer
    tok = tiny_tokenizer("gpt2")
    if kind == "e2e":
        from .tasks.e2e_data import load_e2e
        rows = load_e2e("train", str(data_dir / "e2e")).examples
        texts = [(r.context, " " + r.reference) for r in rows]
    elif kind in ("rte", "sst2"):
        from .tasks.glue_data import load_glue_split
        rows = load_glue_split(kind, "train", str(data_dir / "glue")).rows
        texts = [(r["text_a"], r["text_b"] or "") for r in rows]
    else:
        raise SystemExit(f"--lengths {kind!r}: use an integer, e2e, rte or sst2")
    # The tiny BPE (2k merges) splits finer than GPT-2's 50k-merge BPE; scale by the ratio of
    # their counts on E2E (GPT-2: mean 59 tokens per E2E training sequence, PROTOCOL/device notes).
    counts = [len(tok.encode(a)) + len(tok.encode(b)) + 2 for a, b in texts]
    scale = 59.0 / statistics.mean(counts) if kind == "e2e" else 1.0
    return [max(4, min(512, round(c * scale))) for c in counts]


class _SyntheticTask:
    """Random token ids at the sampled lengths, padded to buckets like the real collate."""
    head = "causal-lm"

    def __init__(self, vocab: int, classification: bool, seq2seq: bool, multiple: int = 8):
        self.vocab, self.classification, self.seq2seq, self.multiple = vocab, classification, seq2seq, multiple

    def batch(self, lengths: list[int], gen: torch.Generator) -> dict:
        from .tasks.base import pad_to
        n = pad_to(max(lengths), self.multiple)
        ids = torch.randint(4, self.vocab, (len(lengths), n), generator=gen)
        mask = (torch.arange(n)[None] < torch.tensor(lengths)[:, None]).long()
        out = {"input_ids": ids, "attention_mask": mask}
        if self.classification:
            out["labels"] = torch.randint(0, 2, (len(lengths),), generator=gen)
        else:
            out["labels"] = torch.where(mask.bool(), ids, -100)
        return out

    def loss(self, model, batch):
        if self.classification:
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            return torch.nn.functional.cross_entropy(logits.float(), batch["labels"])
        if self.seq2seq:
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                        decoder_input_ids=batch["input_ids"][:, :64])
            return torch.nn.functional.cross_entropy(out.logits.flatten(0, 1).float(),
                                                     batch["input_ids"][:, :64].flatten())
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(),
                                                 batch["labels"][:, 1:].flatten(), ignore_index=-100)


def bench_one(shape: str, method_name: str, lengths: list[int], batch: int, precision: str,
              compile_mode: str, steps: int, warmup: int, device: torch.device, seed: int = 0) -> dict:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoModelForSequenceClassification
    model_type, head, kwargs = SHAPES[shape]
    cls = {"causal-lm": AutoModelForCausalLM, "classification": AutoModelForSequenceClassification,
           "seq2seq": AutoModelForSeq2SeqLM}[head]
    torch.manual_seed(seed)
    config = AutoConfig.for_model(model_type, **kwargs)
    model = cls.from_config(config).to(torch.float32)
    task = _SyntheticTask(config.vocab_size, head == "classification", head == "seq2seq")
    total = warmup + steps
    mcfg = OmegaConf.create({"name": method_name, **METHOD_DEFAULTS, "target_rank": 2, "tinit": 0,
                             "tfinal": 1, "delta_t": 10, "beta1": 0.85, "beta2": 0.85,
                             "orth_reg_weight": 0.1, "rank_seed": 0})
    method = build_method(mcfg, total)
    heads = head_prefixes(model) if head == "classification" else []
    model = method.apply(model, heads).to(device)
    tcfg = OmegaConf.create({"lr": 2e-4, "batch_size": batch, "grad_accum": 1, "weight_decay": 0.01,
                             "warmup_steps": 0, "warmup_ratio": 0.0, "max_grad_norm": None,
                             "precision": precision, "compile": compile_mode != "off",
                             "compile_backend": "inductor",
                             "compile_mode": None if compile_mode in ("off", "on") else compile_mode,
                             "compile_dynamic": None, "graph_update": True, "eval_batch_size": 8,
                             "log_every": 10 ** 9, "epochs": 1, "max_steps": None})
    trainer = Trainer(model, method, task, tcfg, device, seed, total)
    trainer.start()
    gen = torch.Generator().manual_seed(seed)
    order = torch.randint(0, len(lengths), (total, batch), generator=gen).tolist()
    batches = [[task.batch([lengths[i] for i in row], gen)] for row in order]
    real_tokens = [sum(lengths[i] for i in row) for row in order]
    times = []
    torch.cuda.reset_peak_memory_stats(device) if device.type == "cuda" else None
    for k, mb in enumerate(batches):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            trainer.train_step(mb)
            end.record()
            end.synchronize()
            ms = start.elapsed_time(end)
        else:
            t0 = time.perf_counter()
            trainer.train_step(mb)
            ms = 1000 * (time.perf_counter() - t0)
        if k >= warmup:
            times.append(ms)
    med = statistics.median(times)
    tok = statistics.mean(real_tokens[warmup:])
    return {"shape": shape, "method": method_name, "batch": batch, "precision": precision,
            "compile": compile_mode, "step_ms_median": med,
            "step_ms_p10": statistics.quantiles(times, n=10)[0],
            "step_ms_p90": statistics.quantiles(times, n=10)[-1],
            "tokens_per_s": tok / (med / 1000), "mean_real_tokens_per_batch": tok,
            "peak_memory_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
            "steps": steps, "warmup": warmup}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m deltalora_repro.bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="gpt2-medium", choices=sorted(SHAPES))
    ap.add_argument("--methods", default="lora,delta-lora")
    ap.add_argument("--lengths", default="e2e", help="e2e | rte | sst2 | an integer")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--precision", default="bf16", help="comma list of fp32, bf16")
    ap.add_argument("--compile", default="off", help="comma list of off, on, reduce-overhead")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--data", type=Path, default=records.PROJECT_ROOT.parent / "shared" / "data")
    ap.add_argument("--out", type=Path, default=records.PROJECT_ROOT / "results" / "bench")
    ap.add_argument("--name", default=None, help="record file name (default: a new run id)")
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    lengths = _lengths(args.lengths, args.data)
    rows = []
    for precision in args.precision.split(","):
        for compile_mode in args.compile.split(","):
            for method in args.methods.split(","):
                torch._dynamo.reset()
                row = bench_one(args.shape, method, lengths, args.batch, precision, compile_mode,
                                args.steps, args.warmup, device)
                rows.append(row)
                print(json.dumps(row), flush=True)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    run_id = args.name or records.new_run_id()
    record = {"run_id": run_id, "kind": "bench", "args": {k: str(v) for k, v in vars(args).items()},
              "lengths": {"source": args.lengths, "n": len(lengths), "mean": statistics.mean(lengths)},
              "rows": rows, "git": records.git_state(), "machine": records.machine(device),
              "versions": records.versions()}
    records.write_json_atomic(args.out / f"{run_id}.json", record)
    print(render(record))


def render(record: dict) -> str:
    lines = [f"Bench {record['run_id']} on {record['machine'].get('device_name', 'cpu')}, "
             f"commit {str(record['git'].get('commit'))[:10]}; lengths: {record['lengths']}",
             "", "| shape | method | precision | compile | step ms (median) | tokens/s | peak GiB |",
             "|---|---|---|---|---|---|---|"]
    for r in record["rows"]:
        mem = "-" if r["peak_memory_bytes"] is None else f"{r['peak_memory_bytes'] / 2**30:.2f}"
        lines.append(f"| {r['shape']} | {r['method']} | {r['precision']} | {r['compile']} | "
                     f"{r['step_ms_median']:.2f} | {r['tokens_per_s']:.0f} | {mem} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
