"""What phiedge.memory.isolated's fork server imports once per build, so that every PyTorch stage it forks
(merge, reference, smoke reference) starts with them loaded: torch, transformers' model classes and peft, each
where installed (a stage needing a missing one fails on its own import, as it would without this)."""
import importlib

for _name in ("torch", "transformers.models.auto.modeling_auto", "peft"):
    try:
        importlib.import_module(_name)
    except ImportError:
        pass
