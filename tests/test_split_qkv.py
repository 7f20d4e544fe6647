"""GPT-2's fused c_attn split into q, k, v modules for PEFT (AdaLoRA on Wq and Wv only) and fused
back on export; the toolkit's own q/v-slice adapters keep the fused projection."""
from __future__ import annotations

import pytest
import torch
from peft.tuners.adalora import AdaLoraLayer
from transformers import GPT2ForSequenceClassification, GPT2LMHeadModel
from transformers.pytorch_utils import Conv1D

from deltalora_repro.adapters import LoRALayer
from deltalora_repro.errors import ConfigError
from deltalora_repro.fused_qkv import SplitQKV, fuse_qkv, split_fused_qkv
from deltalora_repro.models import load_backbone

from .conftest import DATA, SMALL, build, make_cfg, needs_glue

E2E = DATA / "e2e"
H = 64                                   # tiny-gpt2: n_embd 64, 2 blocks
BLOCKS = range(2)


def tiny_gpt2(seed: int = 0):
    model, tok, _ = load_backbone(make_cfg("model=tiny-gpt2").model, "causal-lm", seed=seed)
    return model.eval(), tok


def token_batch(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (3, 21), generator=torch.Generator().manual_seed(0))


@torch.no_grad()
def test_split_computes_the_fused_projection():
    model, tok = tiny_gpt2()
    ids = token_batch(len(tok))
    fused = [model.transformer.h[i].attn.c_attn for i in BLOCKS]
    before = model(ids).logits
    greedy = model.generate(ids[:1], max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
    assert split_fused_qkv(model) == ["c_attn.q", "c_attn.v"]
    for i in BLOCKS:
        split = model.transformer.h[i].attn.c_attn
        assert isinstance(split, SplitQKV)
        for j, proj in enumerate("qkv"):              # q first, then k, then v
            part = getattr(split, proj)
            assert torch.equal(part.weight, fused[i].weight[:, j * H:(j + 1) * H])
            assert torch.equal(part.bias, fused[i].bias[j * H:(j + 1) * H])
    torch.testing.assert_close(model(ids).logits, before)
    # Decoding with the key/value cache goes through the same call.
    again = model.generate(ids[:1], max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
    assert torch.equal(again, greedy)


@torch.no_grad()
def test_fuse_restores_the_plain_layer():
    model, tok = tiny_gpt2()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    split_fused_qkv(model)
    fuse_qkv(model)
    assert not any(isinstance(m, SplitQKV) for m in model.modules())
    assert model.state_dict().keys() == original.keys()
    for k, v in model.state_dict().items():
        assert torch.equal(v, original[k]), k


def test_split_is_refused_where_it_does_not_apply():
    bart, _, _ = load_backbone(make_cfg("model=tiny-bart").model, "seq2seq", seed=0)
    with pytest.raises(ConfigError, match="only GPT-2 has a fused q/k/v projection.*'bart'"):
        split_fused_qkv(bart)


@needs_glue
@pytest.mark.parametrize("method", ["lora", "delta-lora", "dylora"])
def test_toolkit_adapters_keep_the_fused_projection(method, tmp_path):
    """Only PEFT-based methods split: the q/v-slice adapters sit on the fused Conv1D."""
    _, model, _, _ = build(make_cfg("model=tiny-gpt2", f"method={method}", *SMALL, tmp_path=tmp_path))
    assert not any(isinstance(m, SplitQKV) for m in model.modules())
    for i in BLOCKS:
        layer = model.transformer.h[i].attn.c_attn
        assert isinstance(layer, LoRALayer) and isinstance(layer.base, Conv1D)
        assert layer.base.nf == 3 * H and layer.slices == [(0, H), (2 * H, 3 * H)]


@needs_glue
def test_adalora_adapts_exactly_q_and_v_and_k_stays_bit_exact(tmp_path):
    cfg = make_cfg("model=tiny-gpt2", "method=adalora", *SMALL, "train.lr=1e-2", "train.epochs=2",
                   tmp_path=tmp_path)
    task, model, method, trainer = build(cfg)
    adapted = sorted(n.removeprefix("base_model.model.") for n, m in model.named_modules()
                     if isinstance(m, AdaLoraLayer))
    assert adapted == sorted(f"transformer.h.{i}.attn.c_attn.{p}" for i in BLOCKS for p in "qv")
    params = dict(model.named_parameters())
    prefix = "base_model.model.transformer.h"
    k = {n: p.detach().clone() for n, p in params.items() if ".attn.c_attn.k." in n}
    assert sorted(k) == sorted(f"{prefix}.{i}.attn.c_attn.k.{w}" for i in BLOCKS for w in ("weight", "bias"))
    factors = {n: p.detach().clone() for n, p in params.items() if ".lora_" in n}
    trainer.fit()
    assert trainer.step == 12
    for n, before in k.items():
        assert torch.equal(params[n], before), n
    moved = {n for n, before in factors.items() if not torch.equal(params[n], before)}
    assert {n.split(".c_attn.")[1][0] for n in moved} == {"q", "v"}      # training did happen


def export_matches_the_trained_model(run_dir, export_dir, model_class, seed: int) -> None:
    """Export the run, reload it with plain transformers, compare logits and weights."""
    from deltalora_repro.export import load_trained
    from deltalora_repro.export import main as export_main
    trained, tok, record = load_trained(run_dir)
    trained.eval()
    ids = token_batch(len(tok))
    with torch.no_grad():
        expected = trained(ids).logits
    assert export_main([str(run_dir), str(export_dir)]) == 0
    plain, info = model_class.from_pretrained(export_dir, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]     # a plain GPT-2 layout
    plain.eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, expected, rtol=1e-4, atol=1e-5)
    # The merge moved Wq and Wv and left Wk as pretrained, bit for bit.
    pretrained, _ = tiny_gpt2(seed=seed)
    for i in BLOCKS:
        w0 = pretrained.transformer.h[i].attn.c_attn.weight
        w1 = plain.transformer.h[i].attn.c_attn.weight
        assert torch.equal(w1[:, H:2 * H], w0[:, H:2 * H])
        assert not torch.equal(w1[:, :H], w0[:, :H]) and not torch.equal(w1[:, 2 * H:], w0[:, 2 * H:])


@needs_glue
def test_export_of_a_classifier_reloads_as_plain_gpt2(tmp_path):
    from deltalora_repro.run import run
    cfg = make_cfg("model=tiny-gpt2", "method=adalora", *SMALL, "train.lr=1e-2", "save_weights=true",
                   tmp_path=tmp_path)
    assert run(cfg)["status"] == "completed"
    export_matches_the_trained_model(tmp_path / "out", tmp_path / "export",
                                     GPT2ForSequenceClassification, cfg.seed)


@pytest.mark.skipif(not E2E.is_dir(), reason=f"E2E data not found at {E2E}")
def test_export_of_an_e2e_run_reloads_as_gpt2_lm_head_model(tmp_path):
    from deltalora_repro.run import run
    cfg = make_cfg(f"data_dir={E2E}", "task=e2e", "model=tiny-gpt2", "method=adalora",
                   "method.rank=4", "method.target_rank=2", "task.train_max_examples=16",
                   "task.eval_max_examples=8", "task.test_max_groups=2", "train.batch_size=4",
                   "train.epochs=1", "train.lr=1e-2", "train.warmup_steps=0", "device=cpu",
                   "train.checkpoint=false", "task.decoding.num_beams=2",
                   "task.decoding.max_new_tokens=4", "task.score=false", "save_weights=true",
                   tmp_path=tmp_path)
    record = run(cfg)
    assert record["status"] == "completed" and record["total_steps"] == 4
    export_matches_the_trained_model(tmp_path / "out", tmp_path / "export", GPT2LMHeadModel, cfg.seed)
