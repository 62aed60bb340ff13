"""`phiedge serve` on the session build: real servers on 127.0.0.1, started and stopped here, driven by the official
`openai` client (raw HTTP only where the SDK cannot send what is tested: malformed JSON, a 1 MiB body)."""
from __future__ import annotations

import json
import os
import re
import shutil
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import jsonschema
import pytest

from conftest import DEMO, run_cli
from phiedge import device, rag, tools
from phiedge.serve import free_port, running

openai = pytest.importorskip("openai")
pytestmark = pytest.mark.gguf

KEY = "test-key"
QUESTION = DEMO["question"]
ONE = [{"role": "user", "content": QUESTION}]


@contextmanager
def serving(bundle: Path, *args: str):
    """`phiedge serve` in a child process on a free loopback port, until its default model is loaded; stopped after."""
    port = free_port()
    exe = Path(sys.executable).with_name("phiedge")
    with running([str(exe), "serve", str(bundle), "--port", str(port), "--threads", "1", *args],
                 f"http://127.0.0.1:{port}/health"):
        yield f"http://127.0.0.1:{port}"


def client(base: str, key: str | None = KEY) -> "openai.OpenAI":
    return openai.OpenAI(base_url=f"{base}/v1", api_key=key or "unused", max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def server(session):
    """The session bundle served with an API key, llama.cpp's F32 artifact the default model."""
    with serving(session.bundle, "--runtime", "gguf-F32", "--api-key", KEY) as base:
        yield base


def _stream(c, **kw) -> tuple[str, list]:
    chunks = list(c.chat.completions.create(stream=True, **kw))
    return "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices), chunks


def test_answers_streamed_and_whole_equal_ask_with_sources(server, session):
    c = client(server)
    whole = c.chat.completions.create(model="gguf-F32", messages=ONE, max_tokens=16)
    text, chunks = _stream(c, model="gguf-F32", messages=ONE, max_tokens=16, stream_options={"include_usage": True})
    asked = device.ask(session.bundle, QUESTION, runtime="gguf-F32", max_new_tokens=16, threads=1)
    assert whole.choices[0].message.content == text == asked.text and text
    assert whole.choices[0].finish_reason == asked.finish_reason
    sources = [s["source"] for s in whole.model_extra["sources"]]
    assert sources == [re.match(r"\[\d+\] (\S+)", s).group(1) for s in asked.sources] and len(sources) == 3
    final = next(ch for ch in chunks if ch.choices and ch.choices[0].finish_reason)
    assert final.model_extra["sources"] == whole.model_extra["sources"]
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens == asked.prompt_tokens
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens == asked.completion_tokens
    assert sum(1 for ch in chunks if ch.choices and ch.choices[0].delta.content) > 1      # streamed in pieces
    none = c.chat.completions.create(model="gguf-F32", messages=ONE, max_tokens=4, extra_body={"rag": {"k": 0}})
    assert none.model_extra["sources"] == [] and none.usage.prompt_tokens < whole.usage.prompt_tokens


def test_a_tool_call_and_a_tool_result_turn(server, session):
    """Phi-4-mini's <|tool_call|> answer as OpenAI tool_calls (arguments a JSON string, finish_reason tool_calls),
    streamed as one checked chunk too; the assistant's call and the tool's result rendered back in Phi-4-mini's
    format: the prompt is the one phiedge renders for that conversation."""
    import phiedge
    c = client(server)
    fn = [{"type": "function", "function": tools.SMOKE_TOOLS[0]}]
    ask = [{"role": "user", "content": tools.SMOKE_QUESTION}]
    opts = dict(model="gguf-F32", tools=fn, max_tokens=tools.SMOKE_TOKENS, extra_body={"rag": {"k": 0}})
    r = c.chat.completions.create(messages=ask, **opts)
    call = r.choices[0].message.tool_calls[0]
    want = json.loads(session.row("gguf", "F32")["toolcall"]["call"])[0]
    assert r.choices[0].finish_reason == "tool_calls" and r.choices[0].message.content is None
    assert call.function.name == want["name"] and json.loads(call.function.arguments) == want["arguments"]
    streamed = [ch for ch in c.chat.completions.create(messages=ask, stream=True, **opts) if ch.choices]
    calls = [ch for ch in streamed if ch.choices[0].delta.tool_calls]
    assert len(calls) == 1 and calls[0].choices[0].finish_reason == "tool_calls"
    assert calls[0].choices[0].delta.tool_calls[0].function.arguments == call.function.arguments
    turn = [*ask, {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
            {"role": "tool", "tool_call_id": call.id, "content": '{"temperature_c": 21}'}]
    after = c.chat.completions.create(messages=turn, **opts)
    assert after.choices[0].finish_reason in ("stop", "length", "tool_calls")
    written = [{"name": call.function.name, "arguments": json.loads(call.function.arguments)}]
    rendered = [*ask, {"role": "assistant", "content": f"{tools.CALL_OPEN}{json.dumps(written)}{tools.CALL_CLOSE}"},
                {"role": "tool", "content": '{"temperature_c": 21}'}]
    with phiedge.open(session.bundle, runtime="gguf-F32", threads=1) as s:
        ids = s.runtime().chat_ids(rag.conversation(rendered, [], tools=tools.normalize(fn)))
    assert after.usage.prompt_tokens == len(ids) > r.usage.prompt_tokens


SCHEMA = {"type": "object", "properties": {"answer": {"type": "string", "maxLength": 24},
                                           "confidence": {"type": "integer", "minimum": 0, "maximum": 10}},
          "required": ["answer", "confidence"], "additionalProperties": False}


def test_a_json_schema_answer_validates(server):
    c = client(server)
    r = c.chat.completions.create(model="gguf-F32", messages=ONE, max_tokens=64, response_format={
        "type": "json_schema", "json_schema": {"name": "answer", "schema": SCHEMA}})
    jsonschema.validate(json.loads(r.choices[0].message.content), SCHEMA)
    assert r.choices[0].finish_reason == "stop" and "phiedge_problems" not in r.model_extra


def test_embeddings_and_retrieval_are_the_retrievers(server, session):
    from phiedge.retriever import Retriever
    c = client(server)
    texts = ["the with statement", "a pass statement does nothing"]
    got = c.embeddings.create(model="retriever", input=texts)                 # the SDK asks for base64
    floats = c.embeddings.create(model="retriever", input=texts[0], encoding_format="float")
    hits = httpx.post(f"{server}/v1/retrieve", json={"query": QUESTION, "k": 2},
                      headers={"Authorization": f"Bearer {KEY}"}).json()["data"]
    with Retriever.open(session.bundle / "retriever") as r:
        want = r.embedder.embed(texts)
        search = r.search(QUESTION, k=2)
    assert [len(d.embedding) for d in got.data] == [want.shape[1]] * 2
    assert max(abs(a - b) for d, w in zip(got.data, want) for a, b in zip(d.embedding, w)) < 1e-6
    assert max(abs(a - b) for a, b in zip(floats.data[0].embedding, want[0])) < 1e-6
    assert [(h["source"], h["text"]) for h in hits] == [(h.source, h.text) for h in search]


def test_every_error_is_openai_shaped(server):
    c = client(server)
    auth = {"Authorization": f"Bearer {KEY}"}
    url = f"{server}/v1/chat/completions"
    raw = [
        (httpx.post(url, content=b"{not json", headers=auth), 400, "not JSON"),
        (httpx.post(url, json={"model": "gguf-F32", "messages": ONE, "temperature": "hot"}, headers=auth), 400,
         "`temperature`"),
        (httpx.post(url, json={"model": "gguf-F32", "messages": [{"role": "wizard", "content": "hi"}]}, headers=auth),
         400, "role must be one of"),
        (httpx.post(url, json={"model": "gguf-F32", "messages": ONE, "tools": [{"type": "function", "function": {}}]},
                    headers=auth), 400, "has no name"),
        (httpx.post(url, json={"model": "gguf-F32", "messages": ONE, "response_format": {
            "type": "json_schema", "json_schema": {"schema": {"type": "array", "uniqueItems": True}}}},
            headers=auth), 400, "uniqueItems"),
        (httpx.post(url, json={"model": "gguf-F32", "messages": [{"role": "user", "content": "word " * 6000}],
                               "rag": {"k": 0}}, headers=auth), 400, "the target's context is 4096"),
        (httpx.post(url, json={"model": "gguf-F32", "messages": ONE}), 401, "API key"),
        (httpx.post(url, json={"model": "gguf-F32", "messages": ONE},
                    headers={"Authorization": "Bearer wrong"}), 401, "API key"),
        (httpx.post(url, json={"model": "nope", "messages": ONE}, headers=auth), 404, "model 'nope' does not exist"),
        (httpx.post(url, content=b"x" * ((1 << 20) + 1), headers=auth), 413, "over"),
    ]
    for r, status, says in raw:
        body = r.json()
        assert r.status_code == status and says in body["error"]["message"], (status, body)
        assert set(body["error"]) == {"message", "type", "param", "code"} and "Traceback" not in r.text
    with pytest.raises(openai.NotFoundError):
        c.chat.completions.create(model="nope", messages=ONE)
    with pytest.raises(openai.AuthenticationError):
        client(server, "wrong").models.list()
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        c.chat.completions.create(model="gguf-F32", messages=ONE, max_tokens=0)


def test_eight_concurrent_streams_complete_with_the_sequential_text(server):
    c = client(server)
    alone = c.chat.completions.create(model="gguf-F32", messages=ONE, max_tokens=12).choices[0].message.content
    with ThreadPoolExecutor(8) as pool:
        texts = list(pool.map(lambda _: _stream(c, model="gguf-F32", messages=ONE, max_tokens=12)[0], range(8)))
    assert texts == [alone] * 8


def test_models_are_listed_and_metrics_count_requests(server, session):
    c = client(server)
    ids = [m.id for m in c.models.list().data]
    assert ids[:len(session.report["artifacts"])] == [a["path"] for a in session.report["artifacts"]]
    assert "lora" in ids and ids[-1] == "retriever"           # the adapter's name: an alias of its first model
    c.chat.completions.create(model="lora", messages=ONE, max_tokens=2)
    text = httpx.get(f"{server}/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    count = re.search(r'phiedge_requests_total\{model="gguf-F32",status="200"\} (\d+)', text)
    assert count and int(float(count.group(1))) >= 1
    assert re.search(r'phiedge_requests_total\{model="nope",status="404"\}', text) is None    # no free-form labels
    assert 'phiedge_requests_total{model="lora",status="200"} 1.0' in text
    for name in ("phiedge_time_to_first_token_seconds_count", "phiedge_decode_tokens_per_second_count",
                 "phiedge_queue_depth"):
        assert name in text, name
    assert httpx.get(f"{server}/metrics").status_code == 401


@pytest.mark.parametrize("model", [pytest.param("onnx-fp32", marks=pytest.mark.onnx),
                                   pytest.param("openvino-fp16", marks=pytest.mark.openvino),
                                   pytest.param("mlx-fp16", marks=pytest.mark.mlx)])
def test_every_runtime_answers_as_ask(server, session, model):
    c = client(server)
    opts = dict(model=model, messages=ONE, max_tokens=8, extra_body={"rag": {"k": 1}})
    whole = c.chat.completions.create(**opts).choices[0].message.content
    streamed, _ = _stream(c, **opts)
    asked = device.ask(session.bundle, QUESTION, runtime=model, k=1, max_new_tokens=8, threads=1)
    assert whole == streamed == asked.text and whole


def test_a_full_queue_is_429_and_a_dropped_client_stops_its_generation(session):
    """--queue 1: one answer generating (a long one, read slowly), one waiting, the third refused with 429 and
    Retry-After. The first client then goes away mid-stream: its generation stops within 4 tokens, the waiting one
    is answered, and so is a new request, as it would be alone."""
    with serving(session.bundle, "--runtime", "gguf-F32", "--queue", "1") as base:
        c = client(base)
        alone = c.chat.completions.create(model="gguf-F32", messages=ONE, max_tokens=8).choices[0].message.content
        long = c.chat.completions.create(model="gguf-F32", messages=ONE, max_tokens=3000, stream=True,
                                         temperature=1.5, seed=1, extra_body={"rag": {"k": 0}})   # runs to 3000
        pieces = iter(long)
        next(pieces), next(pieces)                                     # generating
        waiting = {}
        t = threading.Thread(target=lambda: waiting.setdefault("text", c.chat.completions.create(
            model="gguf-F32", messages=ONE, max_tokens=8).choices[0].message.content))
        t.start()
        deadline = time.monotonic() + 30
        while "phiedge_queue_depth 1.0" not in httpx.get(f"{base}/metrics").text:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        with pytest.raises(openai.RateLimitError) as e:
            c.chat.completions.create(model="gguf-F32", messages=ONE, max_tokens=8)
        assert e.value.response.headers["Retry-After"] == "1"
        long.close()                                                   # the client goes away
        t.join(120)
        assert waiting["text"] == alone
        assert c.chat.completions.create(model="gguf-F32", messages=ONE, max_tokens=8).choices[0].message.content \
            == alone
        metrics = httpx.get(f"{base}/metrics").text
        dropped = re.search(r"phiedge_tokens_after_disconnect_count (\S+)", metrics)
        after = re.search(r"phiedge_tokens_after_disconnect_sum (\S+)", metrics)
        assert float(dropped.group(1)) == 1 and float(after.group(1)) <= 4, metrics
        assert 'status="499"} 1.0' in metrics and 'status="429"} 1.0' in metrics


def test_a_tampered_bundle_and_an_open_host_without_a_key_do_not_start(session, tmp_path):
    copy = tmp_path / "bundle"
    shutil.copytree(session.bundle, copy, copy_function=os.link)
    (copy / "README.md").unlink()
    (copy / "README.md").write_text("tampered\n")
    r = run_cli("serve", str(copy), "--port", str(free_port()))
    assert r.returncode == 1 and "changed README.md" in r.stderr and "serving" not in r.stderr, r.stderr
    r = run_cli("serve", str(session.bundle), "--host", "0.0.0.0", "--port", str(free_port()))
    assert r.returncode == 1 and "--api-key" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_adapters_are_models_switched_per_request(separate):
    """On the bundle keeping two adapters separate: each (base, adapter) pair is a model, each adapter's name an
    alias; requests alternating between them switch the adapter in place and answer as `ask --adapter` does."""
    out, _, formats, _ = separate
    base = f"gguf-{formats['gguf'][0]}"
    with serving(out, "--runtime", "gguf", "--adapter", "lora") as url:
        c = client(url)
        ids = [m.id for m in c.models.list().data]
        assert {f"{base}+lora", f"{base}+rs", "lora", "rs", "retriever"} <= set(ids)
        answers = {m: c.chat.completions.create(model=m, messages=ONE, max_tokens=8).choices[0].message.content
                   for m in (f"{base}+rs", f"{base}+lora", "rs")}
    for adapter in ("rs", "lora"):
        asked = device.ask(out, QUESTION, runtime="gguf", adapter=adapter, max_new_tokens=8, threads=1)
        assert answers[f"{base}+{adapter}"] == asked.text, adapter
    assert answers["rs"] == answers[f"{base}+rs"] != answers[f"{base}+lora"]
