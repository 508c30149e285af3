"""Session-wide fixtures: one local Ray cluster, an isolated MLflow store, trained tiny models.

Every test session tracks into its own temporary SQLite file (set before Ray starts, so Ray
workers inherit it) and never touches the repository's mlruns.db.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
import torch

_SESSION_DIR = Path(tempfile.mkdtemp(prefix="calibray-tests-"))
os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{_SESSION_DIR / 'mlruns.db'}"
os.environ["CALIBRAY_STORAGE"] = str(_SESSION_DIR / "ray_results")  # Ray Train / Tune runs, not the repository's
os.environ.pop("RAY_ADDRESS", None)  # tests never join a stray cluster
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
# Triton reads TRITON_INTERPRET once, when triton.language is first imported, and that import can
# come from anywhere at collection (transformers -> torch._dynamo -> triton, via tests/dsa): set it
# here, before any test module loads, so the kernel tests' @triton.jit code runs in the interpreter.
os.environ.setdefault("TRITON_INTERPRET", "1")
torch.set_num_threads(1)  # Ray workers and actors share the 2 CI cores; more threads oversubscribe


@pytest.fixture(scope="session")
def session_dir() -> Path:
    return _SESSION_DIR


@pytest.fixture(scope="session")
def mlflow_uri() -> str:
    return os.environ["MLFLOW_TRACKING_URI"]


@pytest.fixture(scope="session")
def ray_local():
    """One in-process Ray cluster for the whole session (loopback only)."""
    import ray

    from workers.runtime.cluster import init_ray

    init_ray(num_cpus=4)  # logical CPUs: lets fractional actors and 2 train workers coexist on 2 cores
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def corpus():
    from workers.data.corpus import load_corpus

    return load_corpus()


def _train_tiny(corpus, **changes):
    from workers.training.config import tiny
    from workers.training.loop import train_local

    tc = tiny().replace(**changes)
    model, losses = train_local(tc, corpus.tokens("train"), corpus.train)
    return tc, model, losses


@pytest.fixture(scope="session")
def tiny_trained(corpus):
    """(TrainConfig, trained tiny DSA-MoE CalibLM, per-step training losses), trained once."""
    return _train_tiny(corpus)


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_trained, session_dir) -> Path:
    """Directory checkpoint of the trained tiny DSA-MoE model (config.json + model.safetensors)."""
    from workers.model import checkpoint

    return checkpoint.save(tiny_trained[1], session_dir / "tiny_model")


@pytest.fixture(scope="session")
def tiny_dense_trained(corpus):
    """A trained tiny dense Llama-shaped model (no indexer, no MoE): exportable to HF."""
    from workers.model.presets import tiny

    return _train_tiny(corpus, model=tiny().replace(indexer=None, moe=None), dense_warmup_steps=0)


@pytest.fixture(scope="session")
def tiny_dense_checkpoint(tiny_dense_trained, session_dir) -> Path:
    from workers.model import checkpoint

    return checkpoint.save(tiny_dense_trained[1], session_dir / "tiny_dense_model")


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct as a plain HF folder: converted once from the packaged GGUF, then cached."""
    from workers.model.hf.shipped import shipped_dir

    return shipped_dir("smollm2-135m")


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    """make(name, **sizes) -> directory of a seeded, randomly initialised byte-vocabulary
    LlamaForCausalLM (4 heads, 2 KV heads), saved with save_pretrained."""

    def make(name: str, *, hidden_size: int, intermediate_size: int, num_hidden_layers: int):
        from transformers import LlamaConfig, LlamaForCausalLM

        path = tmp_path_factory.mktemp(name)
        torch.manual_seed(0)
        cfg = LlamaConfig(
            vocab_size=256,
            hidden_size=hidden_size,
            intermediate_size=intermediate_size,
            num_hidden_layers=num_hidden_layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=128,
        )
        LlamaForCausalLM(cfg).save_pretrained(path)
        return path

    return make


@pytest.fixture(scope="session")
def llama_3l(tiny_llama_dir):
    """A 3-layer random byte-vocabulary Llama (the calibrated-cache tests' model)."""
    return tiny_llama_dir("llama_3l", hidden_size=64, intermediate_size=128, num_hidden_layers=3)


@pytest.fixture(scope="session")
def kv_precision_3l(tmp_path_factory):
    """A kv_precision.json for 3 layers (K8V4, KV2, K4V2; G=R=8) at budget 3.0."""
    from workers.caches.precision import KVQuantConfig
    from workers.kvtuner import artifact

    qc = KVQuantConfig(("K8V4", "KV2", "K4V2"), group=8, residual=8)
    return artifact.write_map(tmp_path_factory.mktemp("kvp") / artifact.FILE_NAME, qc, budget=3.0)


def train_bpe(texts: list[str], path: Path, vocab_size: int = 512, special_tokens: tuple[str, ...] = (), **hf_kw):
    """A real byte-level BPE tokenizer trained on `texts`, saved as Hugging Face tokenizer files in
    `path` (special tokens are part of the vocabulary; hf_kw, e.g. eos_token and chat_template, go to
    PreTrainedTokenizerFast). What a user's own checkpoint brings, without any download."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        texts, vocab_size=vocab_size, min_frequency=2, special_tokens=list(special_tokens), show_progress=False
    )
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, clean_up_tokenization_spaces=False, **hf_kw)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def bpe_tokenizer_dir(tmp_path_factory, corpus) -> Path:
    """A 512-id byte-level BPE tokenizer trained on the pydoc train split (train_bpe)."""
    return train_bpe(corpus.text("train").split("\n\n"), tmp_path_factory.mktemp("bpe512"))


@pytest.fixture(scope="session")
def tiny_qwen3_dir(tmp_path_factory, bpe_tokenizer_dir) -> Path:
    """A seeded random Qwen3ForCausalLM (3 layers, q/k norms, head_dim 32 != hidden / heads) with the
    512-id BPE tokenizer beside it: an HF checkpoint with its own tokenizer, as `hf:<dir>`."""
    import shutil

    from transformers import Qwen3Config, Qwen3ForCausalLM

    path = tmp_path_factory.mktemp("qwen3_bpe")
    torch.manual_seed(0)
    cfg = Qwen3Config(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=512,
        tie_word_embeddings=True,
    )
    Qwen3ForCausalLM(cfg).save_pretrained(path)
    for f in bpe_tokenizer_dir.iterdir():
        shutil.copy(f, path / f.name)
    return path


CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


@pytest.fixture(scope="session")
def chat_qwen3_dir(tmp_path_factory, corpus) -> Path:
    """A seeded random Qwen3ForCausalLM (2 layers) with a chat tokenizer: byte-level BPE trained with
    ChatML's <|im_start|> / <|im_end|> as special tokens, <|im_end|> its EOS, a ChatML template, and
    generation_config.json naming the EOS, as SmolLM2 ships them. An `hf:<dir>` chat model."""
    from transformers import GenerationConfig, Qwen3Config, Qwen3ForCausalLM

    path = tmp_path_factory.mktemp("qwen3_chat")
    special = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
    train_bpe(corpus.text("train").split("\n\n"), path, 512, special, eos_token="<|im_end|>", chat_template=CHATML)
    torch.manual_seed(0)
    cfg = Qwen3Config(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        eos_token_id=2,
    )
    Qwen3ForCausalLM(cfg).save_pretrained(path)
    GenerationConfig(eos_token_id=2).save_pretrained(path)
    return path


# Both DSA families at one tiny size: 6 layers (the search has choices), MLA with q/kv LoRA ranks,
# MoE after one dense layer, an indexer of 2 heads x 16 keeping 8 keys: at the tests' 64-token
# windows k/L = 1/8, so an S layer's reused top-k changes the logits.
TINY_DSA = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    moe_intermediate_size=32,
    num_hidden_layers=6,
    num_attention_heads=4,
    num_key_value_heads=4,
    n_routed_experts=4,
    num_experts_per_tok=2,
    n_group=1,
    topk_group=1,
    kv_lora_rank=16,
    q_lora_rank=32,
    qk_rope_head_dim=8,
    qk_nope_head_dim=8,
    v_head_dim=16,
    index_n_heads=2,
    index_head_dim=16,
    index_topk=8,
    first_k_dense_replace=1,
    max_position_embeddings=128,
)


@pytest.fixture(scope="session")
def tiny_dsa_dirs(tmp_path_factory, bpe_tokenizer_dir) -> dict[str, Path]:
    """{"glm_moe_dsa": dir, "deepseek_v32": dir}: seeded random TINY_DSA checkpoints (every layer
    with its indexer), saved with save_pretrained beside the 512-id BPE tokenizer; `hf:<dir>` models."""
    import shutil

    from transformers import DeepseekV32Config, DeepseekV32ForCausalLM, GlmMoeDsaConfig, GlmMoeDsaForCausalLM

    out = {}
    for config, model in ((GlmMoeDsaConfig, GlmMoeDsaForCausalLM), (DeepseekV32Config, DeepseekV32ForCausalLM)):
        path = tmp_path_factory.mktemp(config.model_type)
        torch.manual_seed(0)
        model(config(**TINY_DSA)).save_pretrained(path)
        for f in bpe_tokenizer_dir.iterdir():
            shutil.copy(f, path / f.name)
        out[config.model_type] = path
    return out
