"""One arm of the balancing experiment: train a small MoE LM with one routing strategy.

Every arm with the same seed starts from the same weights and sees the same batches (the
router strategy is the only difference). Per optimizer step it records the train loss, each
layer's load [E] and MaxVio, and the router time; at the end held-out perplexity and the
held-out global MaxVio, both under eval-mode (causal) routing: BIP with its q frozen at the
last training value, loss-free with its bias.

Shape legend: B sequences, T tokens, E experts, L MoE layers.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace

import torch

from workers.data.corpus import load_corpus
from workers.eval import heldout_nll
from workers.model.config import ConfigError, ModelConfig, MoEConfig, RouterConfig
from workers.model.moe.balancing import max_vio
from workers.model.moe.distributed import moe_layers, routers
from workers.model.moe.metrics import MaxVioTracker, straggler_ratio
from workers.model.transformer import CalibLM
from workers.training.batches import text_batch
from workers.training.loop import StepResult, run_steps
from workers.training.optim import AdamWOptimizer
from workers.training.schedule import LRSchedule

# arm name -> router settings (anything not named keeps the RouterConfig default). BIP arms
# name their q mode explicitly, so a change of the default never changes what an arm ran:
# bip_<mode>_t<T> restarts q at 0 every batch, bip_<mode>_carry_t<T> carries it across steps.
ARMS: dict[str, dict] = {
    "none": {"strategy": "none"},
    "aux_loss_0.01": {"strategy": "aux_loss", "alpha": 0.01},
    "aux_loss_0.1": {"strategy": "aux_loss", "alpha": 0.1},
    "loss_free": {"strategy": "loss_free", "bias_rate": 1e-3},
    "bip_pre_t4": {"strategy": "bip", "bip_mode": "pre", "bip_iters": 4, "bip_q_mode": "restart"},
    "bip_pre_t8": {"strategy": "bip", "bip_mode": "pre", "bip_iters": 8, "bip_q_mode": "restart"},
    "bip_causal_t4": {"strategy": "bip", "bip_mode": "causal", "bip_iters": 4, "bip_q_mode": "restart"},
    "bip_pre_carry_t1": {"strategy": "bip", "bip_mode": "pre", "bip_iters": 1, "bip_q_mode": "carry"},
    "bip_pre_carry_t2": {"strategy": "bip", "bip_mode": "pre", "bip_iters": 2, "bip_q_mode": "carry"},
    "bip_pre_carry_t4": {"strategy": "bip", "bip_mode": "pre", "bip_iters": 4, "bip_q_mode": "carry"},
    "bip_causal_carry_t2": {"strategy": "bip", "bip_mode": "causal", "bip_iters": 2, "bip_q_mode": "carry"},
}


@dataclass(frozen=True)
class ExperimentConfig:
    """Model and schedule shared by all arms (validated at construction)."""

    n_layers: int = 4
    d_model: int = 64
    n_heads: int = 4
    n_experts: int = 16
    top_k: int = 2
    expert_hidden: int = 64
    score_fn: str = "softmax"
    steps: int = 300
    batch_size: int = 8
    seq_len: int = 128
    lr: float = 3e-3
    warmup_steps: int = 10
    min_lr_frac: float = 0.1  # cosine decay to 10% of the peak
    weight_decay: float = 0.1
    decay_norms: bool = True  # AdamW decays the norm gains too: the recipe the reported numbers ran with
    grad_clip: float = 1.0
    eval_windows: int = 64
    straggler_ep: int = 4  # expert-parallel size assumed for the straggler proxy
    corpus: str = "pydoc"
    # > 0 plants a collapsed router at step 0: every gate maps a direction shared by all token
    # embeddings onto expert 0 with this weight (plant_skew); 0 = the plain initialisation
    gate_skew: float = 0.0

    def __post_init__(self) -> None:
        for name in ("n_layers", "steps", "batch_size", "eval_windows", "straggler_ep"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)!r}: must be >= 1")
        if self.seq_len < 2:
            raise ConfigError(f"seq_len={self.seq_len!r}: must be >= 2")
        if self.weight_decay < 0:
            raise ConfigError(f"weight_decay={self.weight_decay!r}: must be >= 0")
        if self.gate_skew < 0:
            raise ConfigError(f"gate_skew={self.gate_skew!r}: must be >= 0")
        if self.grad_clip <= 0:
            raise ConfigError(f"grad_clip={self.grad_clip!r}: must be > 0")
        self.schedule  # noqa: B018 - constructing it checks lr, warmup_steps and min_lr_frac
        if self.n_experts % self.straggler_ep:
            raise ConfigError(f"straggler_ep={self.straggler_ep!r}: must divide n_experts={self.n_experts}")
        self.model_config("none")  # model fields are checked by ModelConfig itself

    def model_config(self, arm: str) -> ModelConfig:
        if arm not in ARMS:
            raise ConfigError(f"arm={arm!r}: one of {sorted(ARMS)}")
        router = RouterConfig(score_fn=self.score_fn, **ARMS[arm])
        moe = MoEConfig(
            n_experts=self.n_experts,
            top_k=self.top_k,
            expert_hidden=self.expert_hidden,
            shared_expert=False,
            router=router,
        )
        return ModelConfig(
            n_layers=self.n_layers,
            d_model=self.d_model,
            n_heads=self.n_heads,
            n_kv_heads=self.n_heads,
            ffn_hidden=4 * self.d_model,
            max_seq_len=self.seq_len,
            moe=moe,
        )

    @property
    def schedule(self) -> LRSchedule:
        return LRSchedule(lr=self.lr, steps=self.steps, warmup_steps=self.warmup_steps, min_lr_frac=self.min_lr_frac)

    def replace(self, **changes) -> ExperimentConfig:
        return replace(self, **changes)

    def to_dict(self) -> dict:
        return asdict(self)


def batch(tokens: torch.Tensor, cfg: ExperimentConfig, seed: int, step: int) -> torch.Tensor:
    """The batch [B, T] of one step: a pure function of (seed, step), shared by all arms."""
    return text_batch(tokens, cfg.batch_size, cfg.seq_len, torch.Generator().manual_seed(seed * 1_000_003 + step))


@torch.no_grad()
def plant_skew(model: CalibLM, skew: float) -> None:
    """Bias every router towards expert 0: a unit direction u added, 3 times over, to every
    token embedding (3 sigma of an N(0, 1) embedding's own projection on u, so nearly every
    token carries it), which every gate maps onto expert 0 with weight `skew`."""
    d = model.cfg.d_model
    u = torch.ones(d) / d**0.5  # [D]
    model.embed_tokens.weight += 3.0 * u
    for r in routers(model):
        r.gate.weight[0] += skew * u


@torch.no_grad()
def heldout_global_maxvio(model: CalibLM, windows: torch.Tensor, batch_size: int = 16) -> list[float]:
    """Eval-mode (causal) routing of every held-out window; per layer MaxVio of the summed load."""
    model.eval()
    totals = None
    for i in range(0, windows.shape[0], batch_size):
        model(windows[i : i + batch_size], attn="dense")
        loads = [layer.last_routing.load.float() for _, layer in moe_layers(model)]
        totals = loads if totals is None else [a + b for a, b in zip(totals, loads)]
    return [float(max_vio(t)) for t in totals]


def train_arm(cfg: ExperimentConfig, arm: str, seed: int, on_step: Callable[[int, dict], None] | None = None) -> dict:
    """Train one arm; returns {"series": per-step lists, "summary": scalars, "loads": last loads}.

    series: train_loss [S], maxvio [S] (mean over layers), maxvio_layer{l} [S], router_ms [S],
    straggler [S], load_layer{l}/expert{j} [S] (tokens routed to expert j in layer l).
    """
    torch.manual_seed(seed)  # same initial weights for every arm of this seed
    model = CalibLM(cfg.model_config(arm))
    if cfg.gate_skew > 0:
        plant_skew(model, cfg.gate_skew)
    opt = AdamWOptimizer(
        model, lr=cfg.lr, weight_decay=cfg.weight_decay, grad_clip=cfg.grad_clip, decay_norms=cfg.decay_norms
    )
    corpus = load_corpus(cfg.corpus)
    tokens = corpus.tokens("train")
    tracker = MaxVioTracker()
    series: dict[str, list[float]] = {"train_loss": [], "maxvio": [], "router_ms": [], "straggler": []}
    train_time, n_tokens = 0.0, 0

    def record(r: StepResult) -> None:
        nonlocal train_time, n_tokens
        train_time += r.seconds
        n_tokens += r.x.numel()
        vios = tracker.add_step(r.loads)
        row = {
            "train_loss": float(r.ce.detach()),
            "maxvio": sum(vios) / len(vios),
            "router_ms": 1e3 * r.router_s,
            "straggler": sum(straggler_ratio(ld, cfg.straggler_ep) for ld in r.loads) / len(r.loads),
            **{f"maxvio_layer{i}": v for i, v in enumerate(vios)},
            **{f"load_layer{i}/expert{j}": x for i, ld in enumerate(r.loads) for j, x in enumerate(ld.tolist())},
        }
        for k, v in row.items():
            series.setdefault(k, []).append(v)
        if on_step is not None:
            on_step(r.step, row)

    run_steps(model, opt, cfg.schedule, lambda step: (batch(tokens, cfg, seed, step), None), hooks=[record])
    windows = corpus.eval_windows("heldout", cfg.seq_len, cfg.eval_windows)
    nll = heldout_nll(model, windows, attn="dense")
    global_vio = heldout_global_maxvio(model, windows)
    summary = {
        **tracker.summary(),
        "heldout_nll": nll.nats,
        "heldout_nll_se": nll.se,
        "heldout_ppl": math.exp(nll.nats),
        "heldout_bpb": nll.bpb,
        "heldout_global_maxvio": sum(global_vio) / len(global_vio),
        "heldout_global_maxvio_sup": max(global_vio),
        "final_train_loss": sum(series["train_loss"][-10:]) / len(series["train_loss"][-10:]),
        "tokens_per_s": n_tokens / train_time,
        "router_ms_per_step": sum(series["router_ms"]) / len(series["router_ms"]),
        "straggler_ratio": sum(series["straggler"]) / len(series["straggler"]),
    }
    return {"series": series, "summary": summary, "corpus_sha256": corpus.sha256}
