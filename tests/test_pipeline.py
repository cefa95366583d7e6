"""`ssql-deploy run`: the whole chain on a tiny pipeline, re-runnable, with its gates, refusing stale stages."""

import hashlib
import json
from pathlib import Path

from conftest import CliRun, assert_user_error

PIPELINE = """
kind: pipeline
out: {out}
pretrain: {{method: ssql, arch: test_resnet, subset: 256, epochs: 1, batch_size: 64, proj_hidden_dim: 64, proj_dim: 64,
           pred_hidden_dim: 16, knn_every: 1, workers: 0}}
finetune: {{arch: test_resnet, subset: 512, epochs: {epochs}, batch_size: 64, lr: 0.05, schedule: cosine, workers: 0}}
quantize: [{{bits: [w8a8, w4a4], calib: minmax, calib_size: 64, subset: 256}},
           {{bits: w4a4, calib: minmax, calib_size: 64, lsq: true, epochs: 1, subset: 128, batch_size: 32}}]
export: {{engines: [ort, trt], ort_kernel: symmetric}}
bench: {{batch_sizes: [1, 2], runs: 50, subset: 200}}
gate: {{min_top1: ["onnx-fp32=1"], max_drop: ["w8a8={drop}"], min_speedup: ["trt-w8a8@1=1.0"]}}
"""


def _files(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def test_pipeline_runs_end_to_end_reuses_matching_stages_and_refuses_stale_ones(tmp_path: Path, fmnist_root: Path, cli: CliRun) -> None:
    recipe = tmp_path / "tiny.yaml"
    run = tmp_path / "run"
    recipe.write_text(PIPELINE.format(out=run, drop=100, epochs=1))
    first = cli("run", recipe, cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "gates" in first.stdout and "report.png" in first.stdout and "skip" in first.stdout  # the TensorRT gate, no GPU here
    stages = ("pretrain", "finetune", "quant/w8a8", "quant/w4a4", "quant/w4a4-lsq", "export/w4a4-ort", "export/w8a8-trt",
              "export/w4a4-lsq-ort", "export/fp32")  # fmt: skip
    for stage in stages:
        assert (run / stage / "manifest.json").is_file(), stage
    finetune = json.loads((run / "finetune/manifest.json").read_text())
    assert finetune["inputs"]["ckpt"]["path"].endswith("pretrain/backbone.pt")
    report = json.loads((run / "bench/report.json").read_text())
    names = {r["name"]: r["status"] for r in report["rows"]}
    assert names["qdq-ort-w4a4"] == names["qdq-ort-w4a4-lsq"] == "ok" and names["trt-w8a8"].startswith("skipped")
    assert (tmp_path / "calib/fashion-mnist-train-64.json").is_file()  # the calibration manifest, next to the run

    recipe.write_text(PIPELINE.format(out=run, drop=-100, epochs=1))  # an impossible gate: the run must fail it
    second = cli("run", recipe, cwd=tmp_path)
    assert second.returncode == 1 and "FAIL" in second.stdout
    assert second.stderr.count("reusing the finished stage") == 3  # pretrain, finetune, LSQ

    recipe.write_text(PIPELINE.format(out=run, drop=100, epochs=2))  # the finished fine-tune no longer matches
    before = _files(run)
    stale = cli("run", recipe, cwd=tmp_path)
    assert_user_error(stale, "--epochs was 1, now 2", "--force")
    assert _files(run) == before
    forced = cli("run", recipe, "--force", cwd=tmp_path)
    assert forced.returncode == 0, forced.stderr[-3000:]
    assert "redoing" in forced.stderr and json.loads((run / "finetune/manifest.json").read_text())["settings"]["epochs"] == 2


def test_pipeline_recipe_errors_come_before_any_stage(tmp_path: Path, cli: CliRun) -> None:
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("kind: pipeline\nout: x\nfinetune: {arch: test_resnet, epochz: 1}\n")
    assert_user_error(cli("run", recipe), "unknown key 'epochz'", "[finetune]")
    recipe.write_text("kind: pipeline\nout: x\n")
    assert_user_error(cli("run", recipe), "finetune")
    ok = "kind: pipeline\nout: {out}\nfinetune: {{arch: test_resnet, epochs: 1}}\n"
    for extra, needle in (("quantize: {bits: [w9a4]}", "weight bits 9"), ("gate: {min_top1: [qdq-ort-w3a3=50]}", "no row 'qdq-ort-w3a3'"),
                          ("gate: {max_latency_ms: [onnx-fp32=5]}", "no batch size"), ("bench: {batch_sizes: [0]}", "batch_sizes"),
                          ("quantize: {bits: w4a4, out: elsewhere}", "'out' is set by the pipeline"),
                          ("quantize: [{bits: w4a4, lsq: true}]", "LSQ needs --epochs"),
                          ("quantize: {bits: w4a4, layer_bits: {features.0.*: w9}}", "weight bits 9"),
                          ("gate: {min_top1: [qdq-ort-w4a4-lsq=50]}", "no row 'qdq-ort-w4a4-lsq'")):  # fmt: skip
        recipe.write_text(ok.format(out=tmp_path / "never") + extra + "\n")
        assert_user_error(cli("run", recipe, cwd=tmp_path), needle)
        assert not (tmp_path / "never").exists()  # refused before the first stage
