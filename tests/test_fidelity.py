"""Each method computes what its authors' procedure computes: checks that fail when a method is
subtly wrong (the wrong rows train, the wrong scale, a loss term dropped, a dropout taken from the
wrong place). Expected values are written out by hand here, never read back from the code under
test."""
from __future__ import annotations

import copy

import pytest
import torch

from deltalora_repro.adapters import lora_layers, weight_slice

from .conftest import DATA, SMALL, build, make_cfg, needs_glue

E2E = DATA / "e2e"
needs_e2e = pytest.mark.skipif(not E2E.is_dir(), reason=f"E2E data not found at {E2E}")
TINY_E2E = [f"data_dir={E2E}", "task=e2e", "model=tiny-gpt2", "task.train_max_examples=16",
            "task.eval_max_examples=16", "task.test_max_groups=4", "train.batch_size=8",
            "train.epochs=1", "device=cpu", "train.checkpoint=false"]


# -- DyLoRA: the sampled rank's row and column alone learn, for every rank --------------------------

@needs_glue
def test_dylora_frozen_mode_trains_only_the_sampled_row_for_every_rank(tmp_path):
    """Official DyLoRA (frozen mode): with rank b sampled, A's rows and B's columns before b are
    detached and those after b unused, so exactly row b of A and column b of B get a gradient;
    b = r included (the full rank must not train every row)."""
    r = 4
    cfg = make_cfg("model=tiny-roberta", "method=dylora", f"method.rank={r}", "method.alpha=16",
                   *SMALL, tmp_path=tmp_path)
    task, model, method, _ = build(cfg)
    model.eval()                                   # no dropout: the gradient pattern alone
    for layer in lora_layers(model):
        for b in layer.lora_B:
            torch.nn.init.normal_(b, std=0.02)     # B = 0 would leave A without gradient
    batch = task.collate(task.train_examples()[:8])
    for rank in range(1, r + 1):
        method.set_rank(rank, frozen=True)
        model.zero_grad(set_to_none=True)
        task.loss(model, batch).backward()
        for layer in lora_layers(model):
            assert layer.factors(0)[2] == 16 / rank          # scaling alpha / b
            for ga, gb in ((a.grad, b.grad) for a, b in zip(layer.lora_A, layer.lora_B)):
                rows_with_grad = [k for k in range(r) if ga[k].abs().sum() > 0]
                cols_with_grad = [k for k in range(r) if gb[:, k].abs().sum() > 0]
                assert rows_with_grad == [rank - 1], (rank, rows_with_grad)
                assert cols_with_grad == [rank - 1], (rank, cols_with_grad)


# -- the LoRA scaling is alpha / r, in the forward and in Delta-LoRA's W update -------------------

@needs_glue
def test_lora_branch_scaling_is_alpha_over_rank(tmp_path):
    """rank 4, alpha 32: h = W x + 8 B A x (8 = 32 / 4, written out)."""
    cfg = make_cfg("model=tiny-roberta", "method=lora", "method.rank=4", "method.alpha=32", *SMALL,
                   tmp_path=tmp_path)
    _, model, _, _ = build(cfg)
    layer = lora_layers(model)[0]
    torch.nn.init.normal_(layer.lora_B[0], std=0.5)
    layer.eval()
    x = torch.randn(3, 5, layer.lora_A[0].shape[1])
    base = x @ layer.base.weight.t() + layer.base.bias
    expected = base + 8.0 * (x @ layer.lora_A[0].t() @ layer.lora_B[0].t())
    with torch.no_grad():
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


@needs_glue
def test_delta_lora_w_update_uses_lambda_alpha_over_rank(tmp_path):
    """GPT-2's fused c_attn, rank 4, alpha 32, lambda 2, K 0: one optimizer step moves the q
    slice of W by exactly 2 * 8 * (B1 A1 - B0 A0) and leaves the k columns untouched."""
    cfg = make_cfg("model=tiny-gpt2", "method=delta-lora", "method.rank=4", "method.alpha=32",
                   "method.update_ratio=2", "method.start_steps=0", "method.update=explicit", *SMALL,
                   "train.warmup_steps=0",
                   tmp_path=tmp_path)
    task, model, method, trainer = build(cfg)
    trainer.start()
    layer, i, site = method.sites[0]
    assert site.proj == "q"
    torch.nn.init.normal_(layer.lora_B[i], std=0.1)
    method.updater._apply(False)                     # the snapshot now holds the new B
    a0, b0 = layer.lora_A[i].detach().clone(), layer.lora_B[i].detach().clone()
    w0 = weight_slice(layer, site).detach().clone()
    fused0 = layer.base.weight.detach().clone()
    trainer.train_step(next(trainer.step_batches(task.train_examples())))
    a1, b1 = layer.lora_A[i].detach(), layer.lora_B[i].detach()
    assert not torch.equal(a1, a0)
    expected = w0 + 2 * 8.0 * (b1 @ a1 - b0 @ a0)
    torch.testing.assert_close(weight_slice(layer, site), expected, rtol=1e-5, atol=1e-6)
    h = model.config.n_embd
    assert torch.equal(layer.base.weight[:, h:2 * h], fused0[:, h:2 * h])


# -- Delta-LoRA has no branch dropout, whatever the task's LoRA dropout --------------------------

def _branch_is_deterministic(model) -> bool:
    """Two train-mode forwards of the first adapted layer agree (no dropout in the branch)."""
    layer = lora_layers(model)[0]
    for b in layer.lora_B:
        torch.nn.init.normal_(b, std=0.5)
    layer.train()
    x = torch.randn(2, 7, layer.lora_A[0].shape[1])
    with torch.no_grad():
        return torch.equal(layer(x), layer(x))


@needs_e2e
@pytest.mark.parametrize("args,deterministic", [
    (["method=delta-lora"], True),                                    # Sec. 4.2: no dropout
    (["method=lora"], False),                                         # LoRA keeps E2E's 0.1
    (["experiment=table5/delta-lora-branch-dropout"], False),         # the ablation keeps it too
])
def test_delta_lora_takes_no_branch_dropout_on_e2e(tmp_path, args, deterministic):
    cfg = make_cfg(*TINY_E2E, *args, tmp_path=tmp_path)
    assert cfg.method.lora_dropout == (0.0 if deterministic else 0.1)  # Table 9's LoRA setting
    _, model, _, _ = build(cfg)
    assert _branch_is_deterministic(model) is deterministic


# -- AdaLoRA's orthogonal regulariser reaches the trainer's gradients ------------------------------

def _orthogonal_penalty(model) -> torch.Tensor:
    """AdaLoRA's regulariser, written out: the mean over every factor matrix P of
    ||P P^T - I||_F (P = lora_A, r x in) or ||P^T P - I||_F (P = lora_B, out x r)."""
    norms = []
    for n, p in model.named_parameters():
        if "lora_A" in n or "lora_B" in n:
            cov = p @ p.T if "lora_A" in n else p.T @ p
            norms.append(torch.sqrt(((cov - torch.eye(cov.shape[0])) ** 2).sum()))
    return torch.stack(norms).mean()


@needs_glue
def test_trainer_adds_adalora_orthogonal_regulariser(tmp_path):
    """The gradients the trainer's optimizer step sees equal those of task loss + 5 * penalty,
    computed here by hand; without the penalty they differ (the check is not vacuous)."""
    cfg = make_cfg("model=tiny-roberta", "method=adalora", "method.schedule.orth_reg_weight=5.0", *SMALL,
                   tmp_path=tmp_path)
    task, model, method, trainer = build(cfg)
    model.eval()                                   # dropout off: both passes see one function
    trainer.start()
    state = trainer.generator.get_state()
    micro = next(trainer.step_batches(task.train_examples()))
    trainer.generator.set_state(state)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    start = copy.deepcopy({n: p.detach().clone() for n, p in params.items()})

    def grads_of(loss):
        model.zero_grad(set_to_none=True)
        loss.backward()
        return {n: p.grad.detach().clone() for n, p in params.items() if p.grad is not None}

    (batch,) = micro
    task_only = grads_of(task.loss(model, batch))
    expected = grads_of(task.loss(model, batch) + 5.0 * _orthogonal_penalty(model))
    model.zero_grad(set_to_none=True)

    seen = {}
    hook = trainer.optimizer.register_step_pre_hook(
        lambda opt, args, kwargs: seen.update(
            {n: p.grad.detach().clone() for n, p in params.items() if p.grad is not None}))
    for n, p in params.items():
        assert torch.equal(p, start[n])
    trainer.train_step(micro)
    hook.remove()
    lora_a = [n for n in expected if "lora_A" in n]
    assert lora_a
    assert any(not torch.allclose(task_only[n], expected[n], rtol=1e-3, atol=1e-6) for n in lora_a)
    for n, g in expected.items():
        torch.testing.assert_close(seen[n], g, rtol=1e-4, atol=1e-6)


# -- a Delta-LoRA run whose W never moves says so ---------------------------------------------------

@needs_glue
def test_delta_lora_start_after_last_step_is_flagged(tmp_path, caplog):
    from deltalora_repro.run import run
    cfg = make_cfg("model=tiny-roberta", "method=delta-lora", "method.start_steps=6", *SMALL,
                   "save_weights=false", tmp_path=tmp_path)     # 48 rows / batch 8 = 6 steps
    with caplog.at_level("WARNING"):
        record = run(cfg)
    assert record["total_steps"] == 6
    assert len(record["warnings"]) == 1 and "W is never updated" in record["warnings"][0]
    assert any("W is never updated" in r.getMessage() for r in caplog.records)
    ok = run(make_cfg("model=tiny-roberta", "method=delta-lora", "method.start_steps=5", *SMALL,
                      "save_weights=false", tmp_path=tmp_path / "ok"))
    assert ok["warnings"] == []


# -- config names: a typo lists the valid choices, sub-folders included ---------------------------

@pytest.mark.parametrize("arg,expected", [
    ("task=glue/rtx", ["task=glue/rtx is not a config", "did you mean task=glue/rte",
                       "glue/mnli", "glue/stsb", "e2e"]),
    ("experiment=table1/lorra", ["did you mean experiment=table1/lora", "table4/delta-lora",
                                 "table7/update-ratio"]),
    ("model=tiny-gtp2", ["did you mean model=tiny-gpt2", "smollm2-135m"]),
])
def test_cli_unknown_group_choice_lists_the_valid_ones(tmp_path, arg, expected):
    from .test_run import cli
    out = cli(arg, f"results_dir={tmp_path}")
    assert out.returncode == 2
    for text in expected:
        assert text in out.stderr
    assert "Traceback" not in out.stderr
    assert not list(tmp_path.rglob("*"))


def test_sweep_lists_are_checked_item_by_item():
    from deltalora_repro.__main__ import check_group_choices
    assert check_group_choices(["-m", "task=glue/rte,glue/mrpc", "seed=0,1"]) is None
    assert "task=glue/mrpx" in check_group_choices(["task=glue/rte,glue/mrpx"])
    assert check_group_choices(["task=choice(glue/rte)"]) is None        # Hydra's own syntax
