"""The device side as a library: one verified bundle, one loaded artifact, many answers.

    import phiedge
    with phiedge.open("bundle/", runtime="gguf") as s:
        a = s.chat([{"role": "user", "content": "What does the with statement do?"}])
        print(a.text, a.sources)
        a = s.chat([..., {"role": "user", "content": "And the pass statement?"}], k=2)
        hits = s.retrieve("pass statement", k=3)
        vectors = s.embed(["a sentence", "another"])

`open` verifies the bundle (and its signature with `key`) and picks the artifact once; the artifact loads on the
first answer and stays loaded, the retriever on the first retrieval. `ask` is one `chat` on a fresh session.
Every step of an answer lives here once: retrieval (phiedge.rag's one rule for conversations), the prompt, the
runtime's generation, tool-call parsing and JSON-schema checks. Streaming, sampling and `phiedge chat` build on
this (issue 35); answers here are greedy and whole, and an adapter is chosen when the bundle is opened.

Device-path module: no torch, no transformers.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from . import bundle, rag
from .errors import BundleError, UsageError
from .runtimes import get

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

    def to_json(self) -> dict:
        checked = self.calls is not None or self.schema
        return {"text": self.text, "sources": self.sources, "runtime": self.runtime,
                "ttft_s": round(self.ttft_s, 4), "decode_tps": round(self.decode_tps, 2),
                **({"calls": [c.as_dict() for c in self.calls or []]} if self.calls is not None else {}),
                **({"value": self.value} if self.schema else {}),
                **({"valid": not self.problems, "problems": self.problems or []} if checked else {})}


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

    def chat(self, messages: list[dict], *, tools: list[dict] | None = None, response_format: dict | None = None,
             rag_context: bool = True, k: int = 3, max_tokens: int = 256) -> Answer:
        """Answer the conversation's latest user turn, from the bundle's documents (k chunks; k=0 or rag_context
        False: none). `tools` (phiedge.tools.load): the answer's calls are parsed and checked against each tool's
        schema. `response_format`: a JSON schema (or OpenAI's {"type": "json_schema", "json_schema": {"schema":
        ...}}) the runtime's constraint holds the answer to; it is parsed and validated."""
        from . import tools as tools_mod
        from .errors import ToolCallError
        schema = _schema_of(response_format)
        if tools is not None and schema is not None:
            raise UsageError("tools and a JSON schema are two kinds of answer: pass one of them")
        if schema is not None:
            get(self.artifact["format"]).check_schema(schema)   # a keyword the constraint cannot hold, before a load
        hits = self.retrieve(rag.query(messages), k) if rag_context and k else []
        msgs = rag.conversation(messages, hits, tools=tools) if rag_context else list(messages)
        gen = self.runtime().generate(msgs, max_new_tokens=max_tokens, constraint=schema)
        answer = Answer(text=gen.text.strip(), sources=rag.sources(hits), runtime=self.label, ttft_s=gen.ttft_s,
                        decode_tps=gen.decode_tps, prompt_tokens=gen.prompt_tokens, completion_tokens=len(gen.ids))
        if schema is not None:
            answer.value, answer.problems = tools_mod.check_json(gen.text, schema, cut=not gen.stopped)
            answer.schema = True
        elif tools is not None:
            try:
                answer.calls = tools_mod.parse(gen.text)
                answer.problems = tools_mod.check(answer.calls, tools)
            except ToolCallError as e:
                answer.calls, answer.problems = [], [str(e)]
        return answer

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


def _schema_of(response_format: dict | None) -> dict | None:
    """A JSON schema from `response_format`: the schema itself, or OpenAI's json_schema wrapper."""
    if response_format is None:
        return None
    if response_format.get("type") == "json_schema" and isinstance(response_format.get("json_schema"), dict):
        return response_format["json_schema"].get("schema") or {}
    return response_format


def open(folder: Path | str, *, runtime: str | None = None, adapter: str | None = None, key: Path | None = None,
         threads: int | None = None) -> Session:  # noqa: A001 (phiedge.open, as the issue names it)
    """Open a bundle on this device: verified once (its signature with `key`), its artifact picked once."""
    return Session(Path(folder), runtime=runtime, adapter=adapter, key=key, threads=threads)
