"""deltalora_repro.hf: Delta-LoRA in Hugging Face / PEFT training code, and PEFT adapter export.

The same tiny GPT-2 trained by the toolkit's loop, by transformers.Trainer + DeltaLoRACallback and
by a plain PyTorch loop calling DeltaLoRA.step() ends with the same W; a Trainer resumed from its
checkpoint ends where an uninterrupted one ends; exported adapters load with
PeftModel.from_pretrained onto the untouched model and give the trained model's logits."""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import pytest
import torch
from peft import AdaLoraConfig, LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import Trainer, TrainerCallback, TrainingArguments, get_linear_schedule_with_warmup

from deltalora_repro import DeltaLoRA, DeltaLoRACallback, export_peft_adapter
from deltalora_repro.adapters import LoRALayer
from deltalora_repro.build import backbone
from deltalora_repro.errors import ConfigError
from deltalora_repro.export import load_trained
from deltalora_repro.export import main as export_main
from deltalora_repro.fused_qkv import split_fused_qkv
from deltalora_repro.hf import DELTA_FILE
from deltalora_repro.run import run
from deltalora_repro.tasks import build_task
from deltalora_repro.train import param_groups

from .conftest import DATA, ROOT, SMALL, build, make_cfg, needs_glue

E2E = DATA / "e2e"
pytestmark = pytest.mark.skipif(not E2E.is_dir(), reason=f"E2E data not found at {E2E}")

RANK, ALPHA, LAMBDA, LR, WD, WARMUP, CLIP = 4, 32, 2.0, 1e-2, 0.01, 2, 1.0
# 24 rows in batches of 8: 3 optimizer steps per epoch, 6 in two epochs.
STEPS = 6


def e2e_cfg(tmp_path, grad_accum=1, k=2, *extra):
    return make_cfg(
        f"data_dir={E2E}", "task=e2e", "model=tiny-gpt2", "task.train_max_examples=24",
        "task.eval_max_examples=8", "task.test_max_groups=2", "task.score=false",
        "train.batch_size=8", f"train.grad_accum={grad_accum}", "train.epochs=2", "device=cpu",
        f"train.lr={LR}", f"train.warmup_steps={WARMUP}", f"train.weight_decay={WD}",
        f"train.max_grad_norm={CLIP}", "train.checkpoint=false", "train.progress=false",
        "train.tensorboard=false", "method=delta-lora", f"method.rank={RANK}",
        f"method.alpha={ALPHA}", f"method.update_ratio={LAMBDA}", f"method.start_steps={k}",
        "method.update=explicit", "method.lora_dropout=0.0", *extra, tmp_path=tmp_path)


def prepare(cfg):
    """The toolkit's run, built: (task, model, trainer, starting factors, micro-batches of every
    optimizer step in order, drawn from the run's own seeded generator, which is then rewound)."""
    task, model, method, trainer = build(cfg)
    start = {(name, i): (layer.lora_A[i].detach().clone(), layer.lora_B[i].detach().clone())
             for name, layer in model.named_modules() if isinstance(layer, LoRALayer)
             for i in range(len(layer.slices))}
    gen = trainer.generator.get_state()
    examples = task.train_examples()
    steps = [step for _ in range(cfg.train.epochs) for step in trainer.step_batches(examples)]
    trainer.generator.set_state(gen)
    return task, model, trainer, start, steps


def qv_weights_toolkit(model) -> dict[str, torch.Tensor]:
    """name -> W (stored orientation, in x out) of every q and v slice of the fused c_attn."""
    out = {}
    for name, layer in model.named_modules():
        if isinstance(layer, LoRALayer):
            for proj, (start, stop) in zip("qv", layer.slices):
                out[f"{name}.{proj}"] = layer.base.weight[:, start:stop].detach().clone()
    return out


def peft_twin(cfg, task, start, dropout=0.0):
    """The same pretrained tiny GPT-2 as a PEFT LoRA model on the q and v slices (the toolkit's
    split c_attn), starting from the toolkit run's factors (PEFT draws its own A otherwise)."""
    base, _, _ = backbone(cfg, task)
    targets = split_fused_qkv(base)
    pm = get_peft_model(base, LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=targets,
                                         fan_in_fan_out=True, lora_dropout=dropout))
    with torch.no_grad():
        for (name, i), (a, b) in start.items():
            layer = pm.base_model.model.get_submodule(f"{name}.{'qv'[i]}")
            layer.lora_A["default"].weight.copy_(a)
            layer.lora_B["default"].weight.copy_(b)
    return pm


def qv_weights_peft(pm) -> dict[str, torch.Tensor]:
    base = pm.base_model.model
    return {name.removesuffix(".base_layer"): m.weight.detach().clone()
            for name, m in base.named_modules() if name.endswith((".q.base_layer", ".v.base_layer"))}


def plain_loop(pm, task, steps, delta):
    """Algorithm 1 by hand: the toolkit's optimizer settings, DeltaLoRA.step() after each step."""
    params = [p for p in pm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(param_groups(pm, WD), lr=LR, betas=(0.9, 0.999), eps=1e-8, foreach=True)
    sched = get_linear_schedule_with_warmup(opt, WARMUP, STEPS)
    for micro in steps:
        weights = micro.weights or [1.0 / len(micro)] * len(micro)
        for batch, w in zip(micro, weights):
            (task.loss(pm, batch) * w).backward()
        torch.nn.utils.clip_grad_norm_(params, CLIP, foreach=True)
        opt.step()
        sched.step()
        delta.step()
        opt.zero_grad(set_to_none=True)


def hf_args(out, grad_accum, **kw):
    # Aligned with the toolkit's loop: AdamW (betas, eps), weight decay on the factors (matrices),
    # linear warm-up schedule over the same step count, clipping at the same norm; batches fed in
    # the toolkit's order (sequential sampler over its pre-collated micro-batches). The Trainer's
    # loss is the sum over the step's target tokens divided by their count (num_items_in_batch),
    # which is the toolkit's token-share weighting of micro-batches.
    base = dict(output_dir=str(out), per_device_train_batch_size=1, gradient_accumulation_steps=grad_accum,
                max_steps=STEPS, learning_rate=LR, warmup_steps=WARMUP, lr_scheduler_type="linear",
                weight_decay=WD, max_grad_norm=CLIP, optim="adamw_torch", adam_beta1=0.9,
                adam_beta2=0.999, adam_epsilon=1e-8, train_sampling_strategy="sequential",
                report_to=[], save_strategy="no", logging_strategy="no", use_cpu=True,
                dataloader_num_workers=0, remove_unused_columns=False, disable_tqdm=True, seed=0)
    base.update(kw)
    return TrainingArguments(**base)


def hf_trainer(pm, steps, args, callbacks):
    micro = [mb for step in steps for mb in step]
    return Trainer(model=pm, args=args, train_dataset=micro, data_collator=lambda rows: rows[0],
                   callbacks=callbacks)


def assert_weights_close(ours, theirs, reference, what):
    assert ours.keys() == theirs.keys()
    moved = max(float((theirs[k] - reference[k]).abs().max()) for k in theirs)
    assert moved > 1e-3, "W did not move: the comparison would be vacuous"
    for k in ours:
        torch.testing.assert_close(ours[k], theirs[k], rtol=0, atol=2e-6, msg=f"{what}: {k}")


# -- the same run three ways ------------------------------------------------------------------------

@pytest.mark.parametrize("grad_accum,k", [(1, 0), (2, 2)])
def test_toolkit_loop_trainer_callback_and_plain_loop_end_with_the_same_w(tmp_path, grad_accum, k):
    """One tiny GPT-2 (fp32, dropout off, seed 0), one data order, Delta-LoRA with lambda = 2 and K:
    the toolkit's loop (explicit update), Trainer + DeltaLoRACallback and a plain loop calling
    DeltaLoRA.step() end with the same Wq and Wv (to float rounding; W moves by ~0.17)."""
    cfg = e2e_cfg(tmp_path, grad_accum, k)
    task, model, trainer, start, steps = prepare(cfg)
    assert len(steps) == STEPS and all(len(s) == grad_accum for s in steps)
    toolkit_start = qv_weights_toolkit(model)
    trainer.fit()                                           # the toolkit's own loop
    toolkit_w = qv_weights_toolkit(model)

    pm = peft_twin(cfg, task, start)
    w0 = qv_weights_peft(pm)
    # The same starting W (same seed, same tiny model): only the training can differ.
    assert w0.keys() == toolkit_start.keys()
    assert all(torch.equal(w0[n], toolkit_start[n]) for n in w0)
    delta = DeltaLoRA(pm, LAMBDA, k)
    plain_loop(pm, task, steps, delta)
    assert delta.steps == STEPS
    assert_weights_close(qv_weights_peft(pm), toolkit_w, w0, "plain loop vs toolkit")

    pm2 = peft_twin(cfg, task, start)
    delta2 = DeltaLoRA(pm2, LAMBDA, k)
    callback = DeltaLoRACallback(delta2)
    hf_trainer(pm2, steps, hf_args(tmp_path / "hf", grad_accum), [callback]).train()
    assert delta2.steps == STEPS and callback.skipped == 0
    assert_weights_close(qv_weights_peft(pm2), toolkit_w, w0, "Trainer + callback vs toolkit")


# -- resume ---------------------------------------------------------------------------------------------

class StopAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def test_trainer_resumed_from_its_checkpoint_ends_identical_w_included(tmp_path):
    cfg = e2e_cfg(tmp_path, 2, 2)
    task, _, _, start, steps = prepare(cfg)                # the data and the starting factors

    def trainer_for(out, extra_callbacks=(), **kw):
        pm = peft_twin(cfg, task, start)
        delta = DeltaLoRA(pm, LAMBDA, 2)
        cb = DeltaLoRACallback(delta)
        tr = hf_trainer(pm, steps, hf_args(out, 2, save_strategy="steps", save_steps=3, **kw),
                        [cb, *extra_callbacks])
        return tr, pm, delta

    whole, pm_whole, delta_whole = trainer_for(tmp_path / "whole")
    whole.train()
    first, _, _ = trainer_for(tmp_path / "split", [StopAt(3)])
    first.train()
    ckpt = tmp_path / "split" / "checkpoint-3"
    assert (ckpt / DELTA_FILE).is_file() and (ckpt / "adapter_model.safetensors").is_file()
    # The Trainer's own (PEFT) save keeps only the adapter: W is in our file alone.
    assert not any("base_layer" in k for k in load_file(str(ckpt / "adapter_model.safetensors")))

    second, pm_second, delta_second = trainer_for(tmp_path / "split")
    second.train(resume_from_checkpoint=str(ckpt))
    assert delta_second.steps == delta_whole.steps == STEPS
    a, b = qv_weights_peft(pm_whole), qv_weights_peft(pm_second)
    w0 = qv_weights_peft(peft_twin(cfg, task, start))
    assert max(float((a[n] - w0[n]).abs().max()) for n in a) > 1e-3
    for n in a:
        torch.testing.assert_close(b[n], a[n], rtol=0, atol=1e-7, msg=n)
    for (n, p), (_, q) in zip(pm_whole.named_parameters(), pm_second.named_parameters()):
        torch.testing.assert_close(q, p, rtol=0, atol=1e-7, msg=n)

    # Without the Delta-LoRA file the resume would silently restart W: it is refused instead.
    (ckpt / DELTA_FILE).unlink()
    third, _, _ = trainer_for(tmp_path / "split")
    with pytest.raises(ConfigError, match="delta_lora.safetensors is missing"):
        third.train(resume_from_checkpoint=str(ckpt))


# -- skipped steps and gradient accumulation ---------------------------------------------------------

def _tiny_net(dtype=torch.float32):
    torch.manual_seed(0)
    net = torch.nn.Sequential()
    net.add_module("proj", torch.nn.Linear(3, 3, bias=False))
    net.add_module("out", torch.nn.Linear(3, 1, bias=False))
    return net.to(dtype)


def _tiny_peft(dropout=0.0, dtype=torch.float32, r=2):
    """A two-layer model with one adapted Linear (hand-sized); B starts random, not zero."""
    return get_peft_model(_tiny_net(dtype), LoraConfig(r=r, lora_alpha=r, target_modules=["proj"],
                                                       lora_dropout=dropout, init_lora_weights=False))


def test_a_skipped_optimizer_step_leaves_w_alone_and_is_not_counted():
    from accelerate import Accelerator
    from accelerate.optimizer import AcceleratedOptimizer
    Accelerator(cpu=True)
    pm = _tiny_peft()
    delta = DeltaLoRA(pm, 1.0, 0)
    cb = DeltaLoRACallback(delta)
    scaler = torch.amp.GradScaler("cpu")
    opt = AcceleratedOptimizer(torch.optim.SGD([p for p in pm.parameters() if p.requires_grad],
                                               lr=0.1), scaler=scaler)
    w = pm.base_model.model.proj.base_layer.weight
    w_before = w.detach().clone()
    x = torch.tensor([[1.0, float("inf"), 0.0]])
    scaler.scale(pm(x).sum()).backward()                 # inf gradients: GradScaler skips the step
    opt.step()
    assert opt.step_was_skipped
    cb.on_optimizer_step(None, None, None, optimizer=opt)
    assert torch.equal(w, w_before) and delta.steps == 0 and cb.skipped == 1
    opt.zero_grad()
    scaler.scale(pm(torch.ones(1, 3)).sum()).backward()
    opt.step()
    assert not opt.step_was_skipped
    cb.on_optimizer_step(None, None, None, optimizer=opt)
    assert delta.steps == 1 and not torch.equal(w, w_before)


def test_under_grad_accumulation_w_updates_once_per_optimizer_step(tmp_path):
    cfg = e2e_cfg(tmp_path, 2, 0)
    task, _, _, start, steps = prepare(cfg)
    steps = steps[:1] * 3                                   # 3 optimizer steps of 2 micro-batches
    pm = peft_twin(cfg, task, start)
    w0 = qv_weights_peft(pm)
    delta = DeltaLoRA(pm, LAMBDA, 0)
    calls = []

    class Count(DeltaLoRACallback):
        def on_optimizer_step(self, *a, **kw):
            calls.append(1)
            return super().on_optimizer_step(*a, **kw)

    hf_trainer(pm, steps, hf_args(tmp_path / "hf", 2, max_steps=3), [Count(delta)]).train()
    assert len(calls) == 3 and delta.steps == 3
    # K = 0: the updates telescope to W_T - W_0 = lambda s B_T A_T (Sec. 4), whatever the step count.
    s = ALPHA / RANK
    base = pm.base_model.model
    for name, w in qv_weights_peft(pm).items():
        layer = base.get_submodule(name)
        ba = layer.lora_B["default"].weight @ layer.lora_A["default"].weight
        torch.testing.assert_close(w - w0[name], (LAMBDA * s * ba).t(), rtol=0, atol=1e-6)


# -- export -------------------------------------------------------------------------------------------

def test_residual_and_factors_on_a_hand_case(tmp_path):
    """W_0 = 0 (2x2), r = 1, s = 1, lambda = 2. After step K = 0: B_K A_K = [[1,0],[0,0]]; after the
    step: B_T A_T = [[0,0],[0,1]]. The update gives W = lambda (B_T A_T - B_K A_K) =
    [[-2,0],[0,2]]; adding E = 0.5 at (0,1) by hand makes residual = 0.5 / max|W_T - W_0| = 0.25."""
    net = torch.nn.Sequential()
    net.add_module("proj", torch.nn.Linear(2, 2, bias=False))
    with torch.no_grad():
        net.proj.weight.zero_()
    untouched = copy.deepcopy(net)
    pm = get_peft_model(net, LoraConfig(r=1, lora_alpha=1, target_modules=["proj"]))
    layer = pm.base_model.model.proj
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(torch.tensor([[1.0, 0.0]]))
        layer.lora_B["default"].weight.copy_(torch.tensor([[1.0], [0.0]]))
    delta = DeltaLoRA(pm, 2.0, 0)
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(torch.tensor([[0.0, 1.0]]))
        layer.lora_B["default"].weight.copy_(torch.tensor([[0.0], [1.0]]))
    delta.step()
    assert torch.equal(layer.base_layer.weight, torch.tensor([[-2.0, 0.0], [0.0, 2.0]]))
    with torch.no_grad():
        layer.base_layer.weight[0, 1] += 0.5
    report = export_peft_adapter(delta, tmp_path / "a", base_model=untouched, quiet=True)
    assert report["residual"] == 0.25 and report["rank"] == 2
    tensors = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    # B' = [(1 + lambda) B_T, -lambda B_K], A' = [A_T; A_K]
    assert torch.equal(tensors["base_model.model.proj.lora_B.weight"],
                       torch.tensor([[0.0, -2.0], [3.0, 0.0]]))
    assert torch.equal(tensors["base_model.model.proj.lora_A.weight"], torch.tensor([[0.0, 1.0], [1.0, 0.0]]))
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["r"] == 2 and config["lora_alpha"] == 2 and config["use_rslora"] is False


def test_export_before_step_k_plus_1_is_the_plain_adapter(tmp_path):
    """K = 5, two steps: W has not moved, so the adapter must give W_0 + s B_T A_T (B_0 is not zero
    here, so writing the telescoped form too early would add -lambda s B_0 A_0)."""
    pm = _tiny_peft()
    delta = DeltaLoRA(pm, 2.0, 5)
    opt = torch.optim.SGD([p for p in pm.parameters() if p.requires_grad], lr=0.1)
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))
    for _ in range(2):
        pm(x).pow(2).sum().backward()
        opt.step()
        opt.zero_grad()
        delta.step()
    report = export_peft_adapter(delta, tmp_path / "a", base_model=_tiny_net(), quiet=True)
    assert report["residual"] == 0.0 and report["max_weight_change"] == 0.0
    loaded = PeftModel.from_pretrained(_tiny_net(), str(tmp_path / "a"))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), pm(x), rtol=0, atol=1e-6)
        assert float((_tiny_net()(x) - pm(x)).abs().max()) > 1e-2


def _trained_peft(family, method, targets_of, steps=4):
    """A tiny model of `family`, its untouched copy, and (PEFT model, DeltaLoRA or None) after a
    few AdamW steps on random tokens with K = 1."""
    cfg = make_cfg(f"model={family}", "task=e2e", f"data_dir={E2E}")
    task = build_task(cfg.task, cfg.data_dir)
    base, _, _ = backbone(cfg, task)
    untouched = copy.deepcopy(base)
    targets = targets_of(base)
    pm = get_peft_model(base, LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=targets,
                                         fan_in_fan_out=family == "tiny-gpt2", lora_dropout=0.0,
                                         use_rslora=True, task_type="CAUSAL_LM"))
    delta = DeltaLoRA(pm, LAMBDA, 1) if method == "delta-lora" else None
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 300, (4, 16), generator=gen)
    for _ in range(steps):
        pm(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
        if delta is not None:
            delta.step()
    return pm.eval(), delta, untouched, ids


@pytest.mark.parametrize("method", ["delta-lora", "lora"])
@pytest.mark.parametrize("family", ["tiny-gpt2", "tiny-qwen2"])
def test_exported_adapter_gives_the_trained_logits(tmp_path, family, method):
    targets_of = split_fused_qkv if family == "tiny-gpt2" else (lambda m: ["q_proj", "v_proj"])
    pm, delta, untouched, ids = _trained_peft(family, method, targets_of)
    with torch.no_grad():
        want = pm(input_ids=ids).logits
        before = untouched(input_ids=ids).logits
    assert float((want - before).abs().max()) > 1e-2        # training changed the function
    report = export_peft_adapter(delta if delta is not None else pm, tmp_path / "a",
                                 base_model=untouched, quiet=True)
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    if family == "tiny-gpt2":
        # One adapter per fused c_attn, loadable on a plain GPT2LMHeadModel.
        assert all(t.endswith("attn.c_attn") for t in config["target_modules"])
        assert config["fan_in_fan_out"] is True
    expected_rank = RANK * (2 if method == "delta-lora" else 1) * (2 if family == "tiny-gpt2" else 1)
    assert config["r"] == report["rank"] == expected_rank
    # rsLoRA trained with alpha/sqrt(r); the adapter states the same scaling at its own rank.
    assert config["lora_alpha"] / config["r"] == pytest.approx(ALPHA / RANK ** 0.5)
    if delta is not None:
        assert report["residual"] < 1e-5
    loaded = PeftModel.from_pretrained(copy.deepcopy(untouched), str(tmp_path / "a")).eval()
    with torch.no_grad():
        got = loaded(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


TOOLKIT_RUNS = {
    # name: (model, method, extra overrides)
    "gpt2-delta": ("tiny-gpt2", "delta-lora", ["method.start_steps=1", "method.update_ratio=2"]),
    "gpt2-delta-deferred": ("tiny-gpt2", "delta-lora", ["method.start_steps=1", "method.update_ratio=2",
                                                        "method.update=deferred"]),
    "qwen2-delta": ("tiny-qwen2", "delta-lora", ["method.start_steps=1", "method.update_ratio=2"]),
    "gpt2-lora": ("tiny-gpt2", "lora", []),
}


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory):
    """Finished toolkit runs (weights kept) on 16 E2E rows, 3 decoded test inputs."""
    runs = {}
    for name, (model, method, extra) in TOOLKIT_RUNS.items():
        tmp = tmp_path_factory.mktemp(name)
        cfg = make_cfg(f"data_dir={E2E}", "task=e2e", f"model={model}", f"method={method}",
                       "task.train_max_examples=16", "task.eval_max_examples=8",
                       "task.test_max_groups=3", "task.decoding.num_beams=2",
                       "task.decoding.max_new_tokens=6", "task.score=false", "train.batch_size=4",
                       "train.epochs=1", "train.lr=2e-2", "device=cpu", "train.checkpoint=false",
                       "train.progress=false", "train.tensorboard=false", *extra, tmp_path=tmp)
        record = run(cfg)
        runs[name] = (tmp, record, cfg)
    return runs


@pytest.mark.parametrize("name", list(TOOLKIT_RUNS))
def test_peft_export_of_a_toolkit_run_gives_its_logits(tiny_runs, name, capsys):
    model, method, _ = TOOLKIT_RUNS[name]
    tmp, record, cfg = tiny_runs[name]
    if name == "gpt2-delta-deferred":
        assert record["fast_path"]["delta_update"] == "deferred"
    out = tmp / "adapter"
    assert export_main([record["output_dir"], str(out), "--peft"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    trained, _, _ = load_trained(tmp / "out")
    trained.eval()
    base, _, _ = backbone(cfg, build_task(cfg.task, cfg.data_dir))
    untouched = copy.deepcopy(base)
    ids = torch.randint(0, 300, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = trained(input_ids=ids).logits
        assert float((want - untouched(input_ids=ids).logits).abs().max()) > 1e-3
        got = PeftModel.from_pretrained(base, str(out)).eval()(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["task_type"] == "CAUSAL_LM"
    if method == "delta-lora":
        w = load_file(str(tmp / "out" / "weights.safetensors"))
        assert any(k.endswith("base.weight") for k in w)       # the run did change W
        assert report["max_weight_change"] > 0 and report["residual"] < 1e-4
    else:
        assert report["residual"] is None
    # Rank 2r per slice for Delta-LoRA, r for LoRA; GPT-2's c_attn carries the q and v slices.
    r = cfg.method.rank * (2 if method == "delta-lora" else 1) * (2 if model == "tiny-gpt2" else 1)
    assert config["r"] == report["rank"] == r


@needs_glue
def test_peft_export_of_a_classification_run_carries_its_head(tmp_path, capsys):
    """tiny RoBERTa on RTE (separate query/value projections): the trained classifier head is a
    PEFT module to save, so the untouched model + adapter gives the run's logits."""
    cfg = make_cfg("model=tiny-roberta", *SMALL, "method=delta-lora", "method.start_steps=1",
                   "train.lr=2e-2", "train.progress=false", "train.tensorboard=false", tmp_path=tmp_path)
    record = run(cfg)
    assert export_main([record["output_dir"], str(tmp_path / "a"), "--peft"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["max_weight_change"] > 1e-3 and report["residual"] < 1e-5
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS" and config["modules_to_save"] == ["classifier"]
    trained, _, _ = load_trained(tmp_path / "out")
    base, _, _ = backbone(cfg, build_task(cfg.task, cfg.data_dir))
    ids = torch.randint(5, 300, (2, 20), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = trained.eval()(input_ids=ids).logits
        assert float((want - copy.deepcopy(base)(input_ids=ids).logits).abs().max()) > 1e-3
        got = PeftModel.from_pretrained(base, str(tmp_path / "a")).eval()(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_peft_export_refuses_other_methods(tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "run.json").write_text(json.dumps({"method": "adalora", "config": {}}))
    (run_dir / "weights.safetensors").write_bytes(b"")
    assert export_main([str(run_dir), str(tmp_path / "a"), "--peft"]) == 2
    err = capsys.readouterr().err
    assert "adalora" in err and "lora and delta-lora" in err


# -- clear errors ---------------------------------------------------------------------------------------

def test_dropout_is_refused_unless_allowed():
    pm = _tiny_peft(dropout=0.1)
    with pytest.raises(ConfigError, match=r"lora_dropout=0.1.*allow_dropout=True"):
        DeltaLoRA(pm, 1.0, 0)
    assert DeltaLoRA(pm, 1.0, 0, allow_dropout=True).steps == 0    # the Table 5 ablation
    with pytest.raises(ConfigError, match="lora_bias=False"):
        DeltaLoRA(get_peft_model(_tiny_net(), LoraConfig(r=2, target_modules=["proj"],
                                                         lora_bias=True)), 1.0, 0)


def test_a_model_without_lora_layers_is_refused():
    with pytest.raises(ConfigError, match="no PEFT LoRA layer.*get_peft_model"):
        DeltaLoRA(torch.nn.Sequential(torch.nn.Linear(3, 3)), 1.0, 0)
    net = torch.nn.Sequential()
    net.add_module("proj", torch.nn.Linear(3, 3))
    ada = get_peft_model(net, AdaLoraConfig(r=2, target_modules=["proj"], total_step=10))
    with pytest.raises(ConfigError, match="SVDLinear.*peft.tuners.lora.Linear"):
        DeltaLoRA(ada, 1.0, 0)


def test_w_not_in_float32_is_refused():
    with pytest.raises(ConfigError, match=r"torch.bfloat16.*float32.*autocast"):
        DeltaLoRA(_tiny_peft(dtype=torch.bfloat16), 1.0, 0)


def test_bad_settings_are_refused():
    with pytest.raises(ConfigError, match="update_ratio"):
        DeltaLoRA(_tiny_peft(), -1.0, 0)
    with pytest.raises(ConfigError, match="start_steps"):
        DeltaLoRA(_tiny_peft(), 1.0, 1.5)


def test_state_dict_round_trip_continues_exactly():
    """Two copies: one runs 4 steps; the other runs 2, saves, is rebuilt from scratch, loads, runs 2."""
    def train(pm, delta, n, opt):
        for _ in range(n):
            pm(torch.ones(2, 3)).pow(2).sum().backward()
            opt.step()
            opt.zero_grad()
            delta.step()

    a = _tiny_peft()
    da = DeltaLoRA(a, 1.5, 1)
    oa = torch.optim.SGD([p for p in a.parameters() if p.requires_grad], lr=0.05)
    train(a, da, 4, oa)

    b = _tiny_peft()
    db = DeltaLoRA(b, 1.5, 1)
    ob = torch.optim.SGD([p for p in b.parameters() if p.requires_grad], lr=0.05)
    train(b, db, 2, ob)
    state = {k: v.clone() for k, v in db.state_dict().items()}
    factors = {n: p.detach().clone() for n, p in b.named_parameters() if p.requires_grad}
    c = _tiny_peft()                                   # pretrained W again: the state must restore it
    with torch.no_grad():
        for n, p in c.named_parameters():
            if n in factors:
                p.copy_(factors[n])
    dc = DeltaLoRA(c, 1.5, 1)
    dc.load_state_dict(state)
    oc = torch.optim.SGD([p for p in c.parameters() if p.requires_grad], lr=0.05)
    train(c, dc, 2, oc)
    assert dc.steps == 4
    assert torch.equal(c.base_model.model.proj.base_layer.weight, a.base_model.model.proj.base_layer.weight)
    with pytest.raises(ConfigError, match="update_ratio=1.5"):
        DeltaLoRA(_tiny_peft(), 2.0, 1).load_state_dict(state)


def test_check_peft_export_script_decodes_as_the_run_did(tiny_runs):
    """scripts/check_peft_export.py on a tiny Delta-LoRA run: the untouched model plus the exported
    adapter decodes the run's test inputs to its own predictions."""
    tmp, record, cfg = tiny_runs["gpt2-delta"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}          # this checkout's package
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "check_peft_export.py"),
                           record["output_dir"], "--data-dir", str(E2E), "--n", "3",
                           "--device", "cpu", "--out", str(tmp / "check.json")],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert json.loads((tmp / "check.json").read_text()) == result
    assert result["kind"] == "peft-export-check" and result["git"]["commit"]
    assert result["machine"]["device"] == "cpu"
    assert result["n"] == 3 and result["exact_match"] == 3, result
    # rank 4r = 16 (q and v slices, 2r each) on 2 c_attn of 64 inputs x 192 outputs, float32
    assert result["adapter_rank"] == 16
    assert result["adapter_bytes"] > 2 * (16 * 64 + 192 * 16) * 4
    # tiny-gpt2: 2 blocks x (Wq + Wv) of 64 x 64 float32
    assert result["changed_w_bytes"] == 2 * 2 * 64 * 64 * 4
    bad = subprocess.run([sys.executable, str(ROOT / "scripts" / "check_peft_export.py"),
                          record["output_dir"], "--data-dir", str(tmp / "nowhere")],
                         capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert bad.returncode == 2 and "--data-dir" in bad.stderr
    again = subprocess.run([sys.executable, str(ROOT / "scripts" / "check_peft_export.py"),
                            record["output_dir"], "--data-dir", str(E2E), "--out",
                            str(tmp / "check.json")], capture_output=True, text=True, cwd=ROOT,
                           env=env, timeout=300)
    assert again.returncode == 2 and "exists; nothing is overwritten" in again.stderr
