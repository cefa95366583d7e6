"""What every evidence script does: run `ssql-deploy` as a user would, with its raw output logged, and score an
exported model in a real ONNX Runtime session on all 10,000 Fashion-MNIST test images (the number a deployment
gets, not the simulation's).
"""

import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ssql_deploy.bench.onnx_runners import OrtRunner  # noqa: E402
from ssql_deploy.bench.runners import Runner  # noqa: E402
from ssql_deploy.data import DataSource  # noqa: E402
from ssql_deploy.evaluate import eval_loader  # noqa: E402

EVIDENCE = ROOT / "runs/evidence"  # the pretrained backbones of benchmarks/ssql_vs_simsiam.py, and their fine-tunes
EVIDENCE_ARCH = "resnet18_quarter"  # the backbone the SSQL evidence started from


def top1(runner: Runner, size: int = 32) -> float:
    """Top-1 of a runtime's runner on all 10,000 Fashion-MNIST test images at `size` px."""
    correct = total = 0
    for images, labels in eval_loader(DataSource.of("fashion-mnist", None, size), None, 500, 1):
        correct += int((runner.predict(images.numpy()).argmax(1) == labels.numpy()).sum())
        total += len(labels)
    return round(100.0 * correct / total, 2)


def ort_top1(path: Path, threads: int = 2) -> float:
    return top1(OrtRunner(path, threads, "CPUExecutionProvider"))


def evidence_run(method: str, arch: str = EVIDENCE_ARCH) -> Path:
    """Where `method`'s pretraining of `arch` lives: the quarter-width ResNet-18's runs keep the names the earlier
    evidence gave them (runs/evidence/ssql), any other backbone's are runs/evidence/<arch>-<method>."""
    return EVIDENCE / (method if arch == EVIDENCE_ARCH else f"{arch}-{method}")


def pretrained_evidence(method: str, log: Path, arch: str = EVIDENCE_ARCH, recipe: str | None = None, extra: tuple[str, ...] = (),
                        epochs: int | None = None) -> float:  # fmt: skip
    """Pretrain `arch` with recipes/pretrain/fashion-mnist-<recipe>.yaml (`method` unless given) unless that is done
    already, an interrupted run resuming; returns the pretraining's seconds, summed over its epochs (kNN checks
    included, start-up not), so that a run resumed in another session counts each epoch once. Every backbone gets the
    recipe's budget (images, epochs, batch, heads), so two methods on one backbone are compared at the same cost."""
    out = evidence_run(method, arch)
    if not (out / "pretrain/manifest.json").is_file():
        recipe_file = f"recipes/pretrain/fashion-mnist-{recipe or method}.yaml"
        args: list[str | Path] = ["pretrain", "--recipe", recipe_file, "--arch", arch, "--out", out]
        args += [*extra, *(["--epochs", str(epochs)] if epochs else []), *(["--resume"] if (out / "pretrain/last.pt").is_file() else [])]
        run_logged(log, *args)
    lines = (out / "pretrain/metrics.jsonl").read_text().splitlines()
    return round(sum(json.loads(line)["epoch_seconds"] for line in lines if line.strip()), 1)


def finetuned_evidence(method: str, log: Path, arch: str = EVIDENCE_ARCH) -> Path:
    """The run of `method`'s pretrained `arch` (benchmarks/ssql_vs_simsiam.py's for the quarter-width ResNet-18), fully
    fine-tuned on all of Fashion-MNIST (2 epochs, lr 0.05 cosine) unless that is done already; an interrupted fine-tune
    resumes."""
    run = evidence_run(method, arch)
    if not (run / "pretrain/backbone.pt").is_file():
        raise SystemExit(f"{run} has no pretrained backbone: run benchmarks/ssql_vs_simsiam.py (or recon_evidence.py --pretrained) first")
    if not (run / "finetune/manifest.json").is_file():
        run_logged(log, "finetune", "--ckpt", run, "--arch", arch, "--mode", "full", "--epochs", "2", "--lr", "0.05",
                   "--schedule", "cosine", "--batch-size", "128", "--workers", "1", "--out", run,
                   *(["--resume"] if (run / "finetune/last.pt").is_file() else []))  # fmt: skip
    return run


def run_logged(log: Path, *args: str | Path, cwd: Path = ROOT) -> float:
    """`ssql-deploy ARGS` run in `cwd`, by default the repository root (run in another checkout, it imports that
    checkout's package), its output appended to `log`; returns its wall time in seconds."""
    cmd = [sys.executable, "-m", "ssql_deploy", *map(str, args)]
    start = time.time()
    with log.open("a") as f:
        f.write("$ " + ("" if cwd == ROOT else f"(in {cwd}) ") + " ".join(cmd) + "\n")
        f.flush()
        subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, check=True, cwd=cwd)
    return round(time.time() - start, 1)


def export_ort(log: Path, source: Path, bits: str, kernel: str, out: Path | None = None, cwd: Path = ROOT) -> tuple[Path, dict]:
    """`ssql-deploy export` for ONNX Runtime unless an earlier run got this far; the QDQ ONNX and its manifest's metrics.

    An export whose parity check fails (exit 1) keeps its artifact and records the failure in the manifest: the
    benchmarks measure it all the same, with its status.
    """
    directory = (out or source) / f"export/{bits}-ort"
    if not (directory / "manifest.json").is_file():
        try:
            run_logged(
                log, "export", source, "--bits", bits, "--engine", "ort", "--ort-kernel", kernel, *(["--out", out] if out else []), cwd=cwd
            )
        except subprocess.CalledProcessError:
            pass  # exit 1: a failed check, written down in the manifest read below
    return directory / "model.qdq.onnx", json.loads((directory / "manifest.json").read_text())["metrics"]


def stamp(log: Path, stage: str) -> None:
    """Mark in `log` where a stage of a benchmark run starts, so a log appended to by several runs reads in order."""
    with log.open("a") as f:
        f.write(f"# {stage}, {time.strftime('%Y-%m-%d %H:%M:%S')}\n")


def revision() -> str:
    """The commit a benchmark measures (with "+changes" when the code differs from it; results files aside): a results
    file filled over several runs says which code measured which rows."""
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    changed = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":!benchmarks/results"], cwd=ROOT,
                             capture_output=True, text=True).stdout  # fmt: skip
    return (head or "unknown") + ("+changes" if changed.strip() else "")


def resummarize(output: Path, key: str, differences: Callable[[dict], dict]) -> None:
    """Recompute the differences `output` holds under `key` from the figures it holds, measuring nothing: for when the
    differences quoted change, or part of the benchmark was measured again."""
    result = json.loads(output.read_text())
    output.write_text(json.dumps(result | {key: differences(result)}, indent=2) + "\n")


def cpu() -> str:
    """The CPU model and whether it has the INT8 instructions ONNX Runtime's integer kernels use."""
    flags = Path("/proc/cpuinfo").read_text()
    name = next((line.split(":", 1)[1].strip() for line in flags.splitlines() if line.startswith("model name")), "unknown")
    return f"{name}, AMX-INT8: {'amx_int8' in flags}, VNNI: {'avx512_vnni' in flags or 'avx_vnni' in flags}"
