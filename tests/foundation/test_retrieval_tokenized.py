"""The retrieval task in a real BPE tokenizer's tokens: fixed shapes, an exact answer span, determinism."""

from __future__ import annotations

import re

import pytest
import torch

from workers.data.retrieval import VALUE_LEN, RetrievalConfig, RetrievalError, eval_set, make_batch, value_tokens
from workers.data.tokenizer import ByteTokenizer, HFTokenizer


@pytest.fixture(scope="module")
def tok(bpe_tokenizer_dir):
    return HFTokenizer(bpe_tokenizer_dir)


def test_answer_span_is_the_asked_records_value_in_tokens(tok, corpus):
    n_value = value_tokens(tok)
    es = eval_set(corpus.heldout, n=12, length=160, seed=5, tokenizer=tok)
    assert es.prompt.shape == (12, 160 - n_value) and es.value.shape == (12, n_value) and es.value_len == n_value
    assert es.prompt.max() >= 256  # BPE merges, not bytes
    for prompt, value in zip(es.prompt, es.value):
        text = tok.decode(prompt)
        key = re.search(r" \?([a-z0-9]{3})=$", text).group(1)
        records = dict(re.findall(r"#([a-z0-9]{3})=([a-z0-9]{3});", text))
        assert records[key] == tok.decode(value)  # the record's value is the span scored
        assert text.count("?") == 1  # filler never carries a marker


def test_tokenized_set_is_deterministic(tok, corpus):
    a = eval_set(corpus.heldout, n=4, length=128, seed=1, tokenizer=tok)
    b = eval_set(corpus.heldout, n=4, length=128, seed=1, tokenizer=tok)
    c = eval_set(corpus.heldout, n=4, length=128, seed=2, tokenizer=tok)
    assert torch.equal(a.prompt, b.prompt) and torch.equal(a.value, b.value)
    assert not torch.equal(a.prompt, c.prompt)


def test_byte_path_is_unchanged(corpus):
    seqs, _ = make_batch(corpus.heldout, RetrievalConfig(length=128), 4, 3)
    for tokenizer in (None, ByteTokenizer()):
        es = eval_set(corpus.heldout, n=4, length=128, seed=3, tokenizer=tokenizer)
        assert torch.equal(es.prompt, seqs[:, : 128 - VALUE_LEN]) and torch.equal(es.value, seqs[:, 128 - VALUE_LEN :])
    assert value_tokens(None) == value_tokens(ByteTokenizer()) == VALUE_LEN


def test_too_short_in_tokens_is_refused(tok, corpus):
    with pytest.raises(RetrievalError, match="length=60"):
        eval_set(corpus.heldout, n=2, length=60, seed=0, tokenizer=tok)
    with pytest.raises(RetrievalError, match="filler has .* tokens; need at least 256"):
        eval_set(corpus.heldout[:300], n=2, length=128, seed=0, tokenizer=tok)
