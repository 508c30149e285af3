"""The project's routers inside transformers MoE models, per family (tiny random checkpoints).

- With q = 0 and no bias the installed router selects exactly the experts the model's own gate
  selects, with the same gate weights, and the model gives the same logits (plain transformers
  with its eager expert loop as the reference); for DeepSeek-V3 with its pretrained correction
  bias and the group limit, both shown to matter on the test batch.
- BIP lowers MaxVio below the plain router's on a batch whose routing is skewed.
- The export (after training steps that move weights and q) reloads in plain transformers with
  the logits of the trained model.
"""

from __future__ import annotations

import copy

import pytest
import torch

from workers.model.config import RouterConfig
from workers.model.hf.moe import HFMoELM, export_hf, install, moe_blocks
from workers.model.hf.tiny_moe import TINY, tiny_model
from workers.model.moe.balancing import max_vio
from workers.model.moe.distributed import balancing_step, routers
from workers.model.transformer import lm_loss

FAMILIES = sorted(TINY)


def _eager(model):
    model.set_experts_implementation("eager")  # the reference: transformers' own per-expert loop
    return model


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    """(kind, plain transformers reference model)."""
    return request.param, _eager(tiny_model(request.param))


def tokens(n: int = 4, length: int = 24, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 256, (n, length), generator=torch.Generator().manual_seed(seed))


def _gate_outputs(model, x) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(indices [N, K], gate weights [N, K]) of every MoE block's gate in one forward."""
    outs = []
    hooks = [
        b.gate.register_forward_hook(lambda m, a, o: outs.append((o[2].detach(), o[1].detach())))
        for _, b in moe_blocks(model)
    ]
    with torch.no_grad():
        logits = model(input_ids=x, use_cache=False).logits
    for h in hooks:
        h.remove()
    return outs, logits


def _sorted(idx: torch.Tensor, gates: torch.Tensor):
    order = idx.argsort(-1)
    return idx.gather(-1, order), gates.gather(-1, order)


@pytest.mark.parametrize(
    "rc",
    [RouterConfig("none"), RouterConfig("loss_free"), RouterConfig("bip"), RouterConfig("aux_loss")],
    ids=["none", "loss_free_b0", "bip_q0_eval", "aux_loss"],
)
def test_selection_and_logits_equal_the_models_own(family, rc):
    kind, ref = family
    x = tokens()
    want, want_logits = _gate_outputs(ref, x)
    model = copy.deepcopy(ref)
    install(model, rc)
    got, logits = _gate_outputs(model.eval(), x)
    assert len(got) == len(want) == len(moe_blocks(ref)) >= 1
    for (gi, gg), (wi, wg) in zip(got, want):
        gi, gg = _sorted(gi, gg)
        wi, wg = _sorted(wi, wg)
        assert torch.equal(gi, wi), kind
        torch.testing.assert_close(gg, wg.float(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(logits, want_logits, rtol=1e-5, atol=1e-5)


def test_deepseek_bias_and_group_limit_matter():
    """Without its correction bias or without the group limit, DeepSeek-V3 routes the test batch
    differently: the equality above would fail if either were dropped."""
    ref = tiny_model("deepseek_v3")
    x = tokens()
    (want_idx, _), *_ = _gate_outputs(ref, x)[0]
    seen = {}
    ref.model.layers[1].mlp.gate.register_forward_pre_hook(lambda m, a: seen.setdefault("h", a[0].reshape(-1, 64)))
    _gate_outputs(ref, x)
    gate = ref.model.layers[1].mlp.gate
    s = (seen["h"].float() @ gate.weight.float().t()).sigmoid()
    plain_biased = (s + gate.e_score_correction_bias).topk(2, -1).indices.sort(-1).values
    model = copy.deepcopy(ref)
    model.model.layers[1].mlp.gate.e_score_correction_bias.zero_()
    (no_bias_idx, _), *_ = _gate_outputs(model, x)[0]
    want_sorted = want_idx.sort(-1).values
    assert not torch.equal(plain_biased, want_sorted)
    assert not torch.equal(no_bias_idx.sort(-1).values, want_sorted)


def _plant_skew(model, strength: float = 2.0) -> None:
    """Every gate prefers experts 0 and 1 along the mean direction of its own inputs on the batch.

    Not much stronger: at 8 DeepSeek's sigmoid saturates, every token scores experts 0 and 1 the
    same (about 1), and no price can split identical tokens (measured: BIP T=8 MaxVio 1.9 vs
    2.4 plain there; 0.375 vs 2.54 at this strength)."""
    x = tokens()
    inputs = {}
    hooks = [
        b.gate.register_forward_pre_hook(lambda m, a, n=n: inputs.setdefault(n, a[0].reshape(-1, a[0].shape[-1])))
        for n, b in moe_blocks(model)
    ]
    with torch.no_grad():
        model(input_ids=x, use_cache=False)
    for h in hooks:
        h.remove()
    with torch.no_grad():
        for n, b in moe_blocks(model):
            mean = inputs[n].float().mean(0)
            b.gate.weight[:2] += strength * mean / mean.pow(2).sum()


def _train_maxvio(model, rc: RouterConfig) -> list[float]:
    model = copy.deepcopy(model)
    install(model, rc)
    lm = HFMoELM(model).train()
    with torch.no_grad():
        lm(tokens())
    return [float(max_vio(load)) for load in balancing_step(lm)]


def test_bip_lowers_maxvio_on_a_skewed_batch(family):
    kind, ref = family
    skewed = copy.deepcopy(ref)
    _plant_skew(skewed)
    plain = _train_maxvio(skewed, RouterConfig("none"))
    bip = _train_maxvio(skewed, RouterConfig("bip", bip_iters=8))
    assert min(plain) > 1.0, (kind, plain)  # the planted skew: far from balanced
    assert all(b < 0.5 * p for b, p in zip(bip, plain)), (kind, plain, bip)


def test_export_reloads_in_transformers_with_the_trained_logits(family, tmp_path):
    """Two AdamW steps under BIP (weights move, q > 0); the export reloads in plain transformers.
    DeepSeek's export folds the frozen q into its correction bias, so it routes as the trained
    router does in eval mode; the softmax families have no such slot, so their export routes by
    plain top-K of the trained gate (compared with the trained model at q = 0) and q is kept in
    the side file."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from workers.data.tokenizer import ByteTokenizer
    from workers.model.hf.moe import ROUTING_FILE

    kind, ref = family
    model = copy.deepcopy(ref)
    install(model, RouterConfig("bip", bip_iters=2))
    lm = HFMoELM(model).train()
    opt = torch.optim.AdamW(lm.parameters(), lr=1e-2)
    for step in range(2):
        x = tokens(seed=10 + step)
        out = lm(x)
        (lm_loss(out.logits, x) + out.aux_loss).backward()
        opt.step()
        opt.zero_grad()
        balancing_step(lm)
    assert all(float(r.bip_price.max()) > 0 for r in routers(lm))
    src = tmp_path / "src"
    ByteTokenizer().save_pretrained(src)
    out_dir = export_hf(lm, tmp_path / "export", src)
    reloaded = AutoModelForCausalLM.from_pretrained(out_dir, experts_implementation="eager").eval()
    assert AutoTokenizer.from_pretrained(out_dir).encode("ab", add_special_tokens=False) == [97, 98]
    routing = load_file(str(out_dir / ROUTING_FILE))
    assert set(routing) == {f"{n}.gate.{b}" for n, _ in moe_blocks(model) for b in ("balance_bias", "bip_price")}
    if kind != "deepseek_v3":
        for r in routers(lm):
            r.bip_price.zero_()
    x = tokens(seed=3)
    with torch.no_grad():
        want = lm.eval()(x).logits
        got = reloaded(input_ids=x).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, ref(input_ids=x).logits, atol=1e-3)  # the training did move it
