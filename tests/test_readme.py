"""The README claims no more than the committed benchmark outputs show: every measured figure is in one of them."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NUMBER = r"(?<![\w.])-?\d+\.\d+(?![\w.])"


def test_every_decimal_figure_in_the_measured_section_is_in_a_committed_output() -> None:
    """A figure with d decimals must be some number of benchmarks/results/ rounded to d decimals (1.67 for 1.6725)."""
    readme = (ROOT / "README.md").read_text()
    measured = readme[readme.index("## Measured") : readme.index("## Why another quantization tool")]
    outputs = "\n".join(p.read_text() for p in sorted((ROOT / "benchmarks/results").iterdir()) if p.suffix in (".json", ".log", ".md"))
    known = {float(x) for x in re.findall(NUMBER, outputs)}
    missing = []
    for figure in sorted(set(re.findall(NUMBER, measured))):
        decimals = len(figure.split(".")[1])
        value = abs(float(figure))
        if not any(round(abs(x), decimals) == round(value, decimals) for x in known):
            missing.append(figure)
    assert not missing, f"README figures found in no file of benchmarks/results/: {missing}"
