"""Bench on the board: `export --evalset` and `bench MODEL.onnx --evalset` with torch, torchvision, onnx, matplotlib
and scipy made unimportable, as on a board with only the runtime extra installed."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import CliRun, assert_user_error

ROOT = Path(__file__).resolve().parents[1]
ABSENT = ("torch", "torchvision", "onnx", "matplotlib", "scipy")


def _board(tmp_path: Path, absent: tuple[str, ...] = ABSENT) -> dict[str, str]:
    """An environment in which importing any of `absent` (by default every training package) fails as if it were not installed."""
    blocker = tmp_path / "absent"
    for name in absent:
        (blocker / name).mkdir(parents=True)
        (blocker / name / "__init__.py").write_text(f"raise ModuleNotFoundError(\"No module named '{name}'\", name='{name}')\n")
    return {**os.environ, "PYTHONPATH": str(blocker)}


def _board_cli(env: dict[str, str], *args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ssql_deploy", *map(str, args)], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=600)  # fmt: skip


@pytest.fixture(scope="module")
def board(deployed: Path, tmp_path_factory: pytest.TempPathFactory, cli: CliRun) -> Path:
    """What an engineer copies to the board: the FP32 model (ONNX and IR), the w4a4 ONNX and IR, and the evalset, nothing else."""
    run = tmp_path_factory.mktemp("board_run") / "run"
    shutil.copytree(deployed, run)
    exported = cli("export", run, "--bits", "w4a4", "--evalset", "--eval-size", "500")
    assert exported.returncode == 0, exported.stderr
    assert cli("export", run, "--bits", "w4a4", "--engine", "openvino").returncode == 0
    board = tmp_path_factory.mktemp("board")
    shutil.copy(run / "export/w4a4-ort/evalset.npz", board / "evalset.npz")
    for name, files in (
        ("fp32", ["model.onnx", "model.xml", "model.bin"]),
        ("w4a4-ort", ["model.qdq.onnx"]),
        ("w4a4-openvino", ["model.xml", "model.bin"]),
    ):
        (board / name).mkdir()
        for file in files:
            shutil.copy(run / "export" / name / file, board / name / file)
    manifest = json.loads((run / "export/w4a4-ort/manifest.json").read_text())
    assert "evalset" in manifest["outputs"]
    return board


def test_bench_on_the_board_needs_only_the_runtime(board: Path, tmp_path: Path, deployed: Path, cli: CliRun) -> None:
    env = _board(tmp_path)
    files = [board / "fp32/model.onnx", board / "w4a4-ort/model.qdq.onnx", board / "w4a4-openvino/model.xml"]
    result = _board_cli(env, "bench", *files, "--evalset", board / "evalset.npz", "--runtime", "ort,openvino", "--batch-sizes", "1",
                        "--out", tmp_path / "report")  # fmt: skip
    assert result.returncode == 0, result.stderr
    rows = {r["name"]: r for r in json.loads((tmp_path / "report/report.json").read_text())["rows"]}
    assert set(rows) == {"onnx-fp32", "qdq-ort-w4a4", "ov-fp32", "ov-qdq-ort-w4a4", "openvino-w4a4"}
    assert rows["openvino-w4a4"]["runtime"] == "openvino" and rows["openvino-w4a4"]["speedup"]["1"]["baseline"] == "ov-fp32"
    assert all(r["n_images"] == 500 and r["status"] == "ok" for r in rows.values())
    assert rows["qdq-ort-w4a4"]["speedup"]["1"]["baseline"] == "onnx-fp32" and rows["ov-fp32"]["agreement"] == 100.0
    assert not (tmp_path / "report/report.png").exists()  # no matplotlib on the board: json and md only
    # the same files and images, benched by the full install from the run, give the same top-1
    full = cli("bench", deployed, "--subset", "500", "--batch-sizes", "1", "--workers", "0", "--out", tmp_path / "full")
    assert full.returncode == 0, full.stderr
    full_rows = {r["name"]: r for r in json.loads((tmp_path / "full/report.json").read_text())["rows"]}
    images = np.load(board / "evalset.npz")["labels"]
    assert len(images) == 500
    for name in ("onnx-fp32", "qdq-ort-w4a4"):
        assert rows[name]["top1"] == pytest.approx(full_rows[name]["top1"], abs=1e-6)


def test_the_board_install_refuses_what_needs_training_packages(board: Path, tmp_path: Path, deployed: Path) -> None:
    env = _board(tmp_path)
    assert_user_error(_board_cli(env, "quantize", deployed, "--bits", "w4a4"), "pip install 'ssql-deploy[train]'")
    broken = tmp_path / "broken.npz"
    broken.write_text("not an archive")
    assert_user_error(_board_cli(env, "bench", board / "fp32/model.onnx", "--evalset", broken), "is not an evalset")
    twice = _board_cli(env, "bench", board / "fp32/model.onnx", board / "fp32/model.xml", "--evalset", board / "evalset.npz",
                       "--runtime", "openvino", "--out", tmp_path / "twice")  # fmt: skip
    assert_user_error(twice, "would both be the row ov-fp32", "pass the FP32 model once")
    assert not (tmp_path / "twice").exists()
    no_openvino = _board(tmp_path / "no_openvino", absent=("openvino",))
    refused = _board_cli(no_openvino, "export", deployed, "--bits", "w4a4", "--engine", "openvino", "--out", tmp_path / "out")
    assert_user_error(refused, "needs OpenVINO", "pip install 'ssql-deploy[openvino]'")
    assert not (tmp_path / "out").exists()
