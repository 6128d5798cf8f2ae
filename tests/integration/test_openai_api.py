"""The OpenAI-compatible API (``/openai/v1``) through the official ``openai`` client, on the
real stack: completions, chat, streaming (tokens arrive as they are sampled), n > 1, stop,
logprobs, a run's live weights, checkpoints and tinker paths, bad input, a client that goes
away, and equality with ``/v1/sample`` for the same seed.
"""

from __future__ import annotations

import json
import shutil
import time
from typing import Any

import httpx
import openai
import pytest
import redis

from eztinker_tasks import catalog, token_stream
from eztinker_web.openai.chat import render
from tests.conftest import Service, result_of, wait_future

SENTENCE = "The river ran slowly past the old mill."


@pytest.fixture(scope="module")
def client(service: Service) -> openai.OpenAI:
    return openai.OpenAI(base_url=service.base_url + "/openai/v1", api_key="unused", max_retries=0)


def v1_sample(http: httpx.Client, **body: Any) -> dict[str, Any]:
    return result_of(http, http.post("/v1/sample", json=body))


@pytest.fixture(scope="module")
def trained(service: Service, run_id: str) -> tuple[str, str]:
    """The module's run trained on SENTENCE, and a checkpoint of it: (run_id, checkpoint)."""
    with service.http as http:
        tokens = http.post("/v1/tokenize", json={"text": SENTENCE}).json()["tokens"]
        for _ in range(12):
            body = {"input_ids": tokens, "target_ids": tokens}
            http.post(f"/v1/runs/{run_id}/forward_backward", json=body)
            http.post(f"/v1/runs/{run_id}/optim_step", json={"learning_rate": 3e-3})
        saved = result_of(http, http.post(f"/v1/runs/{run_id}/save", json={"name": "oai"}))
        return run_id, saved["path"]


def test_models_lists_bases_runs_and_checkpoints(client: openai.OpenAI, trained) -> None:
    run_id, checkpoint = trained
    ids = {m.id for m in client.models.list()}
    assert {"tiny-gpt2", "tiny-llama", f"run:{run_id}", checkpoint} <= ids
    assert any(i.startswith("tinker://") for i in ids)
    assert client.models.retrieve(f"run:{run_id}").id == f"run:{run_id}"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("run:nope")


@pytest.mark.parametrize("temperature", [0.0, 1.3])
def test_completion_equals_v1_sample(
    client: openai.OpenAI, http: httpx.Client, temperature
) -> None:
    out = client.completions.create(
        model="tiny-gpt2", prompt="Once upon a time", max_tokens=20, temperature=temperature,
        seed=11, n=3, logprobs=2,
    )  # fmt: skip
    ref = v1_sample(
        http, base_model="tiny-gpt2", prompt="Once upon a time", max_tokens=20,
        temperature=temperature, seed=11, num_samples=3,
    )  # fmt: skip
    assert len(out.choices) == 3
    for choice, seq in zip(out.choices, ref["sequences"], strict=True):
        assert choice.text == seq["text"]
        assert choice.logprobs is not None
        assert choice.logprobs.token_logprobs == pytest.approx(seq["logprobs"])
        assert choice.finish_reason == ("stop" if seq["stop_reason"] == "stop" else "length")
        tops = choice.logprobs.top_logprobs
        # keyed by token text: two partial UTF-8 tokens both show as U+FFFD and share a key
        assert tops is not None and all(1 <= len(t) <= 2 for t in tops)
        for top, lp in zip(tops, seq["logprobs"], strict=True):
            assert max(top.values()) >= lp - 1e-5
    assert out.usage is not None
    assert out.usage.prompt_tokens == len(ref["prompt_tokens"])
    assert out.usage.completion_tokens == sum(len(s["tokens"]) for s in ref["sequences"])


def test_chat_uses_the_chat_template(client: openai.OpenAI, http: httpx.Client, service) -> None:
    messages: list[Any] = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Tell me about the river."},
    ]
    out = client.chat.completions.create(
        model="tiny-llama", messages=messages, max_tokens=15, seed=3, logprobs=True,
        top_logprobs=3,
    )  # fmt: skip
    prompt = render("tiny-llama", service.data_dir, messages)
    assert prompt == (
        "<|system|>\nYou are terse.<|endoftext|>\n<|user|>\nTell me about the river."
        "<|endoftext|>\n<|assistant|>\n"
    )
    ref = v1_sample(http, base_model="tiny-llama", prompt=prompt, max_tokens=15, seed=3)
    choice = out.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == ref["sequences"][0]["text"]
    assert choice.logprobs is not None and choice.logprobs.content is not None
    lps = [c.logprob for c in choice.logprobs.content]
    assert lps == pytest.approx(ref["sequences"][0]["logprobs"])
    assert all(len(c.top_logprobs) == 3 for c in choice.logprobs.content)
    assert out.object == "chat.completion"


def test_stop_strings_cut_the_text(client: openai.OpenAI) -> None:
    free = client.completions.create(model="tiny-gpt2", prompt="The", max_tokens=30, temperature=0)
    text = free.choices[0].text
    stop = text[8:10]  # something it says, not at the very start
    assert stop and stop.strip()
    cut = client.completions.create(
        model="tiny-gpt2", prompt="The", max_tokens=30, temperature=0, stop=[stop, "zzzz"]
    )
    assert cut.choices[0].text == text[: text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_streaming_sends_tokens_as_they_are_sampled(client: openai.OpenAI) -> None:
    kw: dict[str, Any] = {"model": "tiny-gpt2", "prompt": "Once", "max_tokens": 400, "seed": 7}
    whole = client.completions.create(**kw)
    assert whole.choices[0].finish_reason == "length"  # this seed never samples EOS
    arrivals: list[tuple[float, str]] = []
    finish = None
    start = time.monotonic()
    for chunk in client.completions.create(**kw, stream=True):
        for choice in chunk.choices:
            arrivals.append((time.monotonic() - start, choice.text))
            finish = choice.finish_reason or finish
    assert "".join(text for _, text in arrivals) == whole.choices[0].text
    assert finish == "length"
    with_text = [t for t, text in arrivals if text]
    end = arrivals[-1][0]
    # Many pieces, at many distinct times, most of them well before the end.
    assert len(with_text) >= 10
    assert len({round(t, 3) for t in with_text}) >= 10
    assert with_text[0] < end / 2
    assert sum(1 for t in with_text if t < end - 0.05) >= 5


def test_chat_streaming_n_and_usage(client: openai.OpenAI) -> None:
    kw: dict[str, Any] = {
        "model": "tiny-gpt2", "messages": [{"role": "user", "content": "Hi"}], "n": 2,
        "max_tokens": 25, "seed": 5, "temperature": 1.2,
    }  # fmt: skip
    whole = client.chat.completions.create(**kw)
    texts = ["", ""]
    roles, finishes, usage = set(), {}, None
    for chunk in client.chat.completions.create(
        **kw, stream=True, stream_options={"include_usage": True}
    ):
        assert chunk.object == "chat.completion.chunk"
        usage = chunk.usage or usage
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
            roles.add(choice.delta.role)
            if choice.finish_reason:
                finishes[choice.index] = choice.finish_reason
    assert texts == [c.message.content for c in whole.choices]
    assert texts[0] != texts[1]
    assert "assistant" in roles and set(finishes) == {0, 1}
    assert usage is not None and whole.usage is not None
    assert usage.completion_tokens == whole.usage.completion_tokens


def test_streamed_logprobs_equal_the_whole(client: openai.OpenAI) -> None:
    kw: dict[str, Any] = {
        "model": "tiny-gpt2", "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": 20, "seed": 2, "logprobs": True, "top_logprobs": 2,
    }  # fmt: skip
    whole = client.chat.completions.create(**kw)
    streamed = []
    for chunk in client.chat.completions.create(**kw, stream=True):
        for choice in chunk.choices:
            if choice.logprobs and choice.logprobs.content:
                streamed += choice.logprobs.content
    assert whole.choices[0].logprobs is not None
    want = whole.choices[0].logprobs.content or []
    assert [(c.token, c.logprob) for c in streamed] == [(c.token, c.logprob) for c in want]


def test_live_weights_checkpoints_and_tinker_paths(
    client: openai.OpenAI, http: httpx.Client, trained
) -> None:
    run_id, checkpoint = trained
    live = client.completions.create(
        model=f"run:{run_id}", prompt="The river", max_tokens=12, temperature=0
    )
    ref = v1_sample(http, run_id=run_id, prompt="The river", max_tokens=12, temperature=0)
    assert live.choices[0].text == ref["sequences"][0]["text"]
    assert live.choices[0].text.startswith(" ran slowly")  # it learnt the sentence
    saved = client.completions.create(
        model=checkpoint, prompt="The river", max_tokens=12, temperature=0
    )
    assert saved.choices[0].text == live.choices[0].text
    tinker_path = f"tinker://{run_id}/weights/oai"
    via_tinker = client.completions.create(
        model=tinker_path, prompt="The river", max_tokens=12, temperature=0
    )
    assert via_tinker.choices[0].text == live.choices[0].text
    base = client.completions.create(
        model="tiny-gpt2", prompt="The river", max_tokens=12, temperature=0
    )
    assert base.choices[0].text != live.choices[0].text


def test_a_model_no_worker_has_loaded_yet(
    client: openai.OpenAI, http: httpx.Client, service: Service, tmp_path
) -> None:
    """A local model the web has no tokenizer for yet: a completion's text is tokenized by the
    worker (as ``/v1/sample`` does); chat needs the template, so it asks to load it first
    (409), and works once a worker has."""
    local = tmp_path / "fresh-model"
    shutil.copytree(catalog.model_dir("tiny-llama", service.data_dir), local)
    messages: list[Any] = [{"role": "user", "content": "Hi"}]
    with pytest.raises(openai.ConflictError, match="not here yet"):
        client.with_options(max_retries=0).chat.completions.create(
            model=str(local), messages=messages, max_tokens=4
        )
    out = client.completions.create(model=str(local), prompt="Once", max_tokens=6, seed=1)
    ref = v1_sample(http, base_model="tiny-llama", prompt="Once", max_tokens=6, seed=1)
    assert out.choices[0].text == ref["sequences"][0]["text"]  # the same weights
    assert out.usage is not None and out.usage.prompt_tokens == len(ref["prompt_tokens"])
    chat = client.chat.completions.create(model=str(local), messages=messages, max_tokens=4)
    assert chat.choices[0].message.role == "assistant"


def test_live_weights_are_a_snapshot_at_the_request(
    client: openai.OpenAI, http: httpx.Client
) -> None:
    """``run:<id>`` samples the weights every operation submitted before it made: it waits
    behind them in the run's queue, exactly as ``/v1/sample`` submitted at that point does."""
    created = http.post("/v1/runs", json={"base_model": "tiny-gpt2", "rank": 8})
    run_id = result_of(http, created) and created.json()["run_id"]
    tokens = http.post("/v1/tokenize", json={"text": SENTENCE}).json()["tokens"]
    ask: dict[str, Any] = {"prompt": "The river", "max_tokens": 8, "temperature": 0}
    before = client.completions.create(model=f"run:{run_id}", **ask)
    body = {"input_ids": tokens, "target_ids": tokens}
    for _ in range(8):  # queued, not awaited
        http.post(f"/v1/runs/{run_id}/forward_backward", json=body)
        http.post(f"/v1/runs/{run_id}/optim_step", json={"learning_rate": 3e-3})
    queued = http.post("/v1/sample", json={"run_id": run_id, **ask})
    after = client.completions.create(model=f"run:{run_id}", **ask)
    assert after.choices[0].text == result_of(http, queued)["sequences"][0]["text"]
    assert after.choices[0].text != before.choices[0].text


@pytest.mark.parametrize(
    ("kwargs", "error", "param"),
    [
        ({"model": "no-such-model"}, openai.NotFoundError, "model"),
        ({"model": "run:nope"}, openai.NotFoundError, "model"),
        ({"model": "nope/ckpt"}, openai.NotFoundError, "model"),
        ({"temperature": 5}, openai.BadRequestError, "temperature"),
        ({"n": 0}, openai.BadRequestError, "n"),
        ({"top_p": 0}, openai.BadRequestError, "top_p"),
        ({"max_tokens": 5000}, openai.BadRequestError, "max_tokens"),  # over the context
        ({"logprobs": 50}, openai.BadRequestError, "logprobs"),
        ({"echo": True}, openai.BadRequestError, "echo"),
        ({"presence_penalty": 1.0}, openai.BadRequestError, "presence_penalty"),
        ({"stop": ["a", "b", "c", "d", "e"]}, openai.BadRequestError, "stop"),
        ({"extra_body": {"bogus": 1}}, openai.BadRequestError, "bogus"),
        ({"prompt": ""}, openai.BadRequestError, "prompt"),
        ({"prompt": [1, 99999]}, openai.BadRequestError, None),
        ({"stream": True, "model": "no-such-model"}, openai.NotFoundError, "model"),
    ],
)
def test_bad_completions_get_openai_errors(client: openai.OpenAI, kwargs, error, param) -> None:
    body: dict[str, Any] = {"model": "tiny-gpt2", "prompt": "Hi", "max_tokens": 4, **kwargs}
    with pytest.raises(error) as caught:
        client.completions.create(**body)
    assert isinstance(caught.value.body, dict)
    assert set(caught.value.body) >= {"message", "type", "param", "code"}
    assert caught.value.body["message"]
    if param is not None:
        assert caught.value.body["param"] == param


def test_bad_chat_and_raw_errors(client: openai.OpenAI, service: Service) -> None:
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny-gpt2", messages=[])
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(
            model="tiny-gpt2", messages=[{"role": "user", "content": "x"}], top_logprobs=2
        )
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(
            model="tiny-gpt2",
            messages=[{"role": "user", "content": "x"}],
            tools=[{"type": "function", "function": {"name": "f"}}],
        )
    raw = httpx.post(service.base_url + "/openai/v1/completions", content=b"{not json",
                     headers={"content-type": "application/json"})  # fmt: skip
    assert raw.status_code == 400 and raw.json()["error"]["type"] == "invalid_request_error"
    missing = httpx.get(service.base_url + "/openai/v1/nothing-here")
    assert missing.status_code == 404 and set(missing.json()["error"]) == {
        "message", "type", "param", "code",
    }  # fmt: skip
    # our own /v1 envelope is unchanged
    ours = httpx.post(service.base_url + "/v1/sample", json={"prompt": "x", "top_p": 0})
    assert ours.status_code == 422 and ours.json()["code"] == "invalid_request"


def test_a_client_that_goes_away_stops_the_generation(service: Service, http: httpx.Client) -> None:
    body = {"model": "tiny-gpt2", "prompt": "Once", "max_tokens": 1000, "seed": 1, "stream": True}
    url = service.base_url + "/openai/v1/completions"
    with httpx.Client(timeout=30) as raw, raw.stream("POST", url, json=body) as response:
        assert response.status_code == 200
        lines = response.iter_lines()
        first = next(line for line in lines if line.startswith("data: {"))
    # the response is closed: the connection is gone
    future_id = "fut_" + first.split('"id":"cmpl-', 1)[1].split('"', 1)[0]
    ended = wait_future(http, future_id, timeout=60)
    assert ended["status"] == "failed" and ended["error"]["code"] == "cancelled"
    entries: Any = redis.Redis.from_url(service.redis_url).xrange(
        token_stream.stream_key(future_id)
    )
    steps = [step for _, fields in entries if b"s" in fields for step in json.loads(fields[b"s"])]
    assert 1 <= len(steps) < 1000  # it stopped early: fewer decode steps than max_tokens
    assert [s["i"] for s in steps] == list(range(len(steps)))


# Parameters OpenAI's API declares nullable: clients built from typed request objects
# (LangChain, LiteLLM, generated SDKs) send every one of them, unset ones as an explicit null.
NULLABLE_COMMON = (
    "n", "temperature", "top_p", "stop", "seed", "stream", "stream_options", "max_tokens",
    "presence_penalty", "frequency_penalty", "logit_bias", "user", "logprobs",
)  # fmt: skip
NULLABLE_CHAT = (
    "top_logprobs", "max_completion_tokens", "tools", "tool_choice", "functions",
    "function_call", "parallel_tool_calls", "response_format", "metadata", "store",
    "service_tier", "modalities", "reasoning_effort", "prediction", "audio",
    "web_search_options", "prompt_cache_key", "safety_identifier", "verbosity",
)  # fmt: skip
NULLABLE_COMPLETIONS = ("echo", "suffix", "best_of")


@pytest.mark.parametrize("param", NULLABLE_COMMON + NULLABLE_COMPLETIONS)
def test_completions_take_an_explicit_null_as_the_default(service: Service, param: str) -> None:
    body = {"model": "tiny-gpt2", "prompt": "Once", "max_tokens": 3, "seed": 5, param: None}
    got = httpx.post(service.base_url + "/openai/v1/completions", json=body, timeout=60)
    assert got.status_code == 200, got.text
    assert got.json()["object"] == "text_completion"
    if param not in ("seed", "max_tokens"):  # the same request without it: the same text
        without = {k: v for k, v in body.items() if k != param}
        ref = httpx.post(service.base_url + "/openai/v1/completions", json=without, timeout=60)
        assert got.json()["choices"] == ref.json()["choices"]


@pytest.mark.parametrize("param", NULLABLE_COMMON + NULLABLE_CHAT)
def test_chat_takes_an_explicit_null_as_the_default(service: Service, param: str) -> None:
    body = {
        "model": "tiny-gpt2", "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": 3, param: None,
    }  # fmt: skip
    if param == "logprobs":
        body["logprobs"] = None
    got = httpx.post(service.base_url + "/openai/v1/chat/completions", json=body, timeout=60)
    assert got.status_code == 200, got.text
    assert got.json()["object"] == "chat.completion"


def test_null_is_still_refused_where_it_means_nothing(service: Service) -> None:
    url = service.base_url + "/openai/v1/"
    no_content = [{"role": "user", "content": None}]
    cases = [
        ("completions", {"model": "tiny-gpt2", "prompt": None}, "prompt"),
        ("completions", {"model": None, "prompt": "x"}, "model"),
        ("completions", {"model": "tiny-gpt2", "prompt": "x", "top_k": None}, "top_k"),
        ("chat/completions", {"model": "tiny-gpt2", "messages": None}, "messages"),
        ("chat/completions", {"model": "tiny-gpt2", "messages": [{"role": "user"}]}, "messages"),
        ("chat/completions", {"model": "tiny-gpt2", "messages": no_content}, "messages[0].content"),
        ("chat/completions", {"model": "tiny-gpt2", "messages": [{"role": "user", "content": "x"}],
                              "reasoning_effort": "low"}, "reasoning_effort"),
        ("chat/completions", {"model": "tiny-gpt2", "messages": [{"role": "user", "content": "x"}],
                              "modalities": ["audio"]}, "modalities"),
    ]  # fmt: skip
    for path, body, param in cases:
        got = httpx.post(url + path, json=body, timeout=60)
        assert got.status_code == 400, (body, got.text)
        assert got.json()["error"]["param"] == param, (body, got.text)


def test_an_assistant_turn_without_content(client: openai.OpenAI) -> None:
    """A history replayed from an earlier answer may carry ``content: null`` (OpenAI's own
    responses do, for a refusal or a tool call); it is an empty turn."""
    messages: Any = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": None},
        {"role": "user", "content": "Again"},
    ]
    with_null = client.chat.completions.create(
        model="tiny-gpt2", messages=messages, max_tokens=4, seed=3
    )
    messages[1]["content"] = ""
    empty = client.chat.completions.create(
        model="tiny-gpt2", messages=messages, max_tokens=4, seed=3
    )
    assert with_null.choices[0].message.content == empty.choices[0].message.content
    assert with_null.usage == empty.usage


@pytest.mark.parametrize("stream", [False, True])
def test_over_the_context_says_so_as_openai_does(client: openai.OpenAI, stream: bool) -> None:
    """tiny-gpt2's context is 1024: OpenAI's ``context_length_exceeded``, with the counts, and
    the parameter to shorten (the prompt when it alone is too long, else ``max_tokens``)."""
    cases: list[tuple[dict[str, Any], str, str]] = [
        ({"prompt": [5], "max_tokens": 3000}, "max_tokens", "1 in the prompt, 3000 in the"),
        ({"prompt": "word " * 2000, "max_tokens": 4}, "prompt", "in the prompt, 4 in the"),
        ({"prompt": [5] * 1030, "max_tokens": 4}, "prompt", "1030 in the prompt, 4 in the"),
    ]
    for body, param, counts in cases:
        with pytest.raises(openai.BadRequestError) as caught:
            client.completions.create(model="tiny-gpt2", stream=stream, **body)
        error: Any = caught.value.body
        assert (error["code"], error["param"]) == ("context_length_exceeded", param), error
        assert "maximum context length is 1024 tokens" in error["message"], error
        assert counts in error["message"], error
    long_chat: Any = [{"role": "user", "content": "word " * 2000}]
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="tiny-gpt2", messages=long_chat, stream=stream)
    chat_error: Any = caught.value.body
    assert (chat_error["code"], chat_error["param"]) == ("context_length_exceeded", "messages")
    assert "in the messages" in chat_error["message"], chat_error
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model="tiny-gpt2", messages=[{"role": "user", "content": "Hi"}], max_tokens=2000,
            stream=stream,
        )  # fmt: skip
    tokens_error: Any = caught.value.body
    assert (tokens_error["code"], tokens_error["param"]) == (
        "context_length_exceeded",
        "max_tokens",
    )
    # a completion that fits to the last position is served
    fits = client.completions.create(model="tiny-gpt2", prompt=[5] * 1020, max_tokens=4)
    assert fits.usage is not None and fits.usage.prompt_tokens == 1020
