"""The quickstart pipeline (`make demo`) from nothing, timed: it must finish in <= 10 minutes on 2 cores.

Runs `ssql-deploy run recipes/pipelines/quickstart.yaml` into a fresh run directory (the set-up that
`make demo` does first, creating .venv, is not part of this time), and records the wall time, the
time of each stage from its manifest, the bench report and the gates.

    .venv/bin/python benchmarks/quickstart_time.py

Writes benchmarks/results/quickstart_time.json, .log and the pipeline's report.md beside them.
"""

import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks/results"
LIMIT_S = 600.0


def main() -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "quickstart"
        cmd = [sys.executable, "-m", "ssql_deploy", "run", "recipes/pipelines/quickstart.yaml", "--out", str(run)]
        start = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
        wall = time.perf_counter() - start
        (RESULTS / "quickstart_time.log").write_text(f"$ {' '.join(cmd)}\n{proc.stdout}\n--- stderr ---\n{proc.stderr}")
        stages = {}
        for manifest in sorted(run.glob("*/manifest.json")):
            metrics = json.loads(manifest.read_text()).get("metrics", {})
            stages[manifest.parent.name] = {k: v for k, v in metrics.items() if "seconds" in k or "top1" in k}
        if (run / "bench/report.md").is_file():
            shutil.copy(run / "bench/report.md", RESULTS / "quickstart_report.md")
    result = {
        "benchmark": "quickstart_time",
        "command": "ssql-deploy run recipes/pipelines/quickstart.yaml",
        "exit_code": proc.returncode,
        "wall_seconds": round(wall, 1),
        "wall_minutes": round(wall / 60, 1),
        "limit_seconds": LIMIT_S,
        "passed": proc.returncode == 0 and wall <= LIMIT_S,
        "stages": stages,
    }
    (RESULTS / "quickstart_time.json").write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"quickstart: exit {proc.returncode}, {wall / 60:.1f} min (limit {LIMIT_S / 60:.0f} min): {'PASS' if result['passed'] else 'FAIL'}"
    )


if __name__ == "__main__":
    main()
