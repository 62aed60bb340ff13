"""The tokenizer and chat template a fine-tune ships: the adapter's own, when it carries them.

TRL, Unsloth and PEFT's examples save the tokenizer beside the adapter (`tokenizer.save_pretrained(out)`):
tokenizer.json, tokenizer_config.json (special tokens; the template in older layouts), chat_template.jinja, and
sometimes special_tokens_map.json and generation_config.json. That template is the one the fine-tune was trained
with, so it wins over the base's:

    check_vocabulary(adapter_dir, base_dir, name)   # resolve: added or re-merged tokens refused in one line
    written = apply(adapter_dir, base_dir, out_dir)  # the merged checkpoint, or adapters/<name>/<format>/
    record(out_dir, "adapter" if written else "base")

The vocabulary always stays the base's (the same `tokenizer.json` model, vocabulary and merges, or refused); what
the adapter brings is its template, its special tokens and its generation_config.json's eos ids. An adapter
without tokenizer files, or with files that render and stop as the base's do, changes nothing, byte for byte.

Build-time and device-path module: json, hashlib, shutil; `tokenizers` never needed.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from . import chat
from .errors import AdapterMismatchError, InvalidCheckpointError

VOCAB_FILES = ("tokenizer.json", "added_tokens.json", "vocab.json", "merges.txt", "tokenizer.model")
# What an adapter's tokenizer may change, copied over the base's when it does.
TEMPLATE_FILES = ("tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja", "chat_template.json")
EOS_FILE = "generation_config.json"
# What a Hub adapter's download takes besides its weights (phiedge.source.ADAPTER_FILES).
HUB_FILES = (*VOCAB_FILES, *TEMPLATE_FILES, EOS_FILE)
FIX = ("Phi-4-mini's padded vocabulary has unused rows: map new tokens onto them, or retrain with the base's "
       "tokenizer; or pass a copy of the adapter folder without its tokenizer files to ship the base's template")


def carries(adapter: Path) -> bool:
    """Whether an adapter folder holds tokenizer files of its own."""
    return any((Path(adapter) / f).is_file() for f in (*VOCAB_FILES, *TEMPLATE_FILES))


def check_vocabulary(adapter: Path, base: Path, name: str) -> None:
    """The adapter's vocabulary is the base's, or AdapterMismatchError in one line naming the difference."""
    adapter, base = Path(adapter), Path(base)
    if not carries(adapter):
        return
    for f in (*VOCAB_FILES, *TEMPLATE_FILES, EOS_FILE):
        if f.endswith(".json") and (adapter / f).is_file():
            try:
                json.loads((adapter / f).read_text())
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise InvalidCheckpointError(f"adapter {name}'s {f} is not valid JSON ({e}): copy the adapter "
                                             f"again") from None
    theirs = _added(adapter)
    ours = _added(base)
    new = sorted(set(theirs) - set(ours), key=lambda t: theirs[t])
    if new:
        shown = ", ".join(new[:3]) + (", ..." if len(new) > 3 else "")
        raise AdapterMismatchError(f"adapter {name} adds {len(new)} token{'s' if len(new) > 1 else ''} ({shown}) "
                                   f"to the base's vocabulary: {FIX}")
    moved = sorted(t for t in theirs if t in ours and theirs[t] != ours[t])
    if moved:
        raise AdapterMismatchError(f"adapter {name} gives {moved[0]} id {theirs[moved[0]]}, the base {ours[moved[0]]}: "
                                   f"its vocabulary is another one; {FIX}")
    if (adapter / "tokenizer.json").is_file():
        a, b = _model(adapter / "tokenizer.json"), _model(base / "tokenizer.json")
        if a != b:
            why = (f"{len(a['vocab'])} tokens against the base's {len(b['vocab'])}" if len(a["vocab"]) != len(b["vocab"])
                   else "the same size, other ids" if a["vocab"] != b["vocab"] else "its merges differ" if
                   a["merges"] != b["merges"] else f"a {a['type']} model, the base a {b['type']}")
            raise AdapterMismatchError(f"adapter {name}'s tokenizer.json has another vocabulary ({why}): {FIX}")


def _model(path: Path) -> dict:
    """A tokenizer.json's model, vocabulary and merges, merges in one form (tokenizers writes "a b" or [a, b])."""
    model = json.loads(path.read_text()).get("model") or {}
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model.get("merges") or []]
    vocab = model.get("vocab") or {}
    return {"type": model.get("type"), "vocab": vocab if isinstance(vocab, dict) else
            {str(v[0]) if isinstance(v, list) else str(v): i for i, v in enumerate(vocab)}, "merges": merges}


def _added(folder: Path) -> dict[str, int]:
    """Added (special) tokens and their ids, from whichever of tokenizer.json, tokenizer_config.json's
    added_tokens_decoder and added_tokens.json the folder has."""
    out: dict[str, int] = {}
    tj = folder / "tokenizer.json"
    if tj.is_file():
        out.update({t["content"]: int(t["id"]) for t in json.loads(tj.read_text()).get("added_tokens") or []})
    cfg = folder / "tokenizer_config.json"
    if cfg.is_file():
        decoder = json.loads(cfg.read_text()).get("added_tokens_decoder") or {}
        out.update({t["content"]: int(i) for i, t in decoder.items() if isinstance(t, dict) and "content" in t})
    at = folder / "added_tokens.json"
    if at.is_file():
        out.update({k: int(v) for k, v in json.loads(at.read_text()).items()})
    return out


def _template(folder: Path) -> tuple[str, dict] | None:
    try:
        return chat.load_template(folder)
    except InvalidCheckpointError:
        return None


def _renders_as(mine: tuple[str, dict] | None, theirs: tuple[str, dict] | None) -> bool:
    """Whether the adapter's template and the special tokens it names are the base's (or it names none)."""
    return mine is None or (theirs is not None and mine[0] == theirs[0]
                            and all(v == theirs[1].get(k) for k, v in mine[1].items() if v))


def _eos(folder: Path):
    f = folder / EOS_FILE
    return json.loads(f.read_text()).get("eos_token_id") if f.is_file() else None


def apply(adapter: Path, base: Path, out: Path) -> list[str]:
    """Write the adapter's template, special tokens and eos ids into `out` (which holds the base's files, or none)
    where they differ from the base's; the names written ([] when the adapter changes nothing). `out` then renders
    as the fine-tune was trained: its chat_template.jinja is the adapter's template (the base's when the adapter
    carries none), so no older layout's template in tokenizer_config.json is left to disagree with it."""
    adapter, base, out = Path(adapter), Path(base), Path(out)
    if not carries(adapter):
        return []
    mine, theirs = _template(adapter), _template(base)
    template = mine or theirs
    eos = _eos(adapter)
    if _renders_as(mine, theirs) and eos in (None, _eos(base)):
        return []
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name in (*TEMPLATE_FILES, *([EOS_FILE] if eos is not None else [])):
        if (adapter / name).is_file():
            shutil.copyfile(adapter / name, out / name)
            written.append(name)
    if not (out / "tokenizer_config.json").is_file() and (base / "tokenizer_config.json").is_file():
        shutil.copyfile(base / "tokenizer_config.json", out / "tokenizer_config.json")     # its special tokens
        written.append("tokenizer_config.json")
    (out / "chat_template.json").unlink(missing_ok=True)      # a list of named templates: the jinja file wins
    if template is not None:
        (out / "chat_template.jinja").write_text(template[0])
        written.append("chat_template.jinja")
    return sorted(set(written) - {"chat_template.json"})


def record(folder: Path, source: str) -> dict:
    """What the manifest and report.json say of a tokenizer: where it came from, and the hashes of the files
    that decide it (tokenizer.json; the rendered template's text)."""
    folder = Path(folder)
    tj = folder / "tokenizer.json"
    template = _template(folder)
    return {"source": source,
            "tokenizer_sha256": hashlib.sha256(tj.read_bytes()).hexdigest() if tj.is_file() else None,
            "chat_template_sha256": hashlib.sha256(template[0].encode()).hexdigest() if template else None}
