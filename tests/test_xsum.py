"""XSum (Table 3): split carving on the real 321-article sample, seq2seq batches and loss on real
rows, ROUGE golden values, every method on tiny-bart, the Table 3 experiment configs, and run()
end to end."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from rouge_score import rouge_scorer

from deltalora_repro import build as build_module
from deltalora_repro.adapters import lora_layers
from deltalora_repro.errors import ConfigError, DataError
from deltalora_repro.metrics.xsum import split_sentences, xsum_rouge
from deltalora_repro.paper_numbers import PAPER_TABLES
from deltalora_repro.run import run, validate
from deltalora_repro.tasks.xsum import XSumTask, load_xsum

from .conftest import CONFIGS, DATA, build, make_cfg

XSUM = DATA / "xsum"
SAMPLE = XSUM / "test_sample.jsonl"
needs_xsum = pytest.mark.skipif(not SAMPLE.is_file(), reason=f"XSum sample not found at {SAMPLE}")

SPLIT = "task.local_split={train:[0,16],validation:[16,20],test:[20,24]}"
# Short sources keep the tiny model's CPU steps and beam search fast; the 768-token cut is
# checked on its own below.
TINY_XSUM = [f"data_dir={XSUM}", "task=xsum", "model=tiny-bart", "task.local_file=test_sample.jsonl",
             SPLIT, "task.max_source_length=128", "train.batch_size=8", "train.epochs=1",
             "device=cpu", "train.checkpoint=false", "train.log_every=1000",
             "task.decoding.max_new_tokens=8", "task.decoding.batch_size=4"]


def sample_rows() -> list[dict]:
    return [json.loads(line) for line in SAMPLE.read_text(encoding="utf-8").splitlines()]


def task_cfg(**extra):
    base = OmegaConf.load(CONFIGS / "task" / "xsum.yaml").task
    return OmegaConf.merge(base, extra)


# -- data -------------------------------------------------------------------------------------------
@needs_xsum
def test_splits_carved_from_the_real_sample_and_recorded():
    cfg = task_cfg(local_file="test_sample.jsonl",
                   local_split={"train": [0, 200], "validation": [200, 240], "test": [240, 321]})
    task = XSumTask(cfg, str(XSUM))
    task.load()
    rows = sample_rows()
    assert len(rows) == 321
    assert [len(task.rows[s]) for s in ("train", "validation", "test")] == [200, 40, 81]
    first = task.rows["train"][0]
    assert first["id"] == "29604402" and first["document"].startswith("Mukherjee's The Lives Of Others")
    assert first["summary"].startswith("The winner of the Man Booker Prize is announced later")
    assert [r["id"] for r in task.rows["validation"]] == [r["id"] for r in rows[200:240]]
    assert [r["id"] for r in task.rows["test"]] == [r["id"] for r in rows[240:]]
    assert set(first) == {"id", "document", "summary"}          # split and url are not carried
    desc = task.describe()
    assert desc["local_file"] == "test_sample.jsonl"
    assert desc["local_split"] == {"train": [0, 200], "validation": [200, 240], "test": [240, 321]}
    assert desc["test"]["source"] == f"{SAMPLE} rows [240, 321) of 321"
    assert desc["train"]["rows_used"] == 200


@needs_xsum
def test_max_examples_cut_each_split_after_carving():
    cfg = task_cfg(local_file="test_sample.jsonl", train_max_examples=5, test_max_examples=3,
                   local_split={"train": [10, 30], "validation": [30, 40], "test": [300, 321]})
    task = XSumTask(cfg, str(XSUM))
    task.load()
    rows = sample_rows()
    assert [r["id"] for r in task.rows["train"]] == [r["id"] for r in rows[10:15]]
    assert [r["id"] for r in task.rows["test"]] == [r["id"] for r in rows[300:303]]
    assert task.describe()["train"] == {"source": f"{SAMPLE} rows [10, 30) of 321", "rows": 20,
                                        "rows_used": 5}


@needs_xsum
def test_a_folder_of_split_files(tmp_path):
    lines = SAMPLE.read_text(encoding="utf-8").splitlines()
    for name, part in (("train", lines[:3]), ("validation", lines[3:5]), ("test", lines[5:6])):
        (tmp_path / f"{name}.jsonl").write_text("\n".join(part) + "\n", encoding="utf-8")
    splits = load_xsum(tmp_path)
    assert {k: len(v["rows"]) for k, v in splits.items()} == {"train": 3, "validation": 2, "test": 1}
    assert splits["test"]["rows"][0]["id"] == json.loads(lines[5])["id"]


@needs_xsum
def test_missing_data_names_the_path_and_what_was_expected(tmp_path):
    with pytest.raises(DataError, match=r"train\.jsonl.*test_sample\.jsonl.*task\.local_file"):
        load_xsum(XSUM)                           # the sample folder has no per-split files
    with pytest.raises(DataError, match=r"nope\.jsonl.*fields \['id', 'document', 'summary'\]"):
        load_xsum(XSUM, "nope.jsonl", {"train": [0, 1], "validation": [1, 2], "test": [2, 3]})
    with pytest.raises(DataError, match="is not a folder"):
        load_xsum(tmp_path / "absent")
    (tmp_path / "bad.jsonl").write_text('{"id": "1", "document": "x"}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.jsonl, line 1: lacks fields \['summary'\]"):
        load_xsum(tmp_path, "bad.jsonl", {"train": [0, 1], "validation": [1, 1], "test": [1, 1]})


@needs_xsum
@pytest.mark.parametrize("local_split,message", [
    ({"train": [0, 200], "validation": [190, 240], "test": [240, 321]}, "overlap"),
    ({"train": [0, 200], "validation": [200, 240], "test": [240, 400]}, r"0 <= start < stop <= 321"),
    ({"train": [0, 200], "test": [240, 321]}, "must map each of"),
    ({"train": [0, 200], "validation": [200], "test": [240, 321]}, r"local_split\.validation"),
])
def test_bad_local_split_is_a_config_error(local_split, message):
    with pytest.raises(ConfigError, match=message):
        load_xsum(XSUM, "test_sample.jsonl", local_split)


def test_local_split_needs_a_file_and_a_folder(tmp_path):
    with pytest.raises(ConfigError, match="need data_dir"):
        load_xsum(None, "test_sample.jsonl", {"train": [0, 1]})
    with pytest.raises(ConfigError, match="needs task.local_file"):
        load_xsum(tmp_path, None, {"train": [0, 1], "validation": [1, 2], "test": [2, 3]})
    with pytest.raises(ConfigError, match="needs task.local_split"):
        load_xsum(tmp_path, "test_sample.jsonl", None)


@needs_xsum
def test_run_fails_on_missing_data_before_any_model_is_built(tmp_path, monkeypatch):
    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the data was checked")
    monkeypatch.setattr(build_module, "load_backbone", no_model)
    cfg = make_cfg(*TINY_XSUM, "method=lora", "task.local_file=missing.jsonl", tmp_path=tmp_path)
    with pytest.raises(DataError, match="missing.jsonl"):
        run(cfg)
    assert not list((tmp_path / "results").rglob("*.json"))


# -- batches and loss -------------------------------------------------------------------------------
@needs_xsum
def test_collate_on_the_first_real_row(tmp_path):
    """Source `<s> article </s>` cut at 768 tokens, labels `<s> summary </s>` padded with -100,
    decoder inputs = labels shifted right behind BART's decoder start (</s>)."""
    cfg = make_cfg(*TINY_XSUM, "method=lora", "task.max_source_length=768", tmp_path=tmp_path)
    task, model, *_ = build(cfg)
    tok = task.tokenizer
    bos, eos, pad = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
    row = task.rows["train"][0]
    enc = task.train_examples()[0]
    full = tok(row["document"])["input_ids"]
    assert len(full) > 768                                       # this article really is cut
    assert enc["input_ids"].tolist() == full[:767] + [eos]       # cut, end token kept
    assert enc["labels"].tolist() == tok(row["summary"])["input_ids"]   # 54 tokens: not cut at 64
    assert enc["labels"][0] == bos and enc["labels"][-1] == eos
    assert tok.decode(enc["labels"], skip_special_tokens=True) == row["summary"]
    assert model.config.decoder_start_token_id == eos == task.decoder_start_token_id

    batch = task.collate(task.train_examples()[:3])
    n_src = [len(e["input_ids"]) for e in task.train_examples()[:3]]
    n_tgt = [len(e["labels"]) for e in task.train_examples()[:3]]
    assert batch["input_ids"].shape == (3, 768)                  # 768 is a multiple of 8 already
    assert batch["labels"].shape[1] == -(-max(n_tgt) // 8) * 8
    for i in range(3):
        assert batch["attention_mask"][i].sum() == n_src[i]
        assert (batch["input_ids"][i, n_src[i]:] == pad).all()
        labels, dec = batch["labels"][i], batch["decoder_input_ids"][i]
        assert labels[:n_tgt[i]].tolist() == task.train_examples()[i]["labels"].tolist()
        assert (labels[n_tgt[i]:] == -100).all()
        assert dec[0] == eos and torch.equal(dec[1:n_tgt[i] + 1], labels[:n_tgt[i]])
        # After the shifted-in final </s> (whose output position carries no loss) only padding:
        # the -100 of the labels never reaches the embedding.
        assert (dec[n_tgt[i] + 1:] == pad).all()


@needs_xsum
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_loss_is_cross_entropy_over_target_tokens_and_padding_changes_nothing(tmp_path, smoothing):
    cfg = make_cfg(*TINY_XSUM, "method=lora", f"task.label_smoothing={smoothing}",
                   tmp_path=tmp_path)
    task, model, *_ = build(cfg)
    model.eval()
    examples = task.train_examples()[:3]
    batch = task.collate(examples)
    terms = []
    for e in examples:
        # Each example alone, unpadded and with no mask at all: the padded batch must agree.
        one = task.collate([e])
        n_src, n_tgt = len(e["input_ids"]), len(e["labels"])
        logits = model(input_ids=one["input_ids"][:, :n_src],
                       decoder_input_ids=one["decoder_input_ids"][:, :n_tgt]).logits[0]
        terms.append(F.cross_entropy(logits, one["labels"][0, :n_tgt], reduction="none",
                                     label_smoothing=smoothing))
    expected = torch.cat(terms).mean()
    torch.testing.assert_close(task.loss(model, batch), expected, rtol=1e-5, atol=1e-5)


# -- ROUGE ------------------------------------------------------------------------------------------
def test_rouge_identical_and_disjoint():
    same = xsum_rouge(["The cat sat on the mat."], ["The cat sat on the mat."])
    assert same == {"rouge1": 1.0, "rouge2": 1.0, "rougeL": 1.0, "rougeLsum": 1.0}
    assert xsum_rouge(["dogs bark loudly"], ["the cat sat"]) == dict.fromkeys(same, 0.0)
    # The mean over examples, not a pooled count: one perfect and one empty prediction.
    assert xsum_rouge(["The cat sat.", ""], ["The cat sat.", "A dog ran."]) == dict.fromkeys(same, 0.5)


def test_rouge_partial_match_hand_checked():
    """Stemmed tokens: reference the cat sat on the mat the dog ran (9), prediction the cat are
    sit a dog run (7). Unigram overlap the, cat, dog = 3: F1 = 2*3/(9+7) = 0.375. One shared bigram
    ("the cat") of 8 and 6: F1 = 2/14. LCS the cat ... dog = 3: 0.375. Summary-level LCS over the
    sentence pairs finds the same three tokens (the prediction's one "the" is counted once)."""
    pred, ref = "The cats are sitting. A dog runs.", "The cat sat on the mat. The dog ran."
    scores = xsum_rouge([pred], [ref])
    assert scores == pytest.approx({"rouge1": 0.375, "rouge2": 1 / 7, "rougeL": 0.375,
                                    "rougeLsum": 0.375}, abs=1e-12)
    direct = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL", "rougeLsum"], use_stemmer=True)
    split = direct.score("The cat sat on the mat.\nThe dog ran.", "The cats are sitting.\nA dog runs.")
    plain = direct.score(ref, pred)
    for key in ("rouge1", "rouge2", "rougeL"):
        assert scores[key] == plain[key].fmeasure
    assert scores["rougeLsum"] == split["rougeLsum"].fmeasure


def test_rouge_lsum_reads_the_sentence_split():
    """Swapped sentences: the LCS of the whole texts keeps one sentence (3 of 6 tokens, F1 0.5),
    the summary-level LCS matches each sentence with its twin (F1 1.0)."""
    scores = xsum_rouge(["A dog ran off. The cat sat down."], ["The cat sat down. A dog ran off."])
    assert scores["rougeL"] == pytest.approx(0.5)
    assert scores["rougeLsum"] == pytest.approx(1.0)
    assert scores["rouge1"] == 1.0


def test_sentence_splitter():
    assert split_sentences("One here. Two there! Three? 4 left. \"Quoted\" too.") == [
        "One here.", "Two there!", "Three?", "4 left.", "\"Quoted\" too."]
    assert split_sentences('He said "Stop." Then he left.') == ['He said "Stop."', "Then he left."]
    assert split_sentences("Mr. Smith met J. K. Rowling. It rained.") == [
        "Mr. Smith met J. K. Rowling.", "It rained."]
    assert split_sentences("Prices rose 2.5% in the U.S. economy. ok. no split before lowercase") == [
        "Prices rose 2.5% in the U.S. economy. ok. no split before lowercase"]
    assert split_sentences("Line one.\nLine two.") == ["Line one.", "Line two."]
    assert split_sentences("") == [] and split_sentences("  ") == []
    assert split_sentences("No final stop") == ["No final stop"]


@pytest.mark.parametrize("preds,refs,message", [
    (["a", "b"], ["a"], "2 predictions but 1 references"),
    ([], [], "no predictions"),
    (["a"], [None], "reference 0 is a NoneType"),
    ("a", ["a"], "not one string"),
])
def test_rouge_rejects_bad_input(preds, refs, message):
    with pytest.raises(ValueError, match=message):
        xsum_rouge(preds, refs)


# -- methods and configs ----------------------------------------------------------------------------
# tiny-bart: 2 encoder layers (self-attention) and 2 decoder layers (self- and cross-attention).
WQ_WV = sorted(f"{side}.layers.{i}.{attn}.{proj}_proj" for side, attns in
               (("encoder", ["self_attn"]), ("decoder", ["self_attn", "encoder_attn"]))
               for i in range(2) for attn in attns for proj in "qv")


@needs_xsum
@pytest.mark.parametrize("method", ["lora", "delta-lora", "dylora", "adalora", "ft-qv"])
def test_every_adapter_method_sits_on_wq_wv_of_all_three_attentions(tmp_path, method):
    extra = ["method.rank=6", "method.target_rank=4"] if method == "adalora" else []
    # batch 4: 4 steps in all (with 2, PEFT would finalise the AdaLoRA budget at step 1 before it
    # has any importance scores)
    cfg = make_cfg(*TINY_XSUM, f"method={method}", "task.max_source_length=64", "train.batch_size=4",
                   *extra, tmp_path=tmp_path)
    task, model, _, trainer = build(cfg)
    trainable = [n.removeprefix("base_model.model.") for n, p in model.named_parameters()
                 if p.requires_grad]
    if method == "ft-qv":
        assert sorted(n.removeprefix("model.").removesuffix(".weight") for n in trainable) == WQ_WV
    elif method == "adalora":
        sites = {n.removeprefix("model.").split(".lora_")[0] for n in trainable}
        assert sorted(sites) == WQ_WV
    else:
        names = sorted(n.removeprefix("model.") for n, m in model.named_modules() if m in lora_layers(model))
        assert names == WQ_WV
        assert all(".lora_" in n for n in trainable)
    trainer.start()
    loss = trainer.train_step([task.collate(task.train_examples()[:4])])
    assert torch.isfinite(loss)


@pytest.mark.parametrize("row", sorted(PAPER_TABLES[3]["rows"]))
def test_every_table3_row_has_an_experiment_config(row):
    cfg = make_cfg(f"experiment=table3/{row}")
    assert (cfg.task.name, cfg.model.name, cfg.method.name) == ("xsum", "bart-large", row)
    assert (cfg.train.lr, cfg.train.batch_size, cfg.train.epochs, cfg.train.warmup_steps) == (
        2e-4, 64, 25, 3000)
    assert cfg.task.decoding.num_beams == 8 and cfg.task.max_source_length == 768
    validate(cfg)                                       # e.g. AdaLoRA's target rank fits its rank
    if row == "delta-lora":
        assert (cfg.method.update_ratio, cfg.method.start_steps, cfg.method.rank,
                cfg.method.alpha) == (0.5, 1000, 4, 32)
    assert sorted(p.stem for p in (CONFIGS / "experiment" / "table3").glob("*.yaml")) == sorted(
        PAPER_TABLES[3]["rows"])


# -- end to end -------------------------------------------------------------------------------------
@needs_xsum
def test_xsum_train_decode_score_end_to_end(tmp_path):
    """run(): train on 16 articles, decode 4 test articles with beam search, score ROUGE, keep the
    predictions beside the record."""
    record = run(make_cfg(*TINY_XSUM, "method=delta-lora", "method.start_steps=0",
                          "train.warmup_steps=0", "train.lr=1e-2", tmp_path=tmp_path))
    assert record["status"] == "completed"
    final = record["metrics"]["final"]
    assert set(final) >= {"rouge1", "rouge2", "rougeL", "rougeLsum", "val_loss"}
    assert all(0.0 <= final[k] <= 1.0 for k in ("rouge1", "rouge2", "rougeL", "rougeLsum"))
    assert record["metrics"]["primary"] == "val_loss" and record["metrics"]["mode"] == "min"
    assert record["data"]["local_split"] == {"train": [0, 16], "validation": [16, 20], "test": [20, 24]}
    assert record["model_overrides_applied"] == {"dropout": 0.0, "attention_dropout": 0.0,
                                                 "activation_dropout": 0.0, "classifier_dropout": 0.0}
    kept = tmp_path / "results" / record["predictions"]
    rows = [json.loads(line) for line in kept.read_text(encoding="utf-8").splitlines()]
    expected = sample_rows()[20:24]
    assert [r["id"] for r in rows] == [r["id"] for r in expected]
    assert [r["reference"] for r in rows] == [r["summary"] for r in expected]
    assert set(rows[0]) == {"id", "document", "prediction", "reference"}
    txt = (tmp_path / "out" / "predictions.txt").read_text(encoding="utf-8").split("\n")
    assert txt == [r["prediction"].replace("\n", " ") for r in rows]
    assert final == {**record["metrics"]["evals"][-1],
                     **xsum_rouge([r["prediction"] for r in rows], [r["reference"] for r in rows])}
    assert record["test_time_s"] > 0
