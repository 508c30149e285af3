"""Router strategies and the MoE FFN inside the real CalibLM (single process)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from workers.model.checkpoint import load, save
from workers.model.config import ConfigError, ModelConfig, MoEConfig, RouterConfig
from workers.model.moe.balancing import bip_prices, max_vio, select_topk
from workers.model.moe.distributed import balancing_step, moe_layers, routers
from workers.model.moe.ffn import MoEFFN, capacity_mask
from workers.model.transformer import CalibLM, lm_loss
from workers.training import train_state
from workers.training.config import tiny
from workers.training.loop import run_steps
from workers.training.optim import AdamWOptimizer
from workers.training.schedule import LRSchedule

ARMS = {
    "none": RouterConfig(strategy="none"),
    "aux_loss": RouterConfig(strategy="aux_loss", alpha=0.1),
    "loss_free": RouterConfig(strategy="loss_free"),
    "bip_pre": RouterConfig(strategy="bip", bip_mode="pre", bip_iters=8),
    "bip_causal": RouterConfig(strategy="bip", bip_mode="causal", bip_iters=8),
}


def small_config(router: RouterConfig, **moe) -> ModelConfig:
    return ModelConfig(
        n_layers=2,
        d_model=32,
        n_heads=2,
        n_kv_heads=1,
        ffn_hidden=64,
        max_seq_len=64,
        moe=MoEConfig(n_experts=8, top_k=2, expert_hidden=16, shared_expert=False, router=router, **moe),
    )


def skewed_model(router: RouterConfig, seed: int = 0, **moe) -> CalibLM:
    """A model whose routers start strongly skewed (a constant push towards experts 6, 7)."""
    torch.manual_seed(seed)
    model = CalibLM(small_config(router, **moe))
    u = torch.nn.functional.normalize(torch.ones(32), dim=0)
    with torch.no_grad():
        model.embed_tokens.weight += 0.2 * u  # a shared direction in every hidden state...
        for r in routers(model):
            r.gate.weight.mul_(20.0)
            r.gate.weight[6:] += 2.0 * u  # ...that the gate maps onto experts 6 and 7
    return model


def tokens(seed: int = 0, b: int = 4, t: int = 48) -> torch.Tensor:
    return torch.randint(0, 256, (b, t), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arm", list(ARMS))
def test_gate_weights_are_raw_scores_of_selected_experts(arm):
    model = skewed_model(ARMS[arm]).train()
    x = torch.randn(96, 32)
    r = routers(model)[0]
    for _ in range(2):  # the second call sees causal/loss-free state left by the first
        out = r(x)
        scores = r.scores(x)
        assert torch.allclose(out.gates, scores.gather(1, out.expert_idx))
        r.end_step()
    if arm != "none":
        plain = scores.topk(2, dim=1).indices
        assert not torch.equal(out.expert_idx, plain) or arm == "aux_loss"


def test_bip_pre_balances_from_the_first_step_and_causal_from_the_second():
    x = tokens()
    vios = {}
    for arm in ("none", "bip_pre", "bip_causal"):
        model = skewed_model(ARMS[arm]).train()
        steps = []
        for _ in range(2):
            model(x)
            steps.append([float(max_vio(load)) for load in balancing_step(model)])
        vios[arm] = steps
    assert min(vios["none"][0]) > 1.0  # the skew is real
    assert max(vios["bip_pre"][0]) < 0.25 * min(vios["none"][0])
    assert vios["bip_causal"][0] == vios["none"][0]  # q starts at 0: step 1 is plain top-K
    # same batch, previous q: layer 0 sees the same inputs again and is balanced; deeper
    # layers see inputs that layer 0's new routing changed, so their old q fits less well
    assert vios["bip_causal"][1][0] < 0.25 * vios["none"][1][0]
    assert sum(vios["bip_causal"][1]) < 0.5 * sum(vios["none"][1])
    assert all((r.bip_price >= 0).all() for r in routers(model))


def test_loss_free_bias_moves_once_per_optimizer_step_against_load():
    model = skewed_model(ARMS["loss_free"]).train()
    x = tokens()
    model(x)
    model(x)  # two micro-batches in one optimizer step: loads add up, bias moves once
    r = routers(model)[0]
    assert float(r.balance_bias.abs().sum()) == 0.0
    load = balancing_step(model)[0]
    u = model.cfg.moe.router.bias_rate
    want = u * torch.sign(load.mean() - load)
    assert torch.allclose(r.balance_bias, want)
    assert r.balance_bias[6:].lt(0).all()  # the over-loaded experts are pushed down
    assert float(r.step_load.sum()) == 0.0


def test_aux_loss_only_for_aux_strategy_and_in_training():
    x = tokens()
    for arm in ARMS:
        model = skewed_model(ARMS[arm]).train()
        aux = model(x).aux_loss
        assert (float(aux.detach()) > 0) == (arm == "aux_loss")
        if arm == "aux_loss":
            assert float(model.eval()(x).aux_loss) == 0.0


def test_balancing_state_is_checkpointed_in_buffers():
    model = skewed_model(ARMS["bip_causal"]).train()
    model(tokens())
    keys = model.state_dict().keys()
    assert "layers.0.ffn.router.bip_price" in keys and "layers.0.ffn.router.balance_bias" in keys
    assert not any(k.endswith("step_load") for k in keys)
    clone = CalibLM(model.cfg)
    clone.load_state_dict(model.state_dict())
    assert torch.equal(routers(clone)[0].bip_price, routers(model)[0].bip_price)


@pytest.mark.parametrize("arm", list(ARMS))
def test_eval_routing_is_causal_for_every_strategy(arm):
    model = skewed_model(ARMS[arm]).train()
    model(tokens(1))  # leave non-trivial q / bias behind
    balancing_step(model)
    model.eval()
    x = tokens(2, b=2, t=40)
    with torch.no_grad():
        full = model(x).logits
        prefix = model(x[:, :25]).logits
    assert torch.allclose(full[:, :25], prefix, atol=1e-5)


def test_bip_pre_in_training_looks_ahead():
    """`pre` routes with prices of the whole batch: later tokens change earlier routing."""
    model = skewed_model(ARMS["bip_pre"]).train()
    x = tokens(2, b=2, t=40)
    model(x)
    idx_full = moe_layers(model)[0][1].last_routing.expert_idx.view(2, 40, 2)[:, :25]
    model(x[:, :25])
    idx_prefix = moe_layers(model)[0][1].last_routing.expert_idx.view(2, 25, 2)
    assert not torch.equal(idx_full, idx_prefix)


def test_capacity_mask_and_dropping():
    idx = torch.tensor([[0, 1], [0, 2], [0, 1], [3, 0]])
    keep = capacity_mask(idx, 4, 2)
    assert keep.tolist() == [[True, True], [True, True], [False, True], [True, False]]
    cfg = small_config(RouterConfig(strategy="none"))
    torch.manual_seed(0)
    dropless = MoEFFN(32, cfg.moe)
    capped = MoEFFN(32, dataclasses.replace(cfg.moe, capacity_factor=0.5))
    capped.load_state_dict(dropless.state_dict())
    x = torch.randn(2, 16, 32)
    y_full, _ = dropless(x)
    y_cap, _ = capped(x)
    assert capped.last_dropped > 0 and dropless.last_dropped == 0
    assert capped.last_local_load.max() <= 8  # ceil(0.5 * 64 slots / 8 experts)
    # a token with none of its slots dropped comes out unchanged
    kept = capacity_mask(capped.last_routing.expert_idx, 8, 4).all(1)
    assert kept.any() and not kept.all()
    assert torch.allclose(y_full.view(32, 32)[kept], y_cap.view(32, 32)[kept], atol=1e-6)


@pytest.mark.parametrize("arm", list(ARMS))
def test_training_step_runs_and_moves_routers(arm):
    model = skewed_model(ARMS[arm]).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x = tokens()
    out = model(x)
    (lm_loss(out.logits, x) + out.aux_loss).backward()
    assert routers(model)[0].gate.weight.grad.abs().sum() > 0
    opt.step()
    balancing_step(model)


CARRY = {
    "pre": RouterConfig(strategy="bip", bip_mode="pre", bip_iters=2, bip_q_mode="carry"),
    "causal": RouterConfig(strategy="bip", bip_mode="causal", bip_iters=2, bip_q_mode="carry"),
}


def test_bip_q_mode_is_validated():
    with pytest.raises(ConfigError, match="bip_q_mode='warm'"):
        RouterConfig(strategy="bip", bip_q_mode="warm")


@pytest.mark.parametrize("mode", ["pre", "causal"])
@pytest.mark.parametrize("q_mode", ["restart", "carry"])
def test_bip_rounds_start_from_the_previous_steps_q_only_when_carried(mode, q_mode):
    rc = RouterConfig(strategy="bip", bip_mode=mode, bip_iters=2, bip_q_mode=q_mode)
    r = routers(skewed_model(rc).train())[0]
    xs = [torch.randn(96, 32, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    with torch.no_grad():
        for x in xs:
            q_prev = r.bip_price.clone()
            out = r(x)
            s = r.scores(x)
            want = bip_prices(s, 2, 2, init=q_prev if q_mode == "carry" else None)
            # the causal router's fused first round (token prices off its top-(K+1)) is exact
            assert torch.equal(r.bip_price, want)
            routed_by = want if mode == "pre" else q_prev
            assert torch.equal(out.expert_idx, select_topk(s, 2, -routed_by))
    assert float(r.bip_price.sum()) > 0


def _carry_run(steps: int, *, resume_from=None, forget_q: bool = False, hooks=()) -> CalibLM:
    """Train the skewed BIP-carry model through the real loop (optionally from a checkpoint)."""
    model = skewed_model(CARRY["pre"])
    opt = AdamWOptimizer(model, lr=1e-2, weight_decay=0.1, grad_clip=1.0)
    start = 0
    if resume_from is not None:
        restored = train_state.read(resume_from, model, 0, 1, replicated=True)
        opt.load_state_dict(restored.opt_state)
        start = restored.step
        if forget_q:
            for r in routers(model):
                r.bip_price.zero_()
    schedule = LRSchedule(lr=1e-2, steps=steps, warmup_steps=1, min_lr_frac=0.1)
    run_steps(
        model, opt, schedule, lambda step: (tokens(step), None), start=start, hooks=[h(model, opt) for h in hooks]
    )
    return model


def test_carried_q_survives_checkpoint_and_resume_bit_for_bit(tmp_path):
    saved = {}

    def checkpoint_at_3(model, opt):
        def hook(r):
            if r.step == 3:  # what the training pipelines' checkpoint hook writes
                meta = train_state.meta(tiny(), r.step, 1, [])
                train_state.write(tmp_path, 0, model_state=model.state_dict(), opt_state=opt.state_dict(), meta=meta)
                saved["q"] = [x.bip_price.clone() for x in routers(model)]
                save(model, tmp_path / "model")

        return hook

    straight = _carry_run(5, hooks=[checkpoint_at_3])
    assert all(float(q.max()) > 0 for q in saved["q"])  # a warm q worth carrying
    resumed = _carry_run(5, resume_from=tmp_path)
    # two steps after the resume reproduce the uninterrupted run exactly, q included
    for a, b in zip(routers(resumed), routers(straight)):
        assert torch.equal(a.bip_price, b.bip_price)
    for (name, a), b in zip(resumed.state_dict().items(), straight.state_dict().values()):
        assert torch.equal(a, b), name
    # the safetensors model checkpoint (what evaluation and serving load) keeps q exactly too
    loaded = load(tmp_path / "model")
    assert all(torch.equal(r.bip_price, q) for r, q in zip(routers(loaded), saved["q"]))
    # the check has teeth: a resume that lost q (restarted it at 0) ends elsewhere
    forgot = _carry_run(5, resume_from=tmp_path, forget_q=True)
    assert not all(torch.equal(a.bip_price, b.bip_price) for a, b in zip(routers(forgot), routers(straight)))


def test_checkpoint_without_the_price_buffer_loads_with_q_zero():
    model = skewed_model(CARRY["causal"]).train()
    model(tokens())
    old = {k: v for k, v in model.state_dict().items() if not k.endswith("bip_price")}
    clone = CalibLM(model.cfg)
    for r in routers(clone):
        r.bip_price.fill_(1.0)
    clone.load_state_dict(old)  # strict: nothing missing, nothing unexpected
    assert all(float(r.bip_price.abs().sum()) == 0 for r in routers(clone))
    assert torch.equal(clone.layers[0].ffn.router.gate.weight, model.layers[0].ffn.router.gate.weight)


@pytest.mark.parametrize("mode", ["pre", "causal"])
def test_fused_cpu_kernel_routes_as_the_pytorch_path(mode, monkeypatch):
    """The router on the compiled CPU kernel (kernels.bip_select) and with it switched off give
    the same indices and the same q, bit for bit, step after step with q carried."""
    from kernels.bip_select import cpu

    assert cpu.available(), "the CPU BIP kernel did not build (see kernels/bip_select/cpu.py)"
    rc = RouterConfig(strategy="bip", bip_mode=mode, bip_iters=2, bip_q_mode="carry")
    fused, torch_path = (routers(skewed_model(rc).train())[0] for _ in range(2))
    with torch.no_grad():
        for i in range(3):
            x = torch.randn(96, 32, generator=torch.Generator().manual_seed(i))
            monkeypatch.setenv("CALIBRAY_CPU_KERNELS", "1")
            got = fused(x).expert_idx
            monkeypatch.setenv("CALIBRAY_CPU_KERNELS", "0")
            want = torch_path(x).expert_idx
            assert torch.equal(got, want) and torch.equal(fused.bip_price, torch_path.bip_price)
    assert float(fused.bip_price.sum()) > 0


@pytest.mark.parametrize("arm", ["bip_pre", "none"])
def test_a_bip_router_loads_its_kernel_when_built_not_in_its_first_timed_step(arm):
    """The fused kernel's first load in a process (~0.3 s) used to land in the first step's
    router time, inflating the sweep's BIP router ms per step by ~1.45 ms over 200 steps."""
    from kernels import _cpu
    from workers.model.moe.router import Router

    _cpu._build.cache_clear()
    Router(32, small_config(ARMS[arm]).moe)
    assert (_cpu._build.cache_info().currsize == 1) == (arm == "bip_pre" and _cpu.enabled())
