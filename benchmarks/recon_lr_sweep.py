"""Why reconstruction's rounding variables learn at 10 / --iters (quant/recon/reconstruct.py, `rounding_lr`).

On the fine-tuned quarter-width ResNet-18 of benchmarks/families_int8.py at w2a4, after the mse calibrator, BRECQ
runs at several step counts and rounding learning rates, each from the same calibrated model and the same 1,024
unlabelled calibration images. The score is the simulation's top-1 on all 10,000 test images: this is a sweep of a
setting, not a deployment figure (recon_evidence.py scores the exported models of the default).

    .venv/bin/python benchmarks/recon_lr_sweep.py

Writes benchmarks/results/recon_lr_sweep.json and .log.
"""

import copy
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from evidence import cpu  # noqa: E402

from ssql_deploy.distributed import DistInfo  # noqa: E402
from ssql_deploy.evaluate import eval_loader, evaluate_top1, model_data  # noqa: E402
from ssql_deploy.models.registry import model_spec  # noqa: E402
from ssql_deploy.models.trained import load_trained  # noqa: E402
from ssql_deploy.quant.calib_set import load_calibration  # noqa: E402
from ssql_deploy.quant.calibrate import calibrate  # noqa: E402
from ssql_deploy.quant.config import QuantConfig  # noqa: E402
from ssql_deploy.quant.placement import prepare  # noqa: E402
from ssql_deploy.quant.recon.reconstruct import ReconSettings, reconstruct  # noqa: E402

RUN = ROOT / "runs/families/resnet18_quarter"
RESULTS = ROOT / "benchmarks/results"
BITS = "w2a4"
TRIALS = [(500, 1e-3), (500, 1e-2), (500, None), (250, 1e-3), (250, None)]  # (steps, rate); None: the tool's default


def main() -> None:
    if not (RUN / "finetune/manifest.json").is_file():
        raise SystemExit(f"{RUN} is not fine-tuned: run benchmarks/families_int8.py --train-only --archs resnet18_quarter first")
    model, meta, _ = load_trained(RUN)
    model.eval()
    source = model_data(meta, None, None)
    calibrated = prepare(model, "ssql", QuantConfig.from_bits(BITS), model_spec(meta.arch))
    calibrate(calibrated, load_calibration(source, 512, ROOT / "calib")[0], "mse")
    images, _ = load_calibration(source, 1024, ROOT / "calib")
    loader = eval_loader(source, None, 256, 1)
    score = lambda m, what: evaluate_top1(m, loader, torch.device("cpu"), DistInfo(), what)[0]  # noqa: E731
    result = {"benchmark": "recon_lr_sweep", "model": str(RUN.relative_to(ROOT)), "bits": BITS, "method": "brecq", "cpu": cpu(),
              "measured_on": "the simulation (PyTorch), all 10k test images", "fp32_top1": score(model, "fp32"),
              "nearest_top1": score(calibrated, "rounding to nearest"), "trials": []}  # fmt: skip
    log = [json.dumps({k: v for k, v in result.items() if k != "trials"})]
    for iters, lr in TRIALS:
        gm = copy.deepcopy(calibrated)
        settings = ReconSettings("brecq", iters=iters, lr=lr)
        start = time.time()
        units = reconstruct(gm, images, settings)
        trial = {"iters": iters, "rounding_lr": settings.rounding_lr, "default_rate": lr is None, "seconds": round(time.time() - start, 1),
                 "units_kept": sum(u["kept"] for u in units), "units": len(units), "top1": score(gm, f"{iters} steps at {settings.rounding_lr:g}")}  # fmt: skip
        result["trials"].append(trial)
        log.append(json.dumps(trial))
        print(log[-1], flush=True)
        (RESULTS / "recon_lr_sweep.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / "recon_lr_sweep.log").write_text("\n".join(log) + "\n")


if __name__ == "__main__":
    main()
