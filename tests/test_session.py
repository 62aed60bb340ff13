"""phiedge.open on the session build: one loaded session answering a conversation, streamed and sampled, on every
runtime, with no torch and no transformers on the device path; `phiedge chat` through a pipe; a conversation kept
within the device's context; a conversation growing past the LongRoPE switch as PyTorch's model defines it; the
incremental decoder on characters split across tokens. (`/adapter` on a bundle with adapters kept separate:
tests/test_adapters.py.)"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
from tokenizers import Tokenizer

from conftest import DEMO, DEMO_DOCS, SWITCH, run_cli
from phiedge import rag
from phiedge.checks.metrics import Limits, token_agreement
from phiedge.streaming import TextPieces

QUESTION = DEMO["question"]
FORMATS = [pytest.param(f, marks=getattr(pytest.mark, f)) for f in ("gguf", "onnx", "openvino", "mlx")]


@pytest.mark.parametrize("fmt", FORMATS)
def test_one_session_answers_streams_and_samples_as_fresh_sessions_and_ask_do(session, fmt):
    """phiedge.open: verified and picked once, the artifact loaded once; questions (one a follow-up with the
    client's own system turn and the earlier turns kept); the answer streamed joins to the answer whole, which
    equals a fresh session's and `ask`'s; a seed repeats a sampled answer; the embedder and retriever answer from
    the same open bundle. No torch and no transformers on the way, streaming and sampling included (mlx-lm imports
    transformers for its own tokenizer code: there torch is simulated absent)."""
    code = (("import sys; sys.modules['torch'] = None\n" if fmt == "mlx" else "import sys\n")
            + "import json, phiedge\nfrom phiedge import device\n"
            f"b, q = {str(session.bundle)!r}, {QUESTION!r}\n"
            "one = lambda text: [{'role': 'user', 'content': text}]\n"
            f"with phiedge.open(b, runtime={fmt!r}, threads=1) as s:\n"
            "    first = s.chat(one('What does the pass statement do?'), k=1, max_tokens=8)\n"
            "    rt = s.runtime()\n"
            "    second = s.chat(one(q), max_tokens=12)\n"
            "    chunks = list(s.chat(one(q), max_tokens=12, stream=True))\n"
            "    third = s.chat([{'role': 'system', 'content': 'Be brief.'}, *one(q),\n"
            "                    {'role': 'assistant', 'content': second.text}, *one('Say it again.')], max_tokens=8)\n"
            "    sampled = [s.chat(one(q), k=1, max_tokens=8, temperature=1.5, seed=seed) for seed in (5, 5, 6)]\n"
            "    greedy = s.chat(one(q), k=1, max_tokens=8)\n"
            "    same = s.runtime() is rt\n"
            "    hits = s.retrieve(q, 2)\n"
            "    vec = s.embed(['a', 'b'])\n"
            f"with phiedge.open(b, runtime={fmt!r}, threads=1) as s2:\n"
            "    fresh = s2.chat(one(q), max_tokens=12)\n"
            f"asked = device.ask(b, q, runtime={fmt!r}, max_new_tokens=12, threads=1)\n"
            f"bad = [m for m in {('torch', 'sentence_transformers', *(() if fmt == 'mlx' else ('transformers',)))!r}"
            " if sys.modules.get(m) is not None]\n"
            "last = chunks[-1].answer\n"
            "print(json.dumps({'same': same, 'texts': [first.text, second.text, third.text, fresh.text, asked.text],\n"
            "  'pieces': [c.text for c in chunks], 'streamed': [last.text, last.sources, last.usage, last.finish_reason],\n"
            "  'whole': [second.sources, second.usage, second.finish_reason],\n"
            "  'early': [c.answer is None for c in chunks[:-1]],\n"
            "  'sampled': [a.text for a in sampled] + [greedy.text], 'seeds': [a.seed for a in sampled] + [greedy.seed],\n"
            "  'sources': [second.sources, third.sources, asked.sources], 'hits': len(hits), 'vec': list(vec.shape),\n"
            "  'tokens': [second.prompt_tokens, third.prompt_tokens, second.completion_tokens], 'bad': bad}))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    first, second, third, fresh, asked = out["texts"]
    assert out["same"] and second == fresh == asked and all(out["texts"]), out
    # streamed: in pieces as generated, never a broken character, joined exactly the answer whole
    pieces = out["pieces"]
    assert sum(bool(p) for p in pieces) > 1 and "\ufffd" not in "".join(pieces), pieces
    assert "".join(pieces) == out["streamed"][0] == second and all(out["early"]), out
    assert out["streamed"][1:] == out["whole"], out                  # the last chunk: sources, usage, finish
    assert out["sources"][0] == out["sources"][2] and out["sources"][1], out       # the follow-up retrieves too
    assert out["tokens"][1] > out["tokens"][0] > 0 < out["tokens"][2] <= 12, out   # earlier turns kept
    # sampled: the same seed the same answer; another seed or greedy another one
    a, b, c, greedy = out["sampled"]
    assert a == b and (a != c or a != greedy) and out["seeds"] == [5, 5, 6, None], out
    assert out["hits"] == 2 and out["vec"][0] == 2 and out["bad"] == [], out


def test_chat_through_a_pipe_holds_the_conversation(session):
    """`phiedge chat` read from a pipe: one turn per line, each answer streamed with its sources after it; the
    second turn's prompt holds the first; /sources lists the chunks; /reset starts over; a bad command is one
    error line and the conversation goes on (the exit code says a turn failed)."""
    lines = [QUESTION, "/sources", "And what does it need?", "/frobnicate", "/reset", QUESTION, "/quit", "never asked"]
    r = run_cli("chat", str(session.bundle), "--runtime", "gguf", "--max-tokens", "8", "-k", "2", "--threads", "1",
                input="\n".join(lines) + "\n")
    assert r.returncode == 1 and r.stderr.count("error: ") == 2, r.stderr     # the turn, then the summary
    assert "unknown command /frobnicate" in r.stderr and "(conversation reset)" in r.stderr
    prompts = [int(line.split(": ")[1].split(" prompt tokens")[0]) for line in r.stderr.splitlines()
               if " prompt tokens" in line]
    assert len(prompts) == 3 and prompts[1] > prompts[0] and prompts[2] == prompts[0], r.stderr
    assert r.stdout.count("sources: [1]") == 3 and r.stdout.count(" (score ") == 2, r.stdout
    assert r.stdout.split("sources: [1]")[0].strip(), r.stdout                  # the first answer, streamed


def test_a_conversation_is_trimmed_to_the_device_context(session):
    """Past the profile's n_ctx (4096 for `all`) the oldest turns go, never the system turn nor the latest question,
    and the answer says how many; the rule itself on a conversation whose turns are counted by hand."""
    import phiedge
    words = " ".join(p.read_text() for p in sorted(DEMO_DOCS.glob("*.md"))).split()
    msgs = [{"role": "system", "content": "Answer briefly."}]
    for i in range(14):
        msgs += [{"role": "user", "content": " ".join((words * 2)[i * 300:(i + 1) * 300])},
                 {"role": "assistant", "content": "Noted."}]
    msgs.append({"role": "user", "content": QUESTION})
    with phiedge.open(session.bundle, runtime="gguf", threads=1) as s:
        a = s.chat(msgs, rag=False, max_tokens=8)
        whole = len(s.runtime().chat_ids(msgs))
    assert whole > 4096 and 0 < a.dropped_turns < 20 and a.dropped_turns % 2 == 0, (whole, a.dropped_turns)
    assert a.prompt_tokens + 8 <= 4096 and a.to_json()["dropped_turns"] == a.dropped_turns
    # the rule: turn lengths by hand, a budget of 10
    turns = [{"role": "system", "content": "s"}, {"role": "user", "content": "aaaa"},
             {"role": "assistant", "content": "bbb"}, {"role": "user", "content": "cc"},
             {"role": "assistant", "content": "d"}, {"role": "user", "content": "last"}]
    def fits(m):
        return sum(len(t["content"]) for t in m) <= 10
    kept, dropped = rag.trim(turns, fits)
    assert [t["content"] for t in kept] == ["s", "cc", "d", "last"] and dropped == 2
    kept, dropped = rag.trim(turns, lambda m: False)                     # nothing else can go
    assert [t["content"] for t in kept] == ["s", "last"] and dropped == 4


# The crossing conversation: turn 1 short; turn 2's prompt ends just before the switch, so its answer crosses it;
# turn 3's prompt is past it. (format, artifact, whether an answer crossing the switch follows PyTorch: the
# runtimes phiedge steps itself re-prefill there as transformers' Phi-3 does; ONNX Runtime and OpenVINO switch per
# run inside the graph, keeping the keys cached before the switch in the short regime.)
CROSSING = [pytest.param("gguf", "gguf-F32", True, marks=pytest.mark.gguf),
            pytest.param("onnx", "onnx-fp32", False, marks=pytest.mark.onnx)]


@pytest.mark.parametrize("fmt, artifact, mid_answer", CROSSING)
def test_a_conversation_growing_past_the_longrope_switch_follows_pytorch(session, fmt, artifact, mid_answer):
    """Three turns, the conversation crossing the tiny fixture's switch (SWITCH): the last turn's answer follows
    PyTorch's greedy tokens at the gate's tolerance (teacher-forced, every clear-margin token PyTorch's; greedy,
    PyTorch's up to the first near-tie), PyTorch running the model on the whole sequence at every step, as its
    definition of LongRoPE says (transformers' own cached generate after its re-prefill at the switch drifts off
    that in 5.5: measured, it repeats a 3-token loop where the whole-sequence model does not). On llama.cpp the
    answer that crosses the switch mid-way does too: its context is re-created and re-prefilled there."""
    import phiedge
    words = " ".join(p.read_text() for p in sorted(DEMO_DOCS.glob("*.md"))).split()
    reference = _whole_sequence_greedy(session.merged / "merged")
    with phiedge.open(session.bundle, runtime=artifact, threads=1) as s:
        rt = s.runtime()
        msgs, at, record = [{"role": "system", "content": "Answer briefly."}], 0, []

        def turn(n: int, max_tokens: int):
            nonlocal msgs, at
            msgs = [*msgs, {"role": "user", "content": " ".join(words[at:at + n]) + " What is this about?"}]
            at += n
            a = s.chat(msgs, rag=False, max_tokens=max_tokens)
            record.append((rt.chat_ids(msgs), a))
            msgs = [*msgs, {"role": "assistant", "content": a.text}]
        turn(100, 16)
        n = 10          # turn 2: the most words whose prompt ends 6 tokens or more before the switch
        while len(rt.chat_ids([*msgs, {"role": "user", "content": " ".join(words[at:at + n + 1])
                                                                   + " What is this about?"}])) < SWITCH - 6:
            n += 1
        turn(n, 16)
        turn(60, 16)
        (p1, a1), (p2, a2), (p3, a3) = record
        assert len(p1) < len(p2) < SWITCH < len(p2) + len(a2.token_ids) and SWITCH < len(p3), (len(p2), len(p3))
        for prompt, answer, held in ((p3, a3, True), (p2, a2, mid_answer)):
            want, margins = reference(prompt, len(answer.token_ids))
            n = len(want) if held else SWITCH - len(prompt) + 1     # per-run switching: up to the switch only
            forced = _teacher_forced(rt, prompt, want)[:n]
            ta = token_agreement(want[:n], margins[:n], forced, Limits.for_precision(s.artifact["precision"]))
            prefix = next((i for i, (g, w) in enumerate(zip(answer.token_ids, want[:n])) if g != w), n)
            assert ta.of == n > 0 and not ta.misses and prefix >= min(ta.first_tie, n), \
                (len(prompt), answer.token_ids, want, ta)


def _teacher_forced(rt, prompt: list[int], want: list[int]) -> list[int]:
    """The runtime's pick after each prefix of `want`, in the regime PyTorch's whole-sequence run has there: one
    prefill up to the switch for the positions within it, one past it for the rest."""
    cut = max(0, min(len(want), SWITCH - len(prompt) + 1))
    picks = rt.logits(prompt + want[:cut - 1], cut).argmax(-1).tolist() if cut else []
    if cut < len(want):
        picks += rt.logits(prompt + want[:-1], len(want)).argmax(-1)[cut:].tolist()
    return picks


_GREEDY: dict = {}        # (prompt ids, n) -> PyTorch's answer: both runtimes' conversations are the same


def _whole_sequence_greedy(merged):
    """PyTorch's greedy tokens for a prompt, the model run on the whole sequence at every step (no cache), with the
    top-2 margin of each step: (prompt ids, n) -> (tokens, margins), the stop token excluded."""
    import torch

    from phiedge.checks import reference
    model, stops = None, set(reference.eos_ids(merged))

    def run(ids: list[int], n: int):
        nonlocal model
        if (tuple(ids), n) not in _GREEDY:
            model = model or reference.load(merged)
            seq, out, margins = list(ids), [], []
            with torch.no_grad(), reference.fp32_compute():
                for _ in range(n):
                    top = torch.topk(model(torch.tensor([seq])).logits[0, -1].float(), 2)
                    token = int(top.indices[0])
                    if token in stops:
                        break
                    out.append(token)
                    margins.append(float(top.values[0] - top.values[1]))
                    seq.append(token)
            _GREEDY[tuple(ids), n] = out, margins
        return _GREEDY[tuple(ids), n]
    return run


def test_streamed_text_never_splits_a_character(tiny):
    """Characters the byte-level BPE splits over several tokens come out whole: no piece holds U+FFFD, at least one
    token released nothing (its character incomplete), and the pieces join to the whole decode; a stop string ends
    the text before it, and its start is held back until it is known not to be one."""
    tok = Tokenizer.from_file(str(tiny / "model" / "tokenizer.json"))
    text = "Grüße aus Köln — 日本語のテキスト 🙂 and the end."
    ids = tok.encode(text, add_special_tokens=False).ids
    decode = lambda i: tok.decode(i, skip_special_tokens=True)   # noqa: E731
    pieces = TextPieces(decode)
    out = [pieces.add(t) for t in ids]
    out.append(pieces.finish())
    assert len(ids) > len(text.split()) and "" in out[:-1], ids
    assert all("\ufffd" not in p for p in out) and "".join(out) == decode(ids).strip() == pieces.text
    stopped = TextPieces(decode, stop=["テキスト", "Köln —"])
    got = []
    for t in ids:
        got.append(stopped.add(t))
        if stopped.hit:
            break
    got.append(stopped.finish())
    assert stopped.hit == "Köln —" and "".join(got) == "Grüße aus" == stopped.text, got
