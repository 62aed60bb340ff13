"""Function calling: Phi-4-mini's tool format through every runtime. The tiny fixture is trained on synthetic
tool-call conversations (scripts/make_tiny_phi.py), so PyTorch's answer to the tool-call smoke is a real call that
every artifact of the session build is held to; `phiedge ask --tools` parses and checks calls on the device."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import run_cli
from phiedge import chat, device, ollama, tools
from phiedge.errors import ToolCallError, UsageError

PARIS = [{"name": "get_weather", "arguments": {"city": "Paris"}}]


# --------------------------------------------------------------------------------- parsing and checking

@pytest.mark.parametrize("text", [
    '<|tool_call|>[{"name": "get_weather", "arguments": {"city": "Paris"}}]<|/tool_call|>',
    '[{"name": "get_weather", "arguments": {"city": "Paris"}}]',                   # special tokens dropped
    ' {"name": "get_weather", "arguments": "{\\"city\\": \\"Paris\\"}"}',          # one call, arguments as a string
    'functools[{"name": "get_weather", "arguments": {"city": "Paris"}}]',
    '[{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]',
])
def test_every_form_of_a_call_parses_to_the_same_call(text):
    assert tools.canonical(tools.parse(text)) == json.dumps(PARIS, sort_keys=True)


@pytest.mark.parametrize("text, message", [
    ('<|tool_call|>[{"name": "get_weather", "arguments": {"city": "Paris"}}]', "is never closed"),
    ('[{"name": "get_weather", "arguments": {"city": "Par', "not JSON"),
    ('[{"arguments": {"city": "Paris"}}]', "a call without a name"),
    ('[{"name": "get_weather", "arguments": ["Paris"]}]', "arguments are not an object"),
    ('[]', "an empty list"),
])
def test_a_malformed_call_is_an_error_not_text(text, message):
    with pytest.raises(ToolCallError, match=message):
        tools.parse(text)


def test_an_answer_in_words_makes_no_call():
    assert tools.parse("It is sunny in Paris.") == []
    assert tools.parse("[1] says it is sunny in Paris.") == []           # a RAG citation, not a list of calls


def test_calls_are_checked_against_each_tools_schema():
    card = tools.normalize([{"type": "function", "function": {      # OpenAI's form, Phi-4-mini's card parameters
        "name": "get_weather_updates", "parameters": {"city": {"type": "str", "default": "London"},
                                                      "days": {"type": "int"}}}}])
    assert tools.schema(card[0])["required"] == ["days"]
    ok = tools.parse('[{"name": "get_weather_updates", "arguments": {"city": "Oslo", "days": 2}}]')
    assert tools.check(ok, card) == []
    bad = tools.parse('[{"name": "get_weather_updates", "arguments": {"city": 3}}, {"name": "x", "arguments": {}}]')
    assert tools.check(bad, card) == ["get_weather_updates: 'days' is a required property",
                                      "get_weather_updates: city: 3 is not of type 'string'",
                                      "x: no such tool (the tools are get_weather_updates)"]


def test_a_tools_file_that_is_not_one_is_refused(tmp_path):
    (tmp_path / "t.json").write_text('{"name": ')
    with pytest.raises(UsageError, match="is not JSON"):
        tools.load(tmp_path / "t.json")
    (tmp_path / "t.json").write_text('[{"description": "no name"}]')
    with pytest.raises(UsageError, match="tool 0 has no name"):
        tools.load(tmp_path / "t.json")


def test_tools_render_as_phi_4_minis_template_puts_them(tiny):
    """Between <|tool|> and <|/tool|> in the system turn, as Hugging Face's apply_chat_template renders them; a
    template that renders tools neither way is refused, not silently dropped."""
    from transformers import AutoTokenizer
    msgs = tools.messages(tools.SMOKE_QUESTION, tools.SMOKE_TOOLS)
    template, specials = chat.load_template(tiny / "model")
    text = chat.render(template, msgs, specials)
    assert text == AutoTokenizer.from_pretrained(tiny / "model").apply_chat_template(msgs, add_generation_prompt=True,
                                                                                     tokenize=False)
    assert f"<|tool|>{json.dumps(tools.SMOKE_TOOLS)}<|/tool|><|end|>" in text
    chatml = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    with pytest.raises(UsageError, match="does not render tools"):
        chat.render(chatml, msgs, {})
    standard = "{% for t in tools %}{{ t['name'] }};{% endfor %}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    assert chat.render(standard, msgs, {}).startswith("get_weather;")


# --------------------------------------------------------------------------------- every artifact

def test_every_artifact_answers_the_tool_call_smoke_with_a_call(session):
    """PyTorch's own answer is a call to the tool (the fixture was trained on tool-call conversations); every
    full-precision artifact makes that call (or leaves it only at a near-tie: the fixture hesitates on the city)
    and every quantized one a call that parses and fits the schema -- their verdicts hold it."""
    rows = session.report["artifacts"]
    assert rows
    (ref,) = {r["toolcall"]["reference_call"] for r in rows}
    (call,) = tools.parse(ref)
    assert call.name == "get_weather" and isinstance(call.arguments["city"], str)
    for r in rows:
        tc = r["toolcall"]
        assert tc["held"] and r["passed"], (r["label"], r["failures"])
        assert tools.check(tools.parse(tc["call"]), tools.SMOKE_TOOLS) == [], (r["label"], tc)
        if r["full_precision"]:
            assert tc["call"] == ref or tc["prefix_match"] >= tc["token_agreement"]["first_tie"], (r["label"], tc)
            assert not tc["token_agreement"]["misses"], (r["label"], tc)
    assert "tool call" in (session.bundle / "report.html").read_text()


def _ask(session, fmt, tools_file, *extra):
    path = next(r["path"] for r in session.report["artifacts"] if r["format"] == fmt and r["full_precision"])
    return run_cli("ask", str(session.bundle), tools.SMOKE_QUESTION, "--runtime", path, "--tools", str(tools_file),
                   "-k", "0", "--threads", "1", *extra)


@pytest.mark.parametrize("fmt", ["gguf", "onnx", "openvino", "mlx"])
def test_ask_with_tools_prints_the_call_on_every_runtime(session, tmp_path, fmt):
    """The smoke's prompt asked on the device (tools in OpenAI's form, no retrieval): the call the build's check
    saw on that artifact, parsed and printed."""
    if not session.rows(fmt):
        pytest.skip(f"no {fmt} artifact in the session build")
    row = next(r for r in session.rows(fmt) if r["full_precision"])
    (tmp_path / "tools.json").write_text(json.dumps([{"type": "function", "function": tools.SMOKE_TOOLS[0]}]))
    r = _ask(session, fmt, tmp_path / "tools.json", "--json")
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout)
    assert json.dumps(out["calls"], sort_keys=True) == row["toolcall"]["call"]
    assert out["valid"] and out["problems"] == [] and out["sources"] == []
    plain = _ask(session, fmt, tmp_path / "tools.json")
    (c,) = out["calls"]
    assert plain.returncode == 0 and plain.stdout.strip() == f"call get_weather({json.dumps(c['arguments'])})"


def test_ask_reports_a_call_against_the_schema_or_cut_short_and_fails(session, tmp_path):
    fmt = session.report["artifacts"][0]["format"]
    strict = dict(tools.SMOKE_TOOLS[0], parameters={"type": "object", "properties": {"city": {"type": "integer"}}})
    (tmp_path / "strict.json").write_text(json.dumps([strict]))
    r = _ask(session, fmt, tmp_path / "strict.json", "--json")
    assert r.returncode == 1 and not json.loads(r.stdout)["valid"], r.stderr
    assert "the answer's tool call is rejected: get_weather: city: " in r.stderr
    assert "is not of type 'integer'" in r.stderr
    (tmp_path / "tools.json").write_text(json.dumps(tools.SMOKE_TOOLS))
    cut = _ask(session, fmt, tmp_path / "tools.json", "--max-tokens", "6")
    assert cut.returncode == 1 and cut.stdout.strip() == ""          # never passed on as text
    assert "malformed tool call" in cut.stderr and len(cut.stderr.strip().splitlines()) == 2   # + timing line


# --------------------------------------------------------------------------------- Ollama

GO_RENDER = Path(__file__).resolve().parent / "go" / "ollama_render.go"
TOOL_CONVERSATIONS = [
    ([{"role": "user", "content": "Hi"}], None),
    (ollama.SAMPLE, None),
    (ollama.SAMPLE, ollama.SAMPLE_TOOLS),
    ([{"role": "user", "content": tools.SMOKE_QUESTION}], tools.SMOKE_TOOLS),          # tools, no system message
    ([{"role": "system", "content": tools.SYSTEM}, {"role": "user", "content": tools.SMOKE_QUESTION}],
     tools.SMOKE_TOOLS + [dict(ollama.SAMPLE_TOOLS[0], name="get_time")]),
]


@pytest.mark.parametrize("messages, tool_list", TOOL_CONVERSATIONS)
def test_the_modelfiles_template_renders_what_hugging_face_renders(tiny, tmp_path, messages, tool_list):
    """Ollama's TEMPLATE rendered by Go's own text/template (Debian's golang, installed by `make test`), with
    Ollama's `json` function and its request shape for tools, against apply_chat_template of the same
    conversation on the fixture's (Phi-4-mini's) template."""
    from transformers import AutoTokenizer
    go = shutil.which("go")
    assert go, "Go is installed by `make test` (Debian package golang-go)"
    data = {"template": ollama.PHI_TEMPLATE, "messages": messages,
            "tools": [{"type": "function", "function": t} for t in tool_list or []]}
    env = {**os.environ, "GOCACHE": str(tmp_path / "gocache"), "GOPATH": str(tmp_path / "gopath"), "GOFLAGS": ""}
    r = subprocess.run([go, "run", str(GO_RENDER)], input=json.dumps(data), capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    hf = AutoTokenizer.from_pretrained(tiny / "model")
    want = hf.apply_chat_template(ollama.hf_messages(messages, tool_list), add_generation_prompt=True,
                                  tokenize=False)
    assert r.stdout == want == ollama.phi_render(messages, tool_list)


def test_every_gguf_folder_carries_a_modelfile(session):
    for row in session.rows("gguf"):
        text = (session.bundle / row["path"] / ollama.MODELFILE).read_text()
        assert "FROM ./model.gguf\n" in text and f'TEMPLATE """{ollama.PHI_TEMPLATE}"""' in text
        assert 'PARAMETER stop "<|end|>"' in text and "LongRoPE" in text
        assert int(text.split("PARAMETER num_ctx ")[1].split()[0]) <= 4096
    manifest = json.loads((session.bundle / "manifest.json").read_text())
    assert any(f.endswith("/Modelfile") for f in manifest["files"])          # hashed and verified like the rest


def test_a_template_that_is_not_phi_4_minis_leaves_template_to_ollama(tiny):
    chatml = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    assert not ollama.is_phi(chatml, {}) and ollama.is_phi(*chat.load_template(tiny / "model-published"))
    text = ollama.modelfile("./model.gguf", phi=False, n_ctx=2048, adapter="../adapters/a/gguf/lora.gguf")
    assert "TEMPLATE" not in text.replace("No TEMPLATE", "") and "PARAMETER num_ctx 2048" in text
    assert "ADAPTER ../adapters/a/gguf/lora.gguf" in text and "ignore it" in text and "LongRoPE" not in text
    phi = ollama.modelfile("./model.gguf", phi=True, n_ctx=8192, switch=4096)
    assert "PARAMETER num_ctx 4096" in phi and "LongRoPE's factors" in phi


# --------------------------------------------------------------------------------- JSON output

WEATHER = {"type": "object", "properties": {"city": {"enum": ["Paris", "London", "Oslo"]}, "sunny": {"type": "boolean"}},
           "required": ["city", "sunny"], "additionalProperties": False}


@pytest.mark.parametrize("fmt", ["gguf", "onnx", "openvino", "mlx"])
def test_ask_with_a_json_schema_answers_json_that_follows_it_on_every_runtime(session, tmp_path, fmt):
    """Each runtime's constrained generation (onnxruntime-genai's guidance, llguidance's mask on GGUF, OpenVINO
    and MLX), on full precision and 4-bit: the tiny fixture answers this RAG question in prose when
    unconstrained, so valid JSON is the constraint's doing (tests/test_schemas.py: a table of schemas on a
    random model)."""
    if not session.rows(fmt):
        pytest.skip(f"no {fmt} artifact in the session build")
    (tmp_path / "schema.json").write_text(json.dumps(WEATHER))
    for row in (next(r for r in session.rows(fmt) if r["full_precision"]),
                next(r for r in session.rows(fmt) if not r["full_precision"])):
        args = ("ask", str(session.bundle), "Which city, and is it sunny?", "--runtime", row["path"], "-k", "1",
                "--threads", "1", "--max-tokens", "160")
        free = run_cli(*args)
        assert free.returncode == 0 and not free.stdout.lstrip().startswith("{"), free.stdout
        r = run_cli(*args, "--json-schema", str(tmp_path / "schema.json"), "--json")
        assert r.returncode == 0, (row["path"], r.stderr[-2000:])
        out = json.loads(r.stdout)
        assert out["valid"] and out["problems"] == [] and json.loads(out["text"]) == out["value"], out
        assert out["value"]["city"] in ("Paris", "London", "Oslo") and isinstance(out["value"]["sunny"], bool)


@pytest.mark.parametrize("fmt, missing, message", [
    ("onnx", ("onnxruntime_genai", "GeneratorParams", "set_guidance"),
     "cannot constrain generation to a JSON schema"),
    *[(fmt, ("llguidance", None, None),
       f"constrained generation on the {fmt} runtime needs llguidance: pip install 'phiedge[{fmt}]'")
      for fmt in ("gguf", "openvino", "mlx")],
], ids=["onnx", "gguf", "openvino", "mlx"])
def test_a_runtime_without_its_constraint_is_one_clear_error(session, monkeypatch, fmt, missing, message):
    """The installed runtime as an older release would be: without the API its constraint uses (onnxruntime-genai
    before guidance), or without llguidance installed (GGUF, OpenVINO, MLX): asking for JSON is refused in one
    line naming what to install (without llguidance, before the model loads)."""
    import importlib
    if not session.rows(fmt):
        pytest.skip(f"no {fmt} artifact in the session build")
    module, owner, attr = missing
    if attr is None:
        monkeypatch.setitem(sys.modules, module, None)            # `import llguidance` fails as when absent
    else:
        mod = importlib.import_module(module)
        monkeypatch.delattr(getattr(mod, owner) if owner else mod, attr)
    row = session.rows(fmt)[0]
    with pytest.raises(UsageError) as e:
        device.ask(session.bundle, "Which city?", runtime=row["path"], k=0, max_new_tokens=8, threads=1,
                   json_schema=WEATHER)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_a_json_answer_cut_short_or_a_bad_schema_is_one_clear_error(session, tmp_path):
    row = session.rows("gguf")[0]
    (tmp_path / "schema.json").write_text(json.dumps(WEATHER))
    cut = run_cli("ask", str(session.bundle), "Which city?", "--runtime", row["path"], "-k", "1", "--max-tokens", "3",
                  "--json-schema", str(tmp_path / "schema.json"))
    assert cut.returncode == 1 and cut.stdout.strip() == ""
    assert "the answer does not follow the JSON schema: the answer stopped at --max-tokens before the JSON closed: " \
           "raise --max-tokens" in cut.stderr
    (tmp_path / "bad.json").write_text('{"type": "nonsense"}')
    bad = run_cli("ask", str(session.bundle), "Which city?", "--json-schema", str(tmp_path / "bad.json"))
    assert bad.returncode == 1 and "is not a valid JSON schema" in bad.stderr and len(bad.stderr.splitlines()) == 1
    both = run_cli("ask", str(session.bundle), "Which city?", "--json-schema", str(tmp_path / "schema.json"),
                   "--tools", str(tmp_path / "schema.json"))
    assert both.returncode == 1 and "pass one of them" in both.stderr
