"""E2E/WebNLG formatting and loss mask on real rows (the LoRA repository's layout)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from .conftest import DATA, build, make_cfg

E2E = DATA / "e2e"
needs_e2e = pytest.mark.skipif(not E2E.is_dir(), reason=f"E2E data not found at {E2E}")

TINY_E2E = [f"data_dir={E2E}", "task=e2e", "model=tiny-gpt2", "task.train_max_examples=16",
            "task.eval_max_examples=16", "task.test_max_groups=4", "train.batch_size=8",
            "train.epochs=1", "device=cpu", "train.checkpoint=false", "task.decoding.num_beams=2",
            "task.decoding.max_new_tokens=8"]


@needs_e2e
def test_e2e_sequence_layout_and_loss_mask_on_the_first_training_row(tmp_path):
    cfg = make_cfg(*TINY_E2E, "method=lora", tmp_path=tmp_path)
    task, model, method, trainer = build(cfg)
    tok = task.tokenizer
    # The strings the LoRA repository encodes for trainset.csv's first row (its line stripped,
    # so nothing between the final " ." and the end token); tests/test_lora_encoding.py has more.
    context = ("name : The Vaults | Type : pub | price : more than £ 30 | "
               "customer rating : 5 out of 5 | near : Café Adriatic")
    completion = " The Vaults pub near Café Adriatic has a 5 star rating . Prices start at £ 30 ."
    enc = task.train_examples()[0]
    eos = tok.eos_token_id
    ctx = tok.encode(context, add_special_tokens=False)
    ref = tok.encode(completion, add_special_tokens=False)
    assert enc["input_ids"] == ctx + [eos] + ref + [eos]          # MR <eos> ␠ref <eos>
    batch = task.collate(task.train_examples()[:2])
    labels, ids = batch["labels"][0], batch["input_ids"][0]
    n = len(enc["input_ids"])
    assert (labels[:len(ctx) + 1] == -100).all()                  # no loss on the MR or separator
    assert torch.equal(labels[len(ctx) + 1:n], ids[len(ctx) + 1:n])  # reference + final <eos>
    assert labels[n - 1] == eos and (labels[n:] == -100).all()    # padding carries no loss
    assert tok.decode(labels[len(ctx) + 1:n - 1]) == completion


@needs_e2e
def test_e2e_loss_is_mean_cross_entropy_over_reference_tokens(tmp_path):
    cfg = make_cfg(*TINY_E2E, "method=lora", tmp_path=tmp_path)
    task, model, method, trainer = build(cfg)
    batch = task.collate(task.train_examples()[:3])
    model.eval()
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    terms = []
    for b in range(3):
        for t in range(1, batch["input_ids"].shape[1]):
            if batch["labels"][b, t] != -100:
                terms.append(-F.log_softmax(logits[b, t - 1], -1)[batch["labels"][b, t]])
    torch.testing.assert_close(task.loss(model, batch), torch.stack(terms).mean())


@needs_e2e
def test_e2e_end_tokens_include_eos(tmp_path):
    cfg = make_cfg(*TINY_E2E, "method=lora", tmp_path=tmp_path)
    task, *_ = build(cfg)
    assert task.tokenizer.eos_token_id in task.end_token_ids()
    assert len(task.test_groups) == 4 and task.test_groups[0][0].context.startswith("name : Blue Spice")


@needs_e2e
def test_e2e_train_decode_score_end_to_end(tmp_path):
    """run(): train, decode every kept test MR once, score with the official metrics, keep the
    predictions beside the record."""
    import json
    import shutil
    from deltalora_repro.run import run
    if shutil.which("java") is None:
        pytest.skip("java not installed (METEOR / PTB tokenizer)")
    record = run(make_cfg(*TINY_E2E, "method=delta-lora", "method.start_steps=0",
                          "train.warmup_steps=0", "train.lr=1e-2", tmp_path=tmp_path))
    final = record["metrics"]["final"]
    assert set(final) >= {"bleu", "nist", "meteor", "rouge_l", "cider", "val_loss"}
    kept = tmp_path / "results" / record["predictions"]
    rows = [json.loads(line) for line in kept.read_text().splitlines()]
    assert len(rows) == 4 == record["data"]["test"]["groups_decoded"]
    assert rows[0]["references"] == ["A coffee shop in the city centre area called Blue Spice .",
                                     "Blue Spice is a coffee shop in city centre ."]
    assert record["test_time_s"] > 0
