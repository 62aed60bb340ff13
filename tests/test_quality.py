"""Quality per byte: the calibration sample, llama.cpp's importance matrix from the documents, `phiedge sweep` and a
profile's precision "auto", on the tiny Phi (its widths are multiples of 256, as Phi-4-mini's: llama.cpp's
K-quants keep their own types there) with real llama.cpp."""
from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from conftest import DEMO_DOCS, THREADS, build_args, run_cli
from phiedge import calibration, exporters, runtimes
from phiedge.build import calibration_text
from phiedge.checks import probes
from phiedge.checks.metrics import compare
from phiedge.exporters.gguf import converter_dir

pytestmark = pytest.mark.gguf
CANDIDATES = "gguf=Q4_K_M-imat,Q4_K_M-imat-emb8,Q5_K_S-imat"
TOKENS = 2048


@pytest.fixture(scope="module")
def swept(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    r = run_cli("sweep", "--model", str(tiny / "model"), "--adapter", str(tiny / "adapters" / "lora"),
                "--docs", str(DEMO_DOCS), "--formats", "gguf", "--candidates", CANDIDATES,
                "--calibration-tokens", str(TOKENS), "--out", str(root / "sweep"), "--cache-dir", str(root / "cache"),
                "--threads", THREADS, "--jobs", "1")
    assert r.returncode == 0, r.stderr[-3000:]
    sweep = json.loads((root / "sweep" / "sweep.json").read_text())
    return root, sweep, {row["precision"]: row for row in sweep["rows"]}, r.stdout


def _exported_on_the_sweeps_model(swept, fmt, precisions, tmp_path):
    """`precisions` of `fmt` exported from the sweep's merged model (calibrated on its documents and budget), and
    each one's KL on the runtime against the sweep's reference over the short probe."""
    merge = next(p for p in swept[0].glob("cache/merge-*") if (p / ".complete").exists())
    ref = dict(np.load(merge / "reference.npz"))
    settings = {"calibration_text": calibration_text(DEMO_DOCS), "calibration_tokens": TOKENS}
    arts = {a.precision: a for a in exporters.get(fmt).export(merge / "merged", tmp_path, precisions, settings)}
    kl = {}
    for precision, art in arts.items():
        rt = runtimes.get(fmt).load(art.path)
        kl[precision] = compare(ref["short_logits"], rt.logits(ref["short_ids"].tolist(), probes.COMPARE_LAST)).kl
        rt.close()
    return arts, kl


def _input_covariance(model_dir, seq_len):
    """Every block Linear's input covariance X^T X over the calibration sample of the documents (what GPTQ weighs
    a weight error with), from PyTorch."""
    import torch

    from phiedge.checks.reference import load
    model = load(model_dir)
    s = calibration.sample(model_dir, calibration_text(DEMO_DOCS), seq_len, TOKENS)
    cov = {}

    def hook(name):
        def pre(_mod, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            cov[name] = cov.get(name, 0) + x.T @ x
        return pre
    head = model.get_output_embeddings()
    for n, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and m is not head:
            m.register_forward_pre_hook(hook(n))
    with torch.no_grad():
        for w in s.windows:
            model(input_ids=torch.tensor([list(w)]), use_cache=False)
    weights = {n + ".weight": m.weight.detach().double() for n, m in model.named_modules() if n in cov}
    return cov, weights


@pytest.mark.mlx
def test_mlx_lms_gptq_on_the_documents_lowers_the_error_it_minimizes(swept, tmp_path):
    """mlx-lm's GPTQ fed the calibration sample (mlx-lm's own loader downloads its text), against `mlx_lm.convert
    -q` (4bit-emb4), on the sweep's merged model: GPTQ picks each layer's 4-bit weights to lower the error of its
    outputs on the calibration inputs, tr((W - Q) X^T X (W - Q)^T). Summed over the block layers it is lower with
    GPTQ (0.31x on this fixture) at the same bytes. The KL over the probes followed on an earlier fixture (0.0210
    -> 0.0136) and not on the current one (0.0259 -> 0.0266): reported, not held, at this size."""
    import mlx.core as mx

    from phiedge.exporters.mlx import GPTQ_SEQ_LEN
    arts, kl = _exported_on_the_sweeps_model(swept, "mlx", ["4bit-emb4", "4bit-emb4-gptq"], tmp_path)
    plain, gptq = arts["4bit-emb4"], arts["4bit-emb4-gptq"]
    assert gptq.size_bytes == pytest.approx(plain.size_bytes, rel=0.01)
    assert 0 < gptq.meta["gptq"]["tokens"] <= TOKENS and not (gptq.path / "phiedge_gptq.json").exists()
    merge = next(p for p in swept[0].glob("cache/merge-*") if (p / ".complete").exists()) / "merged"
    cov, weights = _input_covariance(merge, GPTQ_SEQ_LEN)
    err = {}
    for name, art in (("plain", plain), ("gptq", gptq)):
        tensors = {k: v for f in art.path.glob("model*.safetensors") for k, v in mx.load(str(f)).items()}
        q = json.loads((art.path / "config.json").read_text())["quantization"]
        for w_name, w in weights.items():
            deq = mx.dequantize(tensors[w_name], tensors[w_name[:-len("weight")] + "scales"],
                                tensors[w_name[:-len("weight")] + "biases"], q["group_size"], q["bits"])
            d = w.numpy() - np.array(deq.astype(mx.float32), dtype=np.float64)
            err.setdefault(name, {})[w_name] = float(np.einsum("ij,jk,ik->", d, cov[w_name[:-len(".weight")]].numpy(), d))
    assert len(err["gptq"]) == 4 * 2
    assert sum(err["gptq"].values()) < 0.95 * sum(err["plain"].values()), err


@pytest.mark.onnx
def test_onnx_int4_weighted_by_the_documents_is_the_builders_own_graph_at_its_kl(swept, tmp_path):
    """Data-aware ONNX int4 (-imat): the merged model as an importance-weighted GPTQ checkpoint, read by
    onnxruntime-genai's builder through its GPTQ loader. The KL is held on the short probe with this module's 2,048
    calibration tokens; a sweep of this fixture with the default 8,192 (mean KL of both regimes) gave blocks of 128
    0.0111 against k_quant's 0.0120, but blocks of 32 0.0088 against 0.0083 (the fixture before it: 0.0051 against
    0.0071), so on a 9M-parameter model a gain is an observation, not a property the method promises: the fixture
    trained on another machine's CPU gave 0.00875 against 0.00854 on the short probe. What is held is that the
    weighting costs nothing beyond noise (within 10 % of the builder's own); a wrong scale or block layout costs
    several times that."""
    import onnx
    arts, kl = _exported_on_the_sweeps_model(swept, "onnx", ["int4-k_quant-head8", "int4-imat-head8"], tmp_path)
    plain, imat = arts["int4-k_quant-head8"], arts["int4-imat-head8"]
    assert imat.size_bytes == pytest.approx(plain.size_bytes, rel=0.01)
    rec = imat.meta["calibration"]
    assert 0 < rec["tokens"] <= TOKENS == rec["budget"] and len(rec["sha256"]) == 64
    assert "calibration" not in plain.meta and imat.meta["builder_options"] == []
    graph = onnx.load(str(imat.path / "model.onnx"), load_external_data=False).graph
    nodes = {n.name: n for n in graph.node}
    head = next(n for n in graph.node if n.op_type == "MatMulNBits" and n.name.startswith("/lm_head"))
    assert {a.name: a.i for a in head.attribute}["bits"] == 8           # -head8: the LM head in 8 bits ...
    gather = nodes["/model/embed_tokens/GatherBlockQuantized"]           # ... shared with the tied embedding
    assert set(gather.input) & set(head.input)
    assert not list(tmp_path.glob(".work"))
    assert kl["int4-imat-head8"] < 1.1 * kl["int4-k_quant-head8"], kl


@pytest.mark.parametrize("precision, message", [
    ("int4-imat-head8", "onnx int4-imat-head8: data-aware int4 is calibrated on the documents: pass --docs, or build "
                        "the data-free int4-k_quant-head8 (--onnx-precision int4-k_quant-head8)"),
    ("int4-imat-mixed8", "data-aware int4 takes -head8 (its LM head in 8 bits), not the builder's mixed8 layer "
                         "selection: use int4-imat-head8"),
])
def test_onnx_data_aware_int4_is_refused_up_front_without_what_it_needs(tiny, tmp_path, precision, message):
    r = run_cli("build", "--model", str(tiny / "model"), "--formats", "onnx", "--onnx-precision", precision,
                "--out", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache"))
    assert r.returncode != 0 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not list(tmp_path.glob("cache/merge-*"))


def _gguf(path):
    sys.path.insert(0, str(converter_dir() / "gguf-py"))
    import gguf
    return gguf.GGUFReader(path)


def test_the_calibration_sample_takes_every_document_within_its_budget(tiny):
    texts = ["alpha beta gamma " * 400, "delta epsilon " * 300, "zeta " * 40]
    s = calibration.sample(tiny / "model", texts, seq_len=64, budget=512)
    assert s.tokens <= 512 and all(len(w) <= 64 for w in s.windows)
    firsts = [calibration.sample(tiny / "model", [t], 64, 64).windows[0] for t in texts]
    assert list(s.windows[:3]) == firsts            # round-robin: the first window of each document comes first
    again = calibration.sample(tiny / "model", list(texts), 64, 512)
    assert again.sha256 == s.sha256 and again.record() == s.record()
    assert calibration.sample(tiny / "model", texts, 64, 2048).tokens > s.tokens
    small = calibration.sample(tiny / "model", texts, seq_len=512, budget=256)     # under one window: one of 256
    assert small.seq_len == 256 and small.tokens == 256 and len(small.windows) == 1


def _sweep_export(root, precision):
    """The sweep's GGUF export stage of one precision (the auto tests add exports to the same cache)."""
    for p in root.glob("cache/export-gguf-*/artifacts.json"):
        (art,) = json.loads(p.read_text())
        if art["precision"] == precision:
            return p.parent, art
    raise AssertionError(f"the sweep's {precision} export is not in its cache")


def test_the_importance_matrix_is_llama_cpps_and_recorded(swept):
    root, _, rows, _ = swept
    by = {p: _sweep_export(root, p) for p in ("Q4_K_M", "Q4_K_M-imat", "Q4_K_M-imat-emb8")}
    rec = by["Q4_K_M-imat"][1]["meta"]["imatrix"]
    assert 0 < rec["tokens"] <= TOKENS == rec["budget"] and rec["seq_len"] == 512
    assert "imatrix" not in by["Q4_K_M"][1]["meta"]
    for prec, embedding in (("Q4_K_M-imat", "Q6_K"), ("Q4_K_M-imat-emb8", "Q8_0"), ("Q4_K_M", "Q6_K")):
        folder, art = by[prec]
        r = _gguf(folder / art["path"] / "model.gguf")
        fields = {k: r.fields[k] for k in r.fields if k.startswith("quantize.imatrix")}
        types = {t.name: t.tensor_type.name for t in r.tensors}
        assert types["token_embd.weight"] == embedding        # tied: quantized as the output tensor
        if prec == "Q4_K_M":
            assert not fields
            continue
        dataset = bytes(fields["quantize.imatrix.dataset"].parts[-1]).decode()
        assert dataset == f"phiedge calibration sha256:{rec['sha256']}"
        assert int(fields["quantize.imatrix.chunks_count"].parts[-1][0]) == rec["windows"]
        blocks = [n for n, t in types.items() if n.startswith("blk.") and n.endswith(".weight")
                  and not n.endswith("norm.weight")]
        assert int(fields["quantize.imatrix.entries_count"].parts[-1][0]) == len(blocks) + 1 == rec["entries"]


# GGUF block tensors and the merged checkpoint's Linear each one holds (Phi-3: fused qkv and gate_up, not permuted).
GGUF_LINEARS = {"attn_qkv": "self_attn.qkv_proj", "attn_output": "self_attn.o_proj", "ffn_up": "mlp.gate_up_proj",
                "ffn_down": "mlp.down_proj"}


def test_the_importance_matrix_lowers_the_error_it_weighs(swept):
    """What llama-quantize does with an importance matrix: it picks each block's scales to lower the weights' error
    weighted by their input columns' mean squared activation on the documents. That weighted error, over every
    block tensor of the fixture, is lower with the importance matrix than without, at the same bytes (0.86x).
    The KL over the probes follows on a real model (SmolLM2 in make bench-quick); on this 9M-parameter fixture it
    does not reliably: sweeps of two fixtures trained alike gave Q4_K_M 0.0045 / -imat 0.0037 and 0.0063 / 0.0068
    (short probe, outside the documents, up; long probe, the reference text, down), so it is reported, not held."""
    from safetensors.numpy import load_file

    from phiedge.exporters.gguf import IMATRIX_SEQ_LEN
    root, _, rows, _ = swept
    plain, imat = rows["Q4_K_M"], rows["Q4_K_M-imat"]
    assert imat["size_bytes"] == pytest.approx(plain["size_bytes"], rel=1e-4)     # + the imatrix's keys
    merge = next(p for p in root.glob("cache/merge-*") if (p / ".complete").exists()) / "merged"
    power, _ = calibration.input_statistics(merge, calibration_text(DEMO_DOCS), IMATRIX_SEQ_LEN, TOKENS, "the test")
    weights = {k: v for f in merge.glob("*.safetensors") for k, v in load_file(f).items()}
    sys.path.insert(0, str(converter_dir() / "gguf-py"))
    from gguf.quants import dequantize
    err = {}
    for prec in ("Q4_K_M", "Q4_K_M-imat"):
        folder, art = _sweep_export(root, prec)
        reader = _gguf(folder / art["path"] / "model.gguf")
        for t in reader.tensors:
            layer, kind = t.name.split(".")[1:3] if t.name.startswith("blk.") else (None, None)
            if kind not in GGUF_LINEARS:
                continue
            module = f"model.layers.{layer}.{GGUF_LINEARS[kind]}"
            w = weights[module + ".weight"].astype(np.float64)
            q = dequantize(t.data, t.tensor_type).reshape(w.shape)
            total, tokens = power[module]
            err.setdefault(prec, {})[module] = float((((w - q) ** 2) * (np.asarray(total) / tokens)).sum())
    assert err["Q4_K_M"].keys() == err["Q4_K_M-imat"].keys() and len(err["Q4_K_M"]) == 4 * 2
    assert sum(err["Q4_K_M-imat"].values()) < 0.95 * sum(err["Q4_K_M"].values()), err


def test_the_sweep_sets_each_variant_against_the_tools_own_4bit(swept):
    root, sweep, rows, stdout = swept
    anchor = rows["Q4_K_M"]
    assert anchor["anchor"] and anchor["kl_ratio"] == anchor["size_ratio"] == anchor["full_size_ratio"] == 1.0
    assert [r["anchor"] for r in sweep["rows"]].count(True) == 1
    # Projected to Phi-4-mini's proportions, Q4_K_M reads what llama.cpp wrote at full size (2.49 GB, make bench).
    assert 2.3e9 < anchor["full_size_bytes"] < 2.7e9
    for r in rows.values():
        assert r["kl_ratio"] == pytest.approx(r["kl"] / anchor["kl"])
        assert r["full_size_ratio"] == pytest.approx(r["full_size_bytes"] / anchor["full_size_bytes"])
        dominated = any(o["full_size_bytes"] <= r["full_size_bytes"] and o["kl"] <= r["kl"] and o is not r and
                        (o["full_size_bytes"], o["kl"]) != (r["full_size_bytes"], r["kl"]) for o in rows.values())
        assert r["pareto"] == (not dominated)
    assert rows["Q5_K_S-imat"]["full_size_ratio"] < 1.15 and rows["Q4_K_M-imat-emb8"]["full_size_ratio"] > 1.0
    page = (root / "sweep" / "sweep.html").read_text()
    assert page.count("<circle") == len(sweep["rows"]) and "Q5_K_S-imat" in page
    assert "Q4_K_M *" in stdout


def _profile(path, **row):
    lines = ['name = "%s"' % path.stem, "[[artifacts]]", 'format = "gguf"']
    lines += [f"{k} = {json.dumps(v)}" for k, v in row.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_auto_ships_the_lowest_kl_candidate_within_the_size(tiny, swept, tmp_path):
    root, _, rows, _ = swept
    cands = ["Q4_K_M-imat", "Q4_K_M-imat-emb8", "Q5_K_S-imat"]
    limit = rows["Q4_K_M-imat-emb8"]["size_bytes"] - 1     # the 8-bit embedding's variant does not fit
    fits = [c for c in ["Q4_K_M", *cands] if rows[c]["size_bytes"] <= limit]
    best = min(fits, key=lambda c: rows[c]["kl"])
    target = _profile(tmp_path / "small.toml", precision="auto", max_size_gb=limit / 1e9, candidates=cands)
    r = run_cli(*build_args(tiny, tmp_path / "out", root / "cache", {}, "--calibration-tokens", str(TOKENS),
                            target=str(target)))
    assert r.returncode == 0, r.stderr[-3000:]
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    (row,) = manifest["artifacts"]
    assert row["precision"] == best and row["path"] == f"gguf-{best}"
    chosen = row["meta"]["chosen_by"]
    assert chosen["max_size_bytes"] == int(limit / 1e9 * 1e9)
    assert {c["precision"] for c in chosen["sweep"]} == {"Q4_K_M", *cands}
    assert sorted(p.name for p in (tmp_path / "out").glob("gguf-*")) == [f"gguf-{best}"]
    assert f"gguf auto: {best}" in r.stderr


def test_auto_with_nothing_that_fits_is_one_line_naming_the_smallest(tiny, swept, tmp_path):
    root, _, rows, _ = swept
    target = _profile(tmp_path / "tiny.toml", precision="auto", max_size_gb=0.001,
                      candidates=["Q4_K_M-imat", "Q4_K_M-imat-emb8", "Q5_K_S-imat"])     # the stages of the test above
    r = run_cli(*build_args(tiny, tmp_path / "out", root / "cache", {}, "--calibration-tokens", str(TOKENS),
                            target=str(target)))
    assert r.returncode != 0
    last = r.stderr.strip().splitlines()[-1]
    assert "no candidate passed its gate within max_size_gb 0.001" in last and "raise max_size_gb" in last
    smallest = min(rows, key=lambda c: rows[c]["size_bytes"])
    assert smallest in last
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


@pytest.mark.parametrize("row, message", [
    ({"precision": "auto"}, "precision \"auto\" needs max_size_gb"),
    ({"precision": "Q4_K_M", "max_size_gb": 2.8}, "belong to precision \"auto\""),
    ({"precision": "auto", "max_size_gb": 2.8, "candidates": ["Q4_K_M-bogus"]}, "unknown option 'bogus'"),
])
def test_a_profiles_auto_row_is_checked(tiny, tmp_path, row, message):
    target = _profile(tmp_path / "bad.toml", **row)
    r = run_cli(*build_args(tiny, tmp_path / "out", tmp_path / "cache", {}, target=str(target)))
    assert r.returncode != 0 and message in r.stderr.strip().splitlines()[-1]


def test_an_importance_matrix_without_documents_is_refused_up_front(tiny, tmp_path):
    r = run_cli("build", "--model", str(tiny / "model"), "--formats", "gguf", "--gguf-quant", "Q4_K_M-imat",
                "--out", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache"))
    assert r.returncode != 0
    assert "the importance matrix is computed on the documents: pass --docs, or build Q4_K_M " in r.stderr
    assert not list(tmp_path.glob("cache/merge-*"))
