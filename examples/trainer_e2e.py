"""Delta-LoRA with a plain Hugging Face Trainer + PEFT LoRA on E2E, then a standard PEFT adapter.

    python examples/trainer_e2e.py --data-dir ../shared/data/e2e                 # tiny GPT-2, CPU, < 2 min
    python examples/trainer_e2e.py --data-dir ../shared/data/e2e --model smollm2-135m --max-steps 200

The model is fine-tuned with LoRA on Wq and Wv (PEFT), and DeltaLoRACallback adds Delta-LoRA's
update of W after every optimizer step (Algorithm 1: W += lambda * s * (B'A' - BA) from step K+1).
The result is exported as a PEFT LoRA adapter of rank 2r that loads onto the untouched pretrained
model with PeftModel.from_pretrained, and a few test inputs are decoded with it.
"""
from __future__ import annotations

import argparse
import copy
import tempfile
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import Trainer, TrainingArguments

from deltalora_repro import DeltaLoRA, DeltaLoRACallback, export_peft_adapter
from deltalora_repro.config import compose
from deltalora_repro.families import family_spec
from deltalora_repro.fused_qkv import split_fused_qkv
from deltalora_repro.models import load_backbone
from deltalora_repro.tasks.e2e_data import group_references, load_e2e


def encode(tokenizer, context: str, reference: str | None = None) -> dict:
    """`MR <eos> ␠reference <eos>`, loss on the reference and its end token only (the LoRA
    repository's E2E layout, which the paper follows)."""
    eos = tokenizer.eos_token_id
    ctx = tokenizer.encode(context, add_special_tokens=False) + [eos]
    if reference is None:
        return {"input_ids": ctx}
    ref = tokenizer.encode(" " + reference, add_special_tokens=False) + [eos]
    return {"input_ids": ctx + ref, "labels": [-100] * len(ctx) + ref}


def collate(rows: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    n = max(len(r["input_ids"]) for r in rows)
    pad = lambda seq, v: seq + [v] * (n - len(seq))            # noqa: E731
    return {"input_ids": torch.tensor([pad(r["input_ids"], pad_id) for r in rows]),
            "attention_mask": torch.tensor([pad([1] * len(r["input_ids"]), 0) for r in rows]),
            "labels": torch.tensor([pad(r["labels"], -100) for r in rows])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", type=Path, default=None,
                    help="folder with the E2E CSVs (default: the Hugging Face hub)")
    ap.add_argument("--model", default="tiny-gpt2", choices=["tiny-gpt2", "smollm2-135m"])
    ap.add_argument("--max-steps", type=int, default=30)
    ap.add_argument("--train-rows", type=int, default=400)
    ap.add_argument("--lr", type=float, default=2e-4, help="the paper's E2E learning rate (Table 9)")
    ap.add_argument("--out", type=Path, default=None, help="output folder (default: a new temp folder)")
    args = ap.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="trainer_e2e_"))

    # The backbone in float32 (Delta-LoRA keeps W in fp32), dropouts off as in the paper's E2E runs.
    model_cfg = compose(f"model={args.model}", "task=e2e").model
    model, tok, _ = load_backbone(model_cfg, "causal-lm", overrides={"dropouts": 0.0})
    if getattr(model, "hf_quantizer", None) is not None:
        # A GGUF file (smollm2-135m) is dequantised to float32 tensors when loaded, but transformers
        # keeps its quantizer on the model, and Trainer refuses to train a GGUF-"quantized" model.
        assert all(p.dtype == torch.float32 for p in model.parameters())
        model.hf_quantizer.remove_quantization_config(model)
    untouched = copy.deepcopy(model)                 # W_0: to check the export and to load it onto
    family = family_spec(model)
    if family.fused_qkv:
        split_fused_qkv(model)       # GPT-2: q and v of the fused c_attn as their own modules
    peft_model = get_peft_model(model, LoraConfig(
        r=4, lora_alpha=32, lora_dropout=0.0, target_modules=list(family.peft_targets),
        fan_in_fan_out=family.fan_in_fan_out, task_type="CAUSAL_LM"))
    delta = DeltaLoRA(peft_model, update_ratio=2.0, start_steps=args.max_steps // 3)

    rows = load_e2e("train", args.data_dir).examples[:args.train_rows]
    train = [encode(tok, ex.context, ex.reference) for ex in rows]
    trainer = Trainer(
        model=peft_model, train_dataset=train, data_collator=lambda rows: collate(rows, tok.pad_token_id),
        callbacks=[DeltaLoRACallback(delta)],
        args=TrainingArguments(output_dir=str(out / "trainer"), max_steps=args.max_steps,
                               per_device_train_batch_size=8, learning_rate=args.lr,
                               warmup_steps=args.max_steps // 10, lr_scheduler_type="linear",
                               weight_decay=0.01, save_steps=max(1, args.max_steps // 2),
                               logging_steps=10, report_to=[], remove_unused_columns=False,
                               use_cpu=not torch.cuda.is_available()))
    trainer.train()   # a checkpoint-N/ folder holds delta_lora.safetensors (W): resume_from_checkpoint works

    report = export_peft_adapter(delta, out / "adapter", base_model=untouched)
    print(f"adapter: {report['out_dir']} (rank {report['rank']}, {report['adapter_bytes']} bytes, "
          f"residual {report['residual']:.2e})")

    loaded = PeftModel.from_pretrained(untouched, str(out / "adapter")).eval()
    device = next(peft_model.parameters()).device
    loaded.to(device)
    for ex, refs in group_references(load_e2e("test", args.data_dir).examples)[:3]:
        ids = torch.tensor([encode(tok, ex.context)["input_ids"]], device=device)
        with torch.no_grad():
            gen = loaded.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=40,
                                  do_sample=False, num_beams=1, eos_token_id=tok.eos_token_id,
                                  pad_token_id=tok.pad_token_id)
        print(f"{ex.context}\n  -> {tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=True).strip()}"
              f"\n  (a reference: {refs[0]})")


if __name__ == "__main__":
    main()
