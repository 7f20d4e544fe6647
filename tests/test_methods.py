"""Each method does exactly what the paper says, shown on tiny models and real RTE rows."""
from __future__ import annotations

import copy

import pytest
import torch

from deltalora_repro.adapters import lora_layers
from deltalora_repro.errors import ConfigError

from .conftest import SMALL, build, make_cfg, needs_glue

pytestmark = needs_glue
FAMILIES = ["tiny-roberta", "tiny-gpt2", "tiny-bart"]


def snapshot(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def slices_of(model):
    """(layer, slice index, W slice view in (out, in) orientation) for every adapted site."""
    out = []
    for layer in lora_layers(model):
        for i, (start, stop) in enumerate(layer.slices):
            base = layer.base
            w = base.weight[:, start:stop].t() if not isinstance(base, torch.nn.Linear) \
                else base.weight[start:stop]
            out.append((layer, i, w))
    return out


@pytest.mark.parametrize("model_name", FAMILIES)
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_factor_gradients_equal_w_gradient_without_branch_dropout(model_name, dropout, tmp_path):
    """Sec. 4.2: with no dropout in the branch, dL/dW = dL/d(sBA), so dL/dB = s G A^T and
    dL/dA = s B^T G with G = dL/dW; branch dropout breaks the identity."""
    cfg = make_cfg(f"model={model_name}", "method=lora", f"method.lora_dropout={dropout}", *SMALL,
                   tmp_path=tmp_path)
    task, model, method, _ = build(cfg)
    model.train()
    for layer in lora_layers(model):
        layer.base.weight.requires_grad_(True)
        for b in layer.lora_B:            # B = 0 at init would make dL/dA vanish trivially
            torch.nn.init.normal_(b, std=0.02)
    batch = task.collate(task.train_examples()[:8])
    torch.manual_seed(0)
    task.loss(model, batch).backward()
    worst = 0.0
    for layer, i, w in slices_of(model):
        g_full = layer.base.weight.grad
        g = g_full[:, layer.slices[i][0]:layer.slices[i][1]].t() \
            if not isinstance(layer.base, torch.nn.Linear) else g_full[layer.slices[i][0]:layer.slices[i][1]]
        a, b, s = layer.lora_A[i], layer.lora_B[i], layer.scaling
        expect_b, expect_a = s * g @ a.t(), s * b.t() @ g
        err = max((b.grad - expect_b).norm() / expect_b.norm(), (a.grad - expect_a).norm() / expect_a.norm())
        worst = max(worst, float(err.detach()))
    if dropout == 0.0:
        assert worst < 1e-5
    else:
        assert worst > 1e-2


@pytest.mark.parametrize("model_name", FAMILIES)
def test_delta_lora_k0_telescopes_to_final_product(model_name, tmp_path):
    """With K = 0 the per-step updates telescope: W_T - W_0 = lambda * s * B_T A_T."""
    cfg = make_cfg(f"model={model_name}", "method=delta-lora", "method.start_steps=0",
                   "method.update_ratio=2", "train.lr=1e-2", *SMALL, tmp_path=tmp_path)
    task, model, method, trainer = build(cfg)
    before = [w.detach().clone() for *_, w in slices_of(model)]
    trainer.fit()
    assert trainer.step == 6
    for (layer, i, w), w0 in zip(slices_of(model), before):
        expected = 2.0 * layer.scaling * (layer.lora_B[i] @ layer.lora_A[i]).detach()
        assert expected.norm() > 1e-3                       # the factors really moved
        torch.testing.assert_close(w.detach() - w0, expected, rtol=1e-4, atol=1e-6)


def test_delta_lora_with_k_changes_w_by_rank_at_most_2r(tmp_path):
    cfg = make_cfg("model=tiny-gpt2", "method=delta-lora", "method.start_steps=3",
                   "method.update_ratio=1", "train.lr=1e-2", "method.rank=2", *SMALL,
                   tmp_path=tmp_path)
    task, model, method, trainer = build(cfg)
    before = [w.detach().clone() for *_, w in slices_of(model)]
    snaps = {}
    orig = method.after_optimizer_step

    def spy(step):
        orig(step)
        if step == 3:   # the factors as they are when the update starts (B_K A_K)
            snaps.update({(id(l), i): (l.lora_B[i] @ l.lora_A[i]).detach().clone()
                          for l, i, _ in slices_of(model)})
    method.after_optimizer_step = spy
    trainer.fit()
    for (layer, i, w), w0 in zip(slices_of(model), before):
        delta = w.detach() - w0
        assert torch.linalg.matrix_rank(delta.double(), rtol=1e-6) <= 4
        expected = layer.scaling * ((layer.lora_B[i] @ layer.lora_A[i]).detach() - snaps[(id(layer), i)])
        torch.testing.assert_close(delta, expected, rtol=1e-4, atol=1e-6)
        assert delta.norm() > 0


def changed(before: dict, model) -> set[str]:
    return {n for n, p in model.named_parameters() if n in before and not torch.equal(before[n], p)}


@pytest.mark.parametrize("model_name", ["tiny-roberta", "tiny-gpt2"])
@pytest.mark.parametrize("method", ["lora", "delta-lora", "scaled-lora", "dylora", "adalora", "ft",
                                    "ft-noembed", "ft-qv"])
def test_exactly_the_intended_parameters_change(model_name, method, tmp_path):
    extra = ["method.start_steps=0"] if method in ("delta-lora", "scaled-lora") else []
    cfg = make_cfg(f"model={model_name}", f"method={method}", *SMALL, *extra, tmp_path=tmp_path)
    task, model, m, trainer = build(cfg)
    before = snapshot(model)
    trainer.fit()
    moved = changed(before, model)
    adapters = {n for n in before if "lora_" in n}
    head = {n for n in before if ("classifier." in n or "score." in n) and "original_module" not in n}
    embed = {n for n, p in model.named_parameters() if p is model.get_input_embeddings().weight}
    if method in ("lora", "dylora", "adalora"):
        assert moved - adapters == head     # no pretrained weight moves
        assert adapters and adapters & moved
    if method in ("delta-lora", "scaled-lora"):     # scaled-lora: its offset written at the end
        weights = {n for n in before if n.endswith(("query.base.weight", "value.base.weight",
                                                    "c_attn.base.weight"))}
        assert moved - adapters == head | weights and weights
    if method == "ft":
        assert moved == set(before)
    if method == "ft-noembed":
        assert moved == set(before) - embed and embed
    if method == "ft-qv":
        qv = {n for n in before if n.endswith(("query.weight", "value.weight", "c_attn.weight"))}
        assert moved == head | qv
        for name, module in model.named_modules():
            if name.endswith("c_attn"):   # the k columns of GPT-2's fused projection stay put
                h = module.weight.shape[0]
                torch.testing.assert_close(module.weight[:, h:2 * h], before[name + ".weight"][:, h:2 * h],
                                           rtol=0, atol=0)
                assert not torch.equal(module.weight[:, :h], before[name + ".weight"][:, :h])


def test_delta_lora_holds_no_optimizer_state_beyond_lora(tmp_path):
    states = {}
    for method in ("lora", "delta-lora"):
        cfg = make_cfg("model=tiny-gpt2", f"method={method}", *SMALL, tmp_path=tmp_path / method)
        task, model, m, trainer = build(cfg)
        trainer.fit()
        states[method] = sorted((tuple(v.shape) for s in trainer.optimizer.state.values()
                                 for v in s.values()))
        assert not any(p.requires_grad for l in lora_layers(model) for p in l.base.parameters())
    assert states["lora"] == states["delta-lora"]


def test_delta_lora_lambda_zero_equals_lora(tmp_path):
    outs = {}
    for method, extra in (("lora", []), ("delta-lora", ["method.update_ratio=0", "method.start_steps=0"])):
        cfg = make_cfg("model=tiny-roberta", f"method={method}", *SMALL, *extra,
                       tmp_path=tmp_path / method)
        task, model, m, trainer = build(cfg)
        trainer.fit()
        outs[method] = snapshot(model)
    for n, t in outs["lora"].items():
        torch.testing.assert_close(outs["delta-lora"][n], t, rtol=0, atol=0)


def total_rank(method) -> int:
    """Ranks AdaLoRA's allocator keeps across all adapted modules (init_r each before pruning)."""
    pattern = method.model.peft_config["default"].rank_pattern
    if pattern:
        return int(sum(int(torch.as_tensor(v).sum()) for v in pattern.values()))
    return sum(p.shape[0] for n, p in method.model.named_parameters() if "lora_E" in n)


def test_adalora_total_rank_falls_to_target(tmp_path):
    cfg = make_cfg("model=tiny-roberta", "method=adalora", "method.rank=4", "method.target_rank=2",
                   "method.tinit=1", "method.tfinal=2", "method.schedule.delta_t=1", *SMALL,
                   "train.epochs=2", tmp_path=tmp_path)
    task, model, m, trainer = build(cfg)
    n_modules = len([n for n, _ in model.named_parameters() if "lora_E" in n])
    assert total_rank(m) == 4 * n_modules
    trainer.fit()
    assert trainer.step == 12
    assert total_rank(m) == 2 * n_modules
    alive = sum(int((p != 0).sum()) for n, p in model.named_parameters() if "lora_E" in n)
    assert 0 < alive <= 2 * n_modules   # pruned singular values are really zeroed


def test_adalora_too_short_for_a_budget_is_a_clear_error(tmp_path):
    """Two optimizer steps leave AdaLoRA no importance-scoring step before its final budget:
    a ConfigError naming the way out, not PEFT's KeyError mid-training; three steps train."""
    from deltalora_repro.errors import ConfigError
    short = [a for a in SMALL if not a.startswith("task.train_max_examples")]
    with pytest.raises(ConfigError, match="at least one optimizer step before its final budget"):
        build(make_cfg("model=tiny-roberta", "method=adalora", *short,
                       "task.train_max_examples=16", tmp_path=tmp_path))
    *_, trainer = build(make_cfg("model=tiny-roberta", "method=adalora", *short,
                                 "task.train_max_examples=24", tmp_path=tmp_path))
    trainer.fit()
    assert trainer.step == 3


def test_adalora_regulariser_reaches_the_loss(tmp_path):
    cfg = make_cfg("model=tiny-roberta", "method=adalora", *SMALL, tmp_path=tmp_path)
    task, model, m, trainer = build(cfg)
    reg = m.extra_loss(model)
    assert reg is not None and reg.requires_grad and float(reg) > 0


def test_dylora_trains_every_rank(tmp_path):
    cfg = make_cfg("model=tiny-roberta", "method=dylora", "method.rank=4", *SMALL, "train.epochs=3",
                   tmp_path=tmp_path)
    task, model, m, trainer = build(cfg)
    a0 = [a.detach().clone() for l in lora_layers(model) for a in l.lora_A]
    b0 = [b.detach().clone() for l in lora_layers(model) for b in l.lora_B]
    trainer.fit()
    assert set(m.sampled) == {1, 2, 3, 4}
    for a, before in zip([a for l in lora_layers(model) for a in l.lora_A], a0):
        assert all(not torch.equal(a[k], before[k]) for k in range(4))
    for b, before in zip([b for l in lora_layers(model) for b in l.lora_B], b0):
        assert all(not torch.equal(b[:, k], before[:, k]) for k in range(4))


def test_gpt2_lora_adapts_q_and_v_slices_with_separate_factors(tmp_path):
    cfg = make_cfg("model=tiny-gpt2", "method=lora", "method.rank=4", *SMALL, tmp_path=tmp_path)
    task, model, m, _ = build(cfg)
    layers = lora_layers(model)
    assert len(layers) == 2 and all(len(l.lora_A) == 2 for l in layers)
    h = model.config.n_embd
    assert layers[0].slices == [(0, h), (2 * h, 3 * h)]
    assert sum(p.numel() for n, p in model.named_parameters() if "lora_" in n) == 2 * 2 * (4 * h + h * 4)


def test_bad_values_are_rejected_before_training(tmp_path):
    from deltalora_repro.run import validate
    for override, word in (("method.rank=0", "rank"), ("method.lora_dropout=1.0", "lora_dropout")):
        with pytest.raises(ConfigError, match=word):
            validate(make_cfg("method=lora", override, tmp_path=tmp_path))
    for override, word in (("method.update_ratio=-1", "update_ratio"), ("method.start_steps=-5", "start_steps")):
        with pytest.raises(ConfigError, match=word):
            validate(make_cfg("method=delta-lora", override, tmp_path=tmp_path))


def test_delta_lora_state_follows_the_model(tmp_path):
    """The previous factors are buffers of their layer: moved by .to() and saved with the model."""
    cfg = make_cfg("model=tiny-roberta", "method=delta-lora", *SMALL, tmp_path=tmp_path)
    task, model, m, _ = build(cfg)
    keys = [k for k in model.state_dict() if ".prev_A" in k or ".prev_B" in k]
    assert len(keys) == 2 * len(m.updater.entries)
    model.to(torch.float64)
    assert all(t.dtype == torch.float64 for t in m.updater.prev_a + m.updater.prev_b)


def test_delta_lora_updates_once_per_optimizer_step_under_accumulation(tmp_path):
    """Two micro-batches per step: W moves once per optimizer step and still telescopes."""
    cfg = make_cfg("model=tiny-gpt2", "method=delta-lora", "method.start_steps=0", "train.lr=1e-2",
                   "train.grad_accum=2", *SMALL, tmp_path=tmp_path)
    task, model, method, trainer = build(cfg)
    calls = []
    orig = method.updater.step
    method.updater.step = lambda s: (calls.append(s), orig(s))
    before = [w.detach().clone() for *_, w in slices_of(model)]
    trainer.fit()
    assert calls == [1, 2, 3, 4, 5, 6]    # 48 rows / batch 8 = 6 optimizer steps of 2 micro-batches
    for (layer, i, w), w0 in zip(slices_of(model), before):
        expected = 0.5 * layer.scaling * (layer.lora_B[i] @ layer.lora_A[i]).detach()
        torch.testing.assert_close(w.detach() - w0, expected, rtol=1e-4, atol=1e-6)


def test_delta_lora_keeps_w_float32_under_bf16_autocast(tmp_path):
    from omegaconf import OmegaConf
    from deltalora_repro.train import Trainer
    from deltalora_repro.world import World
    cfg = make_cfg("model=tiny-roberta", "method=delta-lora", "method.start_steps=0", "train.lr=1e-2",
                   *SMALL, tmp_path=tmp_path)
    task, model, method, _ = build(cfg)
    trainer = Trainer(model, method, task, OmegaConf.merge(cfg.train, {"precision": "bf16"}),
                      World.single("cpu"), 0, 6)
    before = [w.detach().clone() for *_, w in slices_of(model)]
    trainer.fit()
    for (layer, i, w), w0 in zip(slices_of(model), before):
        assert w.dtype == torch.float32
        expected = 0.5 * layer.scaling * (layer.lora_B[i] @ layer.lora_A[i]).detach()
        torch.testing.assert_close(w.detach() - w0, expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("model_name", ["tiny-gpt2", "tiny-roberta"])
def test_delta_lora_deferred_update_equals_explicit_update(model_name, tmp_path):
    """method.update=deferred (the telescoped sum in the branch, W written once at the end) trains
    the same model as writing W after every step: every tensor after training, W included, and
    every evaluation agree (fp32, K = 3, lambda = 2, through the switch at step K)."""
    out = {}
    for update in ("explicit", "deferred"):
        cfg = make_cfg(f"model={model_name}", "method=delta-lora", "method.start_steps=3",
                       "method.update_ratio=2", "train.lr=1e-2", f"method.update={update}", *SMALL,
                       tmp_path=tmp_path / update)
        task, model, method, trainer = build(cfg)
        w0 = [w.detach().clone() for *_, w in slices_of(model)]
        trainer.fit()
        assert method.update_mode == update and trainer.step == 6
        assert any((w.detach() - a).norm() > 1e-4 for (*_, w), a in zip(slices_of(model), w0))
        out[update] = ({n: t.detach().clone() for n, t in model.state_dict().items()}, trainer.evals)
    (ref, ref_evals), (got, got_evals) = out["explicit"], out["deferred"]
    assert ref.keys() == got.keys()
    for n, t in ref.items():
        if n.split(".")[-1].startswith("prev_"):
            continue   # explicit: factors of the last step; deferred: of the materialisation (equal)
        torch.testing.assert_close(got[n], t, rtol=1e-5, atol=1e-6, msg=n)
    assert len(ref_evals) == len(got_evals) >= 1
    for a, b in zip(ref_evals, got_evals):
        assert a.keys() == b.keys() and "accuracy" in a
        for k in a:
            assert b[k] == pytest.approx(a[k], rel=1e-5), k


def test_delta_lora_deferred_keeps_w_until_the_end_and_needs_no_branch_dropout(tmp_path):
    cfg = make_cfg("model=tiny-gpt2", "method=delta-lora", "method.start_steps=0",
                   "method.update=deferred", "train.lr=1e-2", *SMALL, tmp_path=tmp_path)
    task, model, method, trainer = build(cfg)
    w0 = [w.detach().clone() for *_, w in slices_of(model)]
    trainer.method.on_train_end = lambda: None             # stop before the final write
    trainer.fit()
    assert all(torch.equal(w.detach(), a) for (*_, w), a in zip(slices_of(model), w0))
    assert method.updater.begun and trainer.step == 6
    with pytest.raises(ConfigError, match="lora_dropout=0.*method.update=explicit"):
        cfg = make_cfg("model=tiny-gpt2", "method=delta-lora", "method.lora_dropout=0.1",
                       "method.update=deferred", *SMALL, tmp_path=tmp_path / "d")
        build(cfg)[-1].start()
    with pytest.raises(ConfigError, match="valid: auto, explicit, deferred"):
        cfg = make_cfg("model=tiny-gpt2", "method=delta-lora", "method.update=lazy", *SMALL,
                       tmp_path=tmp_path / "e")
        build(cfg)[-1].start()


def test_scaled_lora_computes_delta_loras_function_with_gradients_1_plus_lambda_larger():
    """The control's layer and Delta-LoRA's (deferred) layer, with the same W, factors (A_t, B_t)
    and snapshot (A_K, B_K), compute W x + s (1 + lambda) B_t A_t x - lambda s B_K A_K x (written
    out by hand here); the factors' gradients of the control are exactly (1 + lambda) times
    Delta-LoRA's, and Delta-LoRA's are those of s B_t A_t alone (Algorithm 1)."""
    from deltalora_repro.adapters import LoRALayer
    torch.manual_seed(0)
    lam, rank, alpha = 2.0, 2, 8.0
    s = alpha / rank
    base = torch.nn.Linear(6, 5)
    x, g = torch.randn(3, 6), torch.randn(3, 5)
    A, B = torch.randn(rank, 6), torch.randn(5, rank)
    A_K, B_K = torch.randn(rank, 6), torch.randn(5, rank)
    layers = {}
    for name, rescale in (("delta", True), ("scaled", False)):
        layer = LoRALayer(copy.deepcopy(base), [(0, 5)], rank, alpha, 0.0)
        with torch.no_grad():
            layer.lora_A[0].copy_(A)
            layer.lora_B[0].copy_(B)
        layer.register_buffer("prev_A0", A_K.clone())
        layer.register_buffer("prev_B0", B_K.clone())
        layer.deferred_coef = 1 + lam
        layer.deferred_grad_rescale = rescale
        xi = x.clone().requires_grad_(True)
        out = layer(xi)
        (out * g).sum().backward()
        layers[name] = (out.detach(), layer.lora_A[0].grad, layer.lora_B[0].grad, xi.grad)
    weight = base.weight + s * (1 + lam) * B @ A - lam * s * B_K @ A_K
    by_hand = base(x) + x @ (weight - base.weight).t()
    for name in layers:
        torch.testing.assert_close(layers[name][0], by_hand.detach(), rtol=1e-5, atol=1e-5)
        # The input's gradient sees the whole weight W_t + s B A: g W.
        torch.testing.assert_close(layers[name][3], (g @ weight).detach(), rtol=1e-5, atol=1e-5)
    # d/dA of sum(g * (s B A x)) = s B^T g^T x; d/dB = s g^T x A^T (the gradients of s B A alone).
    grad_a, grad_b = s * B.t() @ g.t() @ x, s * g.t() @ x @ A.t()
    torch.testing.assert_close(layers["delta"][1], grad_a, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layers["delta"][2], grad_b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layers["scaled"][1], (1 + lam) * layers["delta"][1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layers["scaled"][2], (1 + lam) * layers["delta"][2], rtol=1e-5, atol=1e-6)


def test_scaled_lora_runs_deferred_and_refuses_explicit_or_dropout(tmp_path):
    from deltalora_repro.errors import ConfigError
    from deltalora_repro.run import validate
    cfg = make_cfg("model=tiny-roberta", "method=scaled-lora", "method.start_steps=1", *SMALL,
                   tmp_path=tmp_path)
    task, model, method, trainer = build(cfg)
    trainer.fit()
    assert method.update_mode == "deferred"
    assert all(not layer.deferred_grad_rescale for layer, *_ in method.sites)
    bad = make_cfg("model=tiny-roberta", "method=scaled-lora", "method.update=explicit", *SMALL,
                   tmp_path=tmp_path / "b")
    with pytest.raises(ConfigError, match=r"method.update must be one of auto, deferred"):
        validate(bad)
    with pytest.raises(ConfigError, match="scaled-lora needs method.lora_dropout=0"):
        build(make_cfg("model=tiny-roberta", "method=scaled-lora", "method.lora_dropout=0.1",
                       *SMALL, tmp_path=tmp_path / "c"))
