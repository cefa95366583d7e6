"""Reading checkpoints users already have, and writing ours so that a crash never leaves half a file.

Accepted inputs (always through `torch.load(weights_only=True)`: a checkpoint that needs code
execution to unpickle is refused, never run):
- SSQL reference checkpoints: `{'state_dict': ...}` from a DDP model, keys under `module.encoder.`,
  `module.encoder_q.` or `encoder_q.model.`; projector (the family's head, `encoder.fc.*` for a ResNet), predictor, queue and
  quantizer/observer entries are dropped;
- plain torchvision state dicts (a classifier whose shape does not fit is dropped and reported);
- this tool's own checkpoints (`{"format": "ssql-deploy", ...}`).
"""

import pickle
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.table import Table
from torch import nn

from ssql_deploy.errors import UserError
from ssql_deploy.models.registry import ModelSpec, create_model, list_models
from ssql_deploy.run import atomic_open

FORMAT = "ssql-deploy"
FORMAT_VERSION = 1
_SSL_PREFIXES = (
    "module.encoder_q.model.", "encoder_q.model.", "module.encoder_q.", "encoder_q.",
    "module.encoder.", "encoder.", "module.backbone.", "backbone.", "module.",
)  # fmt: skip
_AUX_WORDS = ("quantizer", "observer", "fake_quant", "activation_post_process", "predictor", "projector", "queue")


def save_atomic(payload: dict[str, Any], path: Path) -> None:
    """torch.save that never leaves a half-written checkpoint (see `run.atomic_open`)."""
    with atomic_open(path, "wb") as f:
        torch.save(payload, f)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load a checkpoint safely, turning every way it can be wrong into one clear error line."""
    if not path.exists():
        raise UserError(f"checkpoint {path} does not exist", "check the path (a run directory works too)")
    if path.is_dir():
        raise UserError(f"{path} is a directory, not a checkpoint file", "pass the .pt/.pth file or a run directory")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "Unsupported global" in str(exc) or "GLOBAL" in str(exc):
            raise UserError(
                f"{path} needs code execution to unpickle (it stores Python objects, not only tensors); refused for safety",
                "re-save it as a plain state dict: torch.save(model.state_dict(), 'weights.pt')",
            ) from None
        raise UserError(f"{path} is not a PyTorch checkpoint ({exc})", "pass a file written by torch.save") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError, AttributeError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(f"{path} is not a readable PyTorch checkpoint ({first})", "pass a file written by torch.save") from None
    if not isinstance(obj, dict):
        raise UserError(f"{path} holds a {type(obj).__name__}, not a checkpoint dictionary", "pass a state dict checkpoint")
    return obj


def is_own(obj: dict[str, Any]) -> bool:
    return obj.get("format") == FORMAT


@dataclass
class KeyReport:
    """What an import did with each checkpoint entry, printed so nothing is dropped silently."""

    source_format: str
    loaded: list[str] = field(default_factory=list)
    dropped: dict[str, list[str]] = field(default_factory=dict)  # reason -> keys
    missing: list[str] = field(default_factory=list)

    def drop(self, key: str, reason: str) -> None:
        self.dropped.setdefault(reason, []).append(key)

    def table(self) -> Table:
        table = Table(title=f"checkpoint import ({self.source_format})")
        table.add_column("what")
        table.add_column("count", justify="right")
        table.add_column("examples")
        table.add_row("loaded", str(len(self.loaded)), _examples(self.loaded))
        for reason, keys in self.dropped.items():
            table.add_row(f"dropped: {reason}", str(len(keys)), _examples(keys))
        table.add_row("missing (initialised fresh)", str(len(self.missing)), _examples(self.missing))
        return table

    def as_dict(self) -> dict[str, Any]:
        return {
            "source_format": self.source_format,
            "loaded": len(self.loaded),
            "dropped": {reason: len(keys) for reason, keys in self.dropped.items()},
            "missing": self.missing,
        }


def _examples(keys: list[str], n: int = 3) -> str:
    return ", ".join(keys[:n]) + (", ..." if len(keys) > n else "")


def _state_dict_of(obj: dict[str, Any]) -> tuple[dict[str, torch.Tensor], str]:
    if is_own(obj):
        return obj["model"], f"ssql-deploy {obj.get('kind', 'model')}"
    for key in ("state_dict", "model", "net"):
        inner = obj.get(key)
        if isinstance(inner, dict) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
            return inner, "SSQL reference" if key == "state_dict" else f"'{key}' checkpoint"
    if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj, "plain state dict"
    raise UserError(
        f"no state dict found in the checkpoint (top-level keys: {', '.join(list(obj)[:6])})",
        "pass a torchvision state dict, an SSQL reference checkpoint or one written by ssql-deploy",
    )


def _strip_prefix(sd: dict[str, torch.Tensor], wanted: set[str]) -> tuple[dict[str, torch.Tensor], str]:
    """Remove the wrapper prefix under which most keys match the model (DDP, encoder, encoder_q...)."""
    best, best_hits = "", sum(k in wanted for k in sd)
    for prefix in _SSL_PREFIXES:
        hits = sum(k.removeprefix(prefix) in wanted for k in sd if k.startswith(prefix))
        if hits > best_hits:
            best, best_hits = prefix, hits
    if not best:
        return sd, ""
    return {k.removeprefix(best): v for k, v in sd.items() if k.startswith(best)} | {
        k: v for k, v in sd.items() if not k.startswith(best)
    }, best


def _pattern(key: str) -> str:
    return re.sub(r"\d+", "#", key)


def family_of(keys: list[str]) -> str | None:
    """Which registered family a state dict's key names look like (digits ignored), to name a checkpoint of another one."""
    wanted = {_pattern(k) for k in keys}
    best, best_share = None, 0.5
    for family in sorted({s.family for s in list_models()}):
        smallest = min((s for s in list_models() if s.family == family), key=lambda s: (not s.name.startswith("test_"), s.name))
        share = len(wanted & {_pattern(k) for k in create_model(smallest.name, 10).state_dict()}) / max(len(wanted), 1)
        if share > best_share:
            best, best_share = family, share
    return best


def _other_family(sd: dict[str, torch.Tensor], spec: ModelSpec) -> str:
    found = family_of(list(sd))
    return f" (it looks like a {found} checkpoint)" if found is not None and found != spec.family else ""


def import_weights(obj: dict[str, Any], model: nn.Module, spec: ModelSpec) -> KeyReport:
    """Load what fits `model` from any accepted checkpoint; raise on a backbone shape mismatch.

    The spec says where the head is: in a self-supervised checkpoint the tensors there are the
    projector, in a supervised one the classifier, kept only if it has this task's class count.
    """
    sd, fmt = _state_dict_of(obj)
    target = model.state_dict()
    sd, prefix = _strip_prefix(sd, set(target))
    report = KeyReport(fmt + (f", prefix '{prefix}'" if prefix else ""))
    ssl = bool(prefix) and prefix != "module."
    head, arch = spec.head + ".", spec.name
    to_load: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        if any(word in key.lower() for word in _AUX_WORDS):
            report.drop(key, "SSL head / quantizer state")
        elif ssl and key.startswith(head):
            report.drop(key, f"projector (encoder.{spec.head})")
        elif key not in target:
            report.drop(key, "not in model")
        elif key.startswith(head) and value.shape != target[key].shape:
            report.drop(key, "classifier of another task")
        elif value.shape != target[key].shape:
            stem_hint = (
                " (or --stem: a 3x3 conv1 is the CIFAR stem, 7x7 the ImageNet stem)"
                if spec.family == "resnet" and key == "conv1.weight"
                else ""
            )
            raise UserError(
                f"checkpoint tensor {key} has shape {list(value.shape)} but {arch} expects {list(target[key].shape)}{_other_family(sd, spec)}",
                f"pass the --arch the checkpoint was trained with{stem_hint}",
            )
        else:
            to_load[key] = value
    backbone = [k for k in target if not k.startswith(head) and not k.endswith("num_batches_tracked")]
    if not any(k in to_load for k in backbone):
        raise UserError(
            f"the checkpoint holds no weights for {arch}, a {spec.family} (0 of {len(backbone)} backbone tensors matched; "
            f"first keys: {', '.join(list(sd)[:3])}){_other_family(sd, spec)}",
            "pass a checkpoint of this architecture, or the --arch it was trained with (see `ssql-deploy models`)",
        )
    model.load_state_dict(to_load, strict=False)
    report.loaded = sorted(to_load)
    report.missing = [k for k in target if k not in to_load and not k.endswith("num_batches_tracked")]
    return report
