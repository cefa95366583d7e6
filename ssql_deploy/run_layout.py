"""Where each stage of a run keeps its files: the one place that builds a run's paths, and parses them back.

    RUN/pretrain/                  last.pt, backbone.pt (a plain state dict), metrics.jsonl, manifest.json
    RUN/finetune/                  last.pt, best.pt, metrics.jsonl, manifest.json
    RUN/quant/<variant>/           quantized.pt, config.json (its QuantConfig; LSQ: also last.pt, best.pt), manifest.json
    RUN/export/fp32/               model.onnx (the FP32 baseline; + model.plan, its FP16 TensorRT engine, and
                                   model.fp16.onnx it is built from on TensorRT 11; + model.xml/.bin, its OpenVINO IR), manifest.json
    RUN/export/<variant>-<engine>/ model.qdq.onnx, twin.pt, parity.json (+ the engine's own file), manifest.json
    RUN/bench/                     report.json, report.md, report.png
    RUN/analyze/                   sensitivity.json, sensitivity.png, manifest.json

A `variant` is a quantized model's name: its config's label (`w4a4`, `w4a4-1a2b3c`), `-lsq` after
quantization-aware training (`variant` below).
"""

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ssql_deploy.errors import UserError
from ssql_deploy.runtimes import ENGINES, Engine

BEST, LAST, BACKBONE = "best.pt", "last.pt", "backbone.pt"
QUANT_FILE, FP32_FILE, TWIN_FILE, PARITY_FILE = "quantized.pt", "model.onnx", "twin.pt", "parity.json"
FP16_FILE = "model.fp16.onnx"  # the FP32 ONNX in float16: TensorRT 11's FP16 baseline
CONFIG_FILE = "config.json"


def variant(label: str, *methods: str) -> str:
    """How a quantized model is named in directories and reports: its config's label (`w4a4`, `w4a4-1a2b3c`), then
    what was done beyond calibration (`w4a4-brecq`, `w4a4-bc`, `w4a4-lsq`)."""
    return "-".join([label, *methods])


@dataclass(frozen=True)
class ExportKey:
    variant: str
    engine: Engine

    @property
    def dirname(self) -> str:
        return f"{self.variant}-{self.engine}"

    @classmethod
    def parse(cls, dirname: str) -> "ExportKey | None":
        """The key of an export directory's name; None for a name no engine could have written."""
        variant, _, engine = dirname.rpartition("-")
        return cls(variant, engine) if variant and engine in ENGINES else None  # type: ignore[arg-type]


@dataclass(frozen=True)
class RunLayout:
    root: Path

    @classmethod
    def of_quantized(cls, path: Path) -> "RunLayout":
        """The run a quantized model file (RUN/quant/<variant>/quantized.pt) belongs to."""
        return cls(path.parents[2])

    @property
    def pretrain(self) -> Path:
        return self.root / "pretrain"

    @property
    def backbone(self) -> Path:
        return self.pretrain / BACKBONE

    @property
    def finetune(self) -> Path:
        return self.root / "finetune"

    @property
    def best(self) -> Path:
        return self.finetune / BEST

    def start_candidates(self) -> tuple[Path, ...]:
        """What `finetune --ckpt RUN` starts from, most specific first."""
        return self.best, self.backbone, self.pretrain / LAST

    def trained_candidates(self) -> tuple[Path, ...]:
        """A classifier to quantize or measure, most specific first."""
        return self.best, self.finetune / LAST

    def quant(self, variant: str) -> Path:
        return self.root / "quant" / variant

    def quantized(self, variant: str) -> Path:
        return self.quant(variant) / QUANT_FILE

    def quantized_models(self) -> list[Path]:
        return sorted((self.root / "quant").glob(f"*/{QUANT_FILE}"))

    @property
    def fp32(self) -> Path:
        return self.root / "export" / "fp32"

    def export(self, key: ExportKey) -> Path:
        return self.root / "export" / key.dirname

    def exports(self) -> list[tuple[ExportKey, Path]]:
        found = [(ExportKey.parse(p.name), p) for p in sorted((self.root / "export").glob("*-*")) if p.is_dir()]
        return [(key, path) for key, path in found if key is not None]

    @property
    def bench(self) -> Path:
        return self.root / "bench"

    @property
    def analyze(self) -> Path:
        return self.root / "analyze"


def resolve_checkpoint(path: Path, candidates: Callable[[RunLayout], tuple[Path, ...]]) -> Path:
    """A checkpoint file as given, or the first of a run directory's `candidates` (RunLayout.start_candidates...)."""
    if not path.exists():
        raise UserError(f"{path} does not exist", "pass a checkpoint file or a run directory")
    if path.is_file():
        return path
    found = candidates(RunLayout(path))
    for file in found:
        if file.is_file():
            return file
    raise UserError(
        f"run directory {path} holds none of {', '.join(str(f.relative_to(path)) for f in found)}",
        "run the earlier stage first or pass the checkpoint file itself",
    )
