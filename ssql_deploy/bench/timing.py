"""Latency of several artifacts measured side by side: interleaved rounds, speed-ups from paired rounds.

Timing artifacts one after another compares two moments of a machine, not two models: a load spike
during one of them moves the ratio (the quickstart's speed gate once failed at 1.17x on a model
measured at 1.39x). Here every round times every artifact, in an order that rotates from round to
round, so drift hits all of them alike; a speed-up is the median of the per-round ratios, and the
smallest and largest ratio show the spread a gate has to live with. Each artifact's block in a round
starts with a couple of untimed runs: the one timed just before it has evicted its weights from the
caches, and its runtime's worker threads may still be spinning down.
"""

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ssql_deploy.bench.schema import Latency, Row, Speedup, baseline_name
from ssql_deploy.progress import progress_bar
from ssql_deploy.recipe import BenchRecipe

Timer = Callable[[], None]  # one inference on inputs prepared beforehand
ROUND_WARMUP = 2  # untimed runs at the start of each artifact's block in a round


@dataclass(frozen=True)
class Measured:
    samples: list[float]  # seconds, every timed run
    round_medians: list[float]  # seconds, one per round

    def latency(self, batch: int) -> Latency:
        p50, p90 = np.percentile(self.samples, [50, 90])
        return Latency(p50_ms=round(1000 * float(p50), 4), p90_ms=round(1000 * float(p90), 4),
                       images_per_s=round(batch / float(p50), 2), rounds=len(self.round_medians))  # fmt: skip


def interleaved(timers: dict[str, Timer], warmup: int, runs: int, rounds: int, label: str = "timing") -> dict[str, Measured]:
    """`runs` timed calls of each timer (at least one per round) after `warmup` untimed ones, split over rounds."""
    names = list(timers)
    per_round = max(1, -(-runs // rounds))
    for fn in timers.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {n: [] for n in names}
    medians: dict[str, list[float]] = {n: [] for n in names}
    with progress_bar() as bar:
        task = bar.add_task(label, total=rounds)
        for r in range(rounds):
            shift = r % len(names)
            for name in names[shift:] + names[:shift]:
                fn, times = timers[name], []
                for _ in range(ROUND_WARMUP):
                    fn()
                for _ in range(per_round):
                    start = time.perf_counter()
                    fn()
                    times.append(time.perf_counter() - start)
                samples[name] += times
                medians[name].append(statistics.median(times))
            bar.advance(task)
    return {n: Measured(samples[n], medians[n]) for n in names}


def paired_speedup(baseline_name: str, baseline: Measured, row: Measured) -> Speedup:
    ratios = [b / max(t, 1e-12) for b, t in zip(baseline.round_medians, row.round_medians, strict=True)]
    return Speedup(baseline=baseline_name, ratio=round(statistics.median(ratios), 4), low=round(min(ratios), 4), high=round(max(ratios), 4))


def time_rows(timers: dict[str, Callable[[int], Timer]], rows: dict[str, Row], recipe: BenchRecipe) -> None:
    """Latency per batch size and paired speed-ups, written into `rows`; `timers[name](batch)` prepares a Timer.

    Interleaved within a runtime, one runtime after another: speed-ups only pair rows of one runtime, and
    a torch run's OpenMP threads still spinning when an ONNX Runtime run starts would slow that ORT row.
    """
    groups: dict[str, list[str]] = {}
    for name in timers:
        groups.setdefault(rows[name].runtime, []).append(name)
    for batch in recipe.batch_sizes:
        measured: dict[str, Measured] = {}
        for runtime, names in groups.items():
            batch_timers = {name: timers[name](batch) for name in names}
            measured |= interleaved(batch_timers, recipe.warmup, recipe.runs, recipe.rounds, f"timing {runtime} at batch {batch}")
        for name, m in measured.items():
            rows[name].latency[str(batch)] = m.latency(batch)
            base = baseline_name(rows[name])
            if base is not None and base in measured:
                rows[name].speedup[str(batch)] = paired_speedup(base, measured[base], m)
