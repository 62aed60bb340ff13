"""Device-side embedder: ONNX Runtime + tokenizers + numpy. No torch, no transformers.

The folder written by `phiedge.retriever.export` holds `model.onnx` (transformer + pooling + L2 normalize in
the graph, output `sentence_embedding`), `tokenizer.json` and `embedder.json` (settings).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from ..errors import RetrieverError

log = logging.getLogger(__name__)

MODEL_FILE = "model.onnx"
TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "embedder.json"


class OnnxEmbedder:
    """Sentence embeddings from an exported ONNX model. Embeddings are L2-normalized float32."""

    def __init__(self, folder: str | Path, *, threads: int | None = None):
        import onnxruntime as ort
        from tokenizers import Tokenizer

        folder = Path(folder)
        for name in (MODEL_FILE, TOKENIZER_FILE, CONFIG_FILE):
            if not (folder / name).is_file():
                raise RetrieverError(f"{folder / name} is missing: the retriever is incomplete; rebuild it with "
                                     f"`phiedge index`")
        self.folder = folder
        self.config = json.loads((folder / CONFIG_FILE).read_text())
        self.max_length = int(self.config["max_seq_length"])
        self.dim = int(self.config["dim"])
        self.tokenizer = Tokenizer.from_file(str(folder / TOKENIZER_FILE))
        self.tokenizer.enable_truncation(self.max_length)
        self.tokenizer.no_padding()
        self.pad_id = int(self.config.get("pad_token_id", 0))
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(str(folder / MODEL_FILE), opts, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own exception types (InvalidProtobuf, Fail, ...)
            raise RetrieverError(f"{folder / MODEL_FILE} cannot be loaded by onnxruntime ({e.__class__.__name__}): "
                                 f"the file is corrupt; rebuild the retriever with `phiedge index`") from None
        self.input_names = [i.name for i in self.session.get_inputs()]

    def embed(self, texts: list[str], batch_size: int = 32) -> np.ndarray:
        """Embeddings (len(texts), dim), L2-normalized. Batches are formed by length to limit padding."""
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        encs = self.tokenizer.encode_batch(list(texts))
        order = sorted(range(len(encs)), key=lambda i: len(encs[i].ids))
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for b in range(0, len(order), batch_size):
            idx = order[b:b + batch_size]
            width = max(len(encs[i].ids) for i in idx)
            ids = np.full((len(idx), width), self.pad_id, dtype=np.int64)
            mask = np.zeros((len(idx), width), dtype=np.int64)
            types = np.zeros((len(idx), width), dtype=np.int64)
            for r, i in enumerate(idx):
                e = encs[i]
                n = len(e.ids)
                ids[r, :n] = e.ids
                mask[r, :n] = 1
                types[r, :n] = e.type_ids
            feeds = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
            vec = self.session.run(None, {k: v for k, v in feeds.items() if k in self.input_names})[0]
            out[idx] = vec
        return out

    def embed_query(self, text: str) -> np.ndarray:
        return self.embed([text], batch_size=1)[0]
