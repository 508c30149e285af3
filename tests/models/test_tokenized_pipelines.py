"""An HF checkpoint with its own BPE tokenizer through the evaluation and both KV-cache pipelines.

The model is a tiny random Qwen3 with a 512-id byte-level BPE tokenizer (`tiny_qwen3_dir`). What is
checked against plain transformers: the project's NLL on tokenized corpus windows (|diff| <= 1e-4
nats/token), its bits/byte (NLL sum / (ln 2 x UTF-8 bytes of the scored tokens)), and the
full-precision NLL each pipeline reports on its own held-out examples.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient

from pipelines import kvtuner, prefixkv
from workers.data.corpus import load_corpus
from workers.eval import heldout_nll
from workers.model.hf import HFModelError
from workers.model.hf.address import load_any, load_tokenizer


def _reference(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, local_files_only=True).eval()


@torch.no_grad()
def _continuation_nll(ref, context: torch.Tensor, continuation: torch.Tensor) -> float:
    """Plain transformers: one full forward, mean NLL of the continuation tokens."""
    x = torch.cat([context, continuation], 1)
    logits = ref(x).logits[:, context.shape[1] - 1 : -1].float()
    return float(torch.nn.functional.cross_entropy(logits.transpose(1, 2), continuation))


def test_heldout_nll_and_bits_per_byte_equal_plain_transformers(tiny_qwen3_dir, corpus):
    address = f"hf:{tiny_qwen3_dir}"
    tok = load_tokenizer(address)
    assert tok.vocab_size == 512 and tok.byte_level
    windows = corpus.eval_windows("heldout", 65, max_windows=6, tokenizer=tok)  # consecutive, from the start
    res = heldout_nll(load_any(address), windows, tokenizer=tok)
    with torch.no_grad():
        ref = float(_reference(tiny_qwen3_dir)(windows, labels=windows).loss)
    assert abs(res.nats - ref) <= 1e-4
    # the scored tokens of consecutive windows are the text minus each window's first token
    scored = "".join(tok.decode(w[1:]) for w in windows)
    assert res.n_bytes == len(scored.encode("utf-8")) and res.n_bytes > 2 * res.n_tokens  # BPE: > 2 bytes/token
    assert res.bpb == pytest.approx(res.nats * res.n_tokens / (math.log(2) * res.n_bytes), rel=1e-12)


def test_pipelines_refuse_a_model_without_tokenizer_before_any_work(tmp_path, mlflow_uri):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=4096, hidden_size=32, intermediate_size=64, num_hidden_layers=1)
    cfg.num_attention_heads, cfg.num_key_value_heads = 2, 1
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "m")
    address = f"hf:{tmp_path / 'm'}"
    client = MlflowClient(mlflow_uri)
    before = sum(len(client.search_runs([e.experiment_id])) for e in client.search_experiments())
    for main, extra in ((kvtuner.main, ["--work-dir", str(tmp_path / "w")]), (prefixkv.main, [])):
        with pytest.raises(HFModelError, match=rf"{address}.*4096"):
            main(["--model", address, *extra])
    assert not (tmp_path / "w").exists()
    assert sum(len(client.search_runs([e.experiment_id])) for e in client.search_experiments()) == before


KVT_ARGS = [
    "--budget", "3.0", "--length", "64", "--continuation", "16", "--group", "16", "--residual", "16",
    "--calib-n", "4", "--valid-n", "4", "--report-n", "6", "--num-samples", "3", "--population", "2",
    "--clusters", "1", "--actors", "1", "--cpus-per-actor", "1", "--baselines", "KV8", "KV2",
]  # fmt: skip


def test_kvtuner_on_a_bpe_model_reports_what_transformers_computes(tiny_qwen3_dir, tmp_path, ray_local, mlflow_uri):
    from workers.kvtuner.evaluate import build_data

    address = f"hf:{tiny_qwen3_dir}"
    res = kvtuner.main(["--model", address, *KVT_ARGS, "--work-dir", str(tmp_path / "w")])
    run = MlflowClient(mlflow_uri).get_run(res["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["tokenizer"] == address and run.data.params["vocab_size"] == "512"
    assert run.data.params["model_dtype"] == "fp32" and "corpus_heldout_bytes" in run.data.params
    # the held-out examples the report scored, rebuilt from the same settings and tokenizer
    tok = load_tokenizer(address)
    data = build_data("text", load_corpus(), "heldout", 6, 0 + 3, 64, 16, tokenizer=tok)
    assert data.continuation.max() >= 256  # BPE ids, not bytes
    ref = _continuation_nll(_reference(tiny_qwen3_dir), data.context, data.continuation)
    m = run.data.metrics
    assert abs(m["heldout_full"] - ref) <= 1e-4
    assert m["heldout_full_bpb"] == pytest.approx(data.bpb(m["heldout_full"]), rel=1e-9)
    assert m["heldout_full_bpb"] < m["heldout_full"] / math.log(2)  # > 1 byte per token
    prec = json.loads((tmp_path / "w" / "out_budgets" / "3" / "kv_precision.json").read_text())
    assert prec["model"] == address and prec["dtype"] == "fp32" and len(prec["layers"]) == 3


def test_prefixkv_on_a_bpe_model_reports_what_transformers_computes(tiny_qwen3_dir, ray_local, mlflow_uri):
    address = f"hf:{tiny_qwen3_dir}"
    argv = [
        "--model", address, "--samples", "2", "--workers", "1", "--context", "100", "--continuation", "16",
        "--batch-size", "2", "--cpus-per-worker", "0.5", "--bootstrap", "5", "--eval-samples", "4",
        "--eval-ratios", "0.5", "--scores", "sum", "--experiment", "prefixkv-bpe",
    ]  # fmt: skip
    run_id = prefixkv.main(argv)
    run = MlflowClient(mlflow_uri).get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.params["tokenizer"] == address
    cfg = prefixkv.parse_args(argv)
    tok = load_tokenizer(address)
    context, continuation = prefixkv.eval_data(cfg, load_corpus(), tok)
    assert context.shape == (4, 100) and continuation.max() >= 256
    ref = _continuation_nll(_reference(tiny_qwen3_dir), context, continuation)
    m = run.data.metrics
    assert abs(m["nll_full_r1"] - ref) <= 1e-4
    n_bytes = sum(tok.n_bytes(row) for row in continuation)
    assert m["bpb_full_r1"] == pytest.approx(ref * continuation.numel() / (math.log(2) * n_bytes), rel=1e-4)
    cal = json.loads(
        Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="prefixkv.json")).read_text()
    )
    assert cal["dtype"] == "fp32" and cal["n_layers"] == 3
