"""Resolve a model or adapter (local directory or Hub id) and check it cheaply, before any weight loads.

Everything here reads JSON and safetensors *headers* only: a wrong adapter, a truncated file or a full
disk is refused in milliseconds, not after 8 GB of weights were loaded.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from .errors import (
    AdapterMismatchError,
    DiskSpaceError,
    InvalidCheckpointError,
    ModelNotFoundError,
    OutputExistsError,
    UnsupportedAdapterError,
    UsageError,
)
from .tensorfile import safetensors_header
from .tokenizer_files import HUB_FILES

log = logging.getLogger(__name__)

DEFAULT_MODEL = "microsoft/Phi-4-mini-instruct"
# What a merge needs from a model repo: nothing else is downloaded (no .bin, no ONNX, no GGUF siblings).
MODEL_FILES = ["config.json", "generation_config.json", "*.safetensors", "*.safetensors.index.json",
               "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
               "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja", "chat_template.json",
               "*.py"]
# An adapter's own tokenizer files come with it: its chat template is the one it was trained with
# (phiedge.tokenizer_files).
ADAPTER_FILES = ["adapter_config.json", "adapter_model.safetensors", "*.safetensors", *HUB_FILES]
# PEFT adapter types phiedge merges; every LoRA variant PEFT can merge (rsLoRA, DoRA, patterns) is proven.
MERGEABLE_PEFT_TYPES = {"LORA"}
# Architectures every exporter is proven on (the tests and `make demo`), with what they are for.
ARCHITECTURES = {
    "Phi3ForCausalLM": "Phi-4-mini and Phi-3",
    "LlamaForCausalLM": "Llama-shaped models such as the demo's SmolLM2",
}
# Hugging Face class-name endings of models that are not causal (decoder-only) language models.
NOT_CAUSAL = ("Model", "ForMaskedLM", "ForSequenceClassification", "ForTokenClassification", "ForQuestionAnswering",
              "ForConditionalGeneration", "ForImageClassification", "ForPreTraining")


@dataclass(frozen=True)
class Source:
    """A resolved model or adapter: where its files are, and what it is called upstream."""
    path: Path
    ref: str                      # what the user passed
    revision: str | None = None   # commit hash when it came from the Hub
    files: dict[str, int] = field(default_factory=dict)   # relative name -> size in bytes

    @property
    def total_bytes(self) -> int:
        return sum(self.files.values())


def resolve(ref: str, *, revision: str | None = None, kind: str = "model") -> Source:
    """Local directory, or a Hub repo id downloaded (only the files needed) through huggingface_hub."""
    p = Path(ref).expanduser()
    if p.exists():
        if not p.is_dir():
            raise InvalidCheckpointError(f"{kind} {ref} is a file, not a directory: pass the folder that holds "
                                         f"{'config.json' if kind == 'model' else 'adapter_config.json'}")
        return Source(path=p.resolve(), ref=ref, files=_list_files(p))
    if ref.startswith((".", "/", "~")) or ref.count("/") != 1:
        raise ModelNotFoundError(f"{kind} '{ref}' is not a directory and not a Hub repo id (owner/name): "
                                 f"check the path")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )
    patterns = MODEL_FILES if kind == "model" else ADAPTER_FILES
    try:
        path = Path(snapshot_download(ref, revision=revision, allow_patterns=patterns))
    except LocalEntryNotFoundError:
        offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0", "false")
        why = "HF_HUB_OFFLINE is set" if offline else "the Hub cannot be reached"
        raise ModelNotFoundError(f"{kind} '{ref}' is not in the Hugging Face cache ({os.environ.get('HF_HOME', '~/.cache/huggingface')}) "
                                 f"and {why}: run once online, or pass a local directory") from None
    except GatedRepoError:
        raise ModelNotFoundError(f"{kind} '{ref}' is gated: accept its licence on the Hub and log in "
                                 f"(`hf auth login`)") from None
    except RepositoryNotFoundError:
        raise ModelNotFoundError(f"{kind} '{ref}' does not exist on the Hub (or is private): check the id") from None
    except RevisionNotFoundError:
        raise ModelNotFoundError(f"{kind} '{ref}' has no revision '{revision}': pass an existing commit, "
                                 f"branch or tag to --revision") from None
    rev = path.name if re.fullmatch(r"[0-9a-f]{40}", path.name) else revision
    return Source(path=path, ref=ref, revision=rev, files=_list_files(path))


def _list_files(p: Path) -> dict[str, int]:
    # Skip a `.cache` folder *inside* the checkpoint (huggingface_hub's download metadata), never the folders
    # above it: Hub snapshots live under ~/.cache/huggingface, so an absolute-path test refused every Hub model.
    return {str(f.relative_to(p)): f.stat().st_size for f in sorted(p.rglob("*"))
            if f.is_file() and ".cache" not in f.relative_to(p).parts}


# ---------------------------------------------------------------- safetensors headers

def param_count(model: Source) -> int:
    """Parameters of a checkpoint, from its safetensors headers (no weights read)."""
    n = 0
    for shape in model_tensors(model).values():
        p = 1
        for d in shape:
            p *= d
        n += p
    return n


def model_tensors(model: Source) -> dict[str, list[int]]:
    """Every tensor name of a model checkpoint with its shape, from the shard headers."""
    files = sorted(f for f in model.files if f.endswith(".safetensors"))
    if not files:
        raise InvalidCheckpointError(f"model {model.ref} has no .safetensors weights: phiedge reads safetensors "
                                     f"only (convert .bin checkpoints with `transformers` save_pretrained)")
    index = model.path / "model.safetensors.index.json"
    if index.exists():
        wanted = set(json.loads(index.read_text())["weight_map"].values())
        missing = wanted - set(files)
        if missing:
            raise InvalidCheckpointError(f"model {model.ref} is missing shard(s) {', '.join(sorted(missing))}: "
                                         f"download it again")
    shapes: dict[str, list[int]] = {}
    for f in files:
        for name, meta in safetensors_header(model.path / f).items():
            shapes[name] = meta["shape"]
    return shapes


def config_dtype(config: dict) -> str:
    """The dtype a checkpoint's weights are stored in: transformers 5 writes `dtype`, earlier releases (and
    Phi-4-mini's published config) `torch_dtype`; float32 when the config says neither."""
    return str(config.get("torch_dtype") or config.get("dtype") or "float32").replace("torch.", "")


def checkpoint_dtype(folder: Path) -> str:
    """config_dtype of the checkpoint in `folder` (its config.json)."""
    return config_dtype(json.loads((Path(folder) / "config.json").read_text()))


def read_config(model: Source) -> dict:
    cfg = model.path / "config.json"
    if not cfg.exists():
        raise InvalidCheckpointError(f"{model.ref} has no config.json: pass a Hugging Face model directory")
    try:
        return json.loads(cfg.read_text())
    except json.JSONDecodeError as e:
        raise InvalidCheckpointError(f"{cfg} is not valid JSON ({e}): download the model again") from None


def check_architecture(model: Source, config: dict) -> None:
    archs = config.get("architectures") or []
    if not isinstance(archs, list) or not archs:
        raise InvalidCheckpointError(f"{model.ref}/config.json names no architecture: pass a Hugging Face causal LM "
                                     f"checkpoint (e.g. --model {DEFAULT_MODEL})")
    arch = str(archs[0])
    if arch in ARCHITECTURES:
        return
    known = ", ".join(f"{a} ({what})" for a, what in ARCHITECTURES.items())
    if arch.endswith(NOT_CAUSAL) and not arch.endswith("ForCausalLM"):
        raise InvalidCheckpointError(f"model {model.ref} is a {arch} ({config.get('model_type', 'unknown')}), not a "
                                     f"causal language model: phiedge exports decoder-only LMs ({known}); pass one "
                                     f"to --model")
    raise InvalidCheckpointError(f"model {model.ref} is a {arch}: phiedge exports {known}; pass such a "
                                 f"checkpoint to --model, e.g. {DEFAULT_MODEL}")


def check_model(model: Source) -> dict:
    """Cheap checks of the base; returns its config."""
    config = read_config(model)
    check_architecture(model, config)
    qc = config.get("quantization_config")
    if qc:
        method = qc.get("quant_method", "unknown")
        raise InvalidCheckpointError(f"base model {model.ref} is quantized ({method}): merge into the "
                                     f"unquantized base (for QLoRA adapters too), e.g. --model {DEFAULT_MODEL}")
    model_tensors(model)  # validates every shard header
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if name not in model.files:
            raise InvalidCheckpointError(f"model {model.ref} has no {name}: the export needs the tokenizer; "
                                         f"copy it from the base model")
    return config


_ADAPTER_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.(?P<part>lora_A|lora_B|lora_magnitude_vector|lora_embedding_A|lora_embedding_B)(?:\.[^.]+)?(?:\.weight)?$")


def check_adapter(adapter: Source, model: Source, config: dict) -> dict:
    """Check a PEFT adapter against the base: type, modules, shapes. Returns its adapter_config."""
    cfg_path = adapter.path / "adapter_config.json"
    if not cfg_path.exists():
        raise InvalidCheckpointError(f"adapter {adapter.ref} has no adapter_config.json: pass a PEFT adapter "
                                     f"directory (saved with save_pretrained)")
    try:
        acfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise InvalidCheckpointError(f"{cfg_path} is not valid JSON ({e}): copy the adapter again") from None
    ptype = str(acfg.get("peft_type", "")).upper()
    if ptype not in MERGEABLE_PEFT_TYPES:
        raise UnsupportedAdapterError(f"adapter type '{acfg.get('peft_type')}' is not supported: phiedge merges "
                                      f"LoRA adapters (plain, rsLoRA, DoRA, rank/alpha patterns)")
    tied = bool(config.get("tie_word_embeddings", False))
    touched = set(acfg.get("modules_to_save") or []) | set(_as_list(acfg.get("target_modules")))
    if acfg.get("trainable_token_indices"):
        touched.add("embed_tokens")
    emb = {m for m in touched if m.split(".")[-1] in ("embed_tokens", "lm_head")}
    if tied and emb:
        raise UnsupportedAdapterError(f"adapter changes {', '.join(sorted(emb))}, but the base ties its input and "
                                      f"output embeddings: merging would untie them and every exporter would ship "
                                      f"one of the two; retrain without embedding/lm_head targets")
    weights = adapter.path / "adapter_model.safetensors"
    if not weights.exists():
        if (adapter.path / "adapter_model.bin").exists():
            raise InvalidCheckpointError(f"adapter {adapter.ref} is a pickle (.bin): save it as safetensors "
                                         f"(peft save_pretrained(safe_serialization=True))")
        raise InvalidCheckpointError(f"adapter {adapter.ref} has no adapter_model.safetensors: copy the adapter again")
    header = safetensors_header(weights)
    base_shapes = model_tensors(model)
    base_name = acfg.get("base_model_name_or_path")
    _check_targets(adapter, model, acfg, header, base_shapes)
    matched = 0
    for key, meta in header.items():
        m = _ADAPTER_KEY.match(key)
        if not m:
            continue
        module, part = m.group("module"), m.group("part")
        target = module + ".weight"
        if target not in base_shapes:
            raise AdapterMismatchError(f"adapter targets '{module}', which the base model {model.ref} does not "
                                       f"have: the adapter was trained for another architecture; pass the matching --model")
        out_dim, in_dim = base_shapes[target][0], base_shapes[target][-1]
        shape = meta["shape"]
        if part == "lora_A" and shape[-1] != in_dim:
            raise AdapterMismatchError(f"adapter tensor '{key}' expects input width {shape[-1]}, base has {in_dim}: "
                                       f"the adapter was trained for {base_name or 'another base'}; pass the matching --model")
        if part == "lora_B" and shape[0] != out_dim:
            raise AdapterMismatchError(f"adapter tensor '{key}' has {shape[0]} output rows, base has {out_dim}: "
                                       f"the adapter was trained for {base_name or 'another base'}; pass the matching --model")
        matched += 1
    if matched == 0:
        raise AdapterMismatchError(f"adapter {adapter.ref} holds no LoRA tensors that match the base's modules: "
                                   f"pass a LoRA adapter for this --model")
    if base_name and base_name not in (model.ref, str(model.path)):
        log.info("adapter names base %s, using %s (shapes match)", base_name, model.ref)
    return acfg


def _adapted_modules(header: dict) -> set[str]:
    """Module paths (as the base names them) that the adapter's tensors adapt."""
    out = set()
    for key in header:
        m = _ADAPTER_KEY.match(key)
        if m:
            out.add(m.group("module"))
    return out


def _targets(target, module: str) -> bool:
    """Whether PEFT's `target_modules` selects `module` (peft.tuners.tuners_utils.check_target_module_exists):
    a string is a regex matched against the whole path; a list matches a path equal to, or ending in `.`, a
    name; `all-linear` matches every linear layer."""
    if isinstance(target, str):
        return target == "all-linear" or re.fullmatch(target, module) is not None
    return any(module == t or module.endswith("." + t) for t in target)


def _leaves(modules) -> str:
    return ", ".join(sorted({m.split(".")[-1] for m in modules})) or "none"


def _check_targets(adapter: Source, model: Source, acfg: dict, header: dict, base_shapes: dict) -> None:
    """adapter_config.json's target_modules against the adapter's own tensors and the base's modules: PEFT loads
    by the config and ends in NoMatchingPeftModuleError when it names modules the base does not have."""
    target = acfg.get("target_modules")
    if target is None or target == "all-linear":
        return
    adapted = _adapted_modules(header)
    linear = sorted({n[:-len(".weight")] for n, shape in base_shapes.items() if n.endswith(".weight") and
                     len(shape) == 2 and n.split(".")[-2] not in ("embed_tokens", "lm_head")})
    shown = target if isinstance(target, str) else ", ".join(sorted(_as_list(target)))
    in_base = [m for m in linear if _targets(target, m)]
    unlisted = sorted(m for m in adapted if not _targets(target, m))
    if not in_base or unlisted:
        said = ("match no module of the base" if not in_base else
                f"do not cover {len(unlisted)} module(s) its tensors adapt")
        raise AdapterMismatchError(f"adapter {adapter.ref}: adapter_config.json's target_modules ({shown}) {said}; "
                                   f"its tensors adapt {_leaves(adapted)}, and the base {model.ref} has "
                                   f"{_leaves(linear)}: set target_modules to the modules its tensors adapt, or "
                                   f"pass the adapter trained for this --model")


def _as_list(v) -> list[str]:
    if v is None:
        return []
    return [v] if isinstance(v, str) else list(v)


ADAPTER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def name_adapters(values: list[str] | tuple[str, ...]) -> dict[str, str]:
    """`--adapter` values, each NAME=PATH (a local folder or a Hub id) or a bare PATH named after its last path
    part, -> {name: ref} in the order given. A value that is itself an existing path is a path even if it holds
    an '='; a name repeated is refused."""
    out: dict[str, str] = {}
    for v in values:
        name, sep, ref = v.partition("=")
        if not sep or not ADAPTER_NAME.fullmatch(name) or Path(v).expanduser().exists():
            ref = v
            name = Path(v.rstrip("/")).name or v
        if not ref.strip():
            raise UsageError(f"--adapter {v!r} names no adapter: pass NAME=PATH or PATH")
        if not ADAPTER_NAME.fullmatch(name):
            raise UsageError(f"--adapter {v!r}: '{name}' cannot name an adapter (letters, digits, '_', '.', '-'; "
                             f"it becomes a folder name in the bundle): pass NAME=PATH with such a name")
        if name in out:
            raise UsageError(f"--adapter: two adapters are named '{name}' ({out[name]} and {ref}): give each its own "
                             f"name with NAME=PATH")
        out[name] = ref
    return out


# ---------------------------------------------------------------- outputs

def prepare_out(out: Path, *, force: bool) -> None:
    """Refuse a non-empty --out unless --force (which empties it only once the build succeeds)."""
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"--out {out} is a file: choose a directory")
    if out.exists() and any(out.iterdir()) and not force:
        raise OutputExistsError(f"output directory {out} exists and is not empty: pass --force to replace it, "
                                f"or choose another --out")


def check_disk(needs: list[tuple[Path, int]]) -> None:
    """Free space for every (folder, bytes) a build writes; folders on one filesystem add up."""
    by_fs: dict[int, tuple[Path, int]] = {}
    for folder, need in needs:
        probe = Path(folder)
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
        dev = probe.stat().st_dev
        seen = by_fs.get(dev)
        by_fs[dev] = (seen[0] if seen else probe, (seen[1] if seen else 0) + need)
    for probe, need in by_fs.values():
        free = shutil.disk_usage(probe).free
        if free < need:
            raise DiskSpaceError(f"need about {need / 1e9:.1f} GB free in {probe}, have {free / 1e9:.1f} GB: "
                                 f"free space or choose another --out / --cache-dir")
