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

3. A tied LM head from a GPTQ checkpoint (phiedge's data-aware int4, _onnx_imatrix). The builder shares the
   quantized head with the embedding's GatherBlockQuantized, which needs its scales and zero points as
   (vocabulary, groups); the GPTQ loader leaves them flat, as MatMulNBits takes them, and onnxruntime refuses the
   graph ("scales must have the same rank as data"). Here they are reshaped as the builder's own quant_auto loader
   reshapes its tied head's.

4. Memory: its int4/int8 pass quantizes the whole graph in fp32 at once (23.6 GB at 3.8 B parameters); here
   it runs one weight at a time with the same quantizer, byte for byte the same model (see _genai_nbits).

Usage: python -m phiedge.exporters._genai_build [--threads N] BUILDER_ARGS...   (the builder's own command line;
N threads quantize, default 1)
"""
import os
import runpy
import sys


def main() -> None:
    import onnxruntime_genai
    import onnxruntime_genai.models  # noqa: F401  (puts the builder's folder on sys.path, as `-m` does)
    import torch
    from builders.base import Model
    from loaders.gptq import GPTQModel

    from phiedge.exporters import _genai_nbits
    original_gptq = GPTQModel.__init__

    def gptq_init(self, *args, **kwargs):
        original_gptq(self, *args, **kwargs)
        head = self.lm_head
        if getattr(head, "qweight", None) is not None:
            head.scales = head.scales.reshape(head.out_features, -1)
            if head.qzeros is not None:
                head.qzeros = head.qzeros.reshape(head.out_features, -1)

    GPTQModel.__init__ = gptq_init
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

    original_to_nbits = Model.to_nbits

    def to_nbits(self):
        if _genai_nbits.applies(self) and not os.environ.get(_genai_nbits.WHOLE_GRAPH):
            return _genai_nbits.to_nbits(self, threads)
        return original_to_nbits(self)

    Model.to_nbits = to_nbits
    Model.has_lm_head = has_lm_head
    Model.make_lm_head = make_lm_head
    Model.get_genai_commit = classmethod(lambda cls: getattr(onnxruntime_genai, "__commit__", None) or None)
    args = sys.argv[1:]
    threads = 1
    if args[:1] == ["--threads"]:
        threads, args = int(args[1]), args[2:]
    sys.argv = ["onnxruntime_genai.models.builder", *args]
    runpy.run_module("onnxruntime_genai.models.builder", run_name="__main__", alter_sys=True)
    if len(made) != 1 and "exclude_lm_head=true" not in sys.argv:
        sys.exit(f"the builder wrote {len(made)} LM heads (expected exactly one): the graph would be wrong")


if __name__ == "__main__":
    main()
