"""The bundle a user ships: one folder per artifact, the retriever, golden references, manifest, report.

Layout:
    <format>-<precision>/   the artifact's files, as its runtime loads them (<format>-<precision>@<adapter>/ when
                            the bundle holds several adapters' merged artifacts, or base artifacts beside them)
    adapters/<adapter>/<format>/   an adapter kept separate (--adapter-mode separate / both), as that format's
                            runtime applies it to any of the bundle's <format>-<precision>/ base artifacts
    retriever/              SQLite + FAISS + ONNX embedder (when built with --docs)
    golden.npz              probe ids, top-k reference log-probs, greedy tokens and margins (phiedge.checks.golden);
                            golden@<adapter>.npz per adapter when there are several, or with --adapter-mode both
                            (each artifact's manifest row names its own)
    manifest.json           every file's sha256 and size, sources, versions, target, results
    manifest.json.sig       (signed bundles) a detached Ed25519 signature of manifest.json
    report.json, report.html, README.md

The writer walks an explicit state order (artifacts → retriever → golden → reports → manifest) and
refuses an out-of-order call, so a manifest can never describe a half-written bundle. Device-path
module for `verify`: hashlib and json (and `cryptography` for signatures).

Hashes prove a file matches the manifest, not who wrote the manifest: whoever swaps a file can rewrite the
manifest to match. A signature closes that: `keygen` makes an Ed25519 key pair, `sign` writes the manifest's
detached signature, and `verify(..., public_key=...)` refuses a bundle whose signature is missing or wrong.
"""
from __future__ import annotations

import enum
import hashlib
import json
import os
import shutil
from pathlib import Path

from .errors import BundleError, SignatureError, UsageError

MANIFEST = "manifest.json"
SIGNATURE = "manifest.json.sig"
SCHEMA = 1


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def is_bundle(folder: Path) -> bool:
    return (folder / MANIFEST).is_file()


class _State(enum.IntEnum):
    EMPTY = 0
    ARTIFACTS = 1
    RETRIEVER = 2
    GOLDEN = 3
    REPORTS = 4
    MANIFEST = 5


class BundleWriter:
    def __init__(self, folder: Path):
        self.folder = folder
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        self.state = _State.EMPTY

    def _advance(self, to: _State) -> None:
        if to <= self.state:
            raise RuntimeError(f"bundle writer: cannot write {to.name.lower()} after {self.state.name.lower()}")
        self.state = to

    def add_artifacts(self, results, extra: dict[str, str] | None = None) -> None:
        """Each checked artifact's files into its folder (ArtifactResult.name), and a separate adapter's runtime
        files into theirs (ArtifactResult.adapter_path), each once: read, never changed. `extra`: files written
        beside them ({path: text}: Ollama's Modelfiles)."""
        self._advance(_State.ARTIFACTS)
        for rel, text in (extra or {}).items():
            (self.folder / rel).parent.mkdir(parents=True, exist_ok=True)
            (self.folder / rel).write_text(text)
        copied = set()
        for r in results:
            for art, where in ((r.artifact, r.name), (r.adapter_files, r.adapter_path)):
                if art is None or where in copied:
                    continue
                copied.add(where)
                for f in art.files:
                    (self.folder / where / f).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(art.path / f, self.folder / where / f)

    def add_retriever(self, retriever: Path | None) -> None:
        self._advance(_State.RETRIEVER)
        if retriever is not None:
            shutil.copytree(retriever, self.folder / "retriever")

    def add_golden(self, references: dict[str, Path]) -> None:
        """{suffix: reference.npz} -> golden<suffix>.npz each."""
        from .checks.golden import golden_name, write_golden
        self._advance(_State.GOLDEN)
        for suffix, reference in references.items():
            write_golden(reference, self.folder / golden_name(suffix))

    def add_reports(self, rep: dict, readme: str) -> None:
        from . import report
        self._advance(_State.REPORTS)
        report.write(rep, self.folder)
        report.write_html(rep, self.folder)
        (self.folder / "README.md").write_text(readme)

    def add_manifest(self, info: dict) -> None:
        self._advance(_State.MANIFEST)
        files = {}
        for p in sorted(self.folder.rglob("*")):
            if p.is_file() and p.name != MANIFEST:
                files[str(p.relative_to(self.folder))] = {"sha256": sha256(p), "size": p.stat().st_size}
        (self.folder / MANIFEST).write_text(json.dumps({"schema": SCHEMA, **info, "files": files}, indent=2) + "\n")


# Each artifact's row in the manifest: runtime_settings are what `ask` / `validate` run it with (phiedge.device).
# `golden`: the golden references it is validated against; `adapter_path`: the separate adapter's runtime files
# that `ask` / `validate` apply to the artifact in `path` (None: merged, or no adapter).
MANIFEST_ROW = ("format", "precision", "adapter", "path", "adapter_path", "golden", "label", "size_bytes", "passed",
                "parity", "smoke", "failures", "runtime_settings", "meta", "tokenizer")


def assemble(work: Path, *, results: list, references: dict[str, Path], retriever: Path | None, report: dict,
             source_info: dict, target: dict | None, sign_key: Path | None = None, phi_templates: dict | None = None,
             own_templates: frozenset = frozenset(), longrope_switch: int | None = None) -> None:
    """The whole bundle in `work`, in the writer's order; `report` already holds every result's row;
    `references`: each variant's reference.npz by its suffix (phiedge.build.Variant); `phi_templates`: by adapter
    name, whether that variant's chat template is Phi-4-mini's (phiedge.ollama.is_phi: the Modelfiles carry it in
    Ollama's syntax), `own_templates`: the adapters that bring their own (phiedge.tokenizer_files);
    `longrope_switch`: the model's (the Modelfiles' num_ctx stays below it)."""
    from . import ollama
    from . import report as report_mod
    w = BundleWriter(work)
    n_ctx = ((target or {}).get("runtime") or {}).get("n_ctx")
    w.add_artifacts(results, ollama.modelfiles(results, phi=phi_templates or {}, own=own_templates, n_ctx=n_ctx,
                                               switch=longrope_switch))
    w.add_retriever(retriever)
    w.add_golden(references)
    w.add_reports(report, report_mod.readme(report))
    w.add_manifest({"created": report["created"], "source": source_info, "target": target,
                    "versions": report["versions"], "passed": report["passed"],
                    "artifacts": [{k: r.get(k) for k in MANIFEST_ROW} for r in report["artifacts"]],
                    "retriever": "retriever" if retriever is not None else None})
    if sign_key is not None:
        sign(work, sign_key)


def swap_into_place(work: Path, out: Path) -> None:
    old = out.with_name(out.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        out.rename(old)
    work.rename(out)
    shutil.rmtree(old, ignore_errors=True)


def load_manifest(folder: Path) -> dict:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise BundleError(f"{folder} has no {MANIFEST}: it is not a phiedge bundle (build one with `phiedge build`)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        raise BundleError(f"{path} is not valid JSON: the bundle is damaged; rebuild or copy it again") from None


def verify(folder: Path, public_key: Path | None = None) -> dict:
    """Re-hash every file; a changed, missing or extra file fails with every such file named. With
    `public_key`, the manifest's signature must be there and valid."""
    folder = Path(folder)
    key = load_key(public_key, private=False) if public_key is not None else None     # a bad key file first
    manifest = load_manifest(folder)
    if key is not None:
        check_signature(folder, key, public_key)
    want = manifest["files"]
    have = {str(p.relative_to(folder)) for p in folder.rglob("*")
            if p.is_file() and str(p.relative_to(folder)) not in (MANIFEST, SIGNATURE)}
    problems = [f"missing {f}" for f in sorted(set(want) - have)]
    problems += [f"extra {f}" for f in sorted(have - set(want))]
    for f in sorted(set(want) & have):
        p = folder / f
        if p.stat().st_size != want[f]["size"] or sha256(p) != want[f]["sha256"]:
            problems.append(f"changed {f}")
    if problems:
        raise BundleError(f"bundle {folder} failed verification: {'; '.join(problems)}: rebuild it or copy it again")
    return manifest


def signature_state(folder: Path, public_key: Path | None) -> str:
    """How a verified bundle's signature was treated, in words for the CLI."""
    if public_key is not None:
        return f"signature verified with {public_key}"
    if (Path(folder) / SIGNATURE).is_file():
        return "signed, but the signature was not checked: pass --key PUBLIC_KEY to check it"
    return "unsigned: the hashes prove the files match the manifest, not who wrote it (see `phiedge keygen`)"


# ------------------------------------------------------------------------------------------------ signing

def keygen(path: Path) -> tuple[Path, Path]:
    """An Ed25519 key pair: `path` (private, PKCS#8 PEM, mode 0600) and `path`.pub (public PEM)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    path = Path(path)
    pub = path.with_name(path.name + ".pub")
    for p in (path, pub):
        if p.exists():
            raise UsageError(f"{p} exists: keygen never overwrites a key; choose another path or remove it")
    if not path.parent.is_dir():
        raise UsageError(f"{path.parent} is not a folder: create it first or choose another path")
    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(private)
    pub.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                  serialization.PublicFormat.SubjectPublicKeyInfo))
    return path, pub


def load_key(path: Path, private: bool):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519
    kind = "private" if private else "public"
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise UsageError(f"cannot read the {kind} key {path} ({e.strerror}): pass the file `phiedge keygen` "
                         f"wrote") from None
    try:
        key = (serialization.load_pem_private_key(data, password=None) if private
               else serialization.load_pem_public_key(data))
    except (ValueError, TypeError):
        raise UsageError(f"{path} is not an unencrypted {kind} key in PEM: pass the "
                         f"{'key' if private else 'key.pub'} file `phiedge keygen` wrote") from None
    want = ed25519.Ed25519PrivateKey if private else ed25519.Ed25519PublicKey
    if not isinstance(key, want):
        raise UsageError(f"{path} is a {type(key).__name__.lstrip('_')}, not an Ed25519 {kind} key: make one with "
                         f"`phiedge keygen`")
    return key


def sign(folder: Path, private_key: Path) -> Path:
    """Write `manifest.json.sig`: the Ed25519 signature of manifest.json's bytes."""
    folder = Path(folder)
    load_manifest(folder)
    key = load_key(private_key, private=True)
    sig = folder / SIGNATURE
    tmp = sig.with_name(SIGNATURE + ".partial")
    tmp.write_bytes(key.sign((folder / MANIFEST).read_bytes()))
    tmp.replace(sig)
    return sig


def check_signature(folder: Path, key, public_key: Path) -> None:
    """`key` (loaded from `public_key`) signed this bundle's manifest.json, or SignatureError."""
    from cryptography.exceptions import InvalidSignature
    sig = Path(folder) / SIGNATURE
    if not sig.is_file():
        raise SignatureError(f"bundle {folder} is not signed (no {SIGNATURE}) but --key was given: refuse it, or "
                             f"sign it with `phiedge sign {folder} --key PRIVATE_KEY`")
    try:
        key.verify(sig.read_bytes(), (Path(folder) / MANIFEST).read_bytes())
    except InvalidSignature:
        raise SignatureError(f"bundle {folder}: {SIGNATURE} does not match manifest.json under {public_key}: the "
                             f"manifest was changed after signing, or it was signed by another key; do not ship "
                             f"it") from None
