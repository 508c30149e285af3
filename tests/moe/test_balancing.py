"""Pure balancing math: BIP prices, loss-free bias, aux loss, gate invariance, MaxVio."""

from __future__ import annotations

import pytest
import torch

from workers.model.moe.balancing import (
    aux_loss,
    bip_prices,
    capacity,
    expert_load,
    gate_weights,
    kth_largest,
    loss_free_update,
    max_vio,
    select_topk,
)
from workers.model.moe.metrics import MaxVioTracker, rank_loads, straggler_ratio


def skewed_scores(n: int = 512, m: int = 16, seed: int = 0, fn: str = "softmax") -> torch.Tensor:
    """Scores [n, m] whose plain top-2 piles onto the last experts (MaxVio ~3)."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, m, generator=g) + torch.linspace(0, 3, m)
    return logits.softmax(-1) if fn == "softmax" else logits.sigmoid()


def test_capacity_is_ceil():
    assert capacity(10, 4, 2) == 5
    assert capacity(11, 4, 2) == 6
    with pytest.raises(ValueError, match="n_experts"):
        capacity(10, 0, 2)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bip_balances_a_skewed_batch(seed):
    s = skewed_scores(seed=seed)
    k, m = 2, s.shape[1]
    plain = max_vio(expert_load(select_topk(s, k), m))
    assert plain > 2.0  # the batch really is skewed
    vio = [float(max_vio(expert_load(select_topk(s, k, -bip_prices(s, k, t)), m))) for t in (1, 4, 16)]
    assert vio[0] < plain
    assert vio[2] <= vio[1] <= vio[0]
    assert vio[2] < 0.1  # near-perfect balance: no expert more than 10% above the mean
    # cap = ceil(K n / m) is what BIP targets: no expert exceeds it by more than a few tokens
    load = expert_load(select_topk(s, k, -bip_prices(s, k, 16)), m)
    assert load.max() <= capacity(s.shape[0], m, k) + 4


@pytest.mark.parametrize("fn", ["softmax", "sigmoid"])
def test_bip_prices_never_negative_and_zero_when_balanced(fn):
    s = skewed_scores(n=200, m=8, fn=fn)
    for t in (1, 2, 5):
        q = bip_prices(s, 2, t)
        assert q.shape == (8,) and (q >= 0).all()
        assert q.max() > 0  # the skew makes some expert constraint bind
    # a perfectly balanced batch (each token prefers a distinct pair) needs no prices
    balanced = torch.eye(8).repeat(25, 1) * 0.9 + 0.1 / 8
    assert torch.equal(bip_prices(balanced, 1, 4), torch.zeros(8))


def test_bip_rejects_bad_arguments():
    s = skewed_scores(n=16, m=4)
    with pytest.raises(ValueError, match="top_k=4"):
        bip_prices(s, 4, 2)
    with pytest.raises(ValueError, match="bip_iters"):
        bip_prices(s, 2, 0)


def test_loss_free_bias_moves_towards_balance():
    bias = torch.zeros(4)
    load = torch.tensor([10.0, 2.0, 4.0, 4.0])  # mean 5: expert 0 overloaded, 1-3 underloaded
    new = loss_free_update(bias, load, 1e-3)
    assert new[0] == pytest.approx(-1e-3)
    assert torch.allclose(new[1:], torch.full((3,), 1e-3))
    # applied repeatedly to a skewed batch, the bias drives MaxVio down
    s = skewed_scores(n=256, m=8)
    b = torch.zeros(8)
    start = float(max_vio(expert_load(select_topk(s, 2, b), 8)))
    for _ in range(300):
        b = loss_free_update(b, expert_load(select_topk(s, 2, b), 8), 1e-3)
    assert float(max_vio(expert_load(select_topk(s, 2, b), 8))) < 0.5 * start


@pytest.mark.parametrize("normalize", [False, True])
def test_offsets_never_change_gate_weights_of_selected_experts(normalize):
    s = skewed_scores(n=64, m=8, fn="sigmoid" if normalize else "softmax")
    for offset in (None, -bip_prices(s, 2, 4), torch.linspace(-0.5, 0.5, 8)):
        idx = select_topk(s, 2, offset)
        gates = gate_weights(s, idx, normalize)
        raw = torch.stack([s[i, idx[i]] for i in range(64)])
        want = raw / raw.sum(-1, keepdim=True) if normalize else raw
        assert torch.equal(gates, want)


def test_aux_loss_is_alpha_when_uniform_and_pushes_overloaded_scores_down():
    n, m = 32, 4
    s = torch.full((n, m), 1.0 / m)
    idx = torch.arange(n * 2).remainder(m).view(n, 2)
    assert float(aux_loss(s, idx, 0.1)) == pytest.approx(0.1)
    logits = torch.randn(n, m, requires_grad=True)
    scores = logits.softmax(-1)
    idx = torch.zeros(n, 2, dtype=torch.long)
    idx[:, 1] = 1  # experts 0, 1 take every slot
    aux_loss(scores, idx, 0.1).backward()
    # descending the loss lowers the overloaded experts' logits relative to the idle ones
    assert (logits.grad[:, :2].sum(0) > 0).all() and (logits.grad[:, 2:].sum(0) < 0).all()


def test_maxvio_and_tracker_summary():
    assert float(max_vio(torch.tensor([2.0, 2.0, 2.0, 2.0]))) == 0.0
    assert float(max_vio(torch.tensor([4.0, 2.0, 1.0, 1.0]))) == pytest.approx(1.0)
    tr = MaxVioTracker()
    tr.add_step([torch.tensor([4.0, 2.0, 1.0, 1.0]), torch.tensor([2.0, 2.0, 2.0, 2.0])])
    for _ in range(30):
        tr.add_step([torch.tensor([2.0, 2.0, 2.0, 2.0])] * 2)
    out = tr.summary()
    assert out["maxvio_step1"] == pytest.approx(0.5)
    assert out["sup_maxvio"] == pytest.approx(1.0)
    assert out["maxvio_1_20"] == pytest.approx(0.5 / 20)
    assert out["avg_maxvio"] == pytest.approx(0.5 / 31)


def test_straggler_ratio():
    load = torch.tensor([6.0, 2.0, 1.0, 1.0])
    assert torch.equal(rank_loads(load, 2), torch.tensor([8.0, 2.0]))
    assert straggler_ratio(load, 2) == pytest.approx(1.6)
    with pytest.raises(ValueError, match="ep_size=3"):
        rank_loads(load, 3)


def dual_update_by_hand(s: torch.Tensor, k: int, rounds: int, q0: list[float]) -> tuple[list[float], dict]:
    """The spec's dual rounds in plain Python (sorted lists, float64); also returns the raw
    (unclamped) p and q of every round, so a test can check the clamps actually bind."""
    rows = s.double().tolist()
    n, m = len(rows), len(rows[0])
    cap = capacity(n, m, k)
    q = list(q0)
    raw = {"p": [], "q": []}
    for _ in range(rounds):
        p_raw = [sorted((rows[i][j] - q[j] for j in range(m)), reverse=True)[k] for i in range(n)]
        p = [max(0.0, v) for v in p_raw]
        q_raw = [sorted((rows[i][j] - p[i] for i in range(n)), reverse=True)[cap] for j in range(m)]
        q = [max(0.0, v) for v in q_raw]
        raw["p"].append(p_raw)
        raw["q"].append(q_raw)
    return q, raw


@pytest.mark.parametrize("warm", [False, True])
@pytest.mark.parametrize("rounds", [1, 2, 3])
def test_bip_prices_equal_the_dual_update_by_hand(warm, rounds):
    s = skewed_scores(n=96, m=8, seed=3)
    # a warm start above most scores makes the token prices' clamp bind in round 1
    q0 = [0.3, 0.0, 0.05, 0.1, 0.0, 0.2, 0.4, 0.6] if warm else [0.0] * 8
    want, raw = dual_update_by_hand(s, 2, rounds, q0)
    got = bip_prices(s, 2, rounds, init=torch.tensor(q0) if warm else None)
    assert torch.allclose(got.double(), torch.tensor(want, dtype=torch.float64), atol=1e-6, rtol=0)
    # a clamp binds on each batch, so without clamp_min(0) the result would differ: from 0, an
    # expert too unpopular to fill cap gets price 0, not a negative one; from the warm start,
    # tokens priced out of K + 1 experts get p = 0
    assert min(raw["p" if warm else "q"][0]) < -1e-3


def test_bip_carry_resumes_the_rounds_where_the_last_batch_left_them():
    """Carrying q over T rounds per batch is the same as running the rounds on without a
    restart: on one fixed batch, 2 + 2 carried rounds = 4 rounds from 0."""
    s = skewed_scores(n=200, m=8, seed=4)
    q2 = bip_prices(s, 2, 2)
    assert torch.equal(bip_prices(s, 2, 2, init=q2), bip_prices(s, 2, 4))
    # and the token prices of the first round, when given, are used instead of recomputed
    p = torch.full((200,), 0.05)
    want, _ = dual_update_by_hand(s, 2, 1, [0.0] * 8)
    assert not torch.allclose(bip_prices(s, 2, 1, token_prices=p).double(), torch.tensor(want, dtype=torch.float64))


@pytest.mark.parametrize("k", [1, 2, 3, 4, 5, 9, 40, 63, 64])
def test_kth_largest_is_the_sorted_value(k):
    x = torch.randn(64, 37)
    x[::5] = x[::5].round()  # ties
    assert torch.equal(kth_largest(x, k, dim=0), x.sort(0, descending=True).values[k - 1])
    if k <= 37:
        assert torch.equal(kth_largest(x, k, dim=1), x.sort(1, descending=True).values[:, k - 1])
    with pytest.raises(ValueError, match="k=65"):
        kth_largest(x, 65, dim=0)
