"""`phiedge serve`: a verified bundle behind an OpenAI-compatible HTTP API, on any of the four runtimes.

    phiedge serve bundle/ [--runtime gguf] [--adapter NAME] [--host 127.0.0.1] [--port 8000] [--api-key KEY]

Every answer is phiedge.session's: the same retrieval, prompt, runtime settings, tool-call parsing and JSON-schema
constraint as `ask` and `phiedge.open`, so at temperature 0 the server answers token for token as `ask` does.
The routes (shapes are OpenAI's; phiedge adds `sources`, `rag` and `phiedge_problems`):

    GET  /v1/models              every servable model (Catalogue: artifact folders, `+adapter` for adapters kept
                                 separate, bare adapter names as aliases, `retriever`)
    POST /v1/chat/completions    streamed (server-sent events) or whole; tools, response_format, sampling, stop
    POST /v1/embeddings          the bundle's embedder (model `retriever`)
    POST /v1/retrieve            {"query", "k"} -> {"data": [{"source", "text", "score"}]}
    GET  /health                 200 once the default model is loaded, 503 before
    GET  /metrics                Prometheus text

One generation at a time per loaded model, on a thread of its own (Unit); further requests wait in a queue of
`queue` entries, past which they get 429. A client that goes away mid-stream stops its generation at the next
token. `max_loaded` models stay loaded, the least recently used idle one unloaded first; adapters kept separate
share their base's load and switch in place per request.

Device-path module: starlette, uvicorn, sse-starlette and prometheus_client (the `serve` extra); no torch.
"""
from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import ipaddress
import json
import logging
import secrets
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from . import bundle, device
from .errors import PhiedgeError, UsageError
from .runtimes import get
from .session import Answer, Session, schema_of

log = logging.getLogger("phiedge.serve")

MAX_BODY = 1 << 20                  # 413 past it
ROLES = ("system", "developer", "user", "assistant", "tool")
MAX_K = 20


class ApiError(Exception):
    """An OpenAI-shaped error response."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# -- what the bundle serves
@dataclass(frozen=True)
class Model:
    id: str
    art: dict               # its manifest row
    unit: str               # what loads: the artifact folder (adapters kept separate share their base's)


class Catalogue:
    """Every servable model of a verified bundle: artifacts whose runtime is installed here."""

    def __init__(self, manifest: dict):
        import importlib.util
        self.models: dict[str, Model] = {}
        self.aliases: dict[str, str] = {}
        for art in manifest["artifacts"]:
            if importlib.util.find_spec(get(art["format"]).package) is None:
                continue
            mid = f"{art['path']}+{art['adapter']}" if art.get("adapter_path") else art["path"]
            self.models.setdefault(mid, Model(mid, art, art["path"]))
            if art.get("adapter") and art["adapter"] not in self.aliases:
                self.aliases[art["adapter"]] = mid
        self.aliases = {a: m for a, m in self.aliases.items() if a not in self.models}
        self.retriever = bool(manifest.get("retriever"))

    def of(self, art: dict) -> Model:
        return next(m for m in self.models.values() if m.art is art)

    def find(self, name) -> Model:
        if not isinstance(name, str) or not name:
            raise ApiError(400, "`model` is required: one of GET /v1/models's ids", param="model")
        mid = self.aliases.get(name, name)
        if mid not in self.models:
            raise ApiError(404, f"model '{name}' does not exist here: GET /v1/models lists "
                                f"{', '.join(self.ids())}", param="model", code="model_not_found")
        return self.models[mid]

    def ids(self) -> list[str]:
        return [*self.models, *self.aliases, *(["retriever"] if self.retriever else [])]


@dataclass
class Unit:
    """One loaded artifact: its session, a thread of its own (one generation at a time) and its queue place."""
    session: Session
    executor: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(1, "phiedge-model"))
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    used: float = 0.0


class Metrics:
    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
        self.registry = CollectorRegistry()
        self.requests = Counter("phiedge_requests", "Requests answered, by model and HTTP status.",
                                ["model", "status"], registry=self.registry)
        self.ttft = Histogram("phiedge_time_to_first_token_seconds", "Time to the first token of an answer.",
                              ["model"], registry=self.registry,
                              buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
        self.tps = Histogram("phiedge_decode_tokens_per_second", "Decode speed of an answer after its first token.",
                             ["model"], registry=self.registry, buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000))
        self.queue = Gauge("phiedge_queue_depth", "Requests waiting for their model.", registry=self.registry)
        self.after_drop = Histogram("phiedge_tokens_after_disconnect", "Tokens generated after a client went away.",
                                    registry=self.registry, buckets=(0, 1, 2, 4, 8, 16, 64))


class Server:
    def __init__(self, folder: Path, manifest: dict, *, runtime: str | None = None, adapter: str | None = None,
                 api_key: str | None = None, queue: int = 16, max_loaded: int = 2, threads: int | None = None):
        self.folder, self.manifest, self.threads = Path(folder), manifest, threads
        self.catalogue = Catalogue(manifest)
        if not self.catalogue.models:
            raise UsageError(f"none of the bundle's runtimes is installed here: pip install "
                             f"'phiedge[{manifest['artifacts'][0]['format']},serve]'")
        self.default = self.catalogue.of(device.pick(manifest, runtime, adapter))
        self.api_key, self.queue, self.max_loaded = api_key, queue, max_loaded
        self.units: collections.OrderedDict[str, Unit] = collections.OrderedDict()
        self.waiting = 0
        self.ready = False
        self.metrics = Metrics()
        self._retriever = None
        self._retriever_thread = ThreadPoolExecutor(1, "phiedge-retriever")

    # -- models
    async def unit(self, model: Model) -> Unit:
        """The loaded unit of `model` (loaded now, another idle one unloaded past max_loaded)."""
        unit = self.units.get(model.unit)
        if unit is None:
            idle = [k for k, u in self.units.items() if not u.lock.locked()]
            while len(self.units) >= self.max_loaded and idle:
                old = self.units.pop(idle.pop(0))
                await asyncio.get_running_loop().run_in_executor(old.executor, old.session.close)
                old.executor.shutdown(wait=False)
                log.info("unloaded %s (least recently used)", old.session.label)
            unit = self.units.get(model.unit)           # another request may have made it while this one waited
            if unit is None:
                unit = Unit(Session.of(self.folder, self.manifest, model.art, threads=self.threads))
                self.units[model.unit] = unit
        self.units.move_to_end(model.unit)
        unit.used = time.monotonic()
        return unit

    async def load_default(self) -> None:
        unit = await self.unit(self.default)
        async with unit.lock:
            await asyncio.get_running_loop().run_in_executor(unit.executor, unit.session.runtime)
        self.ready = True
        log.info("ready: %s", self.default.id)

    def retriever(self):
        if self._retriever is None:
            if not self.catalogue.retriever:
                raise ApiError(400, "this bundle has no retriever: rebuild it with --docs", param="model")
            from .retriever import Retriever
            self._retriever = Retriever.open(self.folder / self.manifest["retriever"])
        return self._retriever

    def close(self) -> None:
        for unit in self.units.values():
            unit.executor.submit(unit.session.close).result()
            unit.executor.shutdown()
        self.units.clear()
        if self._retriever is not None:
            self._retriever_thread.submit(self._retriever.close).result()
        self._retriever_thread.shutdown()

    # -- answers
    async def answer(self, model: Model, request: "ChatRequest", on_chunk=None) -> Answer:
        """Queue for the model, then generate on its thread; `on_chunk(text)` (a coroutine function) gets the text
        as it comes. Cancelled (the client went away), the generation stops at its next token."""
        self.admit()
        self.waiting += 1
        self.metrics.queue.set(self.waiting)
        try:
            unit = await self.unit(model)
            await unit.lock.acquire()
        finally:
            self.waiting -= 1
            self.metrics.queue.set(self.waiting)
        loop = asyncio.get_running_loop()
        pieces: asyncio.Queue = asyncio.Queue()
        stop = Stop()

        def produce() -> Answer:
            try:
                s = unit.session
                if model.art is not s.artifact:         # an adapter kept separate: switched in place
                    s.use_adapter(model.art["adapter"])
                for chunk in s.chat(request.messages, stream=True, cancel=stop, **request.options):
                    if chunk.text and on_chunk is not None:
                        loop.call_soon_threadsafe(pieces.put_nowait, chunk.text)
                return chunk.answer
            finally:
                loop.call_soon_threadsafe(pieces.put_nowait, None)
        job = loop.run_in_executor(unit.executor, produce)
        held = True
        try:
            if on_chunk is not None:
                while (text := await pieces.get()) is not None:
                    await on_chunk(text)
            return await job
        except asyncio.CancelledError:
            # The client went away: the generation stops at its next token. Nothing more is awaited here (a server
            # cancelling this task keeps cancelling every await); the model is freed when its thread is done.
            stop.set()
            job.add_done_callback(lambda _: self._dropped(model, unit, job, stop))
            held = False
            raise
        finally:
            if held:
                unit.lock.release()

    def _dropped(self, model: Model, unit: Unit, job, stop: "Stop") -> None:
        unit.lock.release()
        if job.exception() is not None:
            log.error("%s failed after its client went away: %s", model.id, job.exception())
            return
        self.metrics.after_drop.observe(stop.tokens - stop.at)
        self.metrics.requests.labels(model.id, "499").inc()
        log.info("client went away: %s stopped %d tokens later, after %d", model.id, stop.tokens - stop.at,
                 job.result().completion_tokens)

    def admit(self) -> None:
        """Refuse a request with 429 when `queue` requests wait already."""
        if self.waiting >= self.queue:
            raise ApiError(429, f"the queue is full ({self.queue} requests waiting): retry shortly",
                           type="rate_limit_error", code="queue_full", headers={"Retry-After": "1"})

    def observe(self, model: Model, answer: Answer) -> None:
        self.metrics.ttft.labels(model.id).observe(answer.ttft_s)
        if answer.decode_tps:
            self.metrics.tps.labels(model.id).observe(answer.decode_tps)


class Stop:
    """Session.chat's `cancel` for one request: asked once per token, set when its client goes away; it counts the
    tokens generated after that (phiedge_tokens_after_disconnect)."""

    def __init__(self):
        self._event = threading.Event()
        self.tokens, self.at = 0, 0

    def is_set(self) -> bool:
        self.tokens += 1
        return self._event.is_set()

    def set(self) -> None:
        self.at = self.tokens
        self._event.set()


# -- requests
@dataclass
class ChatRequest:
    model: str
    messages: list[dict]
    stream: bool
    include_usage: bool
    options: dict                   # Session.chat's keyword arguments
    checked: bool                   # tools or a response format: generated whole, checked, then sent


def _field(body: dict, name: str, kinds, default=None, *, check=None, what: str = ""):
    value = body.get(name, default)
    if value is None:
        return default
    if not isinstance(value, kinds) or isinstance(value, bool) and bool not in (kinds if isinstance(kinds, tuple)
                                                                               else (kinds,)):
        raise ApiError(400, f"`{name}` must be {what or getattr(kinds, '__name__', kinds)}", param=name)
    if check is not None and not check(value):
        raise ApiError(400, f"`{name}` must be {what}", param=name)
    return value


def chat_request(body: dict) -> ChatRequest:
    """An OpenAI chat-completions body, checked field by field (400 naming the field) and made phiedge's."""
    from . import tools as tools_mod
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "`messages` must be a non-empty list of {\"role\", \"content\"}", param="messages")
    msgs = [_message(m, i) for i, m in enumerate(messages)]
    max_tokens = _field(body, "max_completion_tokens", int, None, check=lambda v: v >= 1, what="an integer >= 1") \
        or _field(body, "max_tokens", int, 256, check=lambda v: v >= 1, what="an integer >= 1")
    temperature = _field(body, "temperature", (int, float), 0.0, check=lambda v: 0 <= v <= 2, what="0 to 2")
    top_p = _field(body, "top_p", (int, float), 1.0, check=lambda v: 0 < v <= 1, what="in (0, 1]")
    seed = _field(body, "seed", int, None, what="an integer")
    stop = body.get("stop")
    if stop is not None and not (isinstance(stop, str) or isinstance(stop, list) and len(stop) <= 4
                                 and all(isinstance(s, str) for s in stop)):
        raise ApiError(400, "`stop` must be a string or a list of up to 4 strings", param="stop")
    stream = _field(body, "stream", bool, False, what="true or false")
    stream_options = _field(body, "stream_options", dict, {}, what="an object")
    rag = _field(body, "rag", dict, {}, what="an object like {\"k\": 3}")
    k = _field(rag, "k", int, 3, check=lambda v: 0 <= v <= MAX_K, what=f"an integer from 0 to {MAX_K} (rag.k)")
    tools = None
    if body.get("tools") is not None and body.get("tool_choice") != "none":
        try:
            tools = tools_mod.normalize(body["tools"], "`tools`")
        except UsageError as e:
            raise ApiError(400, str(e), param="tools") from None
        choice = body.get("tool_choice")
        if isinstance(choice, dict):
            name = (choice.get("function") or {}).get("name")
            tools = [t for t in tools if t["name"] == name]
            if not tools:
                raise ApiError(400, f"`tool_choice` names no tool of `tools` ({name!r})", param="tool_choice")
        elif choice not in (None, "auto", "required"):
            raise ApiError(400, "`tool_choice` must be \"none\", \"auto\", \"required\" or a function",
                           param="tool_choice")
    fmt = _field(body, "response_format", dict, None, what="an object")
    if fmt is not None and (fmt.get("type") not in ("text", "json_object", "json_schema") or fmt["type"] == "json_schema"
                            and not (isinstance(fmt.get("json_schema"), dict)
                                     and isinstance(fmt["json_schema"].get("schema", {}), dict))):
        raise ApiError(400, "`response_format` must be {\"type\": \"text\"}, {\"type\": \"json_object\"} or "
                            "{\"type\": \"json_schema\", \"json_schema\": {\"schema\": {...}}}", param="response_format")
    schema = schema_of(fmt)
    if tools is not None and schema is not None:
        raise ApiError(400, "tools and a JSON response format are two kinds of answer: pass one of them",
                       param="response_format")
    return ChatRequest(
        model=body.get("model"), messages=msgs, stream=stream,
        include_usage=bool(stream_options.get("include_usage")), checked=tools is not None or schema is not None,
        options=dict(tools=tools, response_format=schema, k=k, max_tokens=max_tokens, temperature=float(temperature),
                     top_p=float(top_p), seed=seed, stop=stop))


def _message(m, i: int) -> dict:
    """One OpenAI message as Phi-4-mini's template takes it: text parts joined, an assistant's tool calls written
    back in Phi-4-mini's <|tool_call|> format, tool results as `tool` turns."""
    from .tools import CALL_CLOSE, CALL_OPEN
    where = f"messages[{i}]"
    if not isinstance(m, dict) or m.get("role") not in ROLES:
        raise ApiError(400, f"{where}.role must be one of {', '.join(ROLES)}", param=f"{where}.role")
    content = m.get("content")
    if isinstance(content, list):
        if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                   for p in content):
            raise ApiError(400, f"{where}.content: only text parts are supported", param=f"{where}.content")
        content = "".join(p["text"] for p in content)
    if content is not None and not isinstance(content, str):
        raise ApiError(400, f"{where}.content must be a string or a list of text parts", param=f"{where}.content")
    role = "system" if m["role"] == "developer" else m["role"]
    content = content or ""
    calls = m.get("tool_calls")
    if role == "assistant" and calls:
        try:
            written = [{"name": c["function"]["name"], "arguments": json.loads(c["function"].get("arguments") or "{}")}
                       for c in calls]
        except (TypeError, KeyError, json.JSONDecodeError):
            raise ApiError(400, f"{where}.tool_calls: each needs function.name and JSON function.arguments",
                           param=f"{where}.tool_calls") from None
        content += CALL_OPEN + json.dumps(written) + CALL_CLOSE
    if role == "user" and not content:
        raise ApiError(400, f"{where}.content is empty", param=f"{where}.content")
    return {"role": role, "content": content}


# -- responses
def _sources(answer: Answer) -> list[dict]:
    return [{"source": h.source, "text": h.text, "score": float(h.score),
             **({"heading": h.heading} if getattr(h, "heading", None) else {})} for h in answer.chunks]


def _message_of(answer: Answer) -> tuple[dict, str, list[str] | None]:
    """The assistant message, its finish_reason and phiedge's problems: a call or schema answer that fails its
    check is never passed on (no tool_calls, no content)."""
    if answer.problems:
        return {"role": "assistant", "content": None}, answer.finish_reason, answer.problems
    if answer.calls:
        return ({"role": "assistant", "content": None, "tool_calls": [
            {"id": f"call_{secrets.token_hex(12)}", "type": "function",
             "function": {"name": c.name, "arguments": json.dumps(c.arguments)}} for c in answer.calls]},
            "tool_calls", None)
    return {"role": "assistant", "content": answer.text}, answer.finish_reason, None


def _completion(cid: str, model: Model, answer: Answer) -> dict:
    message, finish, problems = _message_of(answer)
    return {"id": cid, "object": "chat.completion", "created": int(time.time()), "model": model.id,
            "choices": [{"index": 0, "message": message, "finish_reason": finish, "logprobs": None}],
            "usage": answer.usage, "sources": _sources(answer),
            **({"phiedge_problems": problems} if problems else {})}


def _chunk(cid: str, model: Model, delta: dict | None, finish: str | None = None, **extra) -> str:
    choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]
    return json.dumps({"id": cid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model.id,
                       "choices": choices, **extra})


# -- the ASGI app
def app(server: Server):
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
    from sse_starlette.sse import EventSourceResponse
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    def error(e: ApiError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    async def body_of(request: Request) -> dict:
        if server.api_key is not None:
            given = request.headers.get("authorization", "")
            if not secrets.compare_digest(given.encode(), f"Bearer {server.api_key}".encode()):
                raise ApiError(401, "a valid API key is required: send Authorization: Bearer KEY",
                               type="authentication_error", code="invalid_api_key")
        if request.method != "POST":
            return {}
        size = request.headers.get("content-length")
        if size is not None and size.isdigit() and int(size) > MAX_BODY:
            raise ApiError(413, f"the body is over {MAX_BODY} bytes")
        data = bytearray()
        async for part in request.stream():
            data += part
            if len(data) > MAX_BODY:
                raise ApiError(413, f"the body is over {MAX_BODY} bytes")
        try:
            return json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the body is not JSON ({e})") from None

    def route(handler):
        """Errors OpenAI-shaped, counted; no traceback ever in a response."""
        async def run(request: Request):
            model = "-"
            try:
                body = await body_of(request)
                model = body.get("model", "-") if isinstance(body, dict) else "-"
                response = await handler(request, body)
            except ApiError as e:
                response = error(e)
            except UsageError as e:
                response = error(ApiError(400, str(e)))
            except Exception:       # noqa: BLE001 -- logged with its traceback, answered without internals
                log.exception("unexpected error on %s", request.url.path)
                response = error(ApiError(500, "the server failed on this request: see its log", type="server_error"))
            if request.url.path.startswith("/v1/"):
                server.metrics.requests.labels(str(model)[:64] if model in server.catalogue.ids() else "-",
                                               str(response.status_code)).inc()
            return response
        return run

    async def models(request, body):
        now = int(time.time())
        data = [{"id": m.id, "object": "model", "created": now, "owned_by": "phiedge",
                 "phiedge": {"format": m.art["format"], "precision": m.art["precision"], "adapter": m.art.get("adapter"),
                             "label": m.art.get("label") or f"{m.art['format']} {m.art['precision']}"}}
                for m in server.catalogue.models.values()]
        data += [{"id": a, "object": "model", "created": now, "owned_by": "phiedge", "phiedge": {"alias_of": m}}
                 for a, m in server.catalogue.aliases.items()]
        if server.catalogue.retriever:
            data.append({"id": "retriever", "object": "model", "created": now, "owned_by": "phiedge",
                         "phiedge": {"kind": "embeddings"}})
        return JSONResponse({"object": "list", "data": data})

    async def chat_completions(request, body):
        req = chat_request(body)
        model = server.catalogue.find(req.model)
        if req.options["response_format"] is not None:
            try:
                get(model.art["format"]).check_schema(req.options["response_format"])
            except UsageError as e:
                raise ApiError(400, str(e), param="response_format") from None
        cid = f"chatcmpl-{secrets.token_hex(12)}"
        if not req.stream:
            answer = await server.answer(model, req)
            server.observe(model, answer)
            return JSONResponse(_completion(cid, model, answer))
        # Streamed: the first chunk waits for the queue, so a full queue is still a 429, not a broken stream.
        server.admit()

        async def events():
            out: asyncio.Queue = asyncio.Queue()

            async def text(piece: str):
                await out.put({"data": _chunk(cid, model, {"content": piece})})
            yield {"data": _chunk(cid, model, {"role": "assistant", "content": ""})}
            task = asyncio.ensure_future(server.answer(model, req, None if req.checked else text))
            try:
                while not (task.done() and out.empty()):
                    getter = asyncio.ensure_future(out.get())
                    await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
                    if getter.done():
                        yield getter.result()
                    else:
                        getter.cancel()
                answer = task.result()
            except ApiError as e:
                yield {"data": json.dumps(e.body())}
                return
            except PhiedgeError as e:
                yield {"data": json.dumps(ApiError(400, str(e)).body())}
                return
            finally:
                if not task.done():
                    task.cancel()
                    try:
                        await task
                    except (asyncio.CancelledError, Exception):   # noqa: BLE001 -- the client is gone
                        pass
            server.observe(model, answer)
            message, finish, problems = _message_of(answer)
            delta = {k: v for k, v in message.items() if k != "role" and (req.checked or k != "content")}
            if delta.get("tool_calls"):
                delta["tool_calls"] = [{"index": i, **c} for i, c in enumerate(delta["tool_calls"])]
            yield {"data": _chunk(cid, model, delta, finish, sources=_sources(answer),
                                  **({"phiedge_problems": problems} if problems else {}))}
            if req.include_usage:
                yield {"data": _chunk(cid, model, None, usage=answer.usage)}
            yield {"data": "[DONE]"}
        return EventSourceResponse(events(), ping=15)

    async def embeddings(request, body):
        if body.get("model") != "retriever":
            raise ApiError(404 if body.get("model") else 400, "embeddings come from model `retriever`",
                           param="model", code="model_not_found")
        texts = body.get("input")
        texts = [texts] if isinstance(texts, str) else texts
        if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
            raise ApiError(400, "`input` must be a string or a list of strings", param="input")
        encoding = body.get("encoding_format") or "float"
        if encoding not in ("float", "base64"):
            raise ApiError(400, "`encoding_format` must be float or base64", param="encoding_format")
        vectors = await asyncio.get_running_loop().run_in_executor(
            server._retriever_thread, lambda: server.retriever().embedder.embed(texts))
        data = [{"object": "embedding", "index": i,
                 "embedding": base64.b64encode(v.astype("<f4").tobytes()).decode() if encoding == "base64"
                 else [float(x) for x in v]} for i, v in enumerate(vectors)]
        return JSONResponse({"object": "list", "data": data, "model": "retriever",
                             "usage": {"prompt_tokens": 0, "total_tokens": 0}})

    async def retrieve(request, body):
        query = body.get("query")
        if not isinstance(query, str) or not query.strip():
            raise ApiError(400, "`query` must be a non-empty string", param="query")
        k = _field(body, "k", int, 3, check=lambda v: 1 <= v <= MAX_K, what=f"an integer from 1 to {MAX_K}")
        hits = await asyncio.get_running_loop().run_in_executor(
            server._retriever_thread, lambda: server.retriever().search(query, k=k))
        return JSONResponse({"object": "list", "data": [
            {"source": h.source, "text": h.text, "score": float(h.score),
             **({"heading": h.heading} if h.heading else {})} for h in hits]})

    async def health(request):
        if not server.ready:
            return JSONResponse({"status": "loading", "model": server.default.id}, status_code=503)
        return JSONResponse({"status": "ok", "model": server.default.id})

    async def metrics(request, body):
        return Response(generate_latest(server.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        loading = asyncio.ensure_future(server.load_default())
        try:
            yield
        finally:
            loading.cancel()
            server.close()

    return Starlette(routes=[
        Route("/v1/models", route(models), methods=["GET"]),
        Route("/v1/chat/completions", route(chat_completions), methods=["POST"]),
        Route("/v1/embeddings", route(embeddings), methods=["POST"]),
        Route("/v1/retrieve", route(retrieve), methods=["POST"]),
        Route("/health", health, methods=["GET"]),
        Route("/metrics", route(metrics), methods=["GET"]),
    ], lifespan=lifespan)


def free_port() -> int:
    """A loopback TCP port free right now (for a server started next: the demo, the benchmark, the tests)."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running(argv: list[str], url: str, *, timeout: float = 180, output=None):
    """A server process started, waited for until GET `url` answers 200 (phiedge serve's /health, another server's
    own route), yielded, then stopped (terminated; killed after 30 s). Its output goes to `output` (an open file)
    or to a temporary file whose tail names why it failed to start: never an unread pipe, which fills and stalls
    the server. For the demo, the benchmark and the tests."""
    import subprocess
    import tempfile

    import httpx
    with (contextlib.nullcontext(output) if output is not None else tempfile.TemporaryFile("w+")) as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, text=True)
        try:
            deadline = time.monotonic() + timeout
            while True:
                if proc.poll() is not None:
                    tail = ""
                    if output is None:
                        out.seek(0)
                        tail = out.read()[-3000:]
                    raise RuntimeError(f"{argv[0]} exited with {proc.returncode} before it served {url}: {tail}")
                try:
                    if httpx.get(url, timeout=2).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{argv[0]} did not serve {url} in {timeout:.0f} s")
                time.sleep(0.2)
            yield proc
        finally:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def check_host(host: str, api_key: str | None, insecure: bool) -> None:
    """A server reachable from other machines needs a key (or the user's explicit --insecure-no-auth)."""
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if not loopback and api_key is None and not insecure:
        raise UsageError(f"--host {host} makes the server reachable from other machines: pass --api-key KEY (or "
                         f"--insecure-no-auth to serve without one)")


def run(folder: Path, *, host: str = "127.0.0.1", port: int = 8000, runtime: str | None = None,
        adapter: str | None = None, api_key: str | None = None, key: Path | None = None, queue: int = 16,
        max_loaded: int = 2, insecure_no_auth: bool = False, threads: int | None = None) -> None:
    """Verify the bundle (hashes, the signature with `key`), then serve it until interrupted."""
    try:
        import uvicorn
    except ImportError:
        raise UsageError("phiedge serve needs the serve extra: pip install 'phiedge[serve]'") from None
    check_host(host, api_key, insecure_no_auth)
    if queue < 1 or max_loaded < 1:
        raise UsageError("--queue and --max-loaded must be at least 1")
    manifest = bundle.verify(Path(folder), key)
    server = Server(Path(folder), manifest, runtime=runtime, adapter=adapter, api_key=api_key, queue=queue,
                    max_loaded=max_loaded, threads=threads)
    log.warning("serving %s on http://%s:%d/v1 (default model %s; models: %s)", folder, host, port,
                server.default.id, ", ".join(server.catalogue.ids()))
    uvicorn.run(app(server), host=host, port=port, log_level="warning", access_log=False)

