"""Range calibrators for activation quantizers: collect statistics, then pick a clip range.

`minmax` keeps the extremes; `percentile`, `mse` and `entropy` (KL, TensorRT's method) work on a
histogram with fixed-width bins that grows as larger values arrive (and halves its resolution
when it gets too long), so a calibration set is never held in memory. Every calibrator answers
for a given grid (bits, signed) because the best clip range depends on how many levels it has.
"""

from abc import ABC, abstractmethod
from typing import Literal

import numpy as np
import torch

CalibratorName = Literal["minmax", "percentile", "mse", "entropy"]
CALIBRATORS: tuple[CalibratorName, ...] = ("minmax", "percentile", "mse", "entropy")
_START_BINS = 2048
_MAX_BINS = 8192
_CANDIDATES = 128


class NonFiniteActivation(ValueError):
    """Raised by `collect` on NaN or inf; the caller names the layer in the user-facing error."""


class Calibrator(ABC):
    def __init__(self) -> None:
        self.name = ""  # the quantizer it serves, for error messages
        self.reset()

    def collect(self, x: torch.Tensor) -> None:
        x = x.detach().flatten().float()
        if x.numel() == 0:
            return
        if not torch.isfinite(x).all():
            raise NonFiniteActivation(self.name or "an activation")
        self.count += x.numel()
        lo, hi = torch.aminmax(x)
        self.min = min(self.min, float(lo))
        self.max = max(self.max, float(hi))
        self._collect(x)

    def reset(self) -> None:
        self.count = 0
        self.min = float("inf")
        self.max = float("-inf")
        self._reset()

    def compute_range(self, bits: int, signed: bool) -> tuple[float, float]:
        """The clip range (lo <= 0 <= hi) for a grid of `bits` levels, symmetric if `signed`."""
        if self.count == 0:
            raise ValueError("calibrator has seen no data")
        lo, hi = min(self.min, 0.0), max(self.max, 0.0)
        if hi == lo:
            return 0.0, 0.0
        return self._compute_range(lo, hi, bits, signed)

    def _collect(self, x: torch.Tensor) -> None:
        del x

    def _reset(self) -> None:  # noqa: B027 - a hook: only calibrators with histograms have state to clear
        pass

    @abstractmethod
    def _compute_range(self, lo: float, hi: float, bits: int, signed: bool) -> tuple[float, float]: ...


class MinMaxCalibrator(Calibrator):
    def _compute_range(self, lo: float, hi: float, bits: int, signed: bool) -> tuple[float, float]:
        if signed:
            amax = max(-lo, hi)
            return -amax, amax
        return lo, hi


class HistogramCalibrator(Calibrator):
    """Collects `pos[i]` = count of x in [i*w, (i+1)*w) and `neg[i]` likewise for -x."""

    def _reset(self) -> None:
        self.width = 0.0
        self.pos = torch.zeros(0, dtype=torch.float64)
        self.neg = torch.zeros(0, dtype=torch.float64)

    def _collect(self, x: torch.Tensor) -> None:
        if self.width == 0.0:
            amax = float(x.abs().max())
            if amax == 0.0:
                self.pos = _add_counts(self.pos, torch.zeros(x.numel(), dtype=torch.long))
                return
            self.width = amax / _START_BINS
        self.pos = self._add(self.pos, x[x >= 0])
        self.neg = self._add(self.neg, -x[x < 0])
        while max(len(self.pos), len(self.neg)) > _MAX_BINS:
            self.width *= 2
            self.pos, self.neg = _halve(self.pos), _halve(self.neg)

    def _add(self, hist: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        return _add_counts(hist, torch.floor(values / self.width).long())

    def histogram(self) -> tuple[np.ndarray, np.ndarray]:
        """Bin centers (ascending) and counts over the whole signed range."""
        if self.width == 0.0:
            return np.zeros(1), self.pos.numpy()[:1] if len(self.pos) else np.zeros(1)
        w = self.width
        neg_c = -(np.arange(len(self.neg))[::-1] + 0.5) * w
        pos_c = (np.arange(len(self.pos)) + 0.5) * w
        return np.concatenate([neg_c, pos_c]), np.concatenate([self.neg.numpy()[::-1], self.pos.numpy()])


def _add_counts(hist: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    if idx.numel() == 0:
        return hist
    counts = torch.bincount(idx, minlength=len(hist)).double()
    if len(hist) < len(counts):
        hist = torch.cat([hist, torch.zeros(len(counts) - len(hist), dtype=torch.float64)])
    return hist + counts


def _halve(hist: torch.Tensor) -> torch.Tensor:
    if len(hist) % 2:
        hist = torch.cat([hist, torch.zeros(1, dtype=torch.float64)])
    return hist.view(-1, 2).sum(dim=1)


def _candidate_ranges(lo: float, hi: float, signed: bool) -> np.ndarray:
    """Shrinking clip ranges, shape (K, 2); a symmetric grid shrinks |x|, an asymmetric one both ends."""
    alphas = np.linspace(1.0 / _CANDIDATES, 1.0, _CANDIDATES)
    if signed:
        amax = max(-lo, hi)
        return np.stack([-alphas * amax, alphas * amax], axis=1)
    return np.stack([alphas * lo, alphas * hi], axis=1)


def _grid(lo: np.ndarray, hi: np.ndarray, bits: int, signed: bool) -> tuple[np.ndarray, np.ndarray, int, int]:
    """Vectorised twin of `ActQuantizer.qparams`: scale, zero-point, qmin, qmax for each range."""
    if signed:
        qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
        scale = np.maximum(np.maximum(-lo, hi) / qmax, 1e-12)
        return scale, np.zeros_like(scale), qmin, qmax
    qmin, qmax = 0, 2**bits - 1
    scale = np.maximum((hi - lo) / qmax, 1e-12)
    return scale, np.clip(np.round(-lo / scale), 0, qmax), qmin, qmax


class PercentileCalibrator(HistogramCalibrator):
    def __init__(self, percentile: float = 99.99) -> None:
        if not 50.0 < percentile <= 100.0:
            raise ValueError(f"percentile must be in (50, 100], got {percentile}")
        self.percentile = percentile
        super().__init__()

    def _compute_range(self, lo: float, hi: float, bits: int, signed: bool) -> tuple[float, float]:
        centers, counts = self.histogram()
        p = self.percentile / 100.0
        if signed:
            order = np.argsort(np.abs(centers), kind="stable")
            cdf = np.cumsum(counts[order]) / counts.sum()
            amax = min(abs(centers[order][np.searchsorted(cdf, p)]) + self.width / 2, max(-lo, hi))
            return -amax, amax
        cdf = np.cumsum(counts) / counts.sum()
        q_lo = centers[min(np.searchsorted(cdf, 1 - p), len(centers) - 1)] - self.width / 2
        q_hi = centers[min(np.searchsorted(cdf, p), len(centers) - 1)] + self.width / 2
        return max(min(q_lo, 0.0), lo), min(max(q_hi, 0.0), hi)


class MSECalibrator(HistogramCalibrator):
    """The candidate range with the least expected squared quantization error over the histogram."""

    def _compute_range(self, lo: float, hi: float, bits: int, signed: bool) -> tuple[float, float]:
        centers, counts = self.histogram()
        ranges = _candidate_ranges(lo, hi, signed)
        scale, zp, qmin, qmax = _grid(ranges[:, 0:1], ranges[:, 1:2], bits, signed)
        deq = (np.clip(np.round(centers[None, :] / scale) + zp, qmin, qmax) - zp) * scale
        err = ((deq - centers[None, :]) ** 2 * counts[None, :]).sum(axis=1)
        best = ranges[int(np.argmin(err))]
        return float(best[0]), float(best[1])


class EntropyCalibrator(HistogramCalibrator):
    """TensorRT's KL-divergence threshold search, generalised to asymmetric grids."""

    def _compute_range(self, lo: float, hi: float, bits: int, signed: bool) -> tuple[float, float]:
        centers, counts = self.histogram()
        levels = 2**bits
        ranges = _candidate_ranges(lo, hi, signed)
        scale, zp, qmin, qmax = _grid(ranges[:, 0], ranges[:, 1], bits, signed)
        best, best_kl = ranges[-1], np.inf
        for k in range(len(ranges)):
            inside = (centers >= ranges[k, 0]) & (centers <= ranges[k, 1])
            if inside.sum() < levels:  # too few bins to say anything about this range
                continue
            p = np.where(inside, counts, 0.0)
            first, last = np.argmax(inside), len(inside) - 1 - np.argmax(inside[::-1])
            p[first] += counts[:first].sum()
            p[last] += counts[last + 1 :].sum()
            # Q quantizes the clipped histogram *without* the folded-in outliers, so clipping costs KL.
            c = np.where(inside, counts, 0.0)
            level = (np.clip(np.round(centers / scale[k]) + zp[k], qmin, qmax)).astype(np.int64) - qmin
            level_mass = np.bincount(level[inside], weights=c[inside], minlength=levels)
            level_bins = np.bincount(level[inside], weights=(c[inside] > 0).astype(float), minlength=levels)
            q = np.where(c > 0, level_mass[level] / np.maximum(level_bins[level], 1), 0.0)
            kl = _kl(p, q)
            if kl < best_kl:
                best, best_kl = ranges[k], kl
        return float(best[0]), float(best[1])


def _kl(p: np.ndarray, q: np.ndarray) -> float:
    p = p / p.sum()
    q = q / max(q.sum(), 1e-12)
    mask = p > 0
    return float(np.sum(p[mask] * np.log(p[mask] / np.maximum(q[mask], 1e-12))))


def make_calibrator(name: CalibratorName, percentile: float = 99.99) -> Calibrator:
    if name == "minmax":
        return MinMaxCalibrator()
    if name == "percentile":
        return PercentileCalibrator(percentile)
    if name == "mse":
        return MSECalibrator()
    if name == "entropy":
        return EntropyCalibrator()
    raise ValueError(f"unknown calibrator {name!r}; choose one of {', '.join(CALIBRATORS)}")
