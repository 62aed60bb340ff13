"""The bundle of the session build (`--target all`, every format, documents): layout and manifest, the smoke RAG
answer on every runtime, verify, ask, validate, the stage cache (what a change rebuilds, and what it does not),
and the HTML report in a real browser (kill -9 at every stage: tests/test_resilience.py)."""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import DEMO, DEMO_DOCS, ROOT, SESSION, assert_pytorch_tokens, build_args, installed, run_cli, stage_lines
from phiedge import bundle
from phiedge.checks import ArtifactResult, judge
from phiedge.checks.metrics import min_agreeing
from phiedge.errors import BundleError
from phiedge.runtimes import RuntimeSettings, get

pytestmark = pytest.mark.gguf
QUESTION, NEEDLE = DEMO["question"], DEMO["needle"]


def _flip_byte(path: Path, at: int) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0x01
    path.write_bytes(bytes(data))


def test_bundle_layout_and_manifest(session):
    m = json.loads((session.bundle / "manifest.json").read_text())
    assert m["passed"] and m["target"]["name"] == "all" and m["retriever"] == "retriever"
    assert m["source"]["adapter"]["files"]["adapter_model.safetensors"]
    assert m["source"]["model"]["files"]["model.safetensors"]
    assert m["versions"]["llama-cpp-python"] and m["versions"]["phiedge"]
    for name in ("golden.npz", "report.json", "report.html", "README.md", "retriever/retriever.sqlite",
                 "retriever/vectors.faiss", "retriever/embedder/model.onnx"):
        assert name in m["files"], name
    assert [(a["format"], a["precision"]) for a in m["artifacts"]] == [
        (f, p) for f, precs in SESSION.items() if installed(f) for p in precs]
    for a in m["artifacts"]:
        assert (session.bundle / a["path"]).is_dir() and a["passed"]
        assert a["parity"]["short"]["top1"] > 0 and a["parity"]["long"]["top1"] > 0 and a["smoke"]["of"] > 0
    for rel, meta in m["files"].items():
        assert (session.bundle / rel).stat().st_size == meta["size"]
    assert not session.bundle.with_name("bundle.partial").exists()
    readme = (session.bundle / "README.md").read_text()
    assert "Built for target `all`" in readme and "Built 20" not in readme      # no build time inside


def test_smoke_rag_on_every_runtime(session):
    rep = session.report
    assert rep["smoke"]["question"] == QUESTION and rep["smoke"]["retrieved_has_needle"]
    for a in rep["artifacts"]:
        s = a["smoke"]
        assert s is not None and s["of"] > 0 and s["decode_tps"] > 0 and s["ttft_s"] > 0
        if a["full_precision"]:
            assert s["agreement_min"] is None
            assert_pytorch_tokens(s)
        else:
            need = min_agreeing(s["of"], a["thresholds"]["top1_min"])       # the precision's top-1, beyond chance
            assert s["agreement"] >= s["agreement_min"] == need / s["of"] < a["thresholds"]["top1_min"]


def test_smoke_rule_forgives_only_near_ties(session):
    """The full-precision smoke rule on the build's own F16 record: a token the artifact picks differently is
    forgiven only where PyTorch's top-2 margin is within the precision's logit tolerance (a near-tie), and the
    greedy answer may not leave PyTorch's before the first near-tie. The judge is pure: the same measurement
    gives the same verdict, and judging changes nothing."""
    r = ArtifactResult.from_json(session.row("gguf", "F16"), session.bundle)
    m, limits = r.measurement, r.limits
    smoke = m.smoke
    want, n, tie = list(smoke.probe.reference), len(smoke.probe.reference), limits.near_tie
    assert len(smoke.probe.margins) == n > 0 and all(x >= 0 for x in smoke.probe.margins)
    before = json.dumps(m.to_json(), sort_keys=True)
    assert judge(m, limits) == judge(m, limits) == r.verdict and r.passed
    assert json.dumps(m.to_json(), sort_keys=True) == before

    def verdict(margins: list[float], forced: list[int], tokens: list[int]) -> list[str]:
        probe = dataclasses.replace(smoke.probe, margins=tuple(margins))
        answer = dataclasses.replace(smoke, probe=probe, forced=tuple(forced), tokens=tuple(tokens))
        return [f for f in judge(dataclasses.replace(m, smoke=answer), limits).failures if f.startswith("smoke")]

    other = [want[0] + 1] + want[1:]                   # the first answer token taken the other way
    decisive = [tie + 1.0] * n
    tied_first = [tie / 2] + decisive[1:]
    assert verdict(tied_first, other, other) == []      # a near-tie: the greedy answer may go elsewhere from there
    fails = verdict(decisive, other, other)
    assert any("position(s) 0 of" in f for f in fails) and any("before any near-tie" in f for f in fails), fails
    assert verdict(decisive, want, want[:3] + [want[3] + 1]) == [
        f"smoke: the greedy answer leaves PyTorch's at token 3 of {n}, before any near-tie"]


def test_verify_catches_changed_missing_and_extra_files(session, tmp_path):
    assert bundle.verify(session.bundle)["passed"]
    cases = {
        "changed": lambda b: _flip_byte(b / "golden.npz", 200),
        "missing": lambda b: (b / "README.md").unlink(),
        "extra": lambda b: (b / "notes.txt").write_text("hi"),
    }
    for kind, tamper in cases.items():
        copy = tmp_path / kind
        shutil.copytree(session.bundle, copy)
        tamper(copy)
        with pytest.raises(BundleError) as e:
            bundle.verify(copy)
        assert kind in str(e.value), str(e.value)
    r = run_cli("verify", str(tmp_path / "changed"))
    assert r.returncode == 1 and "changed golden.npz" in r.stderr
    r = run_cli("ask", str(tmp_path / "changed"), QUESTION)
    assert r.returncode == 1 and "failed verification" in r.stderr


def test_ask_and_chat_answer_with_sources_without_torch(session):
    """`ask` (whole and streamed) and `chat` (its command, read from a pipe) on the device path: no torch, no
    transformers; the CLI's streamed answer is the library's answer."""
    code = ("import sys, json; from phiedge import device; from phiedge.cli import main; "
            f"a = device.ask({str(session.bundle)!r}, {QUESTION!r}, max_new_tokens=16, runtime='gguf'); "
            f"s = ''.join(c.text for c in device.ask({str(session.bundle)!r}, {QUESTION!r}, max_new_tokens=16, "
            "runtime='gguf', stream=True)); "
            f"code = main(['chat', {str(session.bundle)!r}, '--runtime', 'gguf', '--max-tokens', '4']); "
            "bad = [m for m in ('torch', 'transformers', 'sentence_transformers') if m in sys.modules]; "
            "print(json.dumps({'bad': bad, 'sources': a.sources, 'text': a.text, 'streamed': s, 'code': code}))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, input=f"{QUESTION}\n")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["bad"] == [] and out["sources"] and out["text"] == out["streamed"] and out["code"] == 0, out
    assert r.stdout.count("sources: [1]") == 1, r.stdout                       # chat's one turn
    cli = run_cli("ask", str(session.bundle), QUESTION, "--max-tokens", "16", "--runtime", "gguf")
    assert cli.returncode == 0 and cli.stdout.split("\n\nsources:\n")[0].strip() == out["text"], cli.stdout


# Validated on this device (each runtime once; MLX's CPU backend would spend minutes on the long probe again).
VALIDATE = ["gguf-Q4_K_M", "onnx-int4", "openvino-int4"]


def test_validate_on_this_device(session, monkeypatch):
    r = run_cli("validate", str(session.bundle), *[a for name in VALIDATE for a in ("--artifact", name)])
    assert r.returncode == 0, r.stderr
    rep = json.loads(session.bundle.with_name("bundle.device-report.json").read_text())
    assert rep["passed"] and rep["runtime_versions"]["llama-cpp-python"]
    checked = [a for a in rep["artifacts"] if a["status"] != "not validated"]
    assert [a["path"] for a in checked] == [n for n in VALIDATE if installed(n.split("-")[0])]
    for a in checked:
        assert a["status"] == "passed" and a["parity"]["short"] and a["parity"]["long"] and a["decode_tps"] > 0
        assert a["greedy"]["token_agreement"]["of"] == a["greedy"]["of"] > 0     # golden margins travel too
    assert all(a["reason"] == "not selected (--artifact)" for a in rep["artifacts"] if a["path"] not in VALIDATE)
    # A machine without the runtimes lists their artifacts as not validated, never as passed.
    import importlib.util

    from phiedge import device
    from phiedge.runtimes import REGISTRY
    packages = {cls.package for cls in REGISTRY.values()}
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n in packages else real(n, *a))
    rep = device.validate(session.bundle)
    assert rep["artifacts"] and all(a["status"] == "not validated" and REGISTRY[a["format"]].package in a["reason"]
                                    for a in rep["artifacts"])


def _session_args(tiny, out, session, **kw):
    formats = {f: p for f, p in SESSION.items() if installed(f)}
    return build_args(tiny, out, session.cache, kw.pop("formats", formats), **kw)


def test_same_build_again_does_no_work(tiny, session, tmp_path):
    r = run_cli(*_session_args(tiny, tmp_path / "again", session))
    assert r.returncode == 0, r.stderr[-2000:]
    stages = stage_lines(r.stderr)
    assert all(cached for name, cached in stages.items() if name not in ("resolve", "bundle")), stages
    assert [name for name, cached in stages.items() if not cached] == ["resolve", "bundle"]


def test_editing_the_report_reruns_no_stage(tiny, session, tmp_path):
    """A stage's key covers the code it runs, not all of phiedge: the same build run by a copy of phiedge whose
    report.py is edited finds every stage in the cache; a copy whose merge.py is edited would not."""
    from phiedge import build as build_mod
    from phiedge import cache
    copy = tmp_path / "src"
    shutil.copytree(ROOT / "phiedge", copy / "phiedge", ignore=shutil.ignore_patterns("__pycache__"))
    with open(copy / "phiedge" / "report.py", "a") as f:
        f.write("\n_EDITED = True   # code no stage runs: the report is written after every stage\n")
    # The copy first, and the editable install's own import hook out of the way.
    code = ("import sys; sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in repr(f)]; "
            f"sys.path.insert(0, {str(copy)!r}); import phiedge; assert phiedge.__file__.startswith({str(copy)!r}); "
            "from phiedge.cli import main; sys.exit(main(sys.argv[1:]))")
    args = _session_args(tiny, tmp_path / "edited", session)
    r = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                       env={**os.environ, "PHIEDGE_TARGETS": str(ROOT / "targets")})
    assert r.returncode == 0, r.stderr[-2000:]
    stages = stage_lines(r.stderr)
    assert stages["merge"] and all(c for n, c in stages.items() if n.startswith(("export", "check"))), stages
    assert "report.py" not in {p.name for p in cache.module_closure(build_mod.MERGE_CODE)}
    before = cache.code_fingerprint(build_mod.MERGE_CODE)
    try:
        cache.PACKAGE = copy / "phiedge"
        assert cache.code_fingerprint(build_mod.MERGE_CODE) == before
        with open(copy / "phiedge" / "merge.py", "a") as f:
            f.write("\n_EDITED = True   # an edit of the merge's code (a comment alone changes no stage)\n")
        assert cache.code_fingerprint(build_mod.MERGE_CODE) != before
    finally:
        cache.PACKAGE = ROOT / "phiedge"


def test_new_docs_rebuild_only_retriever_and_checks(tiny, session, tmp_path):
    more = tmp_path / "docs2"
    shutil.copytree(DEMO_DOCS, more)
    (more / "extra.md").write_text("# Deployment\n\nThe bundle ships a GGUF for llama.cpp and a retriever.\n")
    r = run_cli(*_session_args(tiny, tmp_path / "b2", session, formats={"gguf": SESSION["gguf"]}, docs=more))
    assert r.returncode == 0, r.stderr[-2000:]
    s = stage_lines(r.stderr)
    assert s["merge"] and all(s[f"export gguf {p}"] for p in SESSION["gguf"])
    assert not s["retriever"] and not s["smoke reference"] and not any(s[n] for n in s if n.startswith("check"))


def test_new_adapter_rebuilds_merge_and_exports_not_retriever(tiny, session, tmp_path):
    r = run_cli(*_session_args(tiny, tmp_path / "b3", session, formats={"gguf": ["F16"]}, adapter="rslora"))
    assert r.returncode == 0, r.stderr[-2000:]
    s = stage_lines(r.stderr)
    assert not s["merge"] and not s["export gguf F16"] and s["retriever"]


def test_several_adapters_each_get_their_artifacts_golden_and_answers(tiny, session, tmp_path):
    """`--adapter` twice (a bare path, named after its folder, and NAME=PATH): each adapter is merged into its own
    artifact set (`<format>-<precision>@<adapter>/`) with its own golden references; the session adapter's stages
    all come from the cache (adding an adapter runs only that adapter's stages); ask and validate pick by
    --adapter, and a bundle of several refuses to guess."""
    out = tmp_path / "two"
    r = run_cli(*_session_args(tiny, out, session, formats={"gguf": SESSION["gguf"]}),
                "--adapter", f"rs={tiny / 'adapters' / 'rslora'}")
    assert r.returncode == 0, r.stderr[-2000:]
    s = stage_lines(r.stderr)
    ours = [n for n in s if n.endswith("@lora")]
    assert ours and all(s[n] for n in ours), s                    # the session's adapter: nothing ran again
    # rs's own stages ran or came from the cache (another test exported rs's F16 into the session cache)
    assert all(f"export gguf {p}@rs" in s for p in SESSION["gguf"]) and "merge@rs" in s
    assert not any(k in s for k in ("merge", *(f"export gguf {p}" for p in SESSION["gguf"]), "golden"))
    m = json.loads((out / "manifest.json").read_text())
    want = [f"gguf-{p}@{a}" for a in ("lora", "rs") for p in SESSION["gguf"]]
    assert [a["path"] for a in m["artifacts"]] == want and all(a["passed"] for a in m["artifacts"])
    assert {a["adapter"] for a in m["artifacts"]} == {"lora", "rs"}
    assert {a["golden"] for a in m["artifacts"]} == {"golden@lora.npz", "golden@rs.npz"}
    assert "golden.npz" not in m["files"] and set(m["source"]["adapters"]) == {"lora", "rs"}
    assert m["source"]["adapter"] is None
    # The session's lora artifacts, byte for byte; the other adapter's differ from them.
    for p in SESSION["gguf"]:
        mine = {f: v["sha256"] for f, v in m["files"].items() if f.startswith(f"gguf-{p}@lora/")}
        theirs = json.loads((session.bundle / "manifest.json").read_text())["files"]
        assert mine and all(theirs[f.replace("@lora", "", 1)]["sha256"] == h for f, h in mine.items())
        assert m["files"][f"gguf-{p}@rs/model.gguf"]["sha256"] != m["files"][f"gguf-{p}@lora/model.gguf"]["sha256"]
    rep = json.loads((out / "report.json").read_text())
    assert [a["name"] for a in rep["adapters"]] == ["lora", "rs"] and rep["merge"] is None
    # rs ships its own chat template (saved beside it): in the GGUF's metadata, its record, its Modelfile
    assert {(a["adapter"], a["tokenizer"]["source"]) for a in m["artifacts"]} == {("lora", "base"), ("rs", "adapter")}
    rt = get("gguf").load(out / "gguf-F32@rs", RuntimeSettings(threads=1))
    try:
        assert "You are a support agent for ACME." in rt.chat_template
    finally:
        rt.close()
    assert "TEMPLATE" in (out / "gguf-F32@lora" / "Modelfile").read_text()
    assert "TEMPLATE" not in (out / "gguf-F32@rs" / "Modelfile").read_text().replace("No TEMPLATE", "")
    assert all(a["merge"]["max_abs_vs_base"] > a["merge"]["tolerance"] for a in rep["adapters"])
    assert "--adapter lora" in (out / "README.md").read_text()
    # ask: refuses to guess, names the adapters; answers with the one named; an unknown name is one line.
    guess = run_cli("ask", str(out), QUESTION, "--max-tokens", "4")
    assert guess.returncode == 1 and "--adapter NAME" in guess.stderr and "lora, rs" in guess.stderr
    wrong = run_cli("ask", str(out), QUESTION, "--adapter", "nope")
    assert wrong.returncode == 1 and "no adapter 'nope'" in wrong.stderr and len(wrong.stderr.splitlines()) == 1
    ok = run_cli("ask", str(out), QUESTION, "--max-tokens", "4", "--adapter", "rs", "--runtime", "gguf")
    assert ok.returncode == 0 and "(gguf F32@rs:" in ok.stderr, ok.stderr
    # validate: the chosen adapter's artifact against its own golden references, the rest not selected.
    v = run_cli("validate", str(out), "--adapter", "rs", "--artifact", "gguf-Q8_0@rs")
    assert v.returncode == 0, v.stderr
    dev = json.loads(out.with_name("two.device-report.json").read_text())
    (done,) = [a for a in dev["artifacts"] if a["status"] != "not validated"]
    assert done["path"] == "gguf-Q8_0@rs" and done["status"] == "passed" and done["adapter"] == "rs"
    assert {a["path"]: a["reason"] for a in dev["artifacts"] if a is not done} == {
        **{f"gguf-{p}@lora": "not selected (--adapter)" for p in SESSION["gguf"]},
        **{f"gguf-{p}@rs": "not selected (--artifact)" for p in SESSION["gguf"] if p != "Q8_0"}}


# Measures, in the page, whether any two labels of the size-vs-KL plot overlap (their rendered boxes).
OVERLAP_JS = """<script>
window.addEventListener('load', () => {
  const boxes = [...document.querySelectorAll('g[id^="label"]')].map(g => g.getBoundingClientRect());
  let overlaps = 0;
  for (let i = 0; i < boxes.length; i++) for (let j = i + 1; j < boxes.length; j++) {
    const a = boxes[i], b = boxes[j];
    if (a.left < b.right && b.left < a.right && a.top < b.bottom && b.top < a.bottom) overlaps++;
  }
  document.body.setAttribute('data-labels', boxes.length);
  document.body.setAttribute('data-overlaps', overlaps);
});
</script></body>"""


def test_report_renders_in_a_real_browser(session, tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "chromium is installed by `make test` (Debian package chromium)"
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}"]
    html = (session.bundle / "report.html").read_text()
    assert "nan" not in html.replace("nanoseconds", "") and "None positions" not in html
    page = tmp_path / "report.html"
    page.write_text(html.replace("</body>", OVERLAP_JS))
    dom = subprocess.run([chromium, *flags, "--virtual-time-budget=5000", "--dump-dom", page.as_uri()],
                         capture_output=True, text=True, timeout=120).stdout
    rep = session.report
    n = len(rep["artifacts"])
    assert dom.count('<tr class="pass">') == n
    assert dom.count('id="point-') == 2 * n                # size vs KL, both regimes
    assert dom.count('id="bar-') == 2 * n                  # tokens/s and time to first token
    assert f'data-labels="{n}"' in dom and 'data-overlaps="0"' in dom, "labels of the KL plot overlap"
    shot = tmp_path / "report.png"
    subprocess.run([chromium, *flags, f"--screenshot={shot}", "--window-size=1280,1400",
                    (session.bundle / "report.html").as_uri()], capture_output=True, timeout=120)
    assert shot.stat().st_size > 20_000
