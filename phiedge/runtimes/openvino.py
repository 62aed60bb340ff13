"""OpenVINO: `openvino_genai.LLMPipeline` generates, the OpenVINO runtime scores, both on the artifact's own IR.

- logits: `Core().compile_model` on the stateful IR, one infer of every id (one prefill) on a fresh request.
  The IR picks LongRoPE factors from max(position_ids) + 1 of that call, so a 4200-token probe uses the long
  factors throughout, as Hugging Face does. Only the rows asked for go through the LM head: the compiled
  copy slices the hidden states before it (`slice_before_lm_head`, what LLMPipeline does for its last row;
  at Phi-4-mini's 200,064 vocabulary a 4200-token probe's logits are 3.4 GB of fp32 and ~15 % of the prefill).
  The shipped IR is unchanged.
- generate: LLMPipeline on token ids (greedy, the caller's stop ids), with its default attention backend
  (paged attention on CPU); with adapters kept separate the stateful SDPA pipeline, the one that switches
  adapters per generate call (use_adapter). Measured on the tiny fixture: greedy 16 of 16 PyTorch tokens after the short
  probe and after the 4200-token long probe with both backends; time to first token on the long probe
  2.7 s (paged) vs 6.5 s (SDPA), so the default stays.
- generate held to a JSON schema: phiedge steps the scoring engine's stateful IR itself and llguidance masks
  each step's logits (phiedge.runtimes.guidance: why not GenAI's structured output).
- CPU properties come from the artifact's phiedge_openvino.json (chosen at export, see
  phiedge.exporters.openvino.CPU_PROPERTIES: EXACT_CPU for full precision, the runtime's own defaults for
  int8/int4), then RuntimeSettings.extra["ov_cpu_properties"] (what a bundle ships an artifact with when its
  defaults failed the check and EXACT_CPU passed: exact_settings), then extra["ov_properties"] (any device).
- Device: RuntimeSettings.device CPU / GPU / NPU (or GPU.1 style). One this machine lacks falls back to
  extra["fallback"] (default CPU) with a warning; `fallback_from` records it. Other names are a UsageError.

Device-path module: openvino, openvino_genai, numpy, json and jinja2 (phiedge.chat); never torch or transformers.
"""
from __future__ import annotations

import json
import logging
import queue
import re
import threading
from pathlib import Path
from typing import Iterator

import numpy as np

from ..errors import ToolchainError, UsageError
from ..openvino_ir import ADAPTER_FILE, EXACT_CPU, IR, META_FILE, prefill_inputs  # noqa: F401  (its names too)
from .base import Runtime, RuntimeSettings, register

log = logging.getLogger(__name__)

DEVICES = ("CPU", "GPU", "NPU")       # OpenVINO device families phiedge targets (targets/intel-*.toml)


def _import_ov():
    try:
        import openvino as ov
        import openvino_genai as ov_genai
    except ImportError:
        raise ToolchainError("openvino-genai is not installed: pip install 'phiedge[openvino]'") from None
    return ov, ov_genai


def resolve_device(requested: str, available: list[str], fallback: str | None = "CPU") -> tuple[str, str | None]:
    """(device to use, the requested one if we fell back, else None)."""
    dev = str(requested or "CPU").upper()
    family = dev.split(".")[0]
    if family not in DEVICES:
        raise UsageError(f"openvino runtime has no device '{requested}': known are {', '.join(DEVICES)} "
                         f"(this machine has {', '.join(available) or 'none'})")
    if dev in available or (dev == family and any(a.split(".")[0] == family for a in available)):
        return dev, None
    if not fallback:
        raise ToolchainError(f"OpenVINO device '{dev}' is not on this machine (it has {', '.join(available)}): "
                             f"install its driver, or use a profile with a fallback")
    fb = str(fallback).upper()
    if fb not in available:
        raise ToolchainError(f"OpenVINO device '{dev}' is not on this machine and neither is its fallback '{fb}' "
                             f"(it has {', '.join(available)})")
    log.warning("openvino: device %s is not available here (have %s): falling back to %s", dev,
                ", ".join(available), fb)
    return fb, dev


ROWS_FROM = "phiedge_rows_from"        # the Parameter slice_before_lm_head adds: the first row kept
LORA_MODULE = re.compile(r"(model\.layers\.\d+\.(?:self_attn|mlp)\.\w+)/")    # in a MatMul's friendly name
PEFT_KEY = re.compile(r"^(?:base_model\.model\.)?(.+)\.lora_([AB])\.weight$")


def slice_before_lm_head(ov, model) -> bool:
    """Make `model`'s LM head read only hidden-state rows ROWS_FROM.. (a new i64 [1] input), in place.

    The `logits` output's producer is followed through element-wise nodes (Convert, a softcap's Multiply/Tanh)
    to the MatMul whose first input is [batch, seq, hidden]; a Slice on axis 1 goes before it. False, model
    untouched, where the graph is not that shape: logits then come back for every row, as before."""
    from openvino import opset13 as ops
    try:
        node = model.output("logits").get_node()
    except RuntimeError:
        return False
    for _ in range(8):
        if node.get_type_name() == "MatMul":
            break
        if node.get_input_size() == 0:
            return False
        node = node.input_value(0).get_node()
    else:
        return False
    hidden = node.input_value(0)
    if hidden.get_partial_shape().rank.get_length() != 3:
        return False
    start = ops.parameter([1], ov.Type.i64, name=ROWS_FROM)
    start.output(0).get_tensor().set_names({ROWS_FROM})
    def i64(v):
        return ops.constant(np.asarray([v], dtype=np.int64))
    rows = ops.slice(hidden, start, i64(np.iinfo(np.int64).max), i64(1), i64(1))
    node.input(0).replace_source_output(rows.output(0))
    model.add_parameters([start])
    model.validate_nodes_and_infer_types()
    return True


def read_adapter(path: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{module path: (Aᵀ [in, r], Bᵀ [r, out])} of a folded PEFT adapter file (ADAPTER_FILE), fp32."""
    from ..tensorfile import read_safetensors
    parts: dict[str, dict[str, np.ndarray]] = {}
    for name, t in read_safetensors(path).items():
        m = PEFT_KEY.match(name)
        if not m:
            raise ToolchainError(f"{path}: {name} is not a LoRA A/B tensor: rebuild the bundle's adapters")
        parts.setdefault(m.group(1), {})[m.group(2)] = t
    return {k: (np.ascontiguousarray(v["A"].T, np.float32), np.ascontiguousarray(v["B"].T, np.float32))
            for k, v in parts.items()}


def _is_weight(node, depth: int = 8) -> bool:
    """Whether a MatMul operand is a weight: a Constant, or one through its decompression chain (Convert,
    Subtract, Multiply, Reshape...), never an activation (a Parameter, a ReadValue, or a deeper graph)."""
    if node.get_type_name() == "Constant":
        return True
    if depth == 0 or node.get_type_name() in ("Parameter", "ReadValue") or not node.inputs():
        return False
    return all(_is_weight(i.get_source_output().get_node(), depth - 1) for i in node.inputs())


def add_lora_inputs(ov, model) -> dict[str, tuple[int, int]]:
    """Give every decoder weight MatMul of `model` (in place) a LoRA of the module it computes, as two Parameters
    `<module>.lora_A` [in, r] and `<module>.lora_B` [r, out] of a dynamic rank r: y + (x·A)·B, with x the MatMul's
    own input, where OpenVINO GenAI's LoRA reads it too. Empty (rank-0) tensors give the base exactly.
    Returns {module path: (in, out)}."""
    from openvino import opset13 as ops
    found: dict[str, object] = {}
    for node in model.get_ordered_ops():
        m = LORA_MODULE.search(node.get_friendly_name())
        if node.get_type_name() != "MatMul" or not m or not _is_weight(node.input_value(1).get_node()):
            continue
        if m.group(1) in found:
            raise ToolchainError(f"two MatMuls compute {m.group(1)} in this IR: phiedge cannot apply a LoRA to it")
        found[m.group(1)] = node
    params, modules = [], {}
    for module, node in found.items():
        x, y = node.input_value(0), node.output(0)
        inp, out = x.get_partial_shape()[-1].get_length(), y.get_partial_shape()[-1].get_length()
        a = ops.parameter(ov.PartialShape([inp, -1]), ov.Type.f32, name=f"{module}.lora_A")
        b = ops.parameter(ov.PartialShape([-1, out]), ov.Type.f32, name=f"{module}.lora_B")
        for p in (a, b):
            p.output(0).get_tensor().set_names({p.get_friendly_name()})
        xf = x if x.get_element_type() == ov.Type.f32 else ops.convert(x, ov.Type.f32).output(0)
        delta = ops.matmul(ops.matmul(xf, a, False, False), b, False, False)
        if y.get_element_type() != ov.Type.f32:
            delta = ops.convert(delta, y.get_element_type())
        targets = list(y.get_target_inputs())
        summed = ops.add(y, delta)
        for t in targets:
            t.replace_source_output(summed.output(0))
        params += [a, b]
        modules[module] = (inp, out)
    model.add_parameters(params)
    model.validate_nodes_and_infer_types()
    return modules


@register
class OpenVINORuntime(Runtime):
    format = "openvino"
    SUPPORTS = frozenset({"constraint"})
    package = "openvino_genai"
    ALL_ROW_LOGITS = False            # slice_before_lm_head
    POSITION_SPANS = True             # the IR takes position_ids
    SCORES_APART = True               # the compiled scoring model, beside LLMPipeline's own compiled copy

    def __init__(self, path: Path, settings: RuntimeSettings):
        from .. import chat
        ov, ov_genai = _import_ov()
        self.ov, self.ov_genai, self.path, self.settings = ov, ov_genai, path, settings
        self.core = ov.Core()
        self.device, self.fallback_from = resolve_device(settings.device, list(self.core.available_devices),
                                                         settings.extra.get("fallback", "CPU"))
        meta_path = path / META_FILE
        self.meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
        self.properties = self._properties()
        self.tokenizer = ov_genai.Tokenizer(str(path))
        self.chat_template, self.specials = chat.load_template(path)
        self.generation_config = json.loads((path / "generation_config.json").read_text()) \
            if (path / "generation_config.json").is_file() else {}
        config = json.loads((path / "config.json").read_text())
        self.context_length = int(config.get("max_position_embeddings") or 0) or None
        self._compiled = None
        self._sliced = False
        self._pipe = None
        self._lora_modules: dict[str, tuple[int, int]] | None = None   # the scoring model's LoRA inputs, if any
        self._adapters: dict[Path, tuple[object, dict]] = {}    # file -> (ov_genai.Adapter, read_adapter)
        self._active: Path | None = None
        if settings.extra.get("adapter"):
            self.use_adapter(Path(settings.extra["adapter"]))

    def _use_adapter(self, adapter_dir: Path | None) -> None:
        """Apply the adapter in `adapter_dir` (ADAPTER_FILE) from the next evaluation on, or none. Generation:
        OpenVINO GenAI's own LoRA (`ov_genai.Adapter`, `AdapterConfig(adapter, 1.0)` per generate call); the
        pipeline must know every adapter when it is made, so the first use of a new one remakes it (then switching
        among known ones is in place). Prompt logits: the scoring model with LoRA inputs (add_lora_inputs), fed
        the same file's tensors per request, so the base stays compiled once."""
        self._active = None
        if adapter_dir is None:
            return
        path = (Path(adapter_dir) / ADAPTER_FILE).resolve()
        if not path.is_file():
            raise ToolchainError(f"no {ADAPTER_FILE} in {adapter_dir}: rebuild the bundle's adapters")
        if path not in self._adapters:
            try:
                adapter = self.ov_genai.Adapter(str(path))
            except Exception as e:
                raise ToolchainError(f"OpenVINO GenAI could not read the adapter {path} ({e}): rebuild it") from None
            self._adapters[path] = (adapter, read_adapter(path))
            self._pipe = None                  # GenAI takes its adapters when the pipeline is made
            if self._lora_modules is None:
                self._compiled = None          # recompiled with LoRA inputs on the next logits
            else:
                self._check_fits()
        self._active = path

    def _properties(self) -> dict:
        props: dict = {}
        if self.device == "CPU":
            props.update(self.meta.get("cpu_properties") or {})
            props.update(self.settings.extra.get("ov_cpu_properties") or {})
            if self.settings.threads:
                props["INFERENCE_NUM_THREADS"] = int(self.settings.threads)
        props.update(self.settings.extra.get("ov_properties") or {})
        return props

    @classmethod
    def exact_settings(cls, meta: dict) -> dict | None:
        return None if (meta.get("cpu_properties") or {}) == EXACT_CPU else {"ov_cpu_properties": dict(EXACT_CPU)}

    @classmethod
    def load(cls, artifact_dir: Path, settings: RuntimeSettings | None = None) -> "OpenVINORuntime":
        path = Path(artifact_dir)
        missing = [f for f in (IR, "openvino_tokenizer.xml", "openvino_detokenizer.xml") if not (path / f).is_file()]
        if missing:
            raise ToolchainError(f"no {', '.join(missing)} in {path}: not an OpenVINO GenAI artifact; rebuild it")
        return cls(path, settings or RuntimeSettings())

    # -- the two engines, compiled on first use
    def _request(self):
        if self._compiled is None:
            try:
                model = self.core.read_model(str(self.path / IR))
                self._sliced = slice_before_lm_head(self.ov, model)
                if self._adapters:
                    self._lora_modules = add_lora_inputs(self.ov, model)
                    self._check_fits()
                self._compiled = self.core.compile_model(model, self.device, self.properties)
            except Exception as e:     # openvino raises plain RuntimeError for a bad IR or property
                raise ToolchainError(f"OpenVINO could not compile {self.path / IR} on {self.device}: {e}") from None
        return self._compiled.create_infer_request()

    def release_scoring(self) -> None:
        self._compiled = None             # its infer requests are the callers' locals: the weights go with it

    @classmethod
    def check_peak_bytes(cls, artifact_bytes: int, n_vocab: int, probe_tokens: int) -> int:
        """Measured at full size (3.84 B, int4 data-free AWQ: 2.32 GB, 2.38 GB by the estimate this is given;
        4200-token probe; PSS of the build's process tree, ~0.6 GB of it the build's own): 11.55 GiB with the
        scoring model and LLMPipeline loaded together, 9.46 GiB scoring first and generating after
        (SCORES_APART): the weights, the CPU plugin's own copies of them, and a 4200-token prefill's activations."""
        return int(3.9 * artifact_bytes) + 400 * 2**20

    def _check_fits(self) -> None:
        for path, (_, tensors) in self._adapters.items():
            for module, (a, b) in tensors.items():
                if self._lora_modules.get(module) != (a.shape[0], b.shape[1]):
                    raise ToolchainError(f"the adapter {path} adapts {module}, which this IR has no MatMul of that "
                                         f"shape for: rebuild the adapter from this bundle's base")

    def _lora_feeds(self) -> dict[str, np.ndarray]:
        tensors = self._adapters[self._active][1] if self._active else {}
        feeds = {}
        for module, (inp, out) in (self._lora_modules or {}).items():
            a, b = tensors.get(module, (np.zeros((inp, 0), np.float32), np.zeros((0, out), np.float32)))
            feeds[f"{module}.lora_A"], feeds[f"{module}.lora_B"] = a, b
        return feeds

    def _pipeline(self):
        if self._pipe is None:
            try:
                if self._adapters:
                    config = self.ov_genai.AdapterConfig()
                    for adapter, _ in self._adapters.values():
                        config.add(adapter, 1.0)
                    # The stateful (SDPA) pipeline: GenAI 2026.4's default on CPU, continuous batching with paged
                    # attention, keeps the adapters it was made with and ignores generate()'s (measured: an
                    # empty AdapterConfig, or alpha 0, still answered with the adapter).
                    self._pipe = self.ov_genai.LLMPipeline(str(self.path), self.device, adapters=config,
                                                           **{"ATTENTION_BACKEND": "SDPA", **self.properties})
                else:
                    self._pipe = self.ov_genai.LLMPipeline(str(self.path), self.device, **self.properties)
            except Exception as e:
                raise ToolchainError(f"OpenVINO GenAI could not load {self.path} on {self.device}: {e}") from None
        return self._pipe

    def logits(self, ids: list[int], last_n: int, start: int = 0) -> np.ndarray:
        """ids at positions start.. on a fresh request (empty KV state)."""
        self.check_length(start + len(ids))
        req = self._request()
        n = len(ids)
        inputs = prefill_inputs(ids, start)
        keep = min(last_n, n) if self._sliced else n
        if self._sliced:
            inputs[ROWS_FROM] = np.asarray([n - keep], dtype=np.int64)
        inputs.update(self._lora_feeds())
        req.infer(inputs)
        out = np.asarray(req.get_tensor("logits").data)
        out = out.reshape(-1, out.shape[-1])
        if out.shape[0] != keep:
            raise ToolchainError(f"OpenVINO returned logits for {out.shape[0]} of {keep} positions (an LM head "
                                 f"this runtime does not know): rebuild the artifact with phiedge")
        return out[-last_n:].astype(np.float32)

    def _stream(self, ids: list[int], max_new_tokens: int, stop: set[int]) -> Iterator[int]:
        """LLMPipeline generates on its own (greedy or its own sampler with the seed, the caller's stop ids), in a
        thread of its own; its streamer hands each token over as it is picked. Closing the stream stops the
        pipeline at its next token. An answer held to a JSON schema steps the IR itself instead (_start /
        _advance: the base class's loop), so llguidance masks its logits as on every runtime
        (phiedge.runtimes.guidance)."""
        if self._constraint is not None:
            yield from super()._stream(ids, max_new_tokens, stop)
            return
        pipe = self._pipeline()
        cfg = pipe.get_generation_config()
        cfg.max_new_tokens = int(max_new_tokens)
        cfg.num_beams = 1
        cfg.do_sample = not self._sampling.greedy
        if cfg.do_sample:
            cfg.temperature, cfg.top_p = float(self._sampling.temperature), float(self._sampling.top_p)
            seed = self._sampling.runtime_seed
            cfg.rng_seed = int(np.random.default_rng().integers(2**31)) if seed is None else seed
        cfg.stop_token_ids = {int(i) for i in stop}
        cfg.ignore_eos = not stop           # no stop ids: the caller wants max_new_tokens, eos included
        arr = np.asarray([ids], dtype=np.int64)
        inputs = self.ov_genai.TokenizedInputs(self.ov.Tensor(arr), self.ov.Tensor(np.ones_like(arr)))
        options = {}
        if self._adapters:
            active = self._adapters[self._active][0] if self._active else None
            options["adapters"] = self.ov_genai.AdapterConfig(active, 1.0) if active else self.ov_genai.AdapterConfig()
        handed, cancel, failed = queue.Queue(), threading.Event(), []
        genai = self.ov_genai

        class Streamer(genai.StreamerBase):
            def write(self, token):
                for t in token if isinstance(token, list) else [token]:
                    handed.put(int(t))
                return genai.StreamingStatus.STOP if cancel.is_set() else genai.StreamingStatus.RUNNING

            def end(self):
                pass

        def run():
            try:
                pipe.generate(inputs, cfg, streamer=Streamer(), **options)
            except Exception as e:          # GenAI raises plain RuntimeError
                failed.append(e)
            finally:
                handed.put(None)
        worker = threading.Thread(target=run, name="phiedge-openvino-generate", daemon=True)
        worker.start()
        try:
            while (tok := handed.get()) is not None:
                yield tok
        finally:
            cancel.set()
            while handed.get() is not None:     # let the pipeline finish its token and end
                pass
            worker.join()
        if failed:
            raise ToolchainError(f"OpenVINO GenAI could not generate with {self.path}: {failed[0]}") from None

    # -- step-wise generation on the scoring engine's stateful IR (constrained answers only)
    def _start(self, ids: list[int], total: int) -> int:
        self._gen_req, self._gen_pos = self._request(), 0
        return self._feed(ids)

    def _advance(self, token: int) -> int:
        return self._feed([token])

    def _feed(self, ids: list[int]) -> int:
        """Feed `ids` after the request's state (its KV cache) and choose the next token from the last row."""
        inputs = prefill_inputs(ids, self._gen_pos)
        self._gen_pos += len(ids)
        inputs["attention_mask"] = np.ones((1, self._gen_pos), dtype=np.int64)     # past and new tokens
        if self._sliced:
            inputs[ROWS_FROM] = np.asarray([len(ids) - 1], dtype=np.int64)
        inputs.update(self._lora_feeds())
        self._gen_req.infer(inputs)
        out = np.asarray(self._gen_req.get_tensor("logits").data)
        return self._choose(out.reshape(-1, out.shape[-1])[-1].astype(np.float32))

    # -- tokenizer and template: the artifact's own, as on a device (chat_ids: the Runtime base class)
    def tokenize(self, text: str) -> list[int]:
        enc = self.tokenizer.encode(text, add_special_tokens=False)     # the template writes any BOS itself
        return [int(i) for i in np.asarray(enc.input_ids.data).reshape(-1)]

    def detokenize(self, ids: list[int]) -> str:
        return self.tokenizer.decode([int(i) for i in ids]) if ids else ""

    def stop_ids(self) -> set[int]:
        return self._stop_ids(self.generation_config.get("eos_token_id"))

    def close(self) -> None:
        self._pipe = None
        self._compiled = None
        self._adapters, self._active = {}, None
        self.tokenizer = None
