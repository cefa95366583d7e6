"""Every refused input, as a user types it: one clear line naming the value at fault, non-zero exit, no
traceback, and the run directory byte-identical afterwards (nothing already written is lost)."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import onnx
import pytest
from conftest import CliRun, write_image_tree


def snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory: pytest.TempPathFactory, fmnist_root: Path, cli: CliRun) -> Path:
    out = tmp_path_factory.mktemp("pretrained")
    r = cli("pretrain", "--method", "simsiam", "--arch", "test_resnet", "--batch-size", "32", "--workers", "0", "--proj-dim", "32",
            "--proj-hidden-dim", "64", "--pred-hidden-dim", "16", "--subset", "64", "--epochs", "1", "--knn-every", "0", "--out", out)  # fmt: skip
    assert r.returncode == 0, r.stderr
    return out


@pytest.fixture(scope="module")
def odd_files(tmp_path_factory: pytest.TempPathFactory, deployed: Path) -> dict[str, Path]:
    """Files a user might hand over by mistake: a regular file, a binary recipe, exports ONNX Runtime or bench must refuse."""
    d = tmp_path_factory.mktemp("odd")
    (d / "plain.txt").write_text("not a directory\n")
    (d / "binary.yaml").write_bytes(bytes(range(256)) * 4)
    model = onnx.load(str(deployed / "export/w4a4-ort/model.qdq.onnx"))
    model.ir_version = 99  # newer than any ONNX Runtime here understands
    onnx.save(model, str(d / "future.onnx"))
    meta = onnx.load(str(deployed / "export/w4a4-ort/model.qdq.onnx"))
    entry = next(p for p in meta.metadata_props if p.key == "ssql_deploy_model")
    entry.value = json.dumps(json.loads(entry.value) | {"input_size": 64})  # metadata that disagrees with the 32-px graph
    onnx.save(meta, str(d / "mislabelled.onnx"))
    return {"file": d / "plain.txt", "binary": d / "binary.yaml", "future": d / "future.onnx", "mislabelled": d / "mislabelled.onnx"}


def _gate_report_without(field: str, deployed: Path, tmp: Path, cli: CliRun) -> Path:
    out = tmp / "bench"
    b = cli("bench", deployed / "export/w4a4-ort/model.qdq.onnx", "--subset", "64", "--workers", "0", "--batch-sizes", "1", "--out", out)
    assert b.returncode == 0, b.stderr
    report = json.loads((out / "report.json").read_text())
    del report["rows"][0][field]
    (out / "report.json").write_text(json.dumps(report))
    return out / "report.json"


FT = ["finetune", "--arch", "test_resnet", "--subset", "128", "--epochs", "1", "--batch-size", "32", "--workers", "0"]
CASES = [  # (id, argv with {placeholders}, what the error line must name)
    ("trt-batches", ["export", "{run}", "--bits", "4", "--engine", "trt", "--trt-batches", "a,b"], ["--trt-batches", "'a,b'"]),
    ("trt-batches-order", ["export", "{run}", "--bits", "4", "--engine", "trt", "--trt-batches", "8,1,32"], ["--trt-batches", "8,1,32"]),
    ("other-engines-option", ["export", "{run}", "--bits", "4", "--engine", "trt", "--ort-kernel", "gemm"], ["--ort-kernel", "--engine ort"]),
    ("layer-bits-no-match", ["quantize", "{run}", "--bits", "w4a4", "--layer-bits", "featurez.*=w8"], ["featurez.*", "matches no module"]),
    ("layer-bits-malformed", ["quantize", "{run}", "--bits", "w4a4", "--layer-bits", "layer1.*"], ["--layer-bits", "PATTERN=SPEC"]),
    ("layer-bits-range", ["quantize", "{run}", "--bits", "w4a4", "--layer-bits", "layer1.*=w1"], ["weight bits 1", "2..8"]),
    ("calib-dir-file", ["quantize", "{run}", "--calib-dir", "{file}"], ["--calib-dir", "{file}"]),
    ("pretrain-out-file", ["pretrain", "--arch", "test_resnet", "--out", "{file}"], ["--out", "{file}"]),
    ("finetune-out-file", [*FT, "--out", "{file}"], ["--out", "{file}"]),
    ("quantize-out-file", ["quantize", "{run}", "--out", "{file}"], ["--out", "{file}"]),
    ("export-out-file", ["export", "{run}", "--out", "{file}"], ["--out", "{file}"]),
    ("bench-out-file", ["bench", "{run}", "--out", "{file}"], ["--out", "{file}"]),
    ("bench-input-size", ["bench", "{run}/export/w4a4-ort/model.qdq.onnx", "--input-size", "64", "--out", "{tmp}/b"], ["32x32", "64x64"]),
    ("bench-metadata", ["bench", "{mislabelled}", "--out", "{tmp}/b"], ["32x32", "64 px", "{mislabelled}"]),
    ("bench-ort-refuses", ["bench", "{future}", "--out", "{tmp}/b"], ["{future}", "cannot load", "ir"]),
    ("batchnorm-one-value", [*FT, "--input-size", "8", "--batch-size", "1", "--out", "{tmp}/o"], ["--batch-size", "1x1"]),
    ("binary-recipe", ["finetune", "--recipe", "{binary}"], ["{binary}", "not a text file"]),
    ("batch-sizes-zero", ["bench", "{run}", "--batch-sizes", "0", "--out", "{tmp}/b"], ["--batch-sizes", "0"]),
    ("lr-inf", [*FT, "--lr", "inf", "--out", "{tmp}/o"], ["--lr", "finite"]),
    ("lr-nan", ["pretrain", "--arch", "test_resnet", "--lr", "nan", "--out", "{tmp}/o"], ["--lr", "finite"]),
    ("linear-without-ckpt", [*FT, "--mode", "linear", "--out", "{tmp}/o"], ["--mode linear", "--ckpt"]),
    ("resume-other-arch", ["finetune", "--out", "{run}", "--resume", "--arch", "resnet18_quarter"], ["--arch", "test_resnet", "resnet18_quarter"]),
    ("resume-other-mode", ["finetune", "--out", "{run}", "--resume", "--mode", "linear", "--ckpt", "{run}"], ["--mode", "'full'", "'linear'"]),
    ("pretrain-resume-size", ["pretrain", "--out", "{pre}", "--resume", "--input-size", "64"], ["--input-size", "64"]),
    ("pretrain-resume-proj", ["pretrain", "--out", "{pre}", "--resume", "--proj-dim", "48"], ["--proj-dim", "32", "48"]),
    ("ptq-resume", ["quantize", "{run}", "--resume"], ["--resume", "--lsq"]),
    ("bits-outside", ["quantize", "{run}", "--bits", "w9a4"], ["weight bits 9", "2..8"]),
    ("engine-choice", ["export", "{run}", "--engine", "tflite"], ["tflite", "ort", "trt", "openvino"]),
]  # fmt: skip


@pytest.mark.parametrize("case, argv, needles", CASES, ids=[c[0] for c in CASES])
def test_refused_input_is_one_line_and_changes_nothing(
    case: str,
    argv: list[str],
    needles: list[str],
    deployed: Path,
    pretrained: Path,
    odd_files: dict[str, Path],
    tmp_path: Path,
    cli: CliRun,
) -> None:
    names = {"run": deployed, "pre": pretrained, "tmp": tmp_path, **odd_files}
    fill = lambda s: s.format(**names)  # noqa: E731
    before = {d: snapshot(d) for d in (deployed, pretrained)}
    result = cli(*map(fill, argv), cwd=tmp_path)
    out = result.stdout + result.stderr
    assert result.returncode not in (0, 1), out  # 1 means a failed check or gate; bad input is 2
    assert "Traceback" not in out, out
    for needle in map(fill, needles):
        assert needle.lower() in out.lower(), (needle, out)
    if case != "engine-choice":  # typer's own usage box for a value outside the choices; ours are one line
        assert sum(line.startswith("error:") for line in result.stderr.splitlines()) == 1, result.stderr
    assert {d: snapshot(d) for d in (deployed, pretrained)} == before


def test_gate_names_the_field_a_report_lacks(deployed: Path, tmp_path: Path, cli: CliRun) -> None:
    for field in ("top1", "status"):
        report = _gate_report_without(field, deployed, tmp_path / field, cli)
        result = cli("gate", report, "--min-top1", "qdq-ort-w4a4=1")
        assert result.returncode == 2 and "Traceback" not in result.stderr
        assert f"rows[0].{field}: field required" in result.stderr.lower(), result.stderr


def test_image_folder_refusals_name_the_file_and_the_class(tmp_path: Path, fmnist_root: Path, cli: CliRun) -> None:
    bad = tmp_path / "bad"
    write_image_tree(bad, fmnist_root, 2, 20)
    (bad / "train/class1/notreally.jpg").write_text("this is text, not a JPEG\n")
    args = ["--arch", "test_resnet", "--epochs", "1", "--batch-size", "8", "--workers", "0", "--data", "imagefolder"]
    result = cli("finetune", *args, "--data-root", bad, "--out", tmp_path / "o")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "notreally.jpg" in result.stderr and "refused before training" in result.stderr
    assert not (tmp_path / "o/finetune/last.pt").exists()
    one = tmp_path / "one"
    write_image_tree(one, fmnist_root, 1, 20)
    result = cli("finetune", *args, "--data-root", one, "--out", tmp_path / "o")
    assert result.returncode == 2 and "1 class folder (class0)" in result.stderr and "at least 2" in result.stderr


def test_a_run_remembers_its_data(tmp_path: Path, fmnist_root: Path, cli: CliRun) -> None:
    """Fine-tuned on an image folder, quantized and benched with no data flags: the run's manifest supplies them."""
    tree = tmp_path / "tree"
    write_image_tree(tree, fmnist_root, 3, 24)
    run = tmp_path / "run"
    ft = cli("finetune", "--arch", "test_resnet", "--epochs", "1", "--batch-size", "12", "--workers", "0", "--data", "imagefolder",
             "--data-root", tree, "--input-size", "32", "--out", run)  # fmt: skip
    assert ft.returncode == 0, ft.stderr
    q = cli("quantize", run, "--bits", "w8a8", "--calib-size", "32", "--calib-dir", tmp_path / "calib", "--workers", "0")
    assert q.returncode == 0, q.stderr
    assert f"data: imagefolder from {tree.resolve()}, 32 px" in q.stderr and "as the model was trained" in q.stderr
    assert cli("export", run).returncode == 0
    b = cli("bench", run, "--batch-sizes", "1", "--workers", "0", "--out", tmp_path / "bench")
    assert b.returncode == 0, b.stderr
    rows = {r["name"]: r for r in json.loads((tmp_path / "bench/report.json").read_text())["rows"]}
    assert rows["qdq-ort-w8a8"]["n_images"] == 72 and rows["qdq-ort-w8a8"]["status"] == "ok"


def test_a_loss_that_turns_nan_stops_the_run_at_that_step(tmp_path: Path, fmnist_root: Path, cli: CliRun) -> None:
    result = cli(*FT, "--lr", "1e30", "--out", tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "finetune diverged: the loss became" in result.stderr and "at epoch 1, step" in result.stderr
    assert "no checkpoint was written yet" in result.stderr and "lower --lr" in result.stderr
    assert not (tmp_path / "finetune/best.pt").exists() and not (tmp_path / "finetune/manifest.json").exists()


def test_ctrl_c_in_export_says_what_export_kept(deployed: Path, tmp_path: Path) -> None:
    """The interrupt message fits the stage: an export has no epochs to resume."""
    out = tmp_path / "export-out"
    # SIGINT back to its default in the child: a suite started in the background (nohup, `&`) passes it on ignored
    proc = subprocess.Popen([sys.executable, "-m", "ssql_deploy", "export", str(deployed), "--bits", "4", "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # fmt: skip
    maps = Path(f"/proc/{proc.pid}/maps")
    deadline = time.time() + 60
    while proc.poll() is None and time.time() < deadline and "libtorch" not in maps.read_text():  # inside the command by then
        time.sleep(0.05)
    assert proc.poll() is None, "the export finished before it could be interrupted"
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stdout + stderr
    assert "Traceback" not in stderr and "epochs" not in stderr and "--resume" not in stderr
    assert "the export was not committed" in stderr and "unverified" in stderr
    assert not (out / "export/w4a4-ort/manifest.json").exists()
