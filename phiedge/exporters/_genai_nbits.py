"""onnxruntime-genai's int4/int8 quantization pass, one weight at a time.

The builder writes float `MatMul`s and leaves quantization to `Model.to_nbits`, which hands
`ir.to_proto(self.model)` — the whole graph with every weight materialized in fp32 (4 B/param) — to
onnxruntime's `MatMulNBitsQuantizer`, beside the 16-bit model the builder loaded: 23.6 GB at 3.8 B parameters.

`to_nbits` here gives the same quantizer the same arguments, once per weight, on a one-node model holding that
weight alone, and splices the node(s) and initializers it returns into the builder's graph in place of the float
node. Every quantizer the builder can choose (MLAS's default RTN, onnxruntime's RTN and k_quant) quantizes each
weight from that weight alone, so the result is the builder's own, byte for byte (tests/test_onnx.py proves it on
the tiny model). The float weight leaves the graph as soon as its node is quantized: the builder's initializers
are lazy views of the loaded (memory-mapped) checkpoint's tensors, so at most one weight is held in fp32 at a
time, and the checkpoint pages read for it are let go once it is quantized.

What this does not cover falls back to the builder's own pass: QDQ output, exact per-node overrides, CUDA weight
prepacking, and quantizable nodes inside subgraphs. With PHIEDGE_ONNX_WHOLE_GRAPH_QUANTIZATION=1 in its
environment the builder runs its own pass (the byte-identity test compares the two).
"""
from __future__ import annotations

import concurrent.futures
import gc
import os
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_ir as ir
from onnx import numpy_helper
from onnx_ir import serde
from onnx_ir.convenience import convert_attributes, replace_all_uses_with

from phiedge.pages import drop_mapped_pages

WHOLE_GRAPH = "PHIEDGE_ONNX_WHOLE_GRAPH_QUANTIZATION"
# Within one weight, the checkpoint pages read for its slices are let go once this many bytes of slices were cast
# (to fp32: half as many bytes of bf16 pages): after every slice, reading /proc/self/smaps took half of a
# 1 B-parameter export's time (116 of 238 s over 2,608 slices).
DROP_EVERY_BYTES = 512 * 2**20
# Weights larger than this many elements are quantized in column slices (see _one_node_models); the
# environment variable sets another size (the byte-identity test slices the tiny model's weights with it).
# onnxruntime's k_quant makes ~10 numpy temporaries the size of what it quantizes for each of its 20 search steps:
# slices that stay in the CPU's caches run it twice as fast. Measured on a 4-layer full-width Phi-4-mini (1.02 B
# parameters, 2 threads, AMD EPYC), whole-file identical: int4-k_quant-mixed8 215 s / 4.2 GB peak with 16 Mi
# elements, 131 s at 768 Ki, 123 s / 2.6 GB at 384 Ki (128 columns of K=3072), 137 s at 192 Ki; the builder's
# default int4 (MLAS) 55 s -> 42 s. At full size (3.84 B, the same VM): 752 s / 6.1 GB -> 461 s / 4.5 GB.
CHUNK_ELEMENTS = int(os.environ.get("PHIEDGE_ONNX_QUANTIZE_SLICE", 3 * 2**17))


def applies(model) -> bool:
    """Whether the builder's pass may be replaced by the per-weight one for this build."""
    attrs = model.quant_attrs
    return not (attrs["use_qdq"] or getattr(model, "exact_quant_overrides", None)
                or (model.ep == "cuda" and model.matmul_attrs.get("weights_prepacked", 0) > 0)
                or any(_quantizable(model, n) for g in model.model.graph.subgraphs() for n in g))


def to_nbits(model, threads: int = 1) -> ir.Model:
    """The quantized graph, `threads` slices at a time (onnxruntime's quantizers are numpy: its large
    elementwise operations release the GIL)."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
    from onnxruntime.quantization.quant_utils import QuantFormat

    attrs, graph = model.quant_attrs, model.model.graph
    method = getattr(model, "quantization_algo", "default")
    custom = getattr(model, "int4_customized_weight_config", {}) or {}
    # As the builder's to_nbits: RTN/k_quant take every MatMul's bits from the config (ORT would hard-code 4).
    algo_config = None
    if method != "default":
        weights = {n.name: {"bits": attrs["bits"]} for n in graph if n.op_type == "MatMul"}
        algo_config = model.make_algo_config(method, {**weights, **custom})
    values = _values_by_name(graph)
    pool = concurrent.futures.ThreadPoolExecutor(threads)
    for node in [n for n in graph if _quantizable(model, n)]:
        # The default quantizer applies one bit width per pass (the builder runs one pass per width).
        bits = custom.get(node.name, {}).get("bits", attrs["bits"]) if method == "default" else attrs["bits"]

        def quantize(proto: onnx.ModelProto, bits=bits) -> Quantized:
            q = MatMulNBitsQuantizer(
                model=proto, bits=bits, block_size=attrs["matmul_block_size"], is_symmetric=attrs["is_symmetric"],
                accuracy_level=attrs["accuracy_level"], nodes_to_exclude=[], quant_format=QuantFormat.QOperator,
                op_types_to_quantize=attrs["op_types_to_quantize"], algo_config=algo_config)
            q.process()
            return Quantized.of(q.model.model)

        parts = _bounded_map(pool, quantize, _one_node_models(model.model, node, threads), threads)
        model.model.opset_imports.update(parts[0].opsets)   # the quantizer adds com.microsoft (int4: opset 21)
        model.model.ir_version = max(model.model.ir_version, parts[0].ir_version)
        _splice(graph, node, _joined(parts), values, in_place=method == "default")
        del parts
        gc.collect()
        drop_mapped_pages(".safetensors")
    pool.shutdown()
    if method == "default":
        _sort_subgraph_holders_attributes(graph)
    else:
        _sort_as_onnx_model(graph)
    return model.model


# How the whole-graph pass leaves the graph, reproduced so that model.onnx is the same file:
def _sort_subgraph_holders_attributes(graph: ir.Graph) -> None:
    """The default quantizer (`_process_subgraph`) quantizes nodes in place and rebuilds every node that holds a
    subgraph (the LongRoPE cos/sin `If`) with `onnx.helper.make_node`, which writes attributes in name order."""
    for node in graph:
        if any(a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS) for a in node.attributes.values()):
            attrs = sorted(node.attributes.items())
            node.attributes.clear()
            node.attributes.update(attrs)


def _sort_as_onnx_model(graph: ir.Graph) -> None:
    """RTN and k_quant (`neural_compressor.weight_only.rtn_quantize`) append the quantized nodes at the end, then
    reorder the whole graph with that package's `ONNXModel.topological_sort`: run it on a skeleton of names."""
    from onnxruntime.quantization.neural_compressor.onnx_model import ONNXModel
    nodes = {n.name: n for n in graph}
    skeleton = onnx.helper.make_graph(
        [onnx.helper.make_node("Skeleton", [v.name if v is not None else "" for v in n.inputs],
                               [v.name for v in n.outputs], name=name) for name, n in nodes.items()],
        "skeleton", [onnx.helper.make_empty_tensor_value_info(v.name) for v in graph.inputs], [],
        initializer=[onnx.helper.make_tensor(name, onnx.TensorProto.FLOAT, [0], []) for name in graph.initializers])
    sorter = ONNXModel(onnx.helper.make_model(skeleton))
    sorter.topological_sort()
    graph.remove(list(nodes.values()))
    graph.extend(nodes[p.name] for p in sorter.model.graph.node)


def _quantizable(model, node: ir.Node) -> bool:
    if node.op_type not in model.quant_attrs["op_types_to_quantize"]:
        return False
    if node.name in model.quant_attrs["nodes_to_exclude"]:
        return False
    index = 0 if node.op_type == "Gather" else 1
    return len(node.inputs) > index and node.inputs[index] is not None and node.inputs[index].const_value is not None


def _values_by_name(graph: ir.Graph) -> dict[str, ir.Value]:
    """Every named value of the graph, the dangling ones too (the tied embedding's GatherBlockQuantized reads
    the quantized LM head's initializers by name before they exist)."""
    out = {v.name: v for v in graph.inputs}
    out.update(graph.initializers)
    for node in graph:
        for v in (*node.inputs, *node.outputs):
            if v is not None and v.name:
                out.setdefault(v.name, v)
    return out


def _bounded_map(pool, fn, items, width: int) -> list:
    """`[fn(x) for x in items]` on the pool, at most `width` items taken from the generator at a time."""
    out, window = [], []
    for item in items:
        window.append(pool.submit(fn, item))
        if len(window) == width:
            out += [f.result() for f in window]
            window = []
    return out + [f.result() for f in window]


def _one_node_models(model: ir.Model, node: ir.Node, pieces: int = 1):
    """Models of `node` alone, its constant inputs as initializers and the others as graph inputs: one, or for a
    MatMul weight over CHUNK_ELEMENTS (or to give `pieces` threads one each) one per slice of its output columns
    (an even number each, so 4-bit zero points pair within a slice). Columns are quantized independently, each
    from its own K values, and MatMulNBits stores them column-major (qweight [N, blocks, blob], scales and zero
    points N-major): the slices' results, concatenated, are the whole weight's. A weight the builder casts
    lazily from the loaded checkpoint is cast slice by slice (3.8 B Phi's 200,064-wide LM head is 2.5 GB in
    fp32, and k_quant's numpy temporaries are ~10x what they quantize)."""
    weight = node.inputs[1] if node.op_type == "MatMul" else None
    shape = tuple(weight.const_value.shape) if weight is not None else ()
    k, n = shape if len(shape) == 2 else (0, 0)
    most = min(CHUNK_ELEMENTS, -(-k * n // max(pieces, 1)))
    if not n or k * n <= most:
        yield _model_of(model, node, {v.name: np.asarray(v.const_value.numpy()) for v in _consts(node)})
        return
    step = max(2, most // k // 2 * 2)
    others = {v.name: np.asarray(v.const_value.numpy()) for v in _consts(node) if v is not weight}
    cast = _lazy_cast(weight.const_value)
    whole = None if cast else np.asarray(weight.const_value.numpy())
    read = 0
    for start in range(0, n, step):
        piece = cast(start, start + step) if cast else whole[:, start:start + step]
        yield _model_of(model, node, {**others, weight.name: np.ascontiguousarray(piece)})
        read += piece.nbytes
        if read >= DROP_EVERY_BYTES:          # reading /proc/self/smaps costs ~30 ms: not once per slice
            drop_mapped_pages(".safetensors")    # the checkpoint's pages read so far
            read = 0


def _consts(node: ir.Node) -> list[ir.Value]:
    return [v for v in node.inputs if v is not None and v.const_value is not None]


def _lazy_cast(tensor):
    """For the builder's lazy cast of a checkpoint tensor (`make_initializer(t, to=...)`: an ir.LazyTensor whose
    function casts the torch tensor `tensor` to `torch_dtype`), a function casting columns [a, b) alone --
    the same values, a cast being elementwise; None for any other tensor."""
    func = getattr(tensor, "_func", None)
    code = getattr(func, "__code__", None)
    if code is None or not func.__closure__:
        return None
    cells = dict(zip(code.co_freevars, func.__closure__))
    try:
        source, dtype = cells["tensor"].cell_contents, cells["torch_dtype"].cell_contents
    except (KeyError, ValueError):
        return None
    import torch
    if not isinstance(source, torch.Tensor) or source.dim() != 2 or not isinstance(dtype, torch.dtype):
        return None
    return lambda a, b: source[:, a:b].to(dtype).numpy()


def _model_of(model: ir.Model, node: ir.Node, consts: dict[str, np.ndarray]) -> onnx.ModelProto:
    inits = [numpy_helper.from_array(a, name) for name, a in consts.items()]
    inputs = [serde.serialize_value(v) for v in node.inputs if v is not None and v.name not in consts]
    graph = onnx.helper.make_graph([serde.serialize_node(node)], "one_node", inputs,
                                   [onnx.helper.make_empty_tensor_value_info(v.name) for v in node.outputs],
                                   initializer=inits)
    opsets = [onnx.helper.make_opsetid(d, v) for d, v in model.opset_imports.items()]
    return onnx.helper.make_model(graph, opset_imports=opsets, ir_version=model.ir_version)


@dataclass
class Quantized:
    """What the quantizer made of one (slice of a) weight, copied out of its ModelProto: protobuf keeps every
    byte a message ever held until the whole message goes (the fp32 slice it was given included)."""
    nodes: list[onnx.NodeProto]
    arrays: dict[str, np.ndarray]
    opsets: dict[str, int]
    ir_version: int

    @classmethod
    def of(cls, proto: onnx.ModelProto) -> "Quantized":
        nodes = []
        for n in proto.graph.node:
            nodes.append(onnx.NodeProto())
            nodes[-1].CopyFrom(n)
        return cls(nodes, {t.name: numpy_helper.to_array(t).copy() for t in proto.graph.initializer},
                   {o.domain: o.version for o in proto.opset_import}, proto.ir_version)


def _joined(parts: list[Quantized]) -> tuple[list[onnx.NodeProto], dict[str, np.ndarray]]:
    """The quantized node(s) and initializers of one weight from its column slices' (see _one_node_models):
    initializers concatenated N-major, each MatMulNBits node's N the sum."""
    if len(parts) == 1:
        return parts[0].nodes, parts[0].arrays
    arrays = {}
    for name in list(parts[0].arrays):
        pieces = [p.arrays.pop(name) for p in parts]
        arrays[name] = np.concatenate([x.reshape(-1) for x in pieces]).reshape(
            sum(x.shape[0] for x in pieces), *pieces[0].shape[1:])
        del pieces
    total = sum(next(a.i for a in p.nodes[-1].attribute if a.name == "N") for p in parts)
    for node in parts[0].nodes:
        for a in node.attribute:
            if node.op_type == "MatMulNBits" and a.name == "N":
                a.i = total
    return parts[0].nodes, arrays


def _splice(graph: ir.Graph, old: ir.Node, quantized: tuple[list[onnx.NodeProto], dict[str, np.ndarray]],
            values: dict[str, ir.Value], in_place: bool) -> None:
    """Replace `old` by the quantizer's nodes (where it stood, or at the end of the graph), reading the
    initializers it made; drop `old`'s float weight."""
    weights = [v for v in old.inputs if v is not None and v.const_value is not None]
    for v in weights:
        if v.name in graph.initializers and all(user is old for user, _ in v.uses()):
            graph.initializers.pop(v.name)
            v.const_value = None                    # the lazy fp32 view of the loaded model's tensor goes
            values.pop(v.name, None)
    nodes, arrays = quantized
    for name, array in arrays.items():
        tensor = ir.Tensor(array, name=name)
        value = values.get(name) or ir.Value(name=name)
        value.const_value, value.dtype, value.shape = tensor, tensor.dtype, tensor.shape
        graph.register_initializer(value)
        values[name] = value
    new_nodes, outputs = [], {}
    for p in nodes:
        attrs = convert_attributes({a.name: onnx.helper.get_attribute_value(a) for a in p.attribute})
        inputs = [(outputs.get(name) or values[name]) if name else None for name in p.input]
        node = ir.Node(p.domain, p.op_type, inputs, attrs, num_outputs=len(p.output), name=p.name)
        for value, name in zip(node.outputs, p.output):
            value.name = name
            outputs[name] = value
        new_nodes.append(node)
    old_outputs = list(old.outputs)
    new_outputs = [outputs[v.name] for v in old_outputs]
    for o, n in zip(old_outputs, new_outputs):
        n.type, n.shape = o.type, o.shape
        values[o.name] = n
    replace_all_uses_with(old_outputs, new_outputs, replace_graph_outputs=True)
    if in_place:
        graph.insert_after(old, new_nodes)
    else:
        graph.extend(new_nodes)
    graph.remove(old, safe=True)
