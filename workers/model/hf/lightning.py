"""A dense HF Llama-family model with a DSA lightning indexer in every attention layer (DSA conversion).

    hf = AutoModelForCausalLM.from_pretrained(dense_dir)
    add_indexers(hf, IndexerConfig(n_heads=4, head_dim=32, rope_dim=16, topk=64))   # every layer sparse
    with attention_mode(hf, "dense", train_kl=True):                                # the warm-up target
        hf(ids); kls = [attn.dsa_kl for attn in attentions(hf)]
    save_converted(hf, out_dir); hf = load_converted(out_dir)                       # a plain HF folder

The indexer is the project's CalibLM one (`workers.model.attention.Indexer`: Hi heads of width Di,
one key per token, I[t, s] = sum_h w[t, h] relu(q[t, h] . k[s]), RoPE on the first rope_dim dims),
fed the layer's attention input (the normed hidden state), detached so its KL trains only the
indexer. transformers' own attention module still computes q/k/v and RoPE (q/k norms included);
only the attention function is ours, registered with transformers' AttentionInterface, and a
pre-hook hands it the hidden state the indexer reads. Modes per attention: "sparse" (top-k of its
indexer; the default), "dense" (all earlier keys; with `train_kl` also the indexer's KL to the
head-summed dense attention), "random" (k random earlier positions, the baseline). Inside `observing(hf)`
each sparse attention also records what the training-aware IndexCache variant distills from
(`workers.indexcache.distill`): its indexer input, positions, q, k and the top-k it attended.

The converted folder is the dense checkpoint plus the indexer weights (`...self_attn.indexer.*`) and
`index_*` fields in config.json; plain transformers still loads it as the dense model (the indexer
keys are unexpected and dropped). `workers.model.hf.dsa.DSAModel` runs it with F/S patterns: each
attention's `indexer` slot is what its ReusedIndexer wraps.

Shape legend: B batch, T tokens, S keys (= T: whole windows, no cache), H query heads,
Hkv key/value heads, Dh head dim, K top-k.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

from kernels import indexer_logits, sparse_attention, topk_indices
from workers.model.attention import Indexer, head_summed_probs, kl_to_target, random_logits
from workers.model.config import IndexerConfig
from workers.model.hf import HFModelError

ATTN_IMPL_DSA = "calibray_dsa"
MODES = ("sparse", "dense", "random")
# Attention modules with q/k/v/o projections, full causal attention and transformers' rotary path.
CONVERTIBLE_TYPES = ("llama", "qwen2", "qwen3", "mistral")
INDEXER_KEY = ".self_attn.indexer."


class TopkIndexer(Indexer):
    """The CalibLM lightning indexer with its top-k: x [B, T, D], pos [B, T] -> indices [B, T, K]."""

    def logits(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """-> [B, T, S] fp32 (-inf on future keys)."""
        q, w = self.queries(x, pos)
        return indexer_logits(q, self.keys(x, pos), w, pos, pos)

    def forward(self, x: torch.Tensor, pos: torch.Tensor, k: int) -> torch.Tensor:
        return topk_indices(self.logits(x, pos), k)


def indexer_config(config) -> IndexerConfig | None:
    """The IndexerConfig a converted checkpoint's config carries (None: a dense model)."""
    if getattr(config, "index_topk", None) is None or config.model_type not in CONVERTIBLE_TYPES:
        return None
    return IndexerConfig(config.index_n_heads, config.index_head_dim, config.index_rope_dim, config.index_topk)


def is_converted(config) -> bool:
    return indexer_config(config) is not None


def check_convertible(config, address: str) -> None:
    """Raise HFModelError unless `config` is a dense model of a family this converter handles."""
    where = f"model={address!r}: "
    if config.model_type not in CONVERTIBLE_TYPES:
        raise HFModelError(
            f"{where}model_type {config.model_type!r} cannot be converted; use one of {', '.join(CONVERTIBLE_TYPES)}"
        )
    if is_converted(config):
        raise HFModelError(f"{where}already has lightning indexers (index_topk={config.index_topk})")
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
        raise HFModelError(f"{where}sliding-window attention (sliding_window={config.sliding_window}) is not supported")


def rope_theta(config) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    return float(params.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


def attentions(hf) -> list[torch.nn.Module]:
    return [layer.self_attn for layer in hf.model.layers]


def _keep_input(module, args, kwargs) -> None:
    """Forward pre-hook: the attention's input hidden state [B, T, D], which the indexer reads."""
    module.dsa_x = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]


def _attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, position_ids=None, **kwargs):
    """query [B, H, T, Dh], key/value [B, Hkv, T, Dh] -> ([B, T, H, Dh], None) in the module's `dsa_mode`.

    Whole windows only (keys = queries, positions 0..T-1 or `position_ids`): causality comes from the
    positions; `attention_mask` is None (no mask function is registered for this implementation)."""
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))  # [B, T, H or Hkv, Dh]
    B, T = q.shape[:2]
    if k.shape[1] != T:
        raise ValueError(f"DSA attention runs whole windows without a KV cache; got {T} queries, {k.shape[1]} keys")
    pos = torch.arange(T, device=q.device)[None] if position_ids is None else position_ids
    pos = pos.expand(B, T)
    x = module.dsa_x.detach()  # the indexer's input is detached: its loss trains only the indexer
    module.dsa_x = None
    mode = module.dsa_mode
    if mode == "dense":
        out = F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling, enable_gqa=True)
        if module.dsa_train_kl:
            with torch.no_grad():
                target = head_summed_probs(q.detach(), k.detach(), pos, pos)  # [B, T, S]
            module.dsa_kl = kl_to_target(target, module.indexer.logits(x, pos))
        return out.transpose(1, 2).contiguous(), None
    if mode == "random":
        idx = topk_indices(random_logits(pos, pos, module.layer_idx, module.dsa_seed), module.dsa_topk)
    else:
        idx = module.indexer(x, pos, module.dsa_topk)  # a ReusedIndexer under DSAModel: F runs it, S reuses
    if module.dsa_seen is not None:
        module.dsa_seen.append(Seen(x, pos, q.detach(), k.detach(), idx))
    return sparse_attention(q, k, v, idx.long(), scaling), None


AttentionInterface.register(ATTN_IMPL_DSA, _attention)


class Seen(NamedTuple):
    """One sparse attention call, as `observing` records it."""

    x: torch.Tensor  # [B, T, D] the indexer's input (detached)
    pos: torch.Tensor  # [B, T]
    q: torch.Tensor  # [B, T, H, Dh] after RoPE
    k: torch.Tensor  # [B, T, Hkv, Dh] after RoPE
    idx: torch.Tensor  # [B, T, K] the keys attended (-1: none)


@contextlib.contextmanager
def observing(hf):
    """Inside the block every sparse attention call appends a `Seen` to its layer's list; yields the
    lists [N] (layer order)."""
    attns = attentions(hf)
    seen: list[list[Seen]] = [[] for _ in attns]
    for a, s in zip(attns, seen, strict=True):
        a.dsa_seen = s
    try:
        yield seen
    finally:
        for a in attns:
            a.dsa_seen = None


def add_indexers(hf, icfg: IndexerConfig, seed: int = 0) -> list[TopkIndexer]:
    """Give every attention layer of `hf` (in place) a freshly initialised indexer (seeded); -> the indexers.

    The model's config records the indexer (`index_*` fields), so `save_pretrained` writes it."""
    c = hf.config
    theta = rope_theta(c)
    torch.manual_seed(seed)
    out = []
    for attn in attentions(hf):
        ix = TopkIndexer(c.hidden_size, icfg, theta).to(device=hf.device, dtype=hf.dtype)
        attn.indexer = ix
        attn.dsa_mode, attn.dsa_topk, attn.dsa_seed = "sparse", icfg.topk, 0
        attn.dsa_train_kl, attn.dsa_kl, attn.dsa_x, attn.dsa_seen = False, None, None, None
        attn.register_forward_pre_hook(_keep_input, with_kwargs=True)
        out.append(ix)
    c.index_n_heads, c.index_head_dim, c.index_rope_dim, c.index_topk = (
        icfg.n_heads,
        icfg.head_dim,
        icfg.rope_dim,
        icfg.topk,
    )
    hf.set_attn_implementation(ATTN_IMPL_DSA)
    return out


@contextlib.contextmanager
def attention_mode(hf, mode: str, *, topk: int | None = None, train_kl: bool = False, seed: int = 0):
    """Every layer attends in `mode` (MODES) with `topk` keys (default: the model's) inside the block."""
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}: one of {MODES}")
    if topk is not None and topk < 1:
        raise ValueError(f"topk={topk!r}: must be >= 1")
    attns = attentions(hf)
    saved = [(a.dsa_mode, a.dsa_topk, a.dsa_train_kl, a.dsa_seed) for a in attns]
    for a in attns:
        a.dsa_mode, a.dsa_train_kl, a.dsa_seed = mode, train_kl, seed
        a.dsa_topk = topk or hf.config.index_topk
    try:
        yield attns
    finally:
        for a, (m, k, t, s) in zip(attns, saved, strict=True):
            a.dsa_mode, a.dsa_topk, a.dsa_train_kl, a.dsa_seed, a.dsa_kl = m, k, t, s, None


def indexer_state(hf) -> dict[str, torch.Tensor]:
    """The indexer weights only (what the warm-up trains), under the model's own state-dict keys."""
    return {k: v.detach().cpu().clone() for k, v in hf.state_dict().items() if INDEXER_KEY in k}


def save_converted(hf, directory: str | Path) -> Path:
    """The converted model as an HF folder (dense weights + indexer weights, config with `index_*`)."""
    d = Path(directory)
    hf.save_pretrained(d)
    return d


def load_converted(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
    """A folder written by `save_converted` -> the HF model with its trained indexers, in eval mode."""
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    cfg = AutoConfig.from_pretrained(path, local_files_only=True)
    icfg = indexer_config(cfg)
    if icfg is None:
        raise HFModelError(f"{path}: config.json has no lightning indexer (index_topk); convert it first")
    from transformers.utils import logging as hf_logging

    dtype = dtype or torch.float32
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the indexer keys are "unexpected" to the dense class: loaded below
    try:
        hf = AutoModelForCausalLM.from_pretrained(path, config=cfg, dtype=dtype, local_files_only=True)
    finally:
        hf_logging.set_verbosity(level)
    add_indexers(hf, icfg)
    state = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            names = st.keys()
            state.update({k: st.get_tensor(k) for k in names if INDEXER_KEY in k})
    expected = {k for k in hf.state_dict() if INDEXER_KEY in k}
    missing = sorted(expected - set(state))
    if missing:
        raise HFModelError(f"{path}: indexer weights missing for {len(missing)} tensors, e.g. {missing[0]}")
    hf.load_state_dict(state, strict=False)
    return hf.to(device).eval()
