"""Run onnxruntime-genai's model builder (`python -m onnxruntime_genai.models.builder`) with two fixes.

1. The source revision it stamps into model.onnx (`producer_version`, builders/base.py get_genai_commit) comes
   from `git rev-parse HEAD` run five folders above the installed package: inside a virtualenv that lives in a
   git checkout (this project's own `.venv`, or a user's), that is the checkout's commit, so the same inputs
   gave another model.onnx after every commit. Here it is the installed package's own `__commit__`, as for any
   installed wheel.

2. The LM head.

The builder walks `model.modules()` and takes *any* `nn.Linear` whose `out_features` equals the
vocabulary size for the LM head (builders/base.py `has_lm_head`). When a decoder layer has a Linear of
that width too (the tiny test model: gate_up_proj 2 x 1024 = vocab 2048), the first match becomes the LM
head: logits are computed from layer 0's post-attention norm and the final norm is left dangling. The
graph builds and loads, and is simply wrong (top-1 0.47 against PyTorch on the tiny model). Here the LM
head is the model's own output embedding (`get_output_embeddings()`), and exactly one must be written.

Usage: python -m phiedge.exporters._genai_build BUILDER_ARGS...   (the builder's own command line)
"""
import runpy
import sys


def main() -> None:
    import onnxruntime_genai
    import onnxruntime_genai.models  # noqa: F401  (puts the builder's folder on sys.path, as `-m` does)
    import torch
    from builders.base import Model

    original = Model.has_lm_head
    made = []

    def has_lm_head(self, module):
        weights = getattr(self, "weights", None)
        head = weights.get_output_embeddings() if hasattr(weights, "get_output_embeddings") else None
        if isinstance(head, torch.nn.Module):
            return module is head
        return original(self, module)           # GGUF / pre-quantized inputs: the builder's own logic

    original_make = Model.make_lm_head

    def make_lm_head(self, module):
        made.append(module)
        return original_make(self, module)

    Model.has_lm_head = has_lm_head
    Model.make_lm_head = make_lm_head
    Model.get_genai_commit = classmethod(lambda cls: getattr(onnxruntime_genai, "__commit__", None) or None)
    sys.argv = ["onnxruntime_genai.models.builder", *sys.argv[1:]]
    runpy.run_module("onnxruntime_genai.models.builder", run_name="__main__", alter_sys=True)
    if len(made) != 1 and "exclude_lm_head=true" not in sys.argv:
        sys.exit(f"the builder wrote {len(made)} LM heads (expected exactly one): the graph would be wrong")


if __name__ == "__main__":
    main()
