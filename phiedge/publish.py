"""`phiedge push`: a verified, passing bundle to the Hugging Face Hub.

    plan = plan_push(folder, "org/name", per_artifact=False)     # what would go where: no network
    push(plan, private=False, revision=None, token=None)          # create_repo + one commit per repository

The whole bundle goes to one repository in one `upload_folder` commit; its README.md is the card the build wrote
(phiedge.card), hashed in manifest.json like every other file, so the downloaded bundle still verifies.
`--per-artifact` follows the Hub's one-format-per-repository convention: ORG/NAME-GGUF, ORG/NAME-ONNX, ...,
each with that format's artifact folders (and adapters kept separate for it) and a card of its own whose
base_model_relation is that repository's (quantized / adapter / finetune), in one `create_commit` each.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from . import bundle, card, report
from .errors import PublishError, UsageError

SUFFIX = {"gguf": "GGUF", "onnx": "ONNX", "openvino": "OpenVINO", "mlx": "MLX"}


@dataclass
class RepoPlan:
    repo: str
    files: list[str]                        # paths inside the bundle, uploaded at the same paths
    card: str | None = None                 # README.md text for a per-format repository (None: the bundle's own)
    meta: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"repo": self.repo, "files": len(self.files), "card": self.meta}


@dataclass
class Plan:
    folder: Path
    repos: list[RepoPlan]


def plan_push(folder: Path, repo: str, *, per_artifact: bool = False, key: Path | None = None) -> Plan:
    """Check the bundle (hashes, gate, card) and the repository id, and list what goes where."""
    folder = Path(folder)
    if not card.HUB_ID.match(repo):
        raise UsageError(f"--repo {repo!r} is not a Hub repository id: pass ORG/NAME")
    manifest = bundle.verify(folder, key)
    if not manifest.get("passed"):
        raise PublishError(f"bundle {folder} did not pass its gate (see report.html): fix it and rebuild before "
                           f"publishing it")
    rep = json.loads((folder / "report.json").read_text())
    if not rep["model"].get("hub_id"):
        raise PublishError(f"the bundle's card names no base model (its --model {rep['model']['ref']} is a local "
                           f"folder whose config and adapter name none): rebuild with --base-model-id ORG/NAME")
    if not per_artifact:
        return Plan(folder, [RepoPlan(repo, sorted(manifest["files"]) + ["manifest.json"]
                                      + (["manifest.json.sig"] if (folder / bundle.SIGNATURE).exists() else []),
                                      meta=card.front_matter(rep, rep["artifacts"]))])
    repos = []
    for fmt in dict.fromkeys(r["format"] for r in rep["artifacts"]):
        rows = [r for r in rep["artifacts"] if r["format"] == fmt]
        dirs = sorted({r["path"] for r in rows} | {r["adapter_path"] for r in rows if r.get("adapter_path")})
        files = sorted(f for f in manifest["files"] if any(f.startswith(d + "/") for d in dirs))
        meta = card.front_matter(rep, rows, fmt)
        body = "\n".join([f"# {rep['model']['hub_id']}: {fmt} artifacts", "",
                          f"Built and checked by phiedge from `{rep['model']['hub_id']}`"
                          + (f" with {card_adapters(rep)}" if card_adapters(rep) else "") + ": every artifact below "
                          "passed its parity gate against the PyTorch model.", "", *report.markdown_table(rows), "",
                          "## Run it", "", *card.run_lines(rows)])
        repos.append(RepoPlan(f"{repo}-{SUFFIX[fmt]}", files, card.render(meta, body), meta))
    return Plan(folder, repos)


def card_adapters(rep: dict) -> str:
    return ", ".join(f"`{a['ref']}`" for a in rep["adapters"] if a.get("name"))


def push(plan: Plan, *, private: bool = False, revision: str | None = None, token: str | None = None) -> list[str]:
    """Create each repository (kept if it exists) and upload its files in one commit. Returns the commit URLs."""
    from huggingface_hub import CommitOperationAdd, HfApi
    api = HfApi(token=token)
    urls = []
    try:
        for rp in plan.repos:
            api.create_repo(rp.repo, private=private, exist_ok=True, repo_type="model")
            if revision:
                api.create_branch(rp.repo, branch=revision, exist_ok=True)
            message = f"phiedge bundle ({len(rp.files)} files)"
            if rp.card is None:
                info = api.upload_folder(repo_id=rp.repo, folder_path=str(plan.folder), revision=revision,
                                         commit_message=message, allow_patterns=rp.files)
            else:
                ops = [CommitOperationAdd(path_in_repo=f, path_or_fileobj=str(plan.folder / f)) for f in rp.files]
                ops.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=rp.card.encode()))
                info = api.create_commit(repo_id=rp.repo, operations=ops, revision=revision, commit_message=message)
            urls.append(str(getattr(info, "commit_url", info)))
    except Exception as e:                  # the Hub's and the network's errors, as one line
        raise PublishError(f"publishing to {rp.repo} failed: {type(e).__name__}: {_first_line(e)}: check the "
                           f"network, HF_HUB_OFFLINE and your token (hf auth login)") from None
    return urls


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else "no message"
