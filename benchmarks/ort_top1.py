"""Top-1 of an exported ONNX model in a real ONNX Runtime session on all 10,000 Fashion-MNIST test images.

What the evidence scripts report for every artifact: the number a deployment gets, not the simulation's.
"""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ssql_deploy.data import DataSource  # noqa: E402
from ssql_deploy.evaluate import eval_loader  # noqa: E402
from ssql_deploy.export.ort_session import make_session  # noqa: E402


def ort_top1(path: Path, threads: int = 2) -> float:
    session = make_session(path, threads)
    correct = total = 0
    for images, labels in eval_loader(DataSource.of("fashion-mnist", None, 32), None, 500, 1):
        correct += int((session.run(None, {"input": images.numpy()})[0].argmax(1) == labels.numpy()).sum())
        total += len(labels)
    return round(100.0 * correct / total, 2)
