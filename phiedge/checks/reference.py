"""The PyTorch side of every check: reference logits, greedy answers and their margins. Build time only.

- `reference(merged, config, out)`: for every probe (short; long past the LongRoPE switch, whole and as its
  span at its own positions: probes.span) the last COMPARE_LAST positions' logits, and the short probe's greedy
  continuation with PyTorch's top-2 margin at each step, saved as an .npz (the check stages' and the bundle's
  golden references' source).
- `fp32_compute()`: half-precision checkpoints run with fp32 arithmetic on their stored weights (also the merge
  proof's).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from ..torch_compute import fp32_compute, load
from . import probes as probes_mod

log = logging.getLogger("phiedge")
GREEDY_TOKENS = 16
def last_logits(model, ids: list[int], start: int = 0) -> np.ndarray:
    """Logits of the last COMPARE_LAST positions of one forward of `ids` at positions start.. (all of a
    4200-token probe's would be 3.3 GB at Phi-4-mini's vocabulary). Hugging Face's LongRoPE picks its factors
    from max(position_ids) + 1, so a span past the switch runs the long ones."""
    import torch
    positions = torch.arange(start, start + len(ids))[None]
    with torch.no_grad(), fp32_compute():
        out = model(input_ids=torch.tensor([ids]), position_ids=positions, use_cache=False,
                    logits_to_keep=probes_mod.COMPARE_LAST)
    return out.logits[0, -probes_mod.COMPARE_LAST:].float().numpy()


def reference(merged_dir: Path, config: dict, out_file: Path) -> None:
    """PyTorch reference for every probe: last-N logits, greedy tokens and their margins, saved as .npz."""
    from ..files import save_npz
    model = load(merged_dir)
    arrays: dict[str, np.ndarray] = {}
    for p in probes_mod.make(merged_dir, probes_mod.switch_point(config)):
        log.info("reference logits: %s probe, %d tokens", p.name, p.n)
        arrays[f"{p.name}_ids"] = np.array(p.ids, dtype=np.int32)
        arrays[f"{p.name}_logits"] = last_logits(model, p.ids)
        if p.name == "long":
            sp = probes_mod.span(p)
            arrays["long_span_start"] = np.array(sp.start, dtype=np.int32)
            arrays["long_span_logits"] = last_logits(model, sp.ids, sp.start)
        if p.name == "short":
            tokens, margins = _greedy(model, p.ids, GREEDY_TOKENS, eos_ids(merged_dir))
            arrays["short_greedy"] = np.array(tokens, dtype=np.int32)
            arrays["short_greedy_margins"] = np.array(margins, dtype=np.float32)
    arrays.update(_toolcall(model, merged_dir))
    tmp = out_file.with_name(out_file.name + ".partial.npz")
    save_npz(tmp, arrays)
    tmp.rename(out_file)


def _greedy(model, ids: list[int], n: int, eos: list[int]) -> tuple[list[int], list[float]]:
    """PyTorch greedy continuation (stop token excluded) and, at each of its steps, the margin between the
    chosen token's logit and the runner-up's: where that margin is within a precision's logit tolerance,
    an artifact of that precision may take the other token without being wrong (metrics.token_agreement)."""
    import torch
    with torch.no_grad(), fp32_compute():
        ids_t = torch.tensor([ids])
        gen = model.generate(ids_t, attention_mask=torch.ones_like(ids_t), max_new_tokens=n, do_sample=False,
                             eos_token_id=eos or None, pad_token_id=(eos or [0])[0],
                             output_logits=True, return_dict_in_generate=True)
    toks = gen.sequences[0, len(ids):].tolist()
    keep = next((i for i, t in enumerate(toks) if t in eos), len(toks))
    margins = [float(d[0] - d[1]) for d in (torch.topk(step[0].float(), 2).values for step in gen.logits[:keep])]
    return toks[:keep], margins


def _toolcall(model, merged_dir: Path) -> dict[str, np.ndarray]:
    """The tool-call smoke (phiedge.tools.SMOKE_QUESTION with SMOKE_TOOLS): its prompt, PyTorch's greedy answer
    with margins, and the call that answer makes ("" when PyTorch answers without a well-formed call: then no
    artifact is held to one). Nothing when the model's template does not render tools."""
    from .. import rag, tools
    from ..errors import ToolCallError, UsageError
    try:
        ids = rag.prompt_ids(merged_dir, tools.messages(tools.SMOKE_QUESTION, tools.SMOKE_TOOLS))
    except UsageError as e:
        log.info("no tool-call smoke: %s", e)
        return {}
    tokens, margins = _greedy(model, ids, tools.SMOKE_TOKENS, eos_ids(merged_dir))
    try:
        calls = tools.parse(rag.detokenize(merged_dir, tokens))
    except ToolCallError:
        calls = []
    call = tools.canonical(calls) if calls and not tools.check(calls, tools.SMOKE_TOOLS) else ""
    return {"toolcall_ids": np.array(ids, dtype=np.int32), "toolcall_greedy": np.array(tokens, dtype=np.int32),
            "toolcall_greedy_margins": np.array(margins, dtype=np.float32), "toolcall_call": np.array(call)}


def greedy(merged_dir: Path, ids: list[int], n: int) -> tuple[list[int], list[float]]:
    """Greedy tokens of the merged checkpoint for a prompt (the smoke RAG reference), with their margins."""
    return _greedy(load(merged_dir), ids, n, eos_ids(merged_dir))


def eos_ids(model_dir: Path) -> list[int]:
    """Stop tokens: generation_config's eos ids plus the template's end-of-turn token."""
    from tokenizers import Tokenizer

    from ..chat import END_TOKENS
    ids: list[int] = []
    gc = model_dir / "generation_config.json"
    if gc.exists():
        e = json.loads(gc.read_text()).get("eos_token_id")
        ids += e if isinstance(e, list) else ([e] if e is not None else [])
    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    for t in END_TOKENS:
        i = tok.token_to_id(t)
        if i is not None and i not in ids:
            ids.append(i)
    return ids

