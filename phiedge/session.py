"""The device side as a library: one verified bundle, one loaded artifact, many answers.

    import phiedge
    with phiedge.open("bundle/", runtime="gguf") as s:
        a = s.chat([{"role": "user", "content": "What does the with statement do?"}])
        print(a.text, a.sources, a.usage)
        for chunk in s.chat([..., {"role": "user", "content": "And the pass statement?"}], stream=True):
            print(chunk.text, end="", flush=True)          # the last chunk's .answer: sources, usage, timings
        a = s.chat(msgs, temperature=0.7, top_p=0.9, seed=1)   # the same seed: the same answer
        s.use_adapter("legal")                              # in place where the adapters are kept separate
        hits, vectors = s.retrieve("pass statement", k=3), s.embed(["a sentence", "another"])

`open` verifies the bundle (and its signature with `key`) and picks the artifact once; the artifact loads on the
first answer and stays loaded, the retriever on the first retrieval. `ask`, `chat` and the server are this.
Every step of an answer lives here once: retrieval (phiedge.rag's one rule for conversations), the prompt within
the device's context (the oldest turns dropped: rag.trim), the runtime's tokens as they come
(Runtime.tokens), their text as it becomes whole (phiedge.streaming), tool-call parsing and JSON-schema checks.

Device-path module: no torch, no transformers.
"""
from __future__ import annotations

import logging
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from . import bundle
from . import rag as rag_prompt
from .errors import BundleError, UsageError
from .runtimes import Sampling, get
from .streaming import TextPieces

log = logging.getLogger("phiedge")


@dataclass
class Answer:
    text: str
    sources: list[str]
    runtime: str
    ttft_s: float
    decode_tps: float
    calls: list | None = None               # with tools: the calls the answer makes (phiedge.tools.Call)
    problems: list[str] | None = None       # with tools or a schema: what is wrong with the answer
    value: object = None                    # with a JSON schema: the answer parsed
    schema: bool = False
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str = "stop"             # "stop": the model or a stop string ended it; "length": max_tokens
    dropped_turns: int = 0                  # the oldest turns left out to fit the device's context (rag.trim)
    seed: int | None = None                 # the seed it was sampled with (None: greedy)
    token_ids: list[int] = field(default_factory=list, repr=False)    # the answer's tokens, as generated
    chunks: list = field(default_factory=list, repr=False)    # the retrieved chunks (.text, .source, .heading, .score)
    seconds: float = 0.0                    # the whole answer: retrieval, prompt, generation

    @property
    def usage(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}

    @property
    def timings(self) -> dict:
        return {"ttft_s": round(self.ttft_s, 4), "decode_tps": round(self.decode_tps, 2),
                "seconds": round(self.seconds, 4)}

    def to_json(self) -> dict:
        checked = self.calls is not None or self.schema
        return {"text": self.text, "sources": self.sources, "runtime": self.runtime,
                "ttft_s": round(self.ttft_s, 4), "decode_tps": round(self.decode_tps, 2),
                "usage": self.usage, "finish_reason": self.finish_reason, "dropped_turns": self.dropped_turns,
                **({"seed": self.seed} if self.seed is not None else {}),
                **({"calls": [c.as_dict() for c in self.calls or []]} if self.calls is not None else {}),
                **({"value": self.value} if self.schema else {}),
                **({"valid": not self.problems, "problems": self.problems or []} if checked else {})}


@dataclass
class Chunk:
    """A piece of a streamed answer: its new text; the last chunk also carries the whole Answer (sources, usage,
    timings, calls or the parsed value)."""
    text: str
    answer: Answer | None = None


class Session:
    """A bundle opened on this device (use `phiedge.open`)."""

    def __init__(self, folder: Path, *, runtime: str | None = None, adapter: str | None = None,
                 key: Path | None = None, threads: int | None = None):
        from . import device
        self.folder = Path(folder)
        self.manifest = bundle.verify(self.folder, key)
        self.artifact = device.pick(self.manifest, runtime, adapter)   # a wrong --runtime / --adapter, up front
        self.threads = threads
        self._runtime = None
        self._retriever = None

    @classmethod
    def of(cls, folder: Path, manifest: dict, artifact: dict, *, threads: int | None = None) -> "Session":
        """A session on a bundle verified already (phiedge.serve verifies once, then opens one per model)."""
        s = cls.__new__(cls)
        s.folder, s.manifest, s.artifact, s.threads = Path(folder), manifest, artifact, threads
        s._runtime = s._retriever = None
        return s

    @property
    def label(self) -> str:
        """What answers: "gguf Q4_K_M", "gguf Q4_K_M@legal" (merged) or "gguf Q4_K_M+legal" (kept separate)."""
        art = self.artifact
        return art.get("label") or f"{art['format']} {art['precision']}"

    def runtime(self):
        """The artifact's runtime, loaded on first use with the settings it passed its check with."""
        if self._runtime is None:
            from . import device
            art = self.artifact
            self._runtime = get(art["format"]).load(self.folder / art["path"], device.settings(
                self.manifest, art, self.threads, cap_context=True, folder=self.folder))
        return self._runtime

    def retriever(self):
        """The bundle's retriever, opened on first use."""
        if self._retriever is None:
            if not self.manifest.get("retriever"):
                raise BundleError(f"bundle {self.folder} has no retriever: rebuild it with --docs, or ask with -k 0")
            from .retriever import Retriever
            self._retriever = Retriever.open(self.folder / self.manifest["retriever"])
        return self._retriever

    def retrieve(self, query: str, k: int = 3) -> list:
        """The k best chunks for `query` (each with .text, .source, .heading, .score)."""
        return self.retriever().search(query, k=k)

    def embed(self, texts: list[str]):
        """The bundle embedder's L2-normalised vectors of `texts` (numpy, [len(texts), dim])."""
        return self.retriever().embedder.embed(list(texts))

    def chat(self, messages: list[dict], *, stream: bool = False, tools: list[dict] | None = None,
             response_format: dict | None = None, rag: bool = True, k: int = 3, max_tokens: int = 256,
             temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
             stop: list[str] | str | None = None, cancel=None) -> Answer | Iterator[Chunk]:
        """Answer the conversation's latest user turn, from the bundle's documents (k chunks; k=0 or rag=False:
        none, and the messages go to the model as given). `tools` (phiedge.tools.load): the answer's calls are parsed
        and checked against each tool's schema.
        `response_format`: a JSON schema (or OpenAI's {"type": "json_schema", "json_schema": {"schema": ...}}) the
        runtime's constraint holds the answer to; it is parsed and validated. temperature 0 is greedy; above it the
        answer is sampled (top_p) with `seed` (a fresh one when None, reported in Answer.seed). `stop`: strings
        that end the answer, left out of it. stream=True: an iterator of Chunks as the text is generated.
        `cancel` (a threading.Event, or anything with is_set(), asked once per token): once set from another
        thread, the answer ends at the next token (finish_reason "cancelled")."""
        schema = schema_of(response_format)
        if tools is not None and schema is not None:
            raise UsageError("tools and a JSON schema are two kinds of answer: pass one of them")
        if schema is not None:
            get(self.artifact["format"]).check_schema(schema)   # a keyword the constraint cannot hold, before a load
        if max_tokens < 1:
            raise UsageError(f"max_tokens must be at least 1, not {max_tokens}")
        sampling = Sampling(float(temperature), float(top_p), None if not temperature else
                            secrets.randbelow(2**31) if seed is None else int(seed))
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        chunks = self._chunks(messages, tools, schema, rag, k, max_tokens, sampling, stops, cancel)
        if stream:
            return chunks
        for chunk in chunks:
            pass
        return chunk.answer

    def _chunks(self, messages, tools, schema, use_rag, k, max_tokens, sampling, stops, cancel) -> Iterator[Chunk]:
        import time
        t0 = time.perf_counter()
        hits = self.retrieve(rag_prompt.query(messages), k) if use_rag and k else []
        # No chunks (k=0, rag=False): the messages as given, with the tools where Phi-4-mini's template takes them.
        msgs = rag_prompt.conversation(messages, hits, tools=tools) if hits or tools is not None \
            else [dict(m) for m in messages]
        rt = self.runtime()
        ids, dropped = self._prompt(rt, msgs, max_tokens)
        tokens = rt.tokens(ids, max_tokens, rt.stop_ids(), constraint=schema, sampling=sampling)
        pieces = TextPieces(rt.detokenize, stops)
        cancelled = False
        try:
            for token in tokens:
                piece = pieces.add(token)
                if piece:
                    yield Chunk(piece)
                cancelled = cancel is not None and cancel.is_set()
                if pieces.hit is not None or cancelled:
                    break
        finally:
            tokens.close()
        last = pieces.finish()
        gen = tokens.generation()
        answer = Answer(text=pieces.text, sources=rag_prompt.sources(hits), runtime=self.label, ttft_s=gen.ttft_s,
                        decode_tps=gen.decode_tps, prompt_tokens=gen.prompt_tokens, completion_tokens=len(gen.ids),
                        finish_reason="cancelled" if cancelled else
                        "stop" if gen.stopped or pieces.hit is not None else "length",
                        dropped_turns=dropped, seed=None if sampling.greedy else sampling.seed,
                        token_ids=gen.ids, chunks=list(hits), seconds=time.perf_counter() - t0)
        self._check(answer, tools, schema)
        yield Chunk(last, answer)

    @staticmethod
    def _prompt(rt, msgs: list[dict], max_tokens: int) -> tuple[list[int], int]:
        """The prompt's ids within the device's context (the profile's n_ctx, the model's own), the oldest turns
        dropped to fit (rag.trim); an answer that still cannot fit is refused by the runtime's length check."""
        cap = min(c for c in (rt.settings.extra.get("max_ctx"), rt.context_length, 2**62) if c)
        rendered: dict[int, list[int]] = {}

        def fits(m: list[dict]) -> bool:
            rendered[len(m)] = rt.chat_ids(m)
            return len(rendered[len(m)]) + max_tokens <= cap
        msgs, dropped = rag_prompt.trim(msgs, fits)
        if dropped:
            log.info("dropped the %d oldest turns to fit the device's context (%d tokens)", dropped, cap)
        return rendered.get(len(msgs)) or rt.chat_ids(msgs), dropped

    @staticmethod
    def _check(answer: Answer, tools: list[dict] | None, schema: dict | None) -> None:
        """Parse and check a tool-call or JSON-schema answer (its problems: why it is not passed on as text)."""
        from . import tools as tools_mod
        from .errors import ToolCallError
        if schema is not None:
            answer.value, answer.problems = tools_mod.check_json(answer.text, schema,
                                                                 cut=answer.finish_reason == "length")
            answer.schema = True
        elif tools is not None:
            try:
                answer.calls = tools_mod.parse(answer.text)
                answer.problems = tools_mod.check(answer.calls, tools)
            except ToolCallError as e:
                answer.calls, answer.problems = [], [str(e)]

    def use_adapter(self, name: str) -> None:
        """Answer with adapter `name` from now on: in place where the bundle keeps adapters separate (the base stays
        loaded, Runtime.use_adapter), else that adapter's merged artifact of the same format, loaded on the next
        answer."""
        from . import device
        rows = device.adapter_rows(self.manifest, name)
        art = next((a for a in rows if a["path"] == self.artifact["path"]), None) \
            or next((a for a in rows if a["format"] == self.artifact["format"]), None)
        if art is None:
            raise UsageError(f"adapter '{name}' has no {self.artifact['format']} artifact in this bundle: it has "
                             f"{', '.join(a['path'] for a in rows)}")
        if self._runtime is not None:
            if art["path"] == self.artifact["path"] and art.get("adapter_path") and self.artifact.get("adapter_path"):
                self._runtime.use_adapter(self.folder / art["adapter_path"])
            else:
                self._runtime.close()
                self._runtime = None
        self.artifact = art

    def close(self) -> None:
        if self._runtime is not None:
            self._runtime.close()
            self._runtime = None
        if self._retriever is not None:
            self._retriever.close()
            self._retriever = None

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def schema_of(response_format: dict | None) -> dict | None:
    """A JSON schema from `response_format`: the schema itself, or OpenAI's json_schema wrapper."""
    if response_format is None:
        return None
    if response_format.get("type") == "json_schema" and isinstance(response_format.get("json_schema"), dict):
        return response_format["json_schema"].get("schema") or {}
    if response_format.get("type") == "json_object":
        return {"type": "object"}
    return None if response_format.get("type") == "text" else response_format


def open(folder: Path | str, *, runtime: str | None = None, adapter: str | None = None, key: Path | None = None,
         threads: int | None = None) -> Session:  # noqa: A001 (phiedge.open, as the issue names it)
    """Open a bundle on this device: verified once (its signature with `key`), its artifact picked once."""
    return Session(Path(folder), runtime=runtime, adapter=adapter, key=key, threads=threads)
