"""Trained models as files: the metadata that rebuilds a network, and loading one for later stages."""

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from ssql_deploy.data import DataSource, get_spec
from ssql_deploy.errors import UserError
from ssql_deploy.models.checkpoint import FORMAT, FORMAT_VERSION, import_weights, is_own, load_checkpoint
from ssql_deploy.models.registry import create_model, model_spec, pick_stem, replace_head
from ssql_deploy.run_layout import RunLayout, resolve_checkpoint


@dataclass(frozen=True)
class ModelMeta:
    """Enough to rebuild the network and feed it its data, from a checkpoint with no recipe at hand.

    `data_root` is the directory the user named for the data (None: the dataset's default), and
    mean/std the normalisation the model was trained with, so later stages need no data flags.
    `head` is "linear" after a linear probe (the family's head replaced by one Linear), else "native".
    """

    arch: str
    stem: str
    num_classes: int
    input_size: int
    data: str
    data_root: str | None
    mean: tuple[float, ...]
    std: tuple[float, ...]
    head: str = "native"

    def as_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_checkpoint(cls, obj: dict[str, Any]) -> "ModelMeta":
        """Also reads checkpoints written before data_root/mean/std were recorded (the dataset's own values)."""
        try:
            arch, stem, classes, size, data = (obj[k] for k in ("arch", "stem", "num_classes", "input_size", "data"))
            spec = get_spec(str(data))
            root = obj.get("data_root")
            mean, std = tuple(float(v) for v in obj.get("mean", spec.mean)), tuple(float(v) for v in obj.get("std", spec.std))
            head = str(obj.get("head", "native"))
            return cls(str(arch), str(stem), int(classes), int(size), spec.name, None if root is None else str(root), mean, std, head)
        except (KeyError, TypeError, ValueError) as exc:
            raise UserError(f"the checkpoint's model description is incomplete ({type(exc).__name__}: {exc})",
                            "re-create it with `ssql-deploy finetune`") from None  # fmt: skip

    @classmethod
    def for_data(cls, arch: str, stem: str, num_classes: int, source: DataSource, head: str = "native") -> "ModelMeta":
        root = None if source.root is None else str(source.root.resolve())
        return cls(arch, stem, num_classes, source.input_size, source.data, root, source.mean, source.std, head)

    def source(
        self, data: str | None = None, root: Path | None = None, input_size: int | None = None, download: bool = False
    ) -> DataSource:
        """The data this model is fed: its own dataset, root, size and normalisation unless overridden."""
        name = get_spec(data).name if data is not None else self.data
        own_root = Path(self.data_root) if self.data_root is not None and name == self.data else None
        return DataSource(name, root or own_root, input_size or self.input_size, self.mean, self.std, download)


def build_model(meta: ModelMeta) -> nn.Module:
    """The network a checkpoint with this description holds (weights not loaded)."""
    spec = model_spec(meta.arch)
    model = create_model(meta.arch, meta.num_classes, meta.stem)  # type: ignore[arg-type]
    if meta.head == "linear":
        replace_head(model, spec, nn.Linear(spec.num_features(model), meta.num_classes))
    return model


def model_payload(kind: str, model: nn.Module, meta: ModelMeta, **extra: Any) -> dict[str, Any]:
    return {"format": FORMAT, "format_version": FORMAT_VERSION, "kind": kind, **meta.as_dict(), "model": model.state_dict(), **extra}


def load_trained(
    path: Path, arch: str | None = None, data: str | None = None, input_size: int | None = None
) -> tuple[nn.Module, ModelMeta, Path]:
    """A classifier from a run directory, one of our checkpoints, or (with --arch) a plain state dict.

    Plain state dicts (torchvision, SSQL reference) carry no metadata: the class count is read
    from the fc weight and the stem from conv1, so only the architecture must be named.
    """
    file = resolve_checkpoint(path, RunLayout.trained_candidates)
    obj = load_checkpoint(file)
    if is_own(obj) and "arch" in obj:
        meta = ModelMeta.from_checkpoint(obj)
        model = build_model(meta)
        model.load_state_dict(_float_weights(obj["model"], model))
        return model, meta, file
    if arch is None or data is None:
        raise UserError(
            f"{file} is not an ssql-deploy checkpoint, so its architecture and dataset are unknown",
            "pass --arch and --data, or fine-tune it first with `ssql-deploy finetune`",
        )
    spec = model_spec(arch)
    sd = obj.get("state_dict", obj)
    classifier = sd.get(f"{spec.classifier}.weight") if isinstance(sd, dict) else None
    if classifier is None:
        raise UserError(
            f"{file} has no classifier ({spec.classifier}.weight) to evaluate", "fine-tune it first with `ssql-deploy finetune`"
        )
    # Only a ResNet's stem changes shape with the input size (3x3 vs 7x7 conv1); the other families follow the input size.
    conv1 = sd.get("conv1.weight") if spec.family == "resnet" else None
    stem = ("cifar" if conv1.shape[-1] == 3 else "imagenet") if conv1 is not None else pick_stem(input_size or 224)
    meta = ModelMeta.for_data(
        arch, stem, int(classifier.shape[0]), DataSource.of(data, None, input_size or (32 if stem == "cifar" else 224))
    )
    model = create_model(arch, meta.num_classes, stem)  # type: ignore[arg-type]
    report = import_weights(obj, model, spec)
    if report.missing:
        raise UserError(f"{file} lacks {len(report.missing)} tensors of {arch} (e.g. {report.missing[0]})", "pass the matching --arch")
    return model, meta, file


def _float_weights(sd: dict[str, Any], model: nn.Module) -> dict[str, Any]:
    """The float network's tensors out of a (possibly fake-quant) state dict."""
    wanted = set(model.state_dict())
    return {k: v for k, v in sd.items() if k in wanted}
