"""onnxruntime-genai: `og.Model` on the artifact folder, its own tokenizer, the artifact's own chat template.

LongRoPE: the builder's graph picks the short or long cos/sin cache with an `If` on the total length
(past + new tokens) of each run. `logits` is therefore one `append_tokens` of every id (one prefill), so a
4200-token probe sees 4200 and uses the long factors for all of it, as Hugging Face does. Appending a
long prompt in pieces that cross the switch would mix the two factor sets (tests/test_onnx.py shows the
gate failing that).

Prompt logits on CPU come from onnxruntime itself on an in-memory copy of the same graph whose LM head reads
only the rows asked for (`slice_before_lm_head`; the weights are the artifact's own external data file, the
shipped model.onnx is unchanged): onnxruntime-genai returns the LM head over every position, 3.4 GB of fp32
for a 4200-token probe at Phi-4-mini's 200,064 vocabulary (the full-size check peaked at 16.5 GB so).
Generation stays onnxruntime-genai's.

Device-path module: onnxruntime_genai, onnxruntime, onnx, numpy, json and jinja2 (phiedge.chat); never
torch or transformers.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from ..errors import ToolchainError, UsageError
from . import guidance
from .base import Runtime, RuntimeSettings, register

log = logging.getLogger(__name__)

ROWS_FROM = "phiedge_rows_from"        # the input slice_before_lm_head adds: the first hidden-state row kept
# Ops the LM head's input is followed up through from the `logits` output (a Cast for fp16 I/O, a softcap).
HEAD_PASSTHROUGH = {"Cast", "Mul", "Div", "Tanh"}

# RuntimeSettings.device (or extra["execution_provider"]) -> (onnxruntime-genai provider name or None for
# its default CPU, the og.is_*_available check that must pass first or None).
PROVIDERS: dict[str, tuple[str | None, str | None]] = {
    "CPU": (None, None),
    "CUDA": ("cuda", "is_cuda_available"),
    "GPU": ("cuda", "is_cuda_available"),
    "DML": ("dml", "is_dml_available"),
    "WEBGPU": ("WebGPU", "is_webgpu_available"),
    "OPENVINO": ("OpenVINO", "is_openvino_available"),
    "QNN": ("QNN", "is_qnn_available"),
}


def compact_json(schema: dict) -> dict:
    """The schema with llguidance's own option for JSON without free whitespace between tokens (onnxruntime-genai's
    guidance is llguidance): no tokens spent on layout."""
    return {**schema, "x-guidance": {**guidance.OPTIONS, **schema.get("x-guidance", {})}}


def _import_og():
    try:
        import onnxruntime_genai as og
    except ImportError:
        raise ToolchainError("onnxruntime-genai is not installed: pip install 'phiedge[onnx]'") from None
    return og


def slice_before_lm_head(graph) -> bool:
    """Make the LM head of an onnx GraphProto read only hidden-state rows ROWS_FROM.. (a new int64 [1] input),
    in place. The `logits` output's producer is followed up through HEAD_PASSTHROUGH ops to the MatMul /
    MatMulNBits whose first input is the hidden states; a Slice on axis 1 goes before it. False, graph
    untouched, where it is not that shape."""
    from onnx import TensorProto, helper, numpy_helper
    producer = {o: n for n in graph.node for o in n.output}
    node = producer.get("logits")
    for _ in range(8):
        if node is None or node.op_type in ("MatMul", "MatMulNBits"):
            break
        node = producer.get(node.input[0]) if node.op_type in HEAD_PASSTHROUGH else None
    if node is None or node.op_type not in ("MatMul", "MatMulNBits"):
        return False
    hidden, sliced = node.input[0], "phiedge_lm_head_rows"
    graph.initializer.extend([numpy_helper.from_array(np.asarray([np.iinfo(np.int64).max]), "phiedge_rows_end"),
                              numpy_helper.from_array(np.asarray([1], dtype=np.int64), "phiedge_rows_axis")])
    graph.input.append(helper.make_tensor_value_info(ROWS_FROM, TensorProto.INT64, [1]))
    graph.node.insert(list(graph.node).index(node), helper.make_node(
        "Slice", [hidden, ROWS_FROM, "phiedge_rows_end", "phiedge_rows_axis"], [sliced], name="phiedge_rows"))
    node.input[0] = sliced
    for out in graph.output:             # the logits' row count is no longer the prompt's
        if out.name == "logits" and len(out.type.tensor_type.shape.dim) == 3:
            out.type.tensor_type.shape.dim[1].dim_param = "phiedge_rows"
    return True


@register
class ONNXRuntime(Runtime):
    format = "onnx"
    SUPPORTS = frozenset({"constraint"})
    package = "onnxruntime_genai"
    ALL_ROW_LOGITS = False            # on CPU: slice_before_lm_head (other providers: every row, as before)
    SCORES_APART = True               # ... in onnxruntime, beside onnxruntime-genai's model

    def __init__(self, path: Path, settings: RuntimeSettings):
        from .. import chat
        og = _import_og()
        self.og, self.path, self.settings = og, path, settings
        self.genai_config = json.loads((path / "genai_config.json").read_text())
        device = str(settings.extra.get("execution_provider") or settings.device or "CPU")
        provider = self._provider(og, device)
        config = og.Config(str(path))
        config.clear_providers()
        if provider is not None:
            config.append_provider(provider)
        if settings.threads:
            config.overlay(json.dumps({"model": {"decoder": {"session_options": {
                "intra_op_num_threads": int(settings.threads)}}}}))
        self._config, self._model, self._tokenizer, self._adds_bos = config, None, None, None
        self.device, self.provider = device, provider
        self._rows_session = None         # onnxruntime on the sliced graph, made on first use (False: none)
        self.chat_template, self.specials = chat.load_template(path)
        self.context_length = int(self.genai_config["model"].get("context_length") or 0) or None
        self._adapters = None                 # og.Adapters of this model, made on the first adapter generated with
        self._loaded: dict[Path, list] = {}   # adapter file -> [its name in og.Adapters or None, ort.LoraAdapter]
        self._active: Path | None = None      # the adapter file applied
        if settings.extra.get("adapter"):
            self.use_adapter(Path(settings.extra["adapter"]))

    # onnxruntime-genai's model (and its tokenizer) load on first use: a check scores first, on the sliced session
    # alone, and lets that go before generating (SCORES_APART), so the weights are never held twice.
    @property
    def model(self):
        if self._model is None:
            try:
                self._model = self.og.Model(self._config)
            except Exception as e:      # og raises plain RuntimeError for a bad graph or provider
                raise ToolchainError(f"onnxruntime-genai could not load {self.path} on {self.device}: {e}") from None
        return self._model

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = self.og.Tokenizer(self.model)
        return self._tokenizer

    @property
    def adds_bos(self) -> bool:
        if self._adds_bos is None:
            self._adds_bos = bool(self.tokenize("")) if self.specials.get("bos_token") else False
        return self._adds_bos

    def release_scoring(self) -> None:
        self._rows_session = None

    def _use_adapter(self, adapter_dir: Path | None) -> None:
        """Apply the `.onnx_adapter` in `adapter_dir` (phiedge.exporters._onnx_lora) from the next evaluation on, or
        none: in place, the base stays loaded and each adapter is read once. The sliced scoring session takes the
        file as onnxruntime's LoraAdapter, per run; onnxruntime-genai reads it into its model's og.Adapters on the
        first generation after (the model itself loads then: SCORES_APART) and activates it per generator
        (`set_active_adapter`, before the first tokens: every evaluation makes a new generator)."""
        if adapter_dir is None:
            self._active = None
            return
        files = sorted(Path(adapter_dir).glob("*.onnx_adapter"))
        if not files:
            raise ToolchainError(f"no .onnx_adapter file in {adapter_dir}: rebuild the bundle's adapters")
        path = files[0].resolve()
        if path not in self._loaded:
            import onnxruntime as ort
            lora = ort.LoraAdapter()
            lora.Load(str(path))                    # memory-maps the file
            self._loaded[path] = [None, lora]       # [its name in og.Adapters once read there, the LoraAdapter]
        self._active = path

    def _genai_adapter(self) -> str:
        """The active adapter's name in onnxruntime-genai's og.Adapters, read into it on first use."""
        entry = self._loaded[self._active]
        if entry[0] is None:
            if self._adapters is None:
                self._adapters = self.og.Adapters(self.model)
            name = f"a{sum(e[0] is not None for e in self._loaded.values())}"
            try:
                self._adapters.load(str(self._active), name)
            except Exception as e:          # og raises plain RuntimeError
                raise ToolchainError(f"onnxruntime-genai could not load the adapter {self._active} ({e}): rebuild it "
                                     f"from this bundle's base") from None
            entry[0] = name
        return entry[0]

    @staticmethod
    def _provider(og, device: str) -> str | None:
        key = device.upper()
        if key not in PROVIDERS:
            raise UsageError(f"onnx runtime has no device '{device}': known are {', '.join(PROVIDERS)}")
        provider, check = PROVIDERS[key]
        if check is not None and not getattr(og, check)():
            raise ToolchainError(f"this onnxruntime-genai build has no {provider} support for device '{device}': "
                                 f"install the onnxruntime-genai package for it, or use device CPU")
        return provider

    @classmethod
    def load(cls, artifact_dir: Path, settings: RuntimeSettings | None = None) -> "ONNXRuntime":
        path = Path(artifact_dir)
        if not (path / "genai_config.json").is_file():
            raise ToolchainError(f"no genai_config.json in {path}: not an onnxruntime-genai artifact; rebuild it")
        return cls(path, settings or RuntimeSettings())

    # -- one fresh generator per call: no state leaks between probes
    def _generator(self, max_length: int):
        self.check_length(max_length)
        params = self.og.GeneratorParams(self.model)
        # max_length sizes the KV cache (shared past/present buffer): never the config's 131072.
        params.set_search_options(max_length=max_length, do_sample=False)
        sampling = self._sampling
        if not sampling.greedy:             # onnxruntime-genai's own sampler, with its seed (top_k 0: every token)
            params.set_search_options(do_sample=True, temperature=float(sampling.temperature),
                                      top_p=float(sampling.top_p), top_k=0,
                                      random_seed=-1 if sampling.seed is None else sampling.runtime_seed)
        if self._until_max:                 # the config's eos would end the search: hold it to max_length
            params.set_search_options(min_length=max_length)
        if self._constraint is not None:
            try:
                params.set_guidance("json_schema", json.dumps(compact_json(self._constraint)))
            except Exception as e:
                raise UsageError(f"this onnxruntime-genai ({self.og.__version__}) cannot constrain generation to a "
                                 f"JSON schema ({e}): install a build with guidance (the PyPI wheels >= 0.8)") from None
        gen = self.og.Generator(self.model, params)
        if self._active is not None:
            name = self._genai_adapter()
            try:
                gen.set_active_adapter(self._adapters, name)
            except Exception as e:
                raise ToolchainError(f"onnxruntime-genai could not apply the adapter to {self.path} ({e}): is the "
                                     f"artifact a base built for adapters (--adapter-mode separate)?") from None
        return gen

    @classmethod
    def check_peak_bytes(cls, artifact_bytes: int, n_vocab: int, probe_tokens: int) -> int:
        """Measured at full size (3.84 B, int4-k_quant-mixed8: 3.0 GB on disk, 2.53 GB by the int4 estimate this
        is given; 4200-token probe; RSS): onnxruntime's sliced session peaks at 7.02 GiB while scoring (its
        weights, the kernels' packed copies, fp32 attention over 4200 positions), onnxruntime-genai's model at
        5.4 GiB while generating after it (SCORES_APART: never both; together they peaked at 13.3 GiB)."""
        return int(2.9 * artifact_bytes) + 400 * 2**20

    def _rows(self):
        """An onnxruntime session on the decoder with its LM head sliced (CPU only), or None."""
        if self._rows_session is None:
            self._rows_session = False
            decoder = self.genai_config["model"]["decoder"]
            if self.provider is None and "filename" in decoder:
                import onnx
                import onnxruntime as ort
                proto = onnx.load(str(self.path / decoder["filename"]), load_external_data=False)
                if slice_before_lm_head(proto.graph):
                    so = ort.SessionOptions()
                    so.add_session_config_entry("session.model_external_initializers_file_folder_path",
                                                str(self.path))
                    if self.settings.threads:
                        so.intra_op_num_threads = int(self.settings.threads)
                    # A base for adapters kept separate has LoRA inputs with empty defaults: onnxruntime warns
                    # about every one ("appears in graph inputs"); errors still print.
                    so.log_severity_level = 3
                    self._rows_session = ort.InferenceSession(proto.SerializeToString(), so,
                                                              providers=["CPUExecutionProvider"])
        return self._rows_session or None

    def _rows_logits(self, session, ids: list[int], keep: int) -> np.ndarray:
        """One prefill of every id on empty past state; the LM head over the last `keep` rows."""
        n, feeds, decoder = len(ids), {}, self.genai_config["model"]["decoder"]
        kinds = {"tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(float)": np.float32,
                 "tensor(float16)": np.float16}
        for i in session.get_inputs():
            kind = kinds[i.type]
            if i.name == "input_ids":
                feeds[i.name] = np.asarray([ids], dtype=kind)
            elif i.name == "attention_mask":
                feeds[i.name] = np.ones((1, n), dtype=kind)
            elif i.name == "position_ids":
                feeds[i.name] = np.arange(n, dtype=kind)[None]
            elif i.name == ROWS_FROM:
                feeds[i.name] = np.asarray([n - keep], dtype=np.int64)
            elif i.name.startswith("past_key_values"):        # [batch, kv heads, past length 0, head dim]
                _, h, _, d = i.shape
                shape = (1, h if isinstance(h, int) else decoder["num_key_value_heads"], 0,
                         d if isinstance(d, int) else decoder["head_size"])
                feeds[i.name] = np.zeros(shape, dtype=kind)
            else:
                raise ToolchainError(f"{self.path}: the decoder has an input phiedge does not know ({i.name}): "
                                     f"rebuild the artifact with phiedge")
        options = None
        if self._active is not None:
            import onnxruntime as ort
            options = ort.RunOptions()
            options.add_active_adapter(self._loaded[self._active][1])
        return np.asarray(session.run(["logits"], feeds, options)[0])

    def logits(self, ids: list[int], last_n: int, start: int = 0) -> np.ndarray:
        self._check_start(start)          # the generator numbers positions itself, and switches on the mask width
        session = self._rows() if last_n < len(ids) else None
        if session is not None:
            self.check_length(len(ids))
            out = self._rows_logits(session, ids, last_n)
            return out.reshape(-1, out.shape[-1]).astype(np.float32)
        gen = self._generator(len(ids))
        gen.append_tokens(np.asarray(ids, dtype=np.int32))        # one prefill of every id
        out = np.asarray(gen.get_output("logits"))
        out = out.reshape(-1, out.shape[-1])
        if out.shape[0] != len(ids):
            raise ToolchainError(f"onnxruntime-genai returned logits for {out.shape[0]} of {len(ids)} positions "
                                 f"(a pruned LM head or chunked prefill): rebuild the artifact with phiedge")
        return out[-last_n:].astype(np.float32)

    # -- step-wise generation (the loop is the base class's): onnxruntime-genai picks itself (greedy or its sampler)
    def _start(self, ids: list[int], total: int) -> int:
        self._gen = self._generator(total)
        self._gen.append_tokens(np.asarray(ids, dtype=np.int32))
        return self._next()

    def _advance(self, token: int) -> int:
        return self._next()           # the generator already holds the token it picked

    def _next(self) -> int:
        self._gen.generate_next_token()
        return int(self._gen.get_next_tokens()[0])

    def _exhausted(self) -> bool:
        """The config's own eos ids end the search even when the caller wants them."""
        return self._gen.is_done()

    # -- tokenizer and template: the artifact's own, as on a device
    def tokenize(self, text: str) -> list[int]:
        return [int(i) for i in self.tokenizer.encode(text)]

    def detokenize(self, ids: list[int]) -> str:
        return self.tokenizer.decode(np.asarray(ids, dtype=np.int32)) if ids else ""

    def stop_ids(self) -> set[int]:
        return self._stop_ids(self.genai_config["model"].get("eos_token_id"))

    def close(self) -> None:
        self._tokenizer = None
        self._active, self._loaded, self._adapters = None, {}, None
        self._model = None
        self._rows_session = None
