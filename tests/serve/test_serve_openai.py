"""The OpenAI surface as users script against it: the official `openai` client against a real Ray
Serve instance on 127.0.0.1, serving a random tiny Qwen3 with its own BPE chat tokenizer, and
SmolLM2-135M-Instruct answering a factual question."""

from __future__ import annotations

import openai
import pytest
import requests

from workers.data.tokenizer import HFTokenizer

MODEL = "qwen3-chat"
PROMPT = "The quick brown fox"
CHAT = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a colour."}]


@pytest.fixture(scope="module")
def client(chat_url) -> openai.OpenAI:
    assert chat_url.startswith("http://127.0.0.1:")
    return openai.OpenAI(base_url=f"{chat_url}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def tok(chat_qwen3_dir) -> HFTokenizer:
    return HFTokenizer(chat_qwen3_dir)


def byte_token(tok: HFTokenizer, b: int) -> int:
    """The id of the single-byte token for byte value b (every byte-level BPE has all 256)."""
    return next(t for t in range(tok.vocab_size) if tok.token_bytes(t) == bytes([b]))


def greedy(client, prompt=PROMPT, **kw):
    return client.completions.create(model=MODEL, prompt=prompt, temperature=0.0, **{"max_tokens": 8, **kw})


# -- models ----------------------------------------------------------------------------------------


def test_models_list_and_retrieve(client):
    listed = client.models.list()
    assert [m.id for m in listed.data] == [MODEL]
    card = client.models.retrieve(MODEL)
    assert card.id == MODEL and card.object == "model" and card.model_extra["chat"] is True
    with pytest.raises(openai.NotFoundError) as e:
        client.models.retrieve("gpt-4")
    assert "gpt-4" in e.value.message and e.value.code == "model_not_found"


# -- completions -------------------------------------------------------------------------------------


def test_prompt_forms_and_usage_in_model_tokens(client, tok):
    ids = tok.encode(PROMPT)
    assert len(ids) < len(PROMPT.encode())  # BPE tokens, not bytes
    one = greedy(client)
    assert one.usage.prompt_tokens == len(ids) and one.usage.completion_tokens == 8
    as_ids = greedy(client, prompt=ids)
    assert as_ids.choices[0].text == one.choices[0].text and as_ids.usage.prompt_tokens == len(ids)
    texts = greedy(client, prompt=[PROMPT, "Hello"])
    assert [c.index for c in texts.choices] == [0, 1] and texts.choices[0].text == one.choices[0].text
    assert texts.usage.prompt_tokens == len(ids) + len(tok.encode("Hello"))
    lists = greedy(client, prompt=[ids, tok.encode("Hello")])
    assert [c.text for c in lists.choices] == [c.text for c in texts.choices]


def test_n_best_of_and_seeds(client):
    kw = dict(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=1.0)
    a = client.completions.create(n=3, seed=7, **kw)
    b = client.completions.create(n=3, seed=7, **kw)
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert [c.text for c in a.choices] == [c.text for c in b.choices]  # same seed, same text
    assert len({c.text for c in a.choices}) > 1  # choices are sampled independently
    single = client.completions.create(n=1, seed=7, **kw)
    assert single.choices[0].text == a.choices[0].text  # choice i uses seed + i
    best = client.completions.create(n=1, best_of=3, seed=7, logprobs=0, **kw)
    scores = [sum(c.logprobs.token_logprobs) for c in client.completions.create(n=3, seed=7, logprobs=0, **kw).choices]
    assert len(best.choices) == 1 and sum(best.choices[0].logprobs.token_logprobs) == pytest.approx(max(scores))
    assert best.usage.completion_tokens == 24  # every candidate was generated
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(n=3, best_of=2, **kw)
    assert e.value.param == "best_of"


def test_logprobs_with_alternatives_and_echo(client, tok):
    r = greedy(client, logprobs=3)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 8
    assert "".join(lp.tokens) == r.choices[0].text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(8)]
    for chosen, lp_t, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert len(top) == 3 and lp_t <= 0
        assert max(top.values()) == pytest.approx(lp_t, abs=1e-5) and chosen in top  # greedy takes the argmax
    echoed = greedy(client, echo=True, logprobs=1)
    e = echoed.choices[0]
    assert e.text == PROMPT + r.choices[0].text
    n_prompt = len(tok.encode(PROMPT))
    assert e.logprobs.token_logprobs[0] is None and len(e.logprobs.tokens) == n_prompt + 8
    assert all(x is not None and x <= 0 for x in e.logprobs.token_logprobs[1:])
    assert e.logprobs.token_logprobs[n_prompt:] == pytest.approx(lp.token_logprobs, abs=1e-5)


def test_penalties_and_logit_bias_change_the_tokens(client, tok):
    plain = greedy(client, max_tokens=16, logprobs=0).choices[0].logprobs.tokens
    assert len(set(plain)) < len(plain)  # the random model repeats itself under greedy decoding
    for penalty in ("frequency_penalty", "presence_penalty"):
        tokens = greedy(client, max_tokens=16, logprobs=0, **{penalty: 2.0}).choices[0].logprobs.tokens
        assert len(set(tokens)) == len(tokens), penalty  # any repeat costs 2 nats: none is chosen
    x = byte_token(tok, ord("x"))
    forced = greedy(client, max_tokens=5, logit_bias={str(x): 100})
    assert forced.choices[0].text == "xxxxx"


def test_stop_string_on_text(client):
    text = greedy(client, max_tokens=16).choices[0].text
    cut = next(i for i in range(3, len(text)) if text[i] != " ")  # a stop inside the text, not at 0
    stopped = greedy(client, max_tokens=16, stop=[text[cut : cut + 2]])
    assert stopped.choices[0].text == text[: text.index(text[cut : cut + 2])]
    assert stopped.choices[0].finish_reason == "stop"


def test_streamed_completion_equals_whole_with_usage(client):
    kw = dict(model=MODEL, prompt=[PROMPT, "Hello"], max_tokens=10, temperature=0.9, seed=3, n=2)
    whole = client.completions.create(**kw)
    parts: dict[int, str] = {}
    finish, usage = {}, None
    for chunk in client.completions.create(stream=True, stream_options={"include_usage": True}, **kw):
        if chunk.usage is not None:
            assert chunk.choices == []
            usage = chunk.usage
        for c in chunk.choices:
            parts[c.index] = parts.get(c.index, "") + c.text
            if c.finish_reason:
                finish[c.index] = c.finish_reason
    assert [parts[i] for i in range(4)] == [c.text for c in whole.choices]
    assert finish == {i: "length" for i in range(4)}
    assert usage.completion_tokens == 40 and usage.prompt_tokens == whole.usage.prompt_tokens


def test_multibyte_characters_split_across_tokens_never_split_in_a_chunk(client, tok):
    # Force the three single-byte tokens of "日" (e6 97 a5) in turn: biases 100 > 99.5 > 99 and a
    # frequency penalty of 2 make the greedy choice cycle e6, 97, a5, e6, ... whatever the model says.
    ids = [byte_token(tok, b) for b in "日".encode()]
    kw = dict(
        model=MODEL,
        prompt=PROMPT,
        max_tokens=6,
        temperature=0.0,
        frequency_penalty=2.0,
        logit_bias={str(t): b for t, b in zip(ids, (100, 99.5, 99), strict=True)},
    )
    whole = client.completions.create(logprobs=0, **kw).choices[0]
    assert whole.text == "日日"
    assert whole.logprobs.tokens[:3] == ["bytes:\\xe6", "bytes:\\x97", "bytes:\\xa5"]  # partial UTF-8, as OpenAI
    chunks = [c.choices[0].text for c in client.completions.create(stream=True, **kw) if c.choices]
    assert "".join(chunks) == "日日" and "\ufffd" not in "".join(chunks)
    assert all(c in ("", "日") for c in chunks)  # a character arrives whole or not at all


# -- chat --------------------------------------------------------------------------------------------


def test_chat_through_the_template(client, tok):
    r = client.chat.completions.create(model=MODEL, messages=CHAT, max_completion_tokens=6, temperature=0.0)
    msg = r.choices[0].message
    assert r.object == "chat.completion" and msg.role == "assistant" and isinstance(msg.content, str)
    templated = tok.hf.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
    assert r.usage.prompt_tokens == len(tok.encode(templated)) and r.usage.completion_tokens <= 6
    legacy = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=6, temperature=0.0)
    assert legacy.choices[0].message.content == msg.content
    parts = [{"role": "user", "content": [{"type": "text", "text": "Name a "}, {"type": "text", "text": "colour."}]}]
    joined = client.chat.completions.create(model=MODEL, messages=parts, max_completion_tokens=6, temperature=0.0)
    plain = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Name a colour."}], max_completion_tokens=6, temperature=0.0
    )
    assert joined.choices[0].message.content == plain.choices[0].message.content


def test_chat_n_logprobs_and_eos(client, tok):
    r = client.chat.completions.create(
        model=MODEL,
        messages=CHAT,
        n=2,
        seed=11,
        temperature=1.0,
        max_completion_tokens=6,
        logprobs=True,
        top_logprobs=2,
    )
    assert [c.index for c in r.choices] == [0, 1]
    for c in r.choices:
        content = c.logprobs.content
        # a token's bytes may be part of a character ("bytes:\\xed"); together they make the text
        assert bytes(b for t in content for b in t.bytes).decode(errors="replace") == c.message.content
        assert all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in content)
        assert all(t.bytes == list(t.token.encode()) for t in content if not t.token.startswith("bytes:"))
    eos = client.chat.completions.create(
        model=MODEL, messages=CHAT, temperature=0.0, max_completion_tokens=6, logit_bias={"2": 100}
    )
    # <|im_end|> (id 2, the tokenizer's EOS) ends the turn at once and is not part of the text
    assert eos.choices[0].finish_reason == "stop" and eos.choices[0].message.content == ""
    assert eos.usage.completion_tokens == 1


def test_streamed_chat_equals_whole(client):
    kw = dict(model=MODEL, messages=CHAT, temperature=0.8, seed=5, max_completion_tokens=8)
    whole = client.chat.completions.create(**kw).choices[0]
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 8
    assert len({c.id for c in chunks}) == 1 and chunks[0].object == "chat.completion.chunk"


# -- errors ------------------------------------------------------------------------------------------

UNSUPPORTED = [
    ("completions", {"suffix": "x"}, "suffix"),
    ("chat", {"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tools"),
    ("chat", {"tool_choice": "auto"}, "tool_choice"),
    ("chat", {"response_format": {"type": "json_object"}}, "response_format"),
    ("chat", {"parallel_tool_calls": False}, "parallel_tool_calls"),
    ("chat", {"extra_body": {"reasoning_effort": "low"}}, "reasoning_effort"),
    ("chat", {"extra_body": {"functions": []}}, "functions"),
]


@pytest.mark.parametrize(("api", "extra", "param"), UNSUPPORTED, ids=[u[2] for u in UNSUPPORTED])
def test_unsupported_parameter_is_a_400_naming_it(client, api, extra, param):
    with pytest.raises(openai.BadRequestError) as e:
        if api == "completions":
            client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2, **extra)
        else:
            client.chat.completions.create(model=MODEL, messages=CHAT, max_completion_tokens=2, **extra)
    assert e.value.param == param and param in e.value.message
    assert greedy(client, max_tokens=2).choices[0].text  # the server still answers


def test_bad_values_name_the_field(client, tok):
    cases = [
        (dict(prompt=[tok.vocab_size + 5]), "prompt"),
        (dict(logit_bias={str(tok.vocab_size): 1}), "logit_bias"),
        (dict(logprobs=9), "logprobs"),
        (dict(n=0), "n"),
    ]
    for kw, param in cases:
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(model=MODEL, **{"prompt": PROMPT, "max_tokens": 2, **kw})
        assert e.value.param == param, (kw, e.value.message)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=CHAT, logprobs=False, top_logprobs=2)
    assert e.value.param == "top_logprobs"
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="gpt-4", prompt=PROMPT)
    assert e.value.param == "model"


def test_404_and_405_in_openais_error_shape(chat_url):
    for method, path, status in (("GET", "/v1/nothing", 404), ("GET", "/v1/completions", 405)):
        r = requests.request(method, f"{chat_url}{path}", timeout=30)
        assert r.status_code == status
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and path in err["message"]


# -- a real model ------------------------------------------------------------------------------------


def test_smollm2_answers_a_factual_question(smollm2_url):
    c = openai.OpenAI(base_url=f"{smollm2_url}/v1", api_key="unused", max_retries=0, timeout=300)
    q = [{"role": "user", "content": "What is the capital of France?"}]
    chat = c.chat.completions.create(model="smollm2", messages=q, temperature=0.0, max_completion_tokens=16)
    assert "Paris" in chat.choices[0].message.content, chat.choices[0].message.content
    assert chat.choices[0].finish_reason == "stop"  # <|im_end|> ended the turn; it is not in the text
    assert "<|im_end|>" not in chat.choices[0].message.content
    done = c.completions.create(model="smollm2", prompt="The capital of France is", temperature=0.0, max_tokens=4)
    assert done.choices[0].text.strip().startswith("Paris"), done.choices[0].text
