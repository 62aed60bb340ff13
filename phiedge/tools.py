"""Function calling as Phi-4-mini does it: tools in the system turn, calls out of the answer, checked against
each tool's JSON schema.

    tools = load(Path("tools.json"))                  # a JSON list: {"name", "description", "parameters"} or
                                                      # OpenAI's {"type": "function", "function": {...}}
    msgs = messages("What is the weather in Paris?", tools)
    calls = parse(answer_text)                        # [] for a plain answer; ToolCallError if malformed
    problems = check(calls, tools)                    # schema violations, one line each

Phi-4-mini's chat template puts a system message's `tools` (a JSON string) between <|tool|> and <|/tool|>; the
model answers with <|tool_call|>[{"name": ..., "arguments": {...}}]<|/tool_call|>. Runtimes that drop special
tokens when they detokenize leave the bare JSON list, so `parse` takes both (and a single call object, and the
`functools[...]` prefix some Phi-4 builds print). Templates that read the standard `tools` variable instead get
the same list through it (phiedge.chat.render).

Device-path module: json and jsonschema.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from .errors import ToolCallError, UsageError

SYSTEM = "You are a helpful assistant with some tools."
CALL_OPEN, CALL_CLOSE = "<|tool_call|>", "<|/tool_call|>"

# The tool-call smoke every artifact answers (phiedge.checks): one tool, one question whose answer is a call.
SMOKE_TOOLS = [{"name": "get_weather", "description": "Weather in a city.",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}]
SMOKE_QUESTION = "What is the weather in Paris right now?"
SMOKE_TOKENS = 48

# Phi-4-mini's model card writes parameters as {"city": {"type": "str", ...}}: Python type names.
_PY_TYPES = {"str": "string", "int": "integer", "float": "number", "bool": "boolean", "list": "array",
             "dict": "object"}


@dataclass(frozen=True)
class Call:
    name: str
    arguments: dict

    def as_dict(self) -> dict:
        return {"name": self.name, "arguments": self.arguments}


def load(path: Path) -> list[dict]:
    """Tools from a JSON file, each as {"name", "description", "parameters"} (OpenAI's wrapped form unwrapped)."""
    return normalize(_read_json(Path(path), "tools file", "a JSON file with a list of tools", "a JSON list of tools"),
                     str(path))


def _read_json(path: Path, what: str, give: str, write: str):
    """A JSON file the user named, or one line saying what is wrong with it."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise UsageError(f"{what} {path} does not exist: pass {give}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UsageError(f"{what} {path} is not JSON ({e}): write {write}") from None


def normalize(data, where: str = "tools") -> list[dict]:
    if isinstance(data, dict) and "tools" in data:
        data = data["tools"]
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list) or not data:
        raise UsageError(f"{where} holds no tools: write a JSON list of {{\"name\", \"description\", \"parameters\"}}")
    out = []
    for i, t in enumerate(data):
        if isinstance(t, dict) and t.get("type") == "function" and isinstance(t.get("function"), dict):
            t = t["function"]
        if not isinstance(t, dict) or not isinstance(t.get("name"), str) or not t["name"]:
            raise UsageError(f"{where}: tool {i} has no name: each tool needs \"name\" (and \"parameters\")")
        params = t.get("parameters", {})
        if not isinstance(params, dict):
            raise UsageError(f"{where}: tool {t['name']!r} has parameters that are not an object: give a JSON schema")
        out.append({"name": t["name"], **({"description": t["description"]} if "description" in t else {}),
                    "parameters": params})
    names = [t["name"] for t in out]
    if len(set(names)) != len(names):
        raise UsageError(f"{where}: tool names repeat ({', '.join(sorted(n for n in set(names) if names.count(n) > 1))})"
                         f": give each tool its own name")
    return out


def messages(question: str, tools: list[dict], system: str = SYSTEM) -> list[dict]:
    """Chat messages as Phi-4-mini's template takes tools: a JSON string on the system message."""
    return [{"role": "system", "content": system, "tools": json.dumps(tools)},
            {"role": "user", "content": question}]


def tools_of(msgs: list[dict]) -> list[dict] | None:
    """The tools a message list carries (for templates that read the `tools` variable)."""
    for m in msgs:
        if m.get("tools"):
            return json.loads(m["tools"]) if isinstance(m["tools"], str) else m["tools"]
    return None


def parse(text: str) -> list[Call]:
    """The calls in a model's answer: [] when it answers in words; ToolCallError when it starts a call that is not
    one (bad JSON, no name, arguments that are not an object, an unclosed <|tool_call|>)."""
    s = text.strip()
    if CALL_OPEN in s:
        body = s.split(CALL_OPEN, 1)[1]
        if CALL_CLOSE not in body:
            raise ToolCallError(f"malformed tool call: {CALL_OPEN} is never closed by {CALL_CLOSE}: {_short(s)}")
        body = body.split(CALL_CLOSE, 1)[0]
    elif s.startswith("functools["):
        body = s[len("functools"):]
    elif re.match(r"\[\s*[{\]]|\{\s*\"", s):   # a JSON list of objects (or none) or an object; "[1] says" is prose
        body = s
    else:
        return []
    try:
        data = json.loads(body)
    except json.JSONDecodeError as e:
        raise ToolCallError(f"malformed tool call: not JSON ({e.msg} at character {e.pos}): {_short(body)}") from None
    items = data if isinstance(data, list) else [data]
    if not items:
        raise ToolCallError("malformed tool call: an empty list of calls")
    return [_call(item) for item in items]


def _call(item) -> Call:
    if isinstance(item, dict) and item.get("type") == "function" and isinstance(item.get("function"), dict):
        item = item["function"]
    if not isinstance(item, dict) or not isinstance(item.get("name"), str) or not item["name"]:
        raise ToolCallError(f"malformed tool call: a call without a name: {_short(json.dumps(item))}")
    args = item.get("arguments", item.get("parameters", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except json.JSONDecodeError:
            raise ToolCallError(f"malformed tool call: {item['name']}'s arguments are not JSON: {_short(args)}") from None
    if not isinstance(args, dict):
        raise ToolCallError(f"malformed tool call: {item['name']}'s arguments are not an object: {_short(json.dumps(args))}")
    return Call(item["name"], args)


def schema(tool: dict) -> dict:
    """A tool's parameters as a JSON schema (the model card's {"city": {"type": "str"}} form converted)."""
    p = tool.get("parameters") or {}
    if p.get("type") == "object" or "properties" in p:
        return p
    props, required = {}, []
    for name, spec in p.items():
        spec = dict(spec) if isinstance(spec, dict) else {}
        t = spec.pop("type", None)
        if isinstance(t, str):
            base = re.split(r"[\[,|]", t)[0].strip()
            if base in _PY_TYPES or base in _PY_TYPES.values():
                spec["type"] = _PY_TYPES.get(base, base)
        if "default" not in spec:
            required.append(name)
        props[name] = spec
    return {"type": "object", "properties": props, "required": required}


def check(calls: list[Call], tools: list[dict]) -> list[str]:
    """What is wrong with each call, one line per problem: an unknown tool, arguments its schema refuses."""
    import jsonschema
    by_name = {t["name"]: t for t in tools}
    problems = []
    for c in calls:
        tool = by_name.get(c.name)
        if tool is None:
            problems.append(f"{c.name}: no such tool (the tools are {', '.join(by_name)})")
            continue
        validator = jsonschema.Draft202012Validator(schema(tool))
        for err in sorted(validator.iter_errors(c.arguments), key=lambda e: list(e.path)):
            where = "/".join(map(str, err.path))
            problems.append(f"{c.name}: {where + ': ' if where else ''}{err.message}")
    return problems


def load_schema(path: Path) -> dict:
    """A JSON schema from a file, checked as a schema (Draft 2020-12)."""
    import jsonschema
    path = Path(path)
    schema = _read_json(path, "schema file", "a JSON schema file", "a JSON schema")
    try:
        jsonschema.Draft202012Validator.check_schema(schema)
    except jsonschema.SchemaError as e:
        raise UsageError(f"schema file {path} is not a valid JSON schema: {e.message}") from None
    if not isinstance(schema, dict):
        raise UsageError(f"schema file {path} is not a JSON schema object: write {{\"type\": ...}}")
    return schema


def check_json(text: str, schema: dict, *, cut: bool = False) -> tuple[object, list[str]]:
    """(the answer parsed, what is wrong with it): not JSON (and why: cut at the token limit), or refused by the
    schema, one line per problem."""
    import jsonschema
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        why = "the answer stopped at --max-tokens before the JSON closed: raise --max-tokens" if cut else \
            f"the answer is not JSON ({e.msg} at character {e.pos})"
        return None, [why]
    errors = sorted(jsonschema.Draft202012Validator(schema).iter_errors(value), key=lambda e: list(e.path))
    return value, [("/".join(map(str, e.path)) + ": " if e.path else "") + e.message for e in errors]


def canonical(calls: list[Call]) -> str:
    """One string per list of calls (names and arguments, keys sorted): equal calls give equal strings."""
    return json.dumps([c.as_dict() for c in calls], sort_keys=True)


def _short(s: str, n: int = 120) -> str:
    s = " ".join(s.split())
    return s if len(s) <= n else s[:n] + "…"
