"""Recipes: typed, validated configuration for each stage, loaded from YAML, overridden by CLI flags.

Configuration is data, not code (torchao's configs-as-data): every recipe round-trips to the
manifest as JSON, and an unknown key is an error that names the key and the valid ones, so a
typo never silently falls back to a default.
"""

from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, PositiveInt, PrivateAttr, ValidationError, model_validator

from ssql_deploy.errors import UserError
from ssql_deploy.runtimes import ENGINES, Engine

R = TypeVar("R", bound="Recipe")
RECON_ITERS = 250  # reconstruction steps per unit when --iters is not given


def _not_a_file(path: Path | None) -> Path | None:
    """A directory the stage will create or reuse: an existing regular file there is a mistake, caught before any work."""
    if path is not None and path.exists() and not path.is_dir():
        raise ValueError(f"{path} is an existing file, not a directory; pass a directory (it is created if missing)")
    return path


Directory = Annotated[Path, AfterValidator(_not_a_file)]


class Recipe(BaseModel):
    # Non-finite numbers are refused everywhere: `--lr inf` would otherwise train to NaN and exit 0.
    model_config = ConfigDict(extra="forbid", protected_namespaces=(), allow_inf_nan=False)
    _explicit: frozenset[str] = PrivateAttr(default=frozenset())

    @model_validator(mode="wrap")
    @classmethod
    def _remember_explicit(cls, data: Any, handler: Callable[[Any], "Recipe"]) -> "Recipe":
        """Which keys the user gave (recipe file or flags), before any validator fills defaults in.

        A resumed or reused stage takes the settings the user left out from the run and checks the
        ones given against it (see train_state.resume_recipe).
        """
        recipe = handler(data)
        if isinstance(data, dict):
            recipe._explicit = frozenset(data)
        return recipe

    @property
    def explicit(self) -> frozenset[str]:
        return self._explicit

    @classmethod
    def build(cls: type[R], recipe_file: Path | None = None, **overrides: Any) -> R:
        """The recipe file's values (if any), then every override that is not None."""
        data: dict[str, Any] = load_yaml(recipe_file, cls) if recipe_file else {}
        data.update({k: v for k, v in overrides.items() if v is not None})
        return validate(cls, data, str(recipe_file) if recipe_file else "command line")


def load_yaml(path: Path, cls: type[BaseModel]) -> dict[str, Any]:
    if not path.is_file():
        what = "is a directory, not a recipe file" if path.is_dir() else "does not exist"
        raise UserError(f"recipe {path} {what}", "check the path; recipes/ holds the shipped ones")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError:
        raise UserError(f"recipe {path} is not a text file (it is not valid UTF-8)", "pass a YAML recipe, e.g. from recipes/") from None
    except yaml.YAMLError as exc:
        raise UserError(f"recipe {path} is not valid YAML ({str(exc).splitlines()[0]})", "fix the syntax") from None
    if not isinstance(data, dict):
        raise UserError(f"recipe {path} must be a mapping of keys to values", "see recipes/ for examples")
    kind = cls.model_fields.get("kind")
    if kind is not None and "kind" in data and data["kind"] != kind.default:
        raise UserError(f"recipe {path} is a {data['kind']!r} recipe, not {kind.default!r}", f"use it with `ssql-deploy {data['kind']}`")
    return data


def validate(cls: type[R], data: dict[str, Any], source: str) -> R:
    unknown = sorted(set(data) - set(cls.model_fields))
    if unknown:
        raise UserError(
            f"{source}: unknown key {unknown[0]!r} for a {cls.__name__}",
            f"valid keys: {', '.join(cls.model_fields)}",
        )
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        fields = [str(p) for p in err["loc"] if isinstance(p, str)]  # ("batch_sizes", 0) names the option, not its item
        where = ".".join(fields) or "recipe"
        flag = "--" + where.replace("_", "-") if source == "command line" else where
        msg = str(err["msg"]).removeprefix("Value error, ")
        ours = err["type"] == "value_error"  # our validators' messages name the value and say the fix after "; "
        problem, _, fix = msg.partition("; ") if ours else (msg, "", "")
        value = "" if ours or isinstance(err.get("input"), dict) or not fields else f" (got {err['input']!r})"
        prefix = "" if source == "command line" else f"{source}: "
        raise UserError(
            f"{prefix}{flag}: {problem[0].lower()}{problem[1:]}{value}", fix or "fix that value (see `--help` for each option)"
        ) from None


Mode = Literal["linear", "full"]
Stem = Literal["auto", "cifar", "imagenet"]
Schedule = Literal["step", "cosine"]
Calibrator = Literal["minmax", "percentile", "mse", "entropy"]
OrtKernel = Literal["auto", "gemm", "symmetric"]
Reconstruction = Literal["adaround", "brecq", "qdrop"]
LsqInit = Literal["calibrated", "lsq"]

# SSQL reference settings (SSQL.md): linear eval 100 epochs, lr 30, wd 0, steps at 60/80;
# full fine-tuning 50 epochs, lr 0.01, wd 1e-4, steps at 30/40.
FINETUNE_DEFAULTS: dict[Mode, dict[str, Any]] = {
    "linear": {"epochs": 100, "lr": 30.0, "weight_decay": 0.0, "milestones": [0.6, 0.8]},
    "full": {"epochs": 50, "lr": 0.01, "weight_decay": 1e-4, "milestones": [0.6, 0.8]},
}


class DataRecipe(Recipe):
    """Fields shared by every stage that reads a dataset."""

    data: str = "fashion-mnist"
    data_root: Directory | None = None
    download: bool = False
    subset: int | None = Field(default=None, ge=1)
    input_size: int | None = Field(default=None, ge=8)
    workers: int = Field(default=2, ge=0)


class FinetuneRecipe(DataRecipe):
    kind: Literal["finetune"] = "finetune"
    arch: str = "resnet18"
    stem: Stem = "auto"
    ckpt: Path | None = None
    mode: Mode = "full"
    epochs: int | None = Field(default=None, ge=1)
    batch_size: int = Field(default=256, ge=1)
    lr: float | None = Field(default=None, gt=0)
    momentum: float = Field(default=0.9, ge=0, lt=1)
    weight_decay: float | None = Field(default=None, ge=0)
    schedule: Schedule = "step"
    milestones: list[float] | None = None  # fractions of the epochs at which lr drops 10x
    warmup_epochs: int = Field(default=0, ge=0)
    label_smoothing: float = Field(default=0.0, ge=0, lt=1)
    sync_bn: bool = False
    seed: int = 0
    out: Directory = Path("runs/finetune")

    @model_validator(mode="after")
    def _fill_mode_defaults(self) -> "FinetuneRecipe":
        for key, value in FINETUNE_DEFAULTS[self.mode].items():
            if getattr(self, key) is None:
                setattr(self, key, value)
        return self


def _ordered_profile(batches: list[int]) -> list[int]:
    low, opt, high = (batches + [0, 0, 0])[:3]
    if len(batches) == 3 and not low <= opt <= high:
        raise ValueError(f"the TensorRT profile needs min <= opt <= max, got {','.join(map(str, batches))}; for example 1,8,32")
    return batches


def _label(value: str) -> str:
    """A quantized model's name: a bit spec (`8` means w8a8), or a config label with its hash (`w4a4-1a2b3c`)."""
    spec, dash, digest = value.strip().lower().partition("-")
    return _bit_spec(spec) + (dash + digest if dash else "")


def _bit_spec(value: str) -> str:
    from ssql_deploy.quant.bits import BitSpec

    return str(BitSpec.parse(value))


class QuantizeRecipe(DataRecipe):
    """Post-training quantization (and, with `lsq`, quantization-aware training) of a trained model."""

    kind: Literal["quantize"] = "quantize"
    source: Path
    arch: str | None = None  # only for plain state dicts, which do not name their architecture
    data: str | None = None  # default: the dataset the model was fine-tuned on
    bits: str = "w8a8"  # or "auto": per-layer widths solved from RUN/analyze/ within `budget`
    layer_bits: list[str] | dict[str, Any] = []  # overrides of the default widths, in order: PATTERN=SPEC or {PATTERN: SPEC}
    budget: str | None = None  # with bits "auto": avg-wbits=A, size-mb=X, avg-abits=A, bops=Y (comma-joined)
    config: Path | None = None  # a config.json another quantize wrote (say, with bits "auto"): its widths, reused as they are
    max_drop: float | None = Field(default=None, ge=0)  # accuracy control: give layers back to 8 bits / float until within this
    val_size: int = Field(default=512, ge=1)  # labelled training images (apart from the calibration ones) accuracy control scores
    calib: Calibrator = "percentile"
    percentile: float = Field(default=99.99, gt=50, le=100)
    calib_size: int = Field(default=512, ge=1)
    calib_dir: Directory = Path("calib")
    batch_size: int = Field(default=256, ge=1)
    out: Directory | None = None  # default: the source run directory
    # rounding reconstruction and bias correction after the calibration above (quant/recon/)
    reconstruct: Reconstruction | None = None
    iters: int | None = Field(default=None, ge=1)  # steps per unit; default RECON_ITERS with --reconstruct
    recon_size: int = Field(default=1024, ge=1)  # calibration images the reconstruction learns from
    bias_correction: bool = False
    # LSQ quantization-aware training, seeded from the calibration above
    lsq: bool = False
    epochs: int | None = None
    lr: float = Field(default=0.01, gt=0)
    weight_decay: float = Field(default=1e-4, ge=0)
    lsq_init: LsqInit = "calibrated"
    freeze_bn_after: int | None = Field(default=None, ge=0)
    train_steps_only: bool = False
    seed: int = 0

    @model_validator(mode="after")
    def _normalise_bits(self) -> "QuantizeRecipe":
        from ssql_deploy.quant.config import QuantConfig

        if self.config is not None:
            from ssql_deploy.quant.config import load_config

            if {"bits", "layer_bits", "budget"} & self.model_fields_set:
                raise UserError(
                    "--config sets every layer's widths, so it takes no --bits, --layer-bits or --budget", "drop them, or drop --config"
                )
            loaded = load_config(self.config)
            self.bits, self.layer_bits = str(loaded.default), loaded.override_specs()
        elif self.bits.strip().lower() == "auto":
            from ssql_deploy.analyze.allocate import Budget

            if self.budget is None or self.layer_bits:
                raise UserError("--bits auto solves every layer's widths within a --budget, so it takes a budget and no --layer-bits",
                                "e.g. --bits auto --budget avg-wbits=4.5 (after `ssql-deploy analyze RUN`)")  # fmt: skip
            self.bits, self.budget = "auto", str(Budget.parse(self.budget))
        elif self.budget is not None:
            raise UserError("--budget applies only to --bits auto", "pass --bits auto, or drop --budget")
        else:
            self.bits = _bit_spec(self.bits)
            self.layer_bits = QuantConfig.from_bits(self.bits, self.layer_bits).override_specs()
        if self.lsq and (self.epochs is None or self.epochs < 1):
            raise UserError(
                f"LSQ needs --epochs of at least 1 (got {self.epochs})", "pass --epochs N, or drop --lsq for post-training quantization"
            )
        if not self.lsq and (self.epochs is not None or self.train_steps_only or self.freeze_bn_after is not None):
            raise UserError("--epochs, --train-steps-only and --freeze-bn-after apply only to LSQ training", "add --lsq")
        if self.lsq and (self.reconstruct or self.bias_correction):
            raise UserError("--lsq trains weights and step sizes; --reconstruct and --bias-correction fix them without training",
                            "choose one: --lsq, or --reconstruct / --bias-correction")  # fmt: skip
        if self.max_drop is not None and (self.lsq or self.reconstruct or self.bias_correction):
            raise UserError("--max-drop re-quantizes after every fallback step, which it does with calibration only",
                            "drop --lsq / --reconstruct / --bias-correction, or --max-drop")  # fmt: skip
        if self.max_drop is not None and self.bits == "auto":
            raise UserError(
                "--max-drop starts from fixed widths", "quantize with --bits auto first, then pass its config.json with --config"
            )
        if self.reconstruct is None and self.iters is not None:
            raise UserError("--iters applies only to a reconstruction", "add --reconstruct adaround|brecq|qdrop")
        if self.reconstruct is not None and self.iters is None:
            self.iters = RECON_ITERS
        return self

    def methods(self) -> tuple[str, ...]:
        """What is done beyond calibration, as the quantized model's name says it (w4a4-brecq-bc, w4a4-lsq)."""
        done = (self.reconstruct, "bc" if self.bias_correction else None, "lsq" if self.lsq else None)
        return tuple(m for m in done if m)

    def variant(self) -> str:
        """The quantized model's name: its config's label, then `methods`."""
        from ssql_deploy.quant.config import QuantConfig
        from ssql_deploy.run_layout import variant

        if self.bits == "auto":
            raise UserError("a --bits auto model is named once its widths are solved, so a pipeline cannot plan it yet",
                            "run `ssql-deploy analyze` and `ssql-deploy quantize --bits auto`, then pass its config.json with --config")  # fmt: skip
        return variant(QuantConfig.from_bits(self.bits, self.layer_bits).label, *self.methods())


Metric = Literal["loss", "top1", "hessian"]


def _widths(bits: list[int]) -> list[int]:
    from ssql_deploy.quant.bits import MAX_BITS, MIN_BITS

    wrong = [b for b in bits if not MIN_BITS <= b <= MAX_BITS]
    if wrong:
        raise ValueError(f"width {wrong[0]} is outside {MIN_BITS}..{MAX_BITS}; for example 2,3,4,6,8")
    return sorted(set(bits))


class AnalyzeRecipe(DataRecipe):
    """Per-layer sensitivity of a trained model (analyze/): which layers a low width hurts, on held-out training images."""

    kind: Literal["analyze"] = "analyze"
    source: Path
    arch: str | None = None  # only for plain state dicts
    data: str | None = None  # default: the dataset the model was fine-tuned on
    bits: Annotated[list[PositiveInt], AfterValidator(_widths)] = Field(default=[2, 3, 4, 6, 8], min_length=1)
    metric: Metric = "loss"
    calib: Calibrator = "percentile"
    percentile: float = Field(default=99.99, gt=50, le=100)
    calib_size: int = Field(default=512, ge=1)
    val_size: int = Field(default=512, ge=1)  # labelled training images apart from the calibration ones
    calib_dir: Directory = Path("calib")
    hutchinson_samples: int = Field(default=32, ge=1)
    batch_size: int = Field(default=256, ge=1)
    seed: int = 0
    out: Directory | None = None  # default: the source run directory


class ExportRecipe(Recipe):
    kind: Literal["export"] = "export"
    source: Path
    bits: str | None = None  # which quantized model of the run; optional when it holds one
    lsq: bool = False  # the LSQ-trained model of those bits rather than the PTQ one
    engine: Engine = "ort"
    ort_kernel: OrtKernel = "auto"
    trt_batches: Annotated[list[PositiveInt], AfterValidator(_ordered_profile)] = Field(default=[1, 8, 32], min_length=3, max_length=3)
    build_engine: bool = True
    evalset: bool = False  # also write evalset.npz: the preprocessed test images, for `bench --evalset` on a board
    eval_size: int | None = Field(default=None, ge=1)  # that many test images (a fixed subset); default all
    data_root: Directory | None = None
    threads: int | None = Field(default=None, ge=1)
    out: Directory | None = None  # default: the source run directory

    @model_validator(mode="before")
    @classmethod
    def _engine_options(cls, data: Any) -> Any:
        """An option of another engine (--ort-kernel with --engine trt) is a mistake, not something to ignore."""
        engine = ENGINES.get(data.get("engine", "ort")) if isinstance(data, dict) else None
        for other in (e for e in ENGINES.values() if engine is not None and e.name != engine.name):
            given = sorted(set(other.options) & set(data) - set(engine.options))  # type: ignore[union-attr]
            if given:
                flag = "--" + given[0].replace("_", "-")
                raise UserError(
                    f"{flag} applies only to --engine {other.name}, not {engine.name}", f"drop {flag} or pass --engine {other.name}"
                )  # type: ignore[union-attr]
        return data

    @model_validator(mode="after")
    def _normalise(self) -> "ExportRecipe":
        if self.bits is not None:
            self.bits = _label(self.bits)
        return self


def _onnx_runtimes(names: list[str]) -> list[str]:
    from ssql_deploy.runtimes import ONNX_RUNTIMES

    unknown = [n for n in names if n.strip().lower() not in ONNX_RUNTIMES]
    if unknown:
        raise ValueError(f"unknown runtime {unknown[0]!r}; choose from ort, openvino (for example ort,openvino)")
    return list(dict.fromkeys(ONNX_RUNTIMES[n.strip().lower()] for n in names))


class BenchRecipe(DataRecipe):
    kind: Literal["bench"] = "bench"
    artifacts: list[Path] = Field(min_length=1)
    data: str | None = None  # default: the dataset the artifacts were trained on
    batch_sizes: list[PositiveInt] = Field(default=[1, 32], min_length=1)
    warmup: int = Field(default=10, ge=1)
    runs: int = Field(default=50, ge=50)
    rounds: int = Field(default=5, ge=2)  # timed runs are split into rounds that rotate over the artifacts
    threads: int | None = Field(default=None, ge=1)  # default: all cores
    eval_batch: int = Field(default=256, ge=1)
    runtimes: Annotated[list[str], AfterValidator(_onnx_runtimes)] = Field(
        default=["onnxruntime"], min_length=1
    )  # what runs each ONNX file
    evalset: Path | None = None  # an evalset.npz (export --evalset): bench ONNX files on it without torch
    device: str = "CPU"  # the OpenVINO device of the openvino rows (`CPU`, `GPU`, `NPU`, `AUTO`, ...)
    out: Directory = Path("runs/bench")


class PipelineGate(Recipe):
    min_top1: list[str] = []
    max_drop: list[str] = []
    max_latency_ms: list[str] = []
    min_speedup: list[str] = []
    strict: bool = False  # skipped rows fail every gate instead of skipping it


class PipelineRecipe(Recipe):
    """[pretrain ->] finetune -> quantize (each bit spec) -> export (each engine) -> bench -> gate, in one run directory."""

    kind: Literal["pipeline"] = "pipeline"
    out: Directory
    # Each stage section is that stage's own recipe without what the pipeline sets (out, source, artifacts), checked
    # whole by pipeline/plan.py before the first stage runs; so every stage setting (LSQ included) works in a pipeline.
    pretrain: dict[str, Any] | None = None  # finetune then starts from its backbone
    finetune: dict[str, Any]
    quantize: dict[str, Any] | list[dict[str, Any]] = {"bits": ["w8a8"]}  # one section or several; `bits` may be a list
    export: dict[str, Any] = {"engines": ["ort"]}  # `engines` lists the targets; an engine's own options go to it only
    bench: dict[str, Any] = {}
    gate: PipelineGate | None = None


class PretrainRecipe(DataRecipe):
    """Self-supervised pretraining (SimSiam, BYOL, MoCo v2, SimCLR, and SSQL on the first three).

    Defaults are the SSQL reference CIFAR-10 run (SSQL.md): 400 epochs, global batch 512, SGD lr
    0.05 cosine, momentum 0.9, wd 5e-4, weight bits drawn from 2-8 and activation bits from 4-8.
    Head sizes, EMA momentum and temperature left as None take the method's own defaults
    (ssql_deploy/pretrain/config.py).
    """

    kind: Literal["pretrain"] = "pretrain"
    method: str = "ssql"
    arch: str = "resnet18"
    stem: Stem = "auto"
    epochs: int = Field(default=400, ge=1)
    batch_size: int = Field(default=512, ge=1)  # global; pairs need >= 2 per process (checked with the method)
    lr: float = Field(default=0.05, gt=0)
    momentum: float = Field(default=0.9, ge=0, lt=1)
    weight_decay: float = Field(default=5e-4, ge=0)
    schedule: Schedule = "cosine"
    milestones: list[float] | None = None
    warmup_epochs: int = Field(default=0, ge=0)
    w_bits: str = "2-8"  # SSQL: inclusive range each step's weight width is drawn from
    a_bits: str = "4-8"
    fixed_bits: str | None = None  # ablation: one width pair every step, e.g. w4a4
    quantize_target: bool = False  # ablation: SimSiam targets from the quantized branch
    aux_loss: bool = True  # SSQL's full-precision auxiliary term
    proj_dim: int | None = Field(default=None, ge=1)
    proj_hidden_dim: int | None = Field(default=None, ge=1)
    pred_hidden_dim: int | None = Field(default=None, ge=1)
    ema_momentum: float | None = Field(default=None, ge=0, lt=1)
    temperature: float | None = Field(default=None, gt=0)
    queue_size: int = Field(default=4096, ge=1)
    knn_every: int = Field(default=10, ge=0)  # kNN monitor every N epochs and at the last; 0 turns it off
    knn_k: int = Field(default=200, ge=1)
    knn_temperature: float = Field(default=0.1, gt=0)
    save_every_steps: int | None = Field(default=None, ge=1)
    sync_bn: bool = False
    seed: int = 0
    out: Directory = Path("runs/pretrain")

    @model_validator(mode="after")
    def _resolve_method(self) -> "PretrainRecipe":
        from ssql_deploy.pretrain.config import resolve

        resolve(self)
        return self
