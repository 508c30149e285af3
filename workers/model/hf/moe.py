"""The project's routing strategies and expert parallelism inside a transformers MoE model.

    model = AutoModelForCausalLM.from_pretrained(path)
    blocks = install(model, RouterConfig(strategy="bip"))   # selection replaced, weights kept
    lm = HFMoELM(model)                                      # lm(tokens) -> LMOutput (+ aux loss)

Shape legend: N tokens, D width, F expert hidden, E experts, El = E / ep local experts, K
experts per token.

`install` swaps two submodules of every MoE block and keeps the block's own forward:
- `block.gate` becomes an `HFRouter` (a `workers.model.moe.router.Router`: the strategies none /
  aux_loss / loss_free / bip, their buffers, load counting). It holds the model's gate weight
  as the same Parameter under the same name (`gate.weight`) and returns what the model's gate
  returns, (logits, gates [N, K], indices [N, K]); the gate weights follow the family's rule
  (renormalised over the K chosen where the family does it, DeepSeek's scaling factor).
- `block.experts` becomes `HFExperts`: the same fused Parameters (`gate_up_proj` [E, 2F, D],
  `down_proj` [E, D, F]) run through the project's dispatch kernels (permute, grouped SwiGLU,
  unpermute), and after `shard` through the expert-parallel all-to-all pass. transformers'
  default expert path on CPU is `torch._grouped_mm`, which has no CPU backward.

DeepSeek-V3 (sigmoid scores, group-limited top-K, `e_score_correction_bias`), mapped as its
code routes: the choice scores are c = s + e_score_correction_bias (the pretrained bias, kept
under its own name), every strategy ranks c with the group limit (top `topk_group` of
`n_group` groups by the sum of each group's two best, then top-K inside them), and gate
weights come from the raw s. loss_free moves the router's `balance_bias` on top of c (the
model's bias is what DeepSeek-V3 trained loss-free; it stays as pretrained and the fine-tune's
moves are added to it on export); BIP prices are computed on c without the group constraint
(the LP of moe_bip.md has no group term) and route by c - q with it.
"""

from __future__ import annotations

import copy
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from kernels.moe_dispatch import grouped_swiglu, permute, unpermute
from workers.model.config import ConfigError, MoEConfig, RouterConfig
from workers.model.moe.expert_parallel import EPGroups, ep_expert_pass, mark_expert_param
from workers.model.moe.router import Router
from workers.model.transformer import LMOutput


@dataclass(frozen=True)
class Family:
    """How one transformers MoE family routes: where its blocks are and its gate rule."""

    block: str  # class name of the MoE block (holds .gate and .experts)
    n_experts: str  # config attribute with the number of routed experts
    score_fn: str  # softmax | sigmoid
    norm_topk: str | bool  # config attribute (or a constant): renormalise the K gates to sum 1
    group_limited: bool = False  # DeepSeek-V3's n_group / topk_group selection


FAMILIES = {
    "qwen3_moe": Family("Qwen3MoeSparseMoeBlock", "num_experts", "softmax", "norm_topk_prob"),
    "olmoe": Family("OlmoeSparseMoeBlock", "num_experts", "softmax", "norm_topk_prob"),
    "mixtral": Family("MixtralSparseMoeBlock", "num_local_experts", "softmax", True),
    "deepseek_v3": Family("DeepseekV3MoE", "n_routed_experts", "sigmoid", "norm_topk_prob", group_limited=True),
}
# state the routers add beside the model's own weights; not part of a transformers checkpoint
ROUTER_BUFFERS = ("balance_bias", "bip_price")


def family_of(config) -> Family:
    """The Family of a transformers config; a ConfigError names any other model_type."""
    kind = getattr(config, "model_type", None)
    if kind not in FAMILIES:
        raise ConfigError(f"model_type={kind!r}: MoE fine-tuning supports {', '.join(FAMILIES)}")
    return FAMILIES[kind]


def moe_shape(config) -> tuple[int, int]:
    """(E routed experts, K experts per token) of a supported transformers config."""
    return int(getattr(config, family_of(config).n_experts)), int(config.num_experts_per_tok)


def check_router(config, rc: RouterConfig) -> None:
    """Refuse a strategy the model's shape cannot run (before any work)."""
    e, k = moe_shape(config)
    if rc.strategy == "bip" and not 0 < k < e:
        raise ConfigError(f"router.strategy='bip': needs 0 < top_k < n_experts, got top_k={k}, n_experts={e}")
    if getattr(config, "hidden_act", "silu") != "silu":
        raise ConfigError(f"hidden_act={config.hidden_act!r}: the expert kernels are SwiGLU (silu)")


class HFRouter(Router):
    """A Router holding a transformers gate's weight; called as that gate: x -> (logits, gates, idx)."""

    def __init__(self, hf_gate: nn.Module, config, rc: RouterConfig) -> None:
        fam = family_of(config)
        e, k = moe_shape(config)
        d = hf_gate.weight.shape[1]
        super().__init__(d, MoEConfig(n_experts=e, top_k=k, shared_expert=False, router=rc))
        del self.gate  # the model's own weight replaces the Router's Linear
        self.weight = hf_gate.weight
        self.norm_topk = fam.norm_topk if isinstance(fam.norm_topk, bool) else bool(getattr(config, fam.norm_topk))
        self.sigmoid = fam.score_fn == "sigmoid"
        self.scale = float(getattr(config, "routed_scaling_factor", 1.0)) if fam.group_limited else 1.0
        self.constrained_topk = fam.group_limited
        if fam.group_limited:
            self.n_group, self.topk_group = int(config.n_group), int(config.topk_group)
            self.register_buffer("e_score_correction_bias", hf_gate.e_score_correction_bias.detach().clone())
        self.last_logits: torch.Tensor | None = None
        self.last_aux: torch.Tensor | None = None

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """x [N, D] -> scores [N, E] fp32 (DeepSeek: the gate matmul in fp32 too, as its code does)."""
        if self.sigmoid:
            logits = F.linear(x.float(), self.weight.float())
            self.last_logits = logits
            return logits.sigmoid()
        logits = F.linear(x, self.weight)
        self.last_logits = logits
        return logits.float().softmax(-1)

    def select(self, s: torch.Tensor) -> torch.Tensor:
        if self.constrained_topk:  # DeepSeek ranks s + its pretrained correction bias
            s = s + self.e_score_correction_bias
        return super().select(s)

    def topk(self, s: torch.Tensor, k: int, offset: torch.Tensor | None = None) -> torch.Tensor:
        if not self.constrained_topk:
            return super().topk(s, k, offset)
        c = s if offset is None else s + offset.to(s.dtype)  # [N, E] choice scores
        n, e = c.shape
        grouped = c.view(n, self.n_group, e // self.n_group)  # [N, G, E/G]
        group_scores = grouped.topk(2, dim=-1).values.sum(-1)  # [N, G]
        group_idx = group_scores.topk(self.topk_group, dim=-1, sorted=False).indices
        keep = torch.zeros_like(group_scores).scatter_(1, group_idx, 1).bool()  # [N, G]
        keep = keep.unsqueeze(-1).expand_as(grouped).reshape(n, e)
        return c.masked_fill(~keep, float("-inf")).topk(k, dim=-1, sorted=False).indices

    def gate_values(self, s: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        gates = s.gather(-1, idx)  # [N, K] raw scores
        if self.norm_topk:
            gates = gates / (gates.sum(-1, keepdim=True) + (1e-20 if self.sigmoid else 0.0))
        return gates * self.scale

    def forward(self, x: torch.Tensor):  # the transformers gate's call signature
        x = x.reshape(-1, self.weight.shape[1])  # [N, D]
        r = super().forward(x)
        self.last_aux = r.aux_loss
        return self.last_logits, r.gates, r.expert_idx

    def export_bias(self) -> torch.Tensor | None:
        """DeepSeek only: the correction bias that makes plain transformers route as this router
        does in eval mode (pretrained bias + loss-free moves - frozen BIP q); None otherwise."""
        if not self.constrained_topk:
            return None
        offset = {"loss_free": self.balance_bias, "bip": -self.bip_price}.get(self.cfg.router.strategy)
        return self.e_score_correction_bias + (0 if offset is None else offset)


class HFExperts(nn.Module):
    """A transformers fused-experts module on the project's dispatch kernels (and expert parallelism)."""

    def __init__(self, hf_experts: nn.Module, n_experts: int) -> None:
        super().__init__()
        self.gate_up_proj = hf_experts.gate_up_proj  # [E, 2F, D]: gate rows first, then up
        self.down_proj = hf_experts.down_proj  # [E, D, F]
        self.n_experts = n_experts
        self.ep: EPGroups | None = None
        self.last_local_load: torch.Tensor | None = None  # [El] rows the local experts ran

    @property
    def ep_size(self) -> int:
        return self.ep.ep_size if self.ep is not None else 1

    def weights(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(w_gate [El, D, F], w_up [El, D, F], w_down [El, F, D]) views of the fused Parameters."""
        f = self.down_proj.shape[-1]
        return (
            self.gate_up_proj[:, :f].transpose(1, 2),
            self.gate_up_proj[:, f:].transpose(1, 2),
            self.down_proj.transpose(1, 2),
        )

    def shard(self, groups: EPGroups) -> None:
        """Keep the contiguous block of E / ep experts of this rank, tagged as expert parameters."""
        e, ep = self.n_experts, groups.ep_size
        if e % ep:
            raise ValueError(f"n_experts={e} must be divisible by ep_size={ep}")
        el, lo = e // ep, groups.ep_rank * (e // ep)
        for name in ("gate_up_proj", "down_proj"):
            full = getattr(self, name)
            setattr(self, name, mark_expert_param(nn.Parameter(full.detach()[lo : lo + el].clone()), ep))
        self.ep = groups

    def forward(self, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        """hidden [N, D], top_k_index [N, K], top_k_weights [N, K] -> [N, D]."""
        xs, order, counts = permute(hidden, top_k_index, self.n_experts)  # [N*K, D] sorted by expert
        w_gate, w_up, w_down = self.weights()
        if self.ep_size > 1:
            ys, self.last_local_load = ep_expert_pass(xs, counts, w_gate, w_up, w_down, self.ep)
        else:
            ys = grouped_swiglu(xs, counts, w_gate, w_up, w_down)  # [N*K, D]
            self.last_local_load = counts
        return unpermute(ys, order, top_k_weights.to(hidden.dtype)).to(hidden.dtype)

    def full_state(self) -> dict[str, torch.Tensor]:
        """All E experts' fused weights, gathered over the expert-parallel group."""
        if self.ep_size == 1:
            return {n: getattr(self, n).detach() for n in ("gate_up_proj", "down_proj")}
        out = {}
        for name in ("gate_up_proj", "down_proj"):
            local = getattr(self, name).detach().contiguous()
            parts = [torch.empty_like(local) for _ in range(self.ep_size)]
            dist.all_gather(parts, local, group=self.ep.ep_group)
            out[name] = torch.cat(parts)
        return out


def moe_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, block) of every MoE block of a transformers model or its HFMoELM, installed or not
    (names as `model.state_dict` spells them)."""
    cls = family_of(_unwrap(model).config).block
    return [(n, m) for n, m in model.named_modules() if type(m).__name__ == cls]


def install(model: nn.Module, rc: RouterConfig) -> list[tuple[str, nn.Module]]:
    """Replace every MoE block's selection (and expert kernels) in place; the weights are the model's."""
    config = model.config
    check_router(config, rc)
    e, _ = moe_shape(config)
    blocks = moe_blocks(model)
    if not blocks:
        raise ConfigError(f"model_type={config.model_type!r}: no {family_of(config).block} in the model")
    for _, block in blocks:
        block.gate = HFRouter(block.gate, config, rc)
        block.experts = HFExperts(block.experts, e)
    # the strategies' aux loss replaces transformers' own load-balancing loss
    config.output_router_logits = False
    return blocks


def shard(model: nn.Module, groups: EPGroups) -> None:
    """Expert parallelism: every MoE block keeps its rank's experts; routers balance the group's batch."""
    for _, block in moe_blocks(model):
        if groups.ep_size > 1:
            block.experts.shard(groups)
            block.gate.ep_group = groups.ep_group


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """state_dict in the unsharded layout (a collective over each expert-parallel group)."""
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for name, block in moe_blocks(model):
        for w, full in block.experts.full_state().items():
            state[f"{name}.experts.{w}"] = full.clone()
    return state


def _unwrap(model: nn.Module) -> nn.Module:
    return model.hf if isinstance(model, HFMoELM) else model


class HFMoELM(nn.Module):
    """A transformers causal LM with installed routers, behind the training loop's model call:
    tokens [B, T] -> LMOutput(logits [B, T, V], aux loss summed over layers, indexer_kl 0)."""

    def __init__(self, hf: nn.Module) -> None:
        super().__init__()
        self.hf = hf
        self.routers = [b.gate for _, b in moe_blocks(hf)]

    def forward(self, tokens: torch.Tensor, **_: object) -> LMOutput:
        for r in self.routers:
            r.last_aux = None
        logits = self.hf(input_ids=tokens, use_cache=False).logits
        zero = logits.new_zeros((), dtype=torch.float32)
        aux = sum((r.last_aux for r in self.routers if r.last_aux is not None), zero)
        return LMOutput(logits, aux, zero)


def export_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The plain transformers state dict of an installed (unsharded) model: router buffers
    dropped; DeepSeek's correction bias folded with the router's offsets (HFRouter.export_bias)."""
    hf = _unwrap(model)
    state = {k: v.detach().clone() for k, v in hf.state_dict().items() if k.rsplit(".", 1)[-1] not in ROUTER_BUFFERS}
    for name, block in moe_blocks(hf):
        bias = block.gate.export_bias()
        if bias is not None:
            state[f"{name}.gate.e_score_correction_bias"] = bias.detach().clone()
    return state


def routing_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The routers' balancing state (loss-free bias, BIP q) per MoE block, for the export's side file."""
    hf = _unwrap(model)
    return {
        f"{name}.gate.{b}": getattr(block.gate, b).detach().clone()
        for name, block in moe_blocks(hf)
        for b in ROUTER_BUFFERS
    }


# files of a transformers checkpoint that are neither its config nor its weights: the tokenizer
# and generation settings, copied beside an export
_SIDE_FILES = ("*token*", "vocab.json", "merges.txt", "generation_config.json", "chat_template*")
ROUTING_FILE = "calibray_routing.safetensors"


def export_hf(model: nn.Module, directory: str | Path, source: str | Path | None = None) -> Path:
    """Write an installed (unsharded) model as a plain transformers checkpoint: `save_pretrained` of
    a fresh model of the same config holding `export_state_dict`, the source's tokenizer files, and
    the routers' balancing state in ROUTING_FILE (plain transformers ignores it)."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    hf = _unwrap(model)
    out = Path(directory)
    config = copy.deepcopy(hf.config)
    fresh = AutoModelForCausalLM.from_config(config, dtype=next(hf.parameters()).dtype)
    fresh.load_state_dict(export_state_dict(hf), strict=True)
    fresh.save_pretrained(out)
    for pattern in _SIDE_FILES if source is not None else ():
        for f in Path(source).glob(pattern):
            if f.is_file() and not (out / f.name).exists():
                shutil.copy2(f, out / f.name)
    save_file({k: v.contiguous() for k, v in routing_state(hf).items()}, str(out / ROUTING_FILE))
    return out


@torch.no_grad()
def heldout_loads(model: nn.Module, windows: torch.Tensor, batch_size: int = 16) -> list[torch.Tensor]:
    """Per MoE layer the tokens routed to each expert [E] over held-out windows [N, L], in eval mode
    (every strategy routes each token on its own there)."""
    hf = _unwrap(model)
    blocks = moe_blocks(hf)
    loads = [torch.zeros(b.gate.cfg.n_experts) for _, b in blocks]

    def counter(i):
        def hook(mod, args, out) -> None:  # returns None: a forward hook's return value replaces the output
            loads[i].add_(torch.bincount(out[2].reshape(-1), minlength=loads[i].numel()))

        return hook

    handles = [b.gate.register_forward_hook(counter(i)) for i, (_, b) in enumerate(blocks)]
    try:
        hf.eval()
        for i in range(0, windows.shape[0], batch_size):
            hf(input_ids=windows[i : i + batch_size], use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return loads
