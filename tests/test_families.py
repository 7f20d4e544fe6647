"""The model-family table: every entry finds its Wq/Wv, picks its padding mask, names its dropouts
and PEFT targets; a new family is one entry; a tiny Qwen2 (added through the table alone) trains
E2E end to end."""
from __future__ import annotations

import warnings

import pytest
import torch
from omegaconf import OmegaConf
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer
from transformers import AutoConfig, AutoModelForSequenceClassification

from deltalora_repro.adapters import LoRALayer, find_sites, inject_lora
from deltalora_repro.errors import ConfigError
from deltalora_repro.families import FAMILIES, Family, QVTarget, TinyRecipe, family_spec, register
from deltalora_repro.fused_qkv import split_fused_qkv
from deltalora_repro.models import apply_config_overrides, load_backbone, tiny_tokenizer
from deltalora_repro.run import run
from deltalora_repro.tasks.base import padding_mask

from .conftest import CONFIGS, DATA, make_cfg

E2E = DATA / "e2e"
needs_e2e = pytest.mark.skipif(not (E2E / "trainset.csv").is_file(), reason=f"E2E data not found at {E2E}")

# A tiny model of every family: the committed YAML where there is one, else a config like them.
TINY = {
    "roberta": ("tiny-roberta", "classification"),
    "bert": ({"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
              "intermediate_size": 128, "attention_probs_dropout_prob": 0.0}, "classification"),
    "gpt2": ("tiny-gpt2", "causal-lm"),
    "llama": ({"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
               "num_key_value_heads": 2, "intermediate_size": 128}, "causal-lm"),
    "qwen2": ("tiny-qwen2", "causal-lm"),
    "bart": ("tiny-bart", "seq2seq"),
}


def tiny(family: str, overrides: dict | None = None):
    spec, head = TINY[family]
    if isinstance(spec, str):
        cfg = OmegaConf.load(CONFIGS / "model" / f"{spec}.yaml")
    else:
        cfg = OmegaConf.create({"name": f"tiny-{family}", "source": "tiny", "family": family, "config": spec})
    kwargs = {"num_labels": 2, "problem_type": "single_label_classification"} if head == "classification" else {}
    model, tok, applied = load_backbone(cfg, head, overrides=overrides, **kwargs)
    return model, tok, applied


def test_every_family_has_a_tiny_model_here():
    assert set(TINY) == set(FAMILIES) == {"roberta", "bert", "gpt2", "llama", "qwen2", "bart"}


# (module, proj, first output row, stop) in module order, worked out by hand from each model's
# layout: hidden 64, 2 layers; GPT-2's fused c_attn is q | k | v of 64 columns each; the tiny
# Qwen2 has 1 key/value head of 32 (so Wv is 32 x 64) and the tiny Llama 2; BART's attention
# defines k_proj, v_proj, q_proj in that order, so v comes before q.
def _layers(prefix: str, rows: list[tuple[str, str, int, int]], n: int = 2):
    return [(f"{prefix}.{i}.{name}", proj, a, b) for i in range(n) for name, proj, a, b in rows]


EXPECTED_SITES = {
    "roberta": _layers("roberta.encoder.layer", [("attention.self.query", "q", 0, 64),
                                                 ("attention.self.value", "v", 0, 64)]),
    "bert": _layers("bert.encoder.layer", [("attention.self.query", "q", 0, 64),
                                           ("attention.self.value", "v", 0, 64)]),
    "gpt2": _layers("transformer.h", [("attn.c_attn", "q", 0, 64), ("attn.c_attn", "v", 128, 192)]),
    "llama": _layers("model.layers", [("self_attn.q_proj", "q", 0, 64), ("self_attn.v_proj", "v", 0, 64)]),
    "qwen2": _layers("model.layers", [("self_attn.q_proj", "q", 0, 64), ("self_attn.v_proj", "v", 0, 32)]),
    "bart": _layers("model.encoder.layers", [("self_attn.v_proj", "v", 0, 64), ("self_attn.q_proj", "q", 0, 64)])
    + _layers("model.decoder.layers", [("self_attn.v_proj", "v", 0, 64), ("self_attn.q_proj", "q", 0, 64),
                                       ("encoder_attn.v_proj", "v", 0, 64), ("encoder_attn.q_proj", "q", 0, 64)]),
}


@pytest.mark.parametrize("family", sorted(EXPECTED_SITES))
def test_each_family_finds_its_wq_and_wv(family):
    model, _, _ = tiny(family)
    sites = [(s.module_name, s.proj, s.start, s.stop) for s in find_sites(model)]
    assert sites == EXPECTED_SITES[family]
    layers = inject_lora(model, rank=2, alpha=4, dropout=0.0)
    assert len(layers) == len(EXPECTED_SITES[family])
    for layer, i, site in layers:
        assert layer.lora_B[i].shape == (site.stop - site.start, 2)


# The attention each family's tiny model runs: bidirectional encoders get the 4-D bool mask.
MASK_RANK = {"roberta": 4, "bert": 4, "bart": 4, "gpt2": 2, "llama": 2, "qwen2": 2}


@pytest.mark.parametrize("family", sorted(MASK_RANK))
def test_padding_mask_kind_per_family(family):
    model, _, _ = tiny(family)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    assert model.config._attn_implementation == "sdpa"
    out = padding_mask(model, mask)
    if MASK_RANK[family] == 2:
        assert out is mask
    else:
        assert out.dtype == torch.bool and out.shape == (2, 1, 1, 4)
        assert torch.equal(out[:, 0, 0], mask.bool())
        model.config._attn_implementation = "eager"   # the 2-D mask outside SDPA, as before
        assert padding_mask(model, mask) is mask


def test_unknown_family_is_refused_naming_the_supported_ones():
    model = AutoModelForSequenceClassification.from_config(AutoConfig.for_model(
        "distilbert", dim=32, n_layers=1, n_heads=2, hidden_dim=64, vocab_size=50))
    supported = r"\['bart', 'bert', 'gpt2', 'llama', 'qwen2', 'roberta'\]"
    for call in (find_sites, lambda m: padding_mask(m, torch.ones(1, 3, dtype=torch.long))):
        with pytest.raises(ConfigError, match=f"'distilbert'.*supported: {supported}"):
            call(model)
    with pytest.raises(ConfigError, match=supported):
        tiny_tokenizer("distilbert")
    with pytest.raises(ConfigError, match="registered twice"):
        register(FAMILIES["gpt2"])


# Every dropout attribute of each family's config, read from transformers' configuration and
# modeling files: what `dropouts: 0.0` must set, and nothing else.
FAMILY_DROPOUTS = {
    "gpt2": ["resid_pdrop", "attn_pdrop", "embd_pdrop"],
    "llama": ["attention_dropout"],
    "qwen2": ["attention_dropout"],
    "bart": ["dropout", "attention_dropout", "activation_dropout", "classifier_dropout"],
    "roberta": ["hidden_dropout_prob", "attention_probs_dropout_prob", "classifier_dropout"],
    "bert": ["hidden_dropout_prob", "attention_probs_dropout_prob", "classifier_dropout"],
}
# Config attributes with "drop" in their name that are not dropout of this toolkit's models:
# GPT-2's double-heads summary head; BART's layer drop (skipping whole layers, 0 by default).
NOT_DROPOUT = {"summary_first_dropout", "summary_last_dropout", "encoder_layerdrop", "decoder_layerdrop"}


@pytest.mark.parametrize("family", sorted(FAMILY_DROPOUTS))
def test_no_dropout_sets_exactly_the_familys_attributes(family):
    config = AutoConfig.for_model(family)
    before = config.to_dict()
    assert {k for k in before if "drop" in k} - NOT_DROPOUT == set(FAMILY_DROPOUTS[family])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        applied = apply_config_overrides(config, OmegaConf.create({"dropouts": 0.0}))
    assert list(applied) == FAMILY_DROPOUTS[family] and set(applied.values()) == {0.0}
    after = config.to_dict()
    assert {k for k in before if before[k] != after[k]} <= set(applied)
    assert all(after[k] == 0.0 for k in applied)


@pytest.mark.parametrize("family", sorted(TINY))
def test_no_dropout_makes_a_training_forward_deterministic(family):
    # Only attention dropout is off in the tiny YAMLs; with every dropout off a training-mode
    # forward equals the evaluation-mode one. Without the override, the families that have
    # other dropouts (hidden, residual, embedding) differ.
    for overrides, same in ((None, family in ("llama", "qwen2")), ({"dropouts": 0.0}, True)):
        model, tok, _ = tiny(family, overrides)
        ids = torch.randint(6, len(tok), (2, 9), generator=torch.Generator().manual_seed(0))
        kwargs = {"decoder_input_ids": ids[:, :4]} if family == "bart" else {}
        torch.manual_seed(1)
        train = model.train()(input_ids=ids, **kwargs).logits
        with torch.no_grad():
            evaluation = model.eval()(input_ids=ids, **kwargs).logits
        assert torch.allclose(train, evaluation, atol=1e-6) == same, (family, overrides)


def _overrides(task: str):
    return make_cfg(f"task={task}").task.model_overrides


def test_task_dropouts_apply_gpt2s_three_attributes_as_before():
    # The attributes and values these tasks set on GPT-2 before they asked by role (their old
    # model_overrides lines) are exactly those set now, in the same order.
    for task, old in (("e2e", {"resid_pdrop": 0.0, "attn_pdrop": 0.0, "embd_pdrop": 0.0}),
                      ("webnlg", {"resid_pdrop": 0.09, "attn_pdrop": 0.09, "embd_pdrop": 0.0})):
        model, _, applied = tiny("gpt2", _overrides(task))
        assert applied == old and list(applied) == list(old)
        assert [model.config.resid_pdrop, model.config.attn_pdrop, model.config.embd_pdrop] == list(old.values())
        # Old records carry the attribute names themselves; they still apply unchanged.
        assert tiny("gpt2", old)[2] == old


def test_task_dropouts_on_llama_set_its_attention_dropout():
    with warnings.catch_warnings():
        warnings.simplefilter("error")     # E2E: nothing that does not apply, so no warning
        model, _, applied = tiny("llama", _overrides("e2e"))
    assert applied == {"attention_dropout": 0.0} and model.config.attention_dropout == 0.0
    with pytest.warns(UserWarning, match=r"llama has no residual dropout.*residual=0\.09"):
        model, _, applied = tiny("llama", _overrides("webnlg"))
    assert applied == {"attention_dropout": 0.09}


@pytest.mark.parametrize("overrides,message", [
    ({"dropouts": {"resid": 0.0}}, r"unknown roles \['resid'\]; valid: \['residual', 'attention'"),
    ({"dropouts": {"residual": 1.5}}, r"residual must be a number in \[0, 1\)"),
    ({"dropouts": "none"}, r"must be a number"),
    # BART's `dropout` is both its residual and its embedding dropout: they cannot differ.
    ({"dropouts": {"residual": 0.1, "embedding": 0.0}}, r"residual=0\.1 and embedding=0\.0 disagree.*\(dropout\)"),
    ({"dropouts": 0.0, "attention_dropout": 0.1}, r"attention_dropout=0\.1 contradicts dropouts"),
])
def test_bad_dropout_requests_are_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        apply_config_overrides(AutoConfig.for_model("bart"), overrides)


# Module names PEFT wraps with the table's targets: Wq and Wv alone (GPT-2's fused c_attn split
# first), and for the benchmark's PEFT baseline the whole projections (GPT-2: c_attn, q k v).
@pytest.mark.parametrize("family", sorted(TINY))
def test_peft_targets_wrap_exactly_wq_and_wv(family):
    spec = family_spec(family)
    model, _, _ = tiny(family)
    sites = find_sites(model)
    if spec.fused_qkv:
        split_fused_qkv(model)
        expected = {f"{s.module_name}.{s.proj}" for s in sites}
    else:
        expected = {s.module_name for s in sites}
    peft = get_peft_model(model, LoraConfig(r=2, target_modules=list(spec.peft_targets),
                                            fan_in_fan_out=spec.fan_in_fan_out))
    wrapped = {n.removeprefix("base_model.model.") for n, m in peft.named_modules() if isinstance(m, LoraLayer)}
    assert wrapped == expected
    whole, _, _ = tiny(family)
    peft = get_peft_model(whole, LoraConfig(r=2, target_modules=spec.projection_modules,
                                            fan_in_fan_out=spec.fan_in_fan_out))
    wrapped = {n.removeprefix("base_model.model.") for n, m in peft.named_modules() if isinstance(m, LoraLayer)}
    assert wrapped == {s.module_name for s in sites}       # c_attn once per block on GPT-2


def test_a_new_family_is_one_entry(monkeypatch):
    """DistilBERT, not in the table: one entry makes adapters, the padding mask, the dropout
    mapping and the tiny loader work on it."""
    config = AutoConfig.for_model("distilbert", dim=64, n_layers=2, n_heads=2, hidden_dim=128,
                                  vocab_size=60, num_labels=2)
    with pytest.raises(ConfigError):
        family_spec(config)
    monkeypatch.setitem(FAMILIES, "distilbert", Family(
        "distilbert", (QVTarget("attention.q_lin", "q"), QVTarget("attention.v_lin", "v")), "4d-bool",
        peft_targets=("q_lin", "v_lin"),
        dropouts={"residual": ("dropout",), "attention": ("attention_dropout",),
                  "classifier": ("seq_classif_dropout",)},
        tiny=TinyRecipe(dict(bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
                             cls_token="<s>", sep_token="</s>", mask_token="<mask>"), pair_template=True)))
    assert apply_config_overrides(config, {"dropouts": 0.0}) == {
        "dropout": 0.0, "attention_dropout": 0.0, "seq_classif_dropout": 0.0}
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(config).eval()
    assert [(s.module_name, s.proj, s.start, s.stop) for s in find_sites(model)] == [
        (f"distilbert.transformer.layer.{i}.attention.{n}_lin", p, 0, 64) for i in range(2) for n, p in (("q", "q"), ("v", "v"))]
    ids = torch.randint(6, 60, (2, 5), generator=torch.Generator().manual_seed(0))
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    four_d = padding_mask(model, mask)
    assert four_d.shape == (2, 1, 1, 5)
    with torch.no_grad():    # the 4-D mask attends as the 2-D one does
        torch.testing.assert_close(model(input_ids=ids, attention_mask=four_d).logits,
                                   model(input_ids=ids, attention_mask=mask).logits)
    assert len(inject_lora(model, rank=2, alpha=4, dropout=0.0)) == 4
    cfg = OmegaConf.create({"name": "tiny-distilbert", "source": "tiny", "family": "distilbert",
                            "config": {"dim": 64, "n_layers": 2, "n_heads": 2, "hidden_dim": 128}})
    model, tok, _ = load_backbone(cfg, "classification", num_labels=2)
    assert tok.convert_ids_to_tokens(tok("a", "b")["input_ids"]).count("</s>") == 3
    assert len(find_sites(model)) == 4


def test_tiny_qwen2_tokenizer_is_laid_out_as_qwen2s():
    tok = tiny_tokenizer("qwen2")
    # Qwen2Tokenizer: no bos token; <|endoftext|> ends, pads and stands for unknown; nothing added.
    assert tok.bos_token is None and tok.eos_token == tok.pad_token == "<|endoftext|>"
    ids = tok("name : Blue Spice")["input_ids"]
    assert ids == tok.encode("name : Blue Spice", add_special_tokens=False)
    assert tok.decode(ids) == "name : Blue Spice"
    model, _, _ = tiny("qwen2")
    assert model.config.eos_token_id == model.config.pad_token_id == tok.convert_tokens_to_ids("<|endoftext|>")
    assert model.config.bos_token_id is None and model.config.num_key_value_heads == 1


@needs_e2e
@pytest.mark.parametrize("method,start_steps,w_moves", [
    ("lora", None, False), ("delta-lora", 1, True), ("delta-lora", 2, False)])
def test_tiny_qwen2_trains_e2e_end_to_end(tmp_path, monkeypatch, method, start_steps, w_moves):
    """16 real E2E rows, 2 optimizer steps, 2 test MRs decoded. Delta-LoRA updates W after step K
    (step > K): with K = 1 at step 2, with K = 2 never; LoRA never."""
    from deltalora_repro import run as run_module
    trained = {}

    def keep_model(model, method_, path):         # the model as run() saves it, after training
        trained["model"] = model
        return save_weights(model, method_, path)

    save_weights = run_module.save_weights
    monkeypatch.setattr(run_module, "save_weights", keep_model)
    cfg = make_cfg("task=e2e", "model=tiny-qwen2", f"data_dir={E2E}", f"method={method}",
                   "task.train_max_examples=16", "task.eval_max_examples=8", "task.test_max_groups=2",
                   "train.batch_size=8", "train.epochs=1", "train.warmup_steps=1", "device=cpu",
                   "train.checkpoint=false", "task.decoding.num_beams=2",
                   "task.decoding.max_new_tokens=8", "task.score=false",
                   *([f"method.start_steps={start_steps}"] if start_steps is not None else []),
                   tmp_path=tmp_path)
    record = run(cfg)
    assert record["status"] == "completed"
    assert record["model_overrides_applied"] == {"attention_dropout": 0.0}
    # Rank 4 on 2 layers: Wq (64 x 64) gets A 4x64 + B 64x4, Wv (32 x 64) A 4x64 + B 32x4.
    assert record["params"]["trainable"] == 2 * ((4 * 64 + 64 * 4) + (4 * 64 + 32 * 4))
    assert len((tmp_path / "out" / "predictions.txt").read_text().splitlines()) == 2

    initial = dict(load_backbone(cfg.model, "causal-lm", seed=cfg.seed)[0].named_parameters())
    model = trained["model"]
    qv = [f"model.layers.{i}.self_attn.{p}_proj" for i in range(2) for p in "qv"]
    assert sorted(n for n, m in model.named_modules() if isinstance(m, LoRALayer)) == qv
    for name, p in model.named_parameters():
        if ".lora_" in name:
            continue
        base = name.replace(".base.", ".")
        moved = not torch.equal(p, initial[base])
        site_w = base in {f"{m}.weight" for m in qv}
        assert moved == (w_moves and site_w), name     # only Wq/Wv move, and only for Delta-LoRA
    assert all(torch.count_nonzero(model.get_submodule(m).lora_B[0]) > 0 for m in qv)
