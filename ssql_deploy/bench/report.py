"""The bench report: report.json (for gates and CI), report.md (for people), report.png (to look at)."""

import json
from pathlib import Path
from typing import Any

from rich.table import Table

from ssql_deploy.bench.schema import Report, Row
from ssql_deploy.run import write_text_atomic
from ssql_deploy.runtimes import ENGINES, RUNTIMES

_STATUS_STYLE = {"ok": "green", "skipped": "yellow", "unverified": "red", "check failed": "red", "export failed": "red"}
METHOD_NOTES = (
    "speed-up: against the FP32 row of the same runtime (TensorRT: the FP16 engine of the same network), the median "
    "of per-round ratios over interleaved rounds, with the smallest and largest round in brackets",
    "agreement: share of test images on which the artifact predicts what the PyTorch model of its own layout predicts; "
    "'layout vs SSQL sim' compares that PyTorch model with the SSQL-layout simulation (the runtime's extra quantizers)",
    "TensorRT latency is timed on device-resident buffers (no host copies in the timed region)",
)


def bits_order(bits: str) -> tuple[int, int, str]:
    """fp32 first, then by default weight then activation bits, widest first (labels with overrides beside theirs)."""
    if not bits.startswith("w"):
        return (99, 99, bits)
    w, a = bits[1:].split("-")[0].split("a")
    return (int(w), int(a), bits)


def _fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def table_rows(report: Report) -> tuple[list[str], list[list[str]]]:
    rows = report.rows
    batches = sorted({b for r in rows for b in r.latency}, key=int)
    last = batches[-1] if batches else None
    header = ["name", "runtime", "bits", "top-1 %", "agreement %", "layout vs SSQL sim %"]
    header += [f"p50 ms @{b}" for b in batches] + [f"img/s @{last}" if last else "img/s", f"speed-up @{last}" if last else "speed-up"]
    header += ["MB", "status"]
    body = []
    for r in rows:
        cells = [r.name, r.runtime, r.bits, _fmt(r.top1, ".2f"), _fmt(r.agreement, ".1f"), _fmt(r.layout_agreement, ".1f")]
        cells += [_fmt(r.latency[b].p50_ms if b in r.latency else None, ".2f") for b in batches]
        speed = r.speedup.get(last) if last else None
        cells += [_fmt(r.latency[last].images_per_s if last in r.latency else None, ".0f") if last else "-",
                  f"{speed.ratio:.2f}x [{speed.low:.2f}-{speed.high:.2f}]" if speed else "-",
                  _fmt(r.size_bytes / 1e6 if r.size_bytes else None, ".2f"), r.status]  # fmt: skip
        body.append(cells)
    return header, body


def rich_table(report: Report, title: str = "bench") -> Table:
    header, body = table_rows(report)
    table = Table(title=f"{title} ({report.env.threads} threads, {report.env.cpu})")
    for col in header:
        table.add_column(col, justify="left" if col in ("name", "runtime", "bits", "status") else "right")
    for cells in body:
        status = cells[-1]
        style = next((s for k, s in _STATUS_STYLE.items() if status.startswith(k)), "")
        table.add_row(*cells[:-1], f"[{style}]{status}[/]" if style else status)
    return table


def notes(report: Report) -> list[str]:
    """Where an artifact's numerics differ from the simulation, and how to build what was skipped."""
    return [f"{r.name}: {n}" for r in report.rows for n in r.notes if n]


def markdown(report: Report) -> str:
    header, body = table_rows(report)
    env = report.env
    lines = [
        "# ssql-deploy bench report", "",
        f"Dataset `{env.data}` (full test split unless a subset was asked for); latency p50/p90 over {env.runs} timed runs "
        f"in {env.rounds} interleaved rounds after {env.warmup} warm-up runs on fixed inputs, {env.threads} threads, {env.cpu}.",
        *(f"- {n}" for n in METHOD_NOTES), "",
        "| " + " | ".join(header) + " |", "|" + "---|" * len(header),
    ]  # fmt: skip
    lines += ["| " + " | ".join(cells) + " |" for cells in body]
    if found := notes(report):
        lines += ["", "Notes:", *(f"- {n}" for n in found)]
    return "\n".join(lines) + "\n"


def _title(runtime: str) -> str:
    """A runtime's display name; a report written by another version may name one this table does not know."""
    known = RUNTIMES.get(runtime)  # type: ignore[call-overload]
    return known.title if known is not None else runtime


def _series(row: Row) -> tuple[str, ...]:
    """Accuracy-plot lines a row belongs to: its runtime, and for ONNX Runtime the layout of the graph it runs.
    The FP32 ONNX row starts every ONNX Runtime line."""
    if row.runtime != "onnxruntime":
        return (_title(row.runtime),)
    line = lambda engine: "ONNX Runtime" if engine == "ort" else f"ONNX Runtime, {engine} layout"  # noqa: E731
    return tuple(line(e) for e in ENGINES) if row.bits == "fp32" else (line(row.engine or "ort"),)


def plot(report: Report, path: Path) -> bool:
    """Draw report.png; False where matplotlib is not installed (a board with only the runtime extra)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = [r for r in report.rows if r.top1 is not None]
    fig, (acc_ax, lat_ax, trade_ax) = plt.subplots(1, 3, figsize=(19, 4.8))
    order = sorted({r.bits for r in rows}, key=bits_order, reverse=True)
    lines = list(dict.fromkeys(line for r in rows if r.bits != "fp32" for line in _series(r)))
    for label, marker in zip(lines, "osD^vP*X", strict=False):
        points = sorted((order.index(r.bits), r.top1) for r in rows if label in _series(r) and r.top1 is not None)
        acc_ax.plot(*zip(*points, strict=True), marker=marker, label=label)
    acc_ax.set_xticks(range(len(order)), order)
    acc_ax.set_xlabel("bit-width")
    acc_ax.set_ylabel("top-1 % (full test split)")
    acc_ax.set_title("accuracy measured on each artifact")
    acc_ax.grid(alpha=0.3)
    acc_ax.legend()
    batches = sorted({b for r in rows for b in r.latency}, key=int)
    width = 0.8 / max(len(batches), 1)
    for i, batch in enumerate(batches):
        values = [r.latency[batch].p50_ms if batch in r.latency else 0.0 for r in rows]
        lat_ax.bar([j + i * width for j in range(len(rows))], values, width, label=f"batch {batch}")
    lat_ax.set_xticks([j + width * (len(batches) - 1) / 2 for j in range(len(rows))], [r.name for r in rows], rotation=30, ha="right")
    lat_ax.set_yscale("log")
    lat_ax.set_ylabel("p50 latency, ms (log)")
    lat_ax.set_title(f"latency per runtime ({report.env.threads} threads)")
    lat_ax.grid(alpha=0.3, axis="y")
    lat_ax.legend()
    _tradeoff(trade_ax, rows, batches[0] if batches else None)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _tradeoff(ax: Any, rows: list[Row], batch: str | None) -> None:
    """Latency against top-1 for every artifact on every runtime: what each choice costs and buys, at one batch size."""
    for runtime, marker in zip(dict.fromkeys(r.runtime for r in rows), "osD^vP*X", strict=False):
        points = [(r.latency[batch].p50_ms, r.top1, r.name) for r in rows if r.runtime == runtime and batch in r.latency]
        if not points:
            continue
        ax.scatter([p[0] for p in points], [p[1] for p in points], marker=marker, label=_title(runtime))
        for latency, top1, name in points:
            ax.annotate(name, (latency, top1), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel(f"p50 latency at batch {batch}, ms (log)")
    ax.set_ylabel("top-1 %")
    ax.set_title("latency against accuracy, every artifact and runtime")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend()


def write_reports(report: Report, out: Path) -> dict[str, Path]:
    paths = {"json": out / "report.json", "md": out / "report.md", "png": out / "report.png"}
    write_text_atomic(paths["json"], json.dumps(report.model_dump(mode="json"), indent=2) + "\n")
    write_text_atomic(paths["md"], markdown(report))
    if not plot(report, paths["png"]):
        del paths["png"]
    return paths
