"""The retrieval task with a model's own BPE tokenizer: ``length`` in tokens, fixed shapes, the answer
span exact, seeded; the byte path unchanged. The tokenizer is trained here, offline, in a few seconds."""

from __future__ import annotations

import re

import pytest
import torch

from workers.data.corpus import load_corpus
from workers.data.retrieval import (
    VALUE_LEN,
    RetrievalConfig,
    RetrievalError,
    eval_set,
    make_batch,
    value_tokens,
)
from workers.data.tokenizer import ByteTokenizer, HFTokenizer


@pytest.fixture(scope="module")
def pydoc():
    return load_corpus("pydoc")


@pytest.fixture(scope="module")
def bpe(pydoc, tmp_path_factory) -> HFTokenizer:
    """A ~400-id byte-level BPE trained on the pydoc train split, loaded back as an `HFTokenizer`."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    rust = ByteLevelBPETokenizer()
    rust.train_from_iterator(pydoc.text("train").split("\n\n"), vocab_size=400, min_frequency=2, show_progress=False)
    path = tmp_path_factory.mktemp("bpe400")
    PreTrainedTokenizerFast(tokenizer_object=rust._tokenizer, clean_up_tokenization_spaces=False).save_pretrained(path)
    return HFTokenizer(path)


def test_shapes_and_answer_span(bpe, pydoc):
    n_value = value_tokens(bpe)
    assert n_value >= 1 and value_tokens(bpe) == n_value  # deterministic
    es = eval_set(pydoc.heldout, n=10, length=140, seed=7, tokenizer=bpe)
    assert es.prompt.shape == (10, 140 - n_value) and es.value.shape == (10, n_value)
    assert es.value_len == n_value and len(es) == 10 and es.prompt.dtype == es.value.dtype == torch.long
    assert int(es.prompt.max()) >= 256  # merged tokens, not bytes
    for prompt, value in zip(es.prompt, es.value):
        text, answer = bpe.decode(prompt), bpe.decode(value)
        m = re.search(r"\?([a-z0-9]{3})=$", text)
        assert m, text[-20:]
        key = m.group(1)
        assert text.count("?") == 1  # the only query; filler carries no marker
        head = text[: m.start()]
        assert f"#{key}={answer};" in head
        assert dict(re.findall(r"#([a-z0-9]{3})=([a-z0-9]{3});", head))[key] == answer
        assert len(bpe.encode(answer)) == n_value


def test_deterministic_given_seed(bpe, pydoc):
    a = eval_set(pydoc.heldout, n=4, length=120, seed=11, tokenizer=bpe)
    b = eval_set(pydoc.heldout, n=4, length=120, seed=11, tokenizer=bpe)
    c = eval_set(pydoc.heldout, n=4, length=120, seed=12, tokenizer=bpe)
    assert torch.equal(a.prompt, b.prompt) and torch.equal(a.value, b.value)
    assert not torch.equal(a.prompt, c.prompt)


def test_byte_path_unchanged(pydoc):
    seqs, answers = make_batch(pydoc.heldout, RetrievalConfig(length=96), 3, 21)
    assert all(a == [96 - VALUE_LEN] for a in answers)
    for tokenizer in (None, ByteTokenizer()):
        es = eval_set(pydoc.heldout, n=3, length=96, seed=21, tokenizer=tokenizer)
        assert torch.equal(es.prompt, seqs[:, : 96 - VALUE_LEN]) and torch.equal(es.value, seqs[:, 96 - VALUE_LEN :])
        assert es.value_len == VALUE_LEN == value_tokens(tokenizer)
        assert bytes(es.prompt[0].tolist()).decode().count("?") == 1


def test_too_short_is_refused(bpe, pydoc):
    with pytest.raises(RetrievalError, match=r"length=40\b.*8 records"):
        eval_set(pydoc.heldout, n=2, length=40, seed=0, tokenizer=bpe)
    with pytest.raises(RetrievalError, match="filler has .* tokens; need at least 240"):
        eval_set(pydoc.heldout[:200], n=2, length=120, seed=0, tokenizer=bpe)
