"""Corpus splits, user corpora, shards, the retrieval task and the evaluation module."""

from __future__ import annotations

import json
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from tests import procs
from workers.caches.protocol import DynamicCache
from workers.data.corpus import CorpusError, SplitConfig, load_corpus
from workers.data.retrieval import RetrievalConfig, RetrievalError, eval_set, make_batch
from workers.data.shards import read_shard, write_shards
from workers.data.tokenizer import ByteTokenizer
from workers.eval import continuation_nll, heldout_nll, retrieval_accuracy


def test_default_split_is_disjoint_deterministic_and_hashed(corpus):
    again = load_corpus()
    assert (again.train, again.calib, again.heldout) == (corpus.train, corpus.calib, corpus.heldout)
    assert len(corpus.sha256) == 64
    probe = corpus.heldout[1000:1200]
    assert probe not in corpus.train and probe not in corpus.calib
    other = load_corpus(split=SplitConfig(seed=1))
    assert other.heldout != corpus.heldout and other.sha256 == corpus.sha256


def test_user_corpora_text_jsonl_parquet(tmp_path):
    docs = [f"document number {i} " * 20 for i in range(60)]
    (tmp_path / "c.txt").write_text("\n\n".join(docs))
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps({"text": d}) for d in docs))
    pq.write_table(pa.table({"text": docs}), tmp_path / "c.parquet")
    shas = {load_corpus(str(tmp_path / f"c.{ext}")).sha256 for ext in ("txt", "jsonl", "parquet")}
    assert len(shas) == 1
    pq.write_table(pa.table({"body": docs}), tmp_path / "bad.parquet")
    with pytest.raises(CorpusError, match="no 'text' column"):
        load_corpus(str(tmp_path / "bad.parquet"))
    with pytest.raises(CorpusError, match="no such file"):
        load_corpus(str(tmp_path / "missing.txt"))


def test_shards_round_trip(corpus, tmp_path):
    d = write_shards(corpus, tmp_path)
    assert torch.equal(read_shard(d, "calib"), corpus.tokens("calib"))


def test_tokenizer_round_trip():
    tok = ByteTokenizer()
    assert tok.decode(tok.encode("héllo #abc=xyz;")) == "héllo #abc=xyz;"


def test_retrieval_task_format_and_determinism(corpus):
    data = eval_set(corpus.heldout, n=50, length=256, seed=3)
    again = eval_set(corpus.heldout, n=50, length=256, seed=3)
    assert torch.equal(data.prompt, again.prompt) and torch.equal(data.value, again.value)
    for p, v in zip(data.prompt.tolist(), data.value.tolist()):
        text = bytes(p).decode()
        key = text[-4:-1]
        assert text.endswith("=") and text[-5] == "?"
        assert text.count(f"#{key}={bytes(v).decode()};") == 1  # the answer is in a record
        assert 4 <= text.count("#") <= 8
    # deterministic across processes (no hash randomization)
    code = (
        "from workers.data.corpus import load_corpus; from workers.data.retrieval import eval_set;"
        "print(eval_set(load_corpus().heldout, n=5, seed=3).prompt.sum().item())"
    )
    outs = {procs.run([sys.executable, "-c", code]).stdout for _ in range(2)}
    assert outs == {f"{data.prompt[:5].sum().item()}\n"}
    seqs, answers = make_batch(corpus.train, RetrievalConfig(max_queries=5), 10, seed=0)
    for s, a in zip(seqs.tolist(), answers):
        raw = bytes(s)  # answer offsets are byte offsets
        for off in a:
            key = raw[off - 4 : off - 1]
            assert raw[off - 5 : off - 4] == b"?" and b"#" + key + b"=" + raw[off : off + 3] + b";" in raw
    with pytest.raises(RetrievalError, match="length=40"):
        RetrievalConfig(length=40)


def test_evaluation_module_consistency(tiny_trained, corpus):
    _, model, _ = tiny_trained
    w = corpus.eval_windows("heldout", 64, 8)
    full = heldout_nll(model, w)
    assert full.bpb == pytest.approx(full.nats / 0.6931471805599453)
    # continuation through a full-precision cache equals the plain forward's scores on the same tokens
    cont = continuation_nll(model, w[:, :48], w[:, 48:], make_cache=lambda: DynamicCache(model.cfg.n_layers))
    logits = model(w).logits[:, 47:-1]
    ref = torch.nn.functional.cross_entropy(logits.transpose(1, 2), w[:, 48:], reduction="none").mean(1)
    assert cont.per_example == pytest.approx(ref.tolist(), abs=1e-4)
    data = eval_set(corpus.heldout, n=20, length=64, min_records=2, max_records=4)
    acc = retrieval_accuracy(model, data, make_cache=lambda: DynamicCache(model.cfg.n_layers))
    assert acc.n == 20 and 0 <= acc.accuracy <= 1 and len(acc.per_example) == 20
