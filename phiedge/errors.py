"""Every error phiedge raises on purpose.

Each class names one kind of problem; its message names the bad value and the fix, in one line.
`phiedge.cli.main` turns any of them into that line on stderr and exit code 1.
"""
from __future__ import annotations


class PhiedgeError(Exception):
    """Base class. Never raised itself."""


class UsageError(PhiedgeError):
    """A flag or argument is wrong.

    Example: "unknown format 'tflite': known formats are gguf; pass one of them to --formats"
    """


class ModelNotFoundError(PhiedgeError):
    """The model or adapter cannot be found locally or on the Hub.

    Example: "model 'microsoft/Phi-4-mini-instruct' is not in the Hugging Face cache and HF_HUB_OFFLINE=1:
    run once online, or pass a local directory to --model"
    """


class InvalidCheckpointError(PhiedgeError):
    """A model or adapter directory is incomplete or corrupt.

    Example: "adapter_model.safetensors is truncated (header says 1048576 bytes of data, file has 4096):
    copy the adapter again"
    """


class AdapterMismatchError(PhiedgeError):
    """The adapter was trained for another base model or cannot be merged.

    Example: "adapter tensor 'layers.0.self_attn.qkv_proj.lora_B' has 5120 output rows, model has 640:
    the adapter was trained for another base; pass the matching --model"
    """


class UnsupportedAdapterError(PhiedgeError):
    """The adapter uses a PEFT feature phiedge does not merge.

    Example: "adapter type 'IA3' is not supported: phiedge merges LoRA adapters (incl. rsLoRA, DoRA)"
    """


class OutputExistsError(PhiedgeError):
    """The output directory exists and is not empty.

    Example: "output directory dist/ exists and is not empty: pass --force to replace it, or choose another --out"
    """


class DiskSpaceError(PhiedgeError):
    """Not enough free disk for the outputs.

    Example: "need about 23.1 GB free in dist/, have 8.0 GB: free space or choose another --out"
    """


class MemoryShortError(PhiedgeError):
    """A stage is estimated to need more memory than the build may use (--max-memory); refused before any work.

    Example: "the smoke reference stage of this model needs about 10.3 GB of memory at its peak, more than the
    build's --max-memory 8.6 GB (default: 80% of the memory available): raise --max-memory, free memory, or build
    on a machine with more"
    """


class ToolchainError(PhiedgeError):
    """An external converter or runtime is missing or failed.

    Example: "llama.cpp converter failed (exit 1): ValueError ...; rerun with PHIEDGE_DEBUG=1 for its full log"
    """


class MergeProofError(PhiedgeError):
    """The merged model does not reproduce the adapter-wrapped model.

    Example: "merged logits differ from the PEFT model by 0.31 (tolerance 0.001): the merge is wrong"
    """


class ParityError(PhiedgeError):
    """One or more artifacts failed the parity gate; the message lists every failure.

    Example: "parity failed for 2 artifacts: gguf Q4_K_M long top1 0.61 < 0.85; gguf F16 short max_abs 4.9 > 0.05"
    """


class TargetError(PhiedgeError):
    """A device target profile is unknown or invalid.

    Example: "targets/intel-cpu.toml: unknown key 'threds' in [runtime]: known keys are threads, n_ctx, device"
    """


class RetrieverError(PhiedgeError):
    """The retriever could not be built or opened.

    Example: "no chunks: every file in docs/ was skipped (3 binary, 1 empty): add .md/.txt/.html/.pdf files"
    """


class BundleError(PhiedgeError):
    """A bundle failed verification or is incomplete.

    Example: "bundle/gguf/model-Q4_K_M.gguf: sha256 differs from manifest.json: the file changed after the build"
    """


class SignatureError(BundleError):
    """A bundle's manifest signature is missing or does not verify under the given public key.

    Example: "bundle dist/: manifest.json.sig does not match manifest.json under key.pub: the manifest was changed
    after signing, or it was signed by another key; do not ship it"
    """


class ToolCallError(PhiedgeError):
    """The model's answer starts a tool call that is not one, or calls a tool against its schema.

    Example: "malformed tool call: not JSON (Expecting ',' delimiter at character 31): [{"name": "get_weather" ..."
    """


class PublishError(PhiedgeError):
    """A bundle cannot be published, or the Hub refused it.

    Example: "publishing to org/name failed: HfHubHTTPError: 401 Unauthorized: check the network, HF_HUB_OFFLINE
    and your token (hf auth login)"
    """
