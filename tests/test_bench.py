"""`make bench-quick`: the full-size benchmark's harness, run end to end on the tiny fixture.

The figures of a tiny model prove nothing; the shape does: every stage timed and measured, every standalone
tool run, every runtime timed through phiedge and natively, adapters kept separate switched and reloaded, the
goals evaluated, the plots written."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def results(tiny, tmp_path_factory) -> dict:
    work = tmp_path_factory.mktemp("bench")
    out = work / "results.json"
    # MLX exported by the build's exporter but unchecked, as at full size: its CPU backend spends minutes on the
    # long probe of even the tiny model (tests/test_mlx.py), and the harness's MLX paths are the others' shape.
    # The retriever benchmark (scripts/bench_retriever.py) is run and checked by test_retriever.py.
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench.py"), "--quick", "--fixture", str(tiny),
                        "--unchecked", "mlx", "--skip", "retriever", "--out", str(out), "--work", str(work / "work")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "goals:" in r.stdout and "standalone tool" in r.stdout
    return json.loads(out.read_text()) | {"_out": str(out)}


def test_build_stages_are_timed_and_measured(results):
    b = results["build"]
    names = [s["stage"] for s in b["stages"]]
    for stage in ("resolve", "merge", "retriever", "smoke reference", "export gguf Q5_K_S",
                  "export onnx int4-b128-k_quant-head8", "export openvino int4-g32", "export mlx (unchecked)",
                  "check gguf Q5_K_S", "bundle"):
        assert stage in names, names
    assert b["unchecked"] == ["mlx"]
    measured = [s for s in b["stages"] if s["stage"] != "process start"]
    assert all(s["seconds"] >= 0 and s["peak_rss_mb"] > 0 for s in measured)
    assert b["peak_rss_mb"] >= max(s["peak_rss_mb"] for s in measured) * 0.5
    from phiedge import targets
    from phiedge.checks.metrics import is_full_precision
    four_bit = {(a.format, a.precision) for a in targets.load("all").artifacts if not is_full_precision(a.precision)}
    assert {(a["format"], a["precision"]) for a in b["artifacts"]} == four_bit and len(four_bit) == 4
    assert all(a["size_bytes"] > 0 for a in b["artifacts"])
    assert abs(sum(s["seconds"] for s in b["stages"]) - b["seconds"]) < 0.5


def test_a_failed_build_still_yields_its_stages(results):
    """The bench reads a build's stages from its checklist lines (scripts/bench.py stages_in_log), so a build
    killed mid-way still yields the stages it finished. Checked on this run's real log against its report (which
    holds every stage but the bundle's own, written while it runs)."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import bench
    from_log = {s["stage"]: s for s in bench.stages_in_log(Path(results["build"]["log"]))}
    rep = json.loads((Path(results["build"]["bundle"]) / "report.json").read_text())
    assert list(from_log) == [*rep["timings_s"], "bundle"]
    for stage, seconds in rep["timings_s"].items():
        assert from_log[stage]["seconds"] == pytest.approx(seconds, abs=0.06)
        assert from_log[stage]["peak_rss_mb"] == pytest.approx(rep["peak_rss_mb"][stage], abs=6)


def test_every_standalone_tool_ran(results):
    alts = {a["name"]: a for a in results["alternatives"]}
    assert set(alts) == {"merge", "gguf", "onnx", "openvino", "mlx"}
    for a in alts.values():
        assert a["exit"] == 0, (a["name"], a["steps"][-1].get("error"), a["steps"][-1]["log"])
        assert a["seconds"] > 0 and a["peak_rss_mb"] > 0 and a["size_bytes"] > 0
    c = results["comparison"]
    assert c["standalone_s"] == pytest.approx(sum(a["seconds"] for a in alts.values()), abs=0.05)
    assert 0 < c["merge_and_exports_s"] < c["build_s"] and c["checks_s"] > 0
    assert c["build_ratio"] == pytest.approx(c["build_s"] / c["standalone_s"], rel=1e-2)


def test_inference_ours_and_native(results):
    rows = {r["format"]: r for r in results["inference"]}
    assert set(rows) == {"gguf", "onnx", "openvino"}                 # mlx: unchecked, so not measured
    for r in rows.values():
        assert 400 <= r["prompt_tokens"] <= 512
        for mode in ("ours", "native"):
            assert r[mode]["exit"] == 0, (r["format"], mode, r[mode].get("error"))
            assert r[mode]["decode_tps"] > 0 and r[mode]["ttft_s"] > 0 and r[mode]["peak_rss_mb"] > 0
        assert r["ours"]["new_tokens"] == 128
        for mode in ("ours", "native"):                      # the best of the interleaved runs
            assert len(r[mode]["decode_tps_runs"]) == 3 and r[mode]["decode_tps"] == max(r[mode]["decode_tps_runs"])
        assert r["decode_ratio"] == pytest.approx(r["ours"]["decode_tps"] / r["native"]["decode_tps"], rel=1e-2)
        if r["format"] == "gguf":                            # native: the faster of flash attention off and on
            by_flash = r["native"]["decode_tps_by_flash_attn"]
            assert set(by_flash) == {"false", "true"} and r["native"]["decode_tps"] == max(by_flash.values())
        assert r["weight_bytes"] > 0 and r["roofline_tps"] > 0


def test_adapters_switch_reload_and_decode_beside_merged(results):
    """Per checked runtime: the base for adapters and both adapters' files exported, a switch in place and a reload
    timed, decode with the adapter against the merged artifact of the same precision."""
    rows = {r["format"]: r for r in results["adapters"]}
    assert set(rows) == {"gguf", "onnx", "openvino"}                 # mlx: unchecked, so not measured
    precision = {a["format"]: a["precision"] for a in results["build"]["artifacts"]}
    for f, r in rows.items():
        assert r["precision"] == precision[f] and "error" not in r, r
        assert all(r[k]["exit"] == 0 for k in ("base_export", "adapter_a_export", "adapter_b_export")), r
        assert 0 < r["adapter_bytes"] < r["base_bytes"] and r["merged_bytes"] > 0
        assert all(r[k] > 0 for k in ("switch_s", "switch_back_s", "reload_s", "load_with_adapter_s")), r
        assert r["new_tokens"] == 128
        assert r["decode_ratio"] == pytest.approx(r["adapter_decode_tps"] / r["merged_decode_tps"], rel=1e-2)
        assert r["ship_merged_for_speed"] == (r["decode_ratio"] < 0.9)


def test_bandwidth_goals_and_outputs(results):
    assert results["bandwidth"]["read_gb_s"] > 0.5
    goals = results["goals"]
    assert len(goals) == 3 + 4 and all(isinstance(g["passed"], bool) for g in goals if "not_measured" not in g)
    assert [g["goal"].split()[0] for g in goals[:3]] == ["build", "merge", "whole"]
    assert [g["goal"].split()[0] for g in goals if "not_measured" in g] == ["mlx"]
    assert goals[0]["measured"] == pytest.approx(results["build"]["peak_rss_mb"] / 1024, abs=0.01)
    assert results["retriever"] is None                      # --skip retriever
    html = Path(results["_out"]).with_suffix(".html").read_text()
    assert html.count("<svg") == 6 and "goals:" in html and "switch in place" in html
