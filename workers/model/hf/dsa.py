"""transformers DSA models (`glm_moe_dsa`, `deepseek_v32`) behind CalibLM's layer-level API with F/S patterns.

    model = load_dsa("hf:<dir>")                          # every layer keeps its lightning indexer
    logits = model(tokens, pattern="FSSF").logits          # S layers reuse the last F layer's top-k
    ctx = model.context(B, T)
    h, buf, _, _ = model.run_layers(model.embed(tokens), l, N, ctx=ctx, pattern=p, index_buffer=buf)

This is the model adapter of the IndexCache search: `workers.indexcache.evaluate` drives a `DSAModel`
exactly as it drives a CalibLM (embed / run_layers / head, the index buffer carried between layers).
The layers are the model's own decoder layers, called with the mask and rotary tables its own forward
builds; only the choice F (run the indexer) or S (reuse the buffer) is ours, made per family:

- glm_moe_dsa has the mechanism: `config.indexer_types[l]` is "full" or "shared". transformers reads it
  once, when GlmMoeDsaAttention is built (a shared layer gets `indexer = None`, and forward tests only
  `self.indexer is not None`), so changing the config afterwards changes nothing. The model is loaded
  all "full" and a pattern is applied by setting `indexer_types` AND each attention's `indexer` /
  `skip_topk` the way its constructor would have; the indexers of S layers stay in `DSAModel.indexers`,
  so every weight is kept and the next pattern can turn them back on.
- deepseek_v32 calls `self.indexer(...)` unconditionally; each layer's indexer is replaced by a
  `ReusedIndexer` that runs the real indexer (F) or returns the buffer the last F layer wrote (S).
- a dense Llama-family model converted by `pipelines.dsa_convert` (`workers.model.hf.lightning`) calls
  its indexer slot the same way, and gets the same ReusedIndexer.

Shape legend: B batch, T tokens, D width, V vocab, K top-k (min(index_topk, T)), N layers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from tuning.indexcache.patterns import validate_pattern
from workers.model.hf import DSA_TYPES, HFModelError


@dataclass(frozen=True)
class IndexerView:
    topk: int
    n_heads: int
    head_dim: int


@dataclass(frozen=True)
class DSAConfigView:
    """The fields of `ModelConfig` the IndexCache search and its reports read, from an HF DSA config."""

    n_layers: int
    vocab_size: int
    max_seq_len: int
    model_type: str
    indexer: IndexerView


@dataclass
class DSAContext:
    """Per-forward inputs every layer shares: what the model's own forward builds before its layer loop."""

    positions: torch.Tensor  # [1, T] (or [B, T])
    rope: tuple[torch.Tensor, torch.Tensor]  # cos, sin [1, T, Dr]
    mask: torch.Tensor  # [B or 1, 1, T, T], the model's causal mask (the indexer reads [:, 0])


@dataclass
class DSAOutput:
    logits: torch.Tensor  # [B, T, V] fp32
    aux_loss: torch.Tensor
    indexer_kl: torch.Tensor
    stats: dict = field(default_factory=dict)


class CountingIndexer(nn.Module):
    """The model's own indexer, counting its calls (the evidence that S layers skip it)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.calls = 0

    def forward(self, *args, **kwargs) -> torch.Tensor:
        """-> top-k indices [B, T, K] int32, as the wrapped indexer returns them."""
        self.calls += 1
        return self.inner(*args, **kwargs)


class TopkBuffer:
    """The index buffer of one forward: the top-k [B, T, K] written by the last F layer."""

    def __init__(self) -> None:
        self.value: torch.Tensor | None = None


class ReusedIndexer(nn.Module):
    """deepseek_v32's indexer slot: F runs the indexer and writes the buffer, S returns the buffer."""

    def __init__(self, indexer: CountingIndexer, buffer: TopkBuffer, layer: int) -> None:
        super().__init__()
        self.indexer, self.buffer, self.layer = indexer, buffer, layer
        self.full = True

    def forward(self, *args, **kwargs) -> torch.Tensor:
        if self.full:
            self.buffer.value = self.indexer(*args, **kwargs)
        elif self.buffer.value is None:
            raise ValueError(f"layer {self.layer} is S but no F layer before it wrote top-k indices")
        return self.buffer.value


class DSAModel(nn.Module):
    """A transformers DSA causal LM with CalibLM's `embed` / `context` / `run_layers` / `head` / `forward`."""

    def __init__(self, hf_model: nn.Module) -> None:
        super().__init__()
        from workers.model.hf.lightning import is_converted

        c = hf_model.config
        if c.model_type not in DSA_TYPES and not is_converted(c):
            raise HFModelError(f"model_type {c.model_type!r} has no DSA indexer; IndexCache supports {DSA_TYPES}")
        self.hf = hf_model.eval()
        self.kind = c.model_type
        n = c.num_hidden_layers
        self.cfg = DSAConfigView(
            n,
            c.vocab_size,
            c.max_position_embeddings,
            c.model_type,
            IndexerView(c.index_topk, c.index_n_heads, c.index_head_dim),
        )
        attns = [layer.self_attn for layer in self.layers]
        missing = [i for i, a in enumerate(attns) if a.indexer is None]
        if missing:
            raise HFModelError(f"layers {missing} were built without an indexer; load with indexer_types all 'full'")
        self.indexers = nn.ModuleList(CountingIndexer(a.indexer) for a in attns)
        self._buffer = TopkBuffer()
        for i, a in enumerate(attns):
            a.indexer = (
                self.indexers[i] if self.kind == "glm_moe_dsa" else ReusedIndexer(self.indexers[i], self._buffer, i)
            )
        self.pattern = "F" * n

    @property
    def layers(self) -> nn.ModuleList:
        return self.hf.model.layers

    def apply_pattern(self, pattern: str) -> str:
        """Make `pattern` (validated against the model's N layers, layer 0 F) the model's F/S choice."""
        pattern = validate_pattern(pattern, self.cfg.n_layers)
        if pattern == self.pattern:
            return pattern
        for i, (layer, c) in enumerate(zip(self.layers, pattern, strict=True)):
            a = layer.self_attn
            if self.kind == "glm_moe_dsa":
                # what GlmMoeDsaAttention.__init__ derives from indexer_types, redone for this pattern
                self.hf.config.indexer_types[i] = "full" if c == "F" else "shared"
                a.skip_topk = c == "S"
                a.indexer = self.indexers[i] if c == "F" else None
            else:
                a.indexer.full = c == "F"
        self.pattern = pattern
        return pattern

    def indexer_calls(self) -> list[int]:
        """Calls of every layer's real indexer so far [N]."""
        return [ix.calls for ix in self.indexers]

    def context(self, B: int, T: int, *, positions=None, device=None, attn: str = "sparse", **unused) -> DSAContext:
        """The causal mask and rotary tables of a T-token forward (no cache), built as the model builds them."""
        from transformers.masking_utils import create_causal_mask

        if attn not in ("sparse", "auto"):
            raise ValueError(f"attn={attn!r}: a DSA model always attends through its indexer's top-k ('sparse')")
        if unused.get("cache") is not None:
            raise ValueError("DSAModel runs whole windows without a KV cache")
        emb = self.hf.model.embed_tokens.weight
        device = device or emb.device
        if positions is None:
            positions = torch.arange(T, device=device).unsqueeze(0)
        dummy = torch.empty(B, T, emb.shape[1], dtype=emb.dtype, device=device)  # read for shape and dtype only
        mask = create_causal_mask(
            config=self.hf.config,
            inputs_embeds=dummy,
            attention_mask=None,
            cache=None,
            position_ids=positions,
            allow_is_causal_skip=False,  # the indexer needs the mask, as in the model's own forward
        )
        return DSAContext(positions, self.hf.model.rotary_emb(dummy, position_ids=positions), mask)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B, T] -> hidden [B, T, D]."""
        if tokens.dim() != 2:
            raise ValueError(f"tokens must be [B, T], got shape {tuple(tokens.shape)}")
        return self.hf.model.embed_tokens(tokens)

    def run_layers(self, h, start: int, end: int, *, ctx: DSAContext, pattern: str, index_buffer=None, collect=None):
        """Run layers [start, end) on hidden h [B, T, D] -> (h, index_buffer [B, T, K] int32, [], []).

        `index_buffer` enters layer `start` as the top-k of the last F layer before it (None at layer 0);
        S layers attend with it and never call their indexer. `collect(layer, h_in, buffer_in)` runs
        before each layer, as in CalibLM.run_layers.
        """
        self.apply_pattern(pattern)
        for i in range(start, end):
            if collect is not None:
                collect(i, h, index_buffer)
            layer = self.layers[i]
            kw = dict(
                attention_mask=ctx.mask, position_embeddings=ctx.rope, position_ids=ctx.positions, use_cache=False
            )
            if self.kind == "glm_moe_dsa":
                h, index_buffer = layer(h, prev_topk_indices=index_buffer, **kw)
            else:
                self._buffer.value = index_buffer
                h = layer(h, **kw)
                index_buffer, self._buffer.value = self._buffer.value, None
        return h, index_buffer, [], []

    def retained_indexer(self, layer: int) -> nn.Module:
        """Layer `layer`'s own lightning indexer (what the training-aware variant trains)."""
        return self.indexers[layer].inner

    def observe(self, tokens: torch.Tensor, pattern: str) -> list:
        """One no-grad forward of tokens [B, T] under `pattern` -> per layer [N] what its sparse attention
        saw (`lightning.Seen`: indexer input, positions, q, k, the top-k attended). Converted models only:
        glm_moe_dsa and deepseek_v32 run transformers' own attention, which records nothing."""
        from workers.model.hf.lightning import observing

        if self.kind in DSA_TYPES:
            raise HFModelError(
                f"model_type {self.kind!r}: the training-aware variant trains CalibLM indexers and those of "
                "models converted by pipelines.dsa_convert"
            )
        with observing(self.hf) as seen:
            self(tokens, pattern=pattern)
        return [s[0] for s in seen]

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """hidden [B, T, D] -> logits [B, T, V] fp32."""
        return self.hf.lm_head(self.hf.model.norm(h)).float()

    def forward(self, tokens: torch.Tensor, *, pattern: str | None = None, attn: str = "auto", **unused) -> DSAOutput:
        """tokens [B, T] -> logits [B, T, V] under `pattern` (None: all F, the unmodified model)."""
        pattern = "F" * self.cfg.n_layers if pattern is None else pattern
        B, T = tokens.shape
        ctx = self.context(B, T, device=tokens.device, attn=attn, **unused)
        with torch.no_grad():
            h, _, _, _ = self.run_layers(self.embed(tokens), 0, self.cfg.n_layers, ctx=ctx, pattern=pattern)
            logits = self.head(h)
        zero = logits.new_zeros(())
        return DSAOutput(logits, zero, zero)


def load_dsa(address: str, device: str | torch.device = "cpu", dtype: str | torch.dtype | None = None) -> DSAModel:
    """`hf:<dir>` (or any HF address) of a glm_moe_dsa / deepseek_v32 checkpoint -> DSAModel in eval mode.

    glm_moe_dsa loads with `indexer_types` all "full" whatever its config says; a checkpoint saved with
    shared layers has no indexer weights for them, and is refused (those layers could never be F).
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    from workers.model.hf.address import local_dir, resolve_dtype
    from workers.model.hf.lightning import is_converted, load_converted

    path = local_dir(address)
    cfg = AutoConfig.from_pretrained(path, local_files_only=True)
    check_dsa_config(cfg, address)
    if is_converted(cfg):
        return DSAModel(load_converted(path, device, resolve_dtype(dtype, device)))
    if cfg.model_type == "glm_moe_dsa":
        cfg.indexer_types = ["full"] * cfg.num_hidden_layers
    hf, info = AutoModelForCausalLM.from_pretrained(
        path, config=cfg, dtype=resolve_dtype(dtype, device), local_files_only=True, output_loading_info=True
    )
    lacking = sorted({int(k.split(".")[2]) for k in info["missing_keys"] if ".indexer." in k})
    if lacking:
        raise HFModelError(
            f"model={address!r}: the checkpoint has no indexer weights for layers {lacking} (saved with shared "
            "layers); IndexCache needs every layer's indexer"
        )
    return DSAModel(hf.to(device))


def check_dsa_config(config, address: str) -> None:
    """Raise HFModelError unless `config` (a transformers config) is a DSA model with something to search."""
    from workers.model.hf.lightning import is_converted

    if config.model_type not in DSA_TYPES and not is_converted(config):
        raise HFModelError(
            f"model={address!r}: model_type {config.model_type!r} has no lightning indexer; IndexCache runs on "
            f"{', '.join(DSA_TYPES)} checkpoints, a model converted by pipelines.dsa_convert, or a CalibLM with an indexer"
        )
    if config.num_hidden_layers < 2:
        raise HFModelError(f"model={address!r} has {config.num_hidden_layers} layer(s): nothing to search")
