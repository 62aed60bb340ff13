"""LoRA kept separate on onnxruntime-genai: the base graph with LoRA weights as inputs, and `.onnx_adapter` files.

onnxruntime-genai 0.18.0's builder bakes an adapter into the graph as constants; what `og.Adapters` needs is a
base whose LoRA weights are graph inputs, each fed by the active adapter (Olive's ExtractAdapters pass turns the
builder's constants into such inputs). phiedge builds the base from the base model as usual and then adds the
inputs itself, after each decoder MatMul / MatMulNBits:

    y = MatMul(x, W)                 ->   y = MatMul(x, W) + MatMul(MatMul(x, A_m), B_m[:, cols])

one pair per Hugging Face module m of every layer, named `<module>.lora_A` [in, r] and `<module>.lora_B` [r, out]
with a symbolic rank r, whose default is an empty initializer of rank 0: with no adapter active the added
product is exact zeros and the base runs as exported. The pairs follow the checkpoint's modules, not the graph's
packing: the builder packs or unpacks projections (Phi-3's fused qkv_proj / gate_up_proj become q/k/v and
gate/up MatMuls, or one packed MatMul; SmolLM2's q/k/v one packed qkv_proj), and each graph MatMul reads the
columns of the modules it computes (SEGMENTS). So one adapter file fits every precision of one base.

The adapter file holds, per adapted module, Aᵀ and (s·B)ᵀ in fp32 (PEFT's scaling s folded in: phiedge.adapters),
written with onnxruntime's own `AdapterFormat`.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from ..errors import ToolchainError, UnsupportedAdapterError

ADAPTER_FILE = "adapter.onnx_adapter"
SLOT = re.compile(r"^/model/layers\.(\d+)/(attn|mlp)/(\w+)/MatMul(?:NBits|_Q\d+)?$")
HF_MODULE = re.compile(r"^model\.layers\.(\d+)\.((?:self_attn|mlp)\.\w+)\.weight$")
A_NAME, B_NAME = "{}.lora_A", "{}.lora_B"


def modules_of(header: dict) -> dict[int, dict[str, tuple[int, int]]]:
    """{layer: {block-relative module ("self_attn.qkv_proj"): (out, in)}} from a checkpoint's safetensors
    headers ({tensor name: shape})."""
    out: dict[int, dict[str, tuple[int, int]]] = {}
    for name, shape in header.items():
        m = HF_MODULE.match(name)
        if m and len(shape) == 2:
            out.setdefault(int(m.group(1)), {})[m.group(2)] = (int(shape[0]), int(shape[1]))
    return out


def segments(kind: str, slot: str, hf: dict[str, tuple[int, int]], config: dict) -> list[tuple[str, int, int]]:
    """The (module, first output column, width) runs a graph MatMul `/<kind>/<slot>/` computes, in its column order,
    from the layer's Hugging Face modules `hf`."""
    heads, kv = int(config["num_attention_heads"]), int(config.get("num_key_value_heads") or config["num_attention_heads"])
    head_dim = int(config.get("head_dim") or int(config["hidden_size"]) // heads)
    q, k = heads * head_dim, kv * head_dim
    inter = int(config.get("intermediate_size") or 0)
    fused = {"self_attn.qkv_proj": [("q_proj", 0, q), ("k_proj", q, k), ("v_proj", q + k, k)],
             "mlp.gate_up_proj": [("gate_proj", 0, inter), ("up_proj", inter, inter)]}
    block = "self_attn" if kind == "attn" else "mlp"
    name = f"{block}.{slot}"
    if name in hf:
        return [(name, 0, hf[name][0])]
    for whole, parts in fused.items():
        if whole in hf:                                        # a slice of a fused module
            for part, start, width in parts:
                if name == f"{block}.{part}":
                    return [(whole, start, width)]
        if name == whole:                                      # a packed MatMul of separate modules
            found = [f"{block}.{part}" for part, _, _ in parts]
            if all(f in hf for f in found):
                return [(f, 0, hf[f][0]) for f in found]
    raise UnsupportedAdapterError(f"the ONNX graph's {kind}/{slot} MatMul matches no module of the checkpoint "
                                  f"(has {', '.join(sorted(hf))}): onnx cannot keep adapters separate for this "
                                  f"architecture yet; build with --adapter-mode merged")


def _out_width(node, initializers: dict) -> int:
    if node.op_type == "MatMulNBits":
        return next(int(a.i) for a in node.attribute if a.name == "N")
    weight = initializers.get(node.input[1])
    if weight is None or len(weight.dims) != 2:
        raise ToolchainError(f"{node.name}: its weight is not a 2-D initializer; phiedge cannot add LoRA inputs")
    return int(weight.dims[1])


def add_lora_inputs(model_file: Path, checkpoint_header: dict, config: dict) -> list[str]:
    """Rewrite the ONNX graph in `model_file` (weights stay in their external data file, untouched) with a LoRA
    input pair per Hugging Face module, as this module's docstring says. Returns the modules given inputs."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    proto = onnx.load(str(model_file), load_external_data=False)
    graph = proto.graph
    hf_layers = modules_of(checkpoint_header)
    inits = {i.name: i for i in graph.initializer}
    # The builder's activation dtype is its KV cache's (io_dtype): value_info need not list a MatMul's input.
    kv = {i.type.tensor_type.elem_type for i in graph.input if i.name.startswith("past_key_values")}
    if kv - {TensorProto.FLOAT}:
        raise UnsupportedAdapterError("onnx keeps adapters separate on fp32 activations only (the CPU precisions "
                                      "fp32 and int4): build fp16 with --adapter-mode merged")
    new_nodes: dict[int, list] = {}          # node index -> nodes to insert after it
    modules: dict[str, tuple[int, int]] = {}   # module path -> (in, out)
    projected: dict[tuple[str, str], str] = {}  # (x, module) -> MatMul(x, A) output, shared by a fused module's slices
    nodes = list(graph.node)
    for idx, node in enumerate(nodes):
        m = SLOT.match(node.name)
        if not m or node.op_type not in ("MatMul", "MatMulNBits"):
            continue
        layer, kind, slot = int(m.group(1)), m.group(2), m.group(3)
        hf = hf_layers.get(layer, {})
        segs = segments(kind, slot, hf, config)
        if sum(w for _, _, w in segs) != _out_width(node, inits):
            raise ToolchainError(f"{node.name}: its output width is not that of {', '.join(s for s, _, _ in segs)}; "
                                 f"phiedge cannot add LoRA inputs to this graph")
        x, y = node.input[0], node.output[0]
        base = f"{node.name}/phiedge_lora"
        added, parts = [], []
        for i, (module, start, width) in enumerate(segs):
            path = f"model.layers.{layer}.{module}"
            out, inp = hf[module]
            modules[path] = (inp, out)
            if (x, path) not in projected:
                projected[(x, path)] = f"{base}/xa_{i}"
                added.append(helper.make_node("MatMul", [x, A_NAME.format(path)], [projected[(x, path)]],
                                              name=f"{base}/MatMul_A_{i}"))
            b = B_NAME.format(path)
            if (start, width) != (0, out):                 # this MatMul computes a slice of the module's columns
                consts = [f"{base}/cols_{i}_{w}" for w in ("start", "end", "axis")]
                graph.initializer.extend(numpy_helper.from_array(np.asarray([v], np.int64), n)
                                         for n, v in zip(consts, (start, start + width, 1)))
                added.append(helper.make_node("Slice", [b, *consts], [f"{base}/b_{i}"], name=f"{base}/Slice_B_{i}"))
                b = f"{base}/b_{i}"
            added.append(helper.make_node("MatMul", [projected[(x, path)], b], [f"{base}/delta_{i}"],
                                          name=f"{base}/MatMul_B_{i}"))
            parts.append(f"{base}/delta_{i}")
        if len(parts) > 1:
            added.append(helper.make_node("Concat", parts, [f"{base}/delta"], name=f"{base}/Concat", axis=-1))
            delta = f"{base}/delta"
        else:
            delta = parts[0]
        node.output[0] = f"{base}/base"
        added.append(helper.make_node("Add", [f"{base}/base", delta], [y], name=f"{base}/Add"))
        new_nodes[idx] = added
    if not modules:
        raise UnsupportedAdapterError("the ONNX graph has no decoder MatMul phiedge knows: onnx cannot keep adapters "
                                      "separate for this architecture yet; build with --adapter-mode merged")
    for path, (inp, out) in sorted(modules.items()):
        rank = f"lora_rank_{path.replace('.', '_')}"
        for name, shape, dims in ((A_NAME.format(path), (inp, 0), [inp, rank]),
                                  (B_NAME.format(path), (0, out), [rank, out])):
            graph.input.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, dims))
            graph.initializer.append(numpy_helper.from_array(np.zeros(shape, np.float32), name))
    del graph.node[:]
    for idx, node in enumerate(nodes):
        graph.node.append(node)
        graph.node.extend(new_nodes.get(idx, ()))
    tmp = model_file.with_name(model_file.name + ".lora")
    onnx.save(proto, str(tmp))
    tmp.replace(model_file)
    return sorted(modules)


def write_adapter(modules: dict, out_file: Path) -> list[str]:
    """`modules` ({module path: phiedge.adapters.Folded}) as onnxruntime's adapter file: `<module>.lora_A` = Aᵀ
    [in, r], `<module>.lora_B` = (s·B)ᵀ [r, out], fp32. Returns the parameter names."""
    import onnxruntime as ort
    params = {}
    for path, f in sorted(modules.items()):
        params[A_NAME.format(path)] = np.ascontiguousarray(f.a.T.numpy(), dtype=np.float32)
        params[B_NAME.format(path)] = np.ascontiguousarray(f.b.T.numpy(), dtype=np.float32)
    fmt = ort.AdapterFormat()
    fmt.set_adapter_version(1)
    fmt.set_model_version(1)
    fmt.set_parameters({n: ort.OrtValue.ortvalue_from_numpy(a) for n, a in params.items()})
    tmp = out_file.with_name(out_file.name + ".partial")
    fmt.export_adapter(str(tmp))
    tmp.replace(out_file)
    return sorted(params)
