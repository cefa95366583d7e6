"""Mixed precision under a budget: per-layer widths that minimise the summed sensitivity, by an exact integer program.

HAWQ-v3 (which the SSQL reference code carries) and ModelOpt's auto_quantize choose per-layer
widths this way. Each weight layer i and activation point j gets one width b from the analysed
ones (binary x_ib, y_jb, each summing to one); the objective is the sum of their measured
sensitivities (analyze/sensitivity.py), made monotone in the width (see monotone_costs); the budget is
one or more linear constraints:

- `avg-wbits=A`: the parameter-weighted mean weight width is at most A (what a weight budget buys);
- `size-mb=X`: the quantized conv weights, packed at their widths, take at most X MB (10^6 bytes);
- `avg-abits=A`: the element-weighted mean activation width is at most A (activation traffic);
- `bops=Y`: sum over convs of MACs x weight width x input activation width is at most Y
  (in GBOPs per image; the product is linearised with one binary per conv and width pair; an input
  that is not quantized in the analysed layout, the image, counts as 8 bits, as runtimes run it).

Without an activation budget every activation takes the width that costs least, which is the
widest. scipy's `milp` (HiGHS) solves it exactly; the widths ONNX Runtime and TensorRT run are
all of 2..8 (both execute them on 8-bit kernels), so no width is excluded for a runtime.
"""

import fnmatch
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import lil_matrix

from ssql_deploy.errors import UserError
from ssql_deploy.quant.config import LayerSpec, Override, QuantConfig

BUDGET_KINDS = ("avg-wbits", "size-mb", "avg-abits", "bops")
TIE_BREAK = 1e-5  # per bit below the widest: prefers the wider of two widths that measured alike
_TERM = re.compile(r"^(?P<kind>[a-z-]+)=(?P<value>[0-9.]+)$")


@dataclass(frozen=True)
class Budget:
    limits: dict[str, float]

    @classmethod
    def parse(cls, text: str) -> "Budget":
        """'avg-wbits=4.5' or several joined by commas: 'avg-wbits=4,avg-abits=6'."""
        limits: dict[str, float] = {}
        for term in (t.strip() for t in text.split(",") if t.strip()):
            match = _TERM.match(term.lower())
            if match is None or match["kind"] not in BUDGET_KINDS:
                raise UserError(f"malformed --budget term {term!r}", f"write KIND=NUMBER with KIND one of {', '.join(BUDGET_KINDS)}, "
                                "e.g. --budget avg-wbits=4.5")  # fmt: skip
            limits[match["kind"]] = float(match["value"])
        if not limits:
            raise UserError("--budget is empty", "e.g. --budget avg-wbits=4.5")
        return cls(limits)

    def __str__(self) -> str:
        return ",".join(f"{k}={v:g}" for k, v in self.limits.items())


def _check_rows(sensitivity: dict[str, Any], budget: Budget) -> None:
    needs = {"bops": ("macs", "weights"), "avg-abits": ("elements", "activations")}
    for kind, (field, role) in needs.items():
        if kind in budget.limits and any(field not in row for row in sensitivity[role]):
            raise UserError(f"the sensitivity analysis has no {field} per layer, which a {kind} budget needs",
                            "re-run `ssql-deploy analyze` with this version")  # fmt: skip


def solve(sensitivity: dict[str, Any], budget: Budget, stem: tuple[str, ...] = ()) -> dict[str, Any]:
    """The per-layer widths minimising summed sensitivity within `budget`, as a QuantConfig and the totals it reaches."""
    _check_rows(sensitivity, budget)
    bits = [int(b) for b in sensitivity["bits"]]
    weights, acts = sensitivity["weights"], _by_layer(sensitivity["activations"])
    nb = len(bits)
    n_w, n_a = len(weights) * nb, len(acts) * nb
    point_of = {point: j for j, row in enumerate(acts) for point in row["points"]}
    pairs = [(i, point_of[row["input_point"]]) for i, row in enumerate(weights) if row.get("input_point") in point_of]
    n_z = len(pairs) * nb * nb if "bops" in budget.limits else 0
    n = n_w + n_a + n_z
    cost = np.zeros(n)
    for i, row in enumerate(weights):
        cost[i * nb : (i + 1) * nb] = monotone_costs(row["sensitivity"], bits, bits, TIE_BREAK)
    for j, row in enumerate(acts):
        cost[n_w + j * nb : n_w + (j + 1) * nb] = monotone_costs(row["sensitivity"], bits, bits, TIE_BREAK)
    rows: list[tuple[dict[int, float], float, float]] = []  # (coefficients, lower, upper)
    for k in range(len(weights) + len(acts)):
        rows.append(({k * nb + t: 1.0 for t in range(nb)}, 1.0, 1.0))  # one width per quantizer
    params = np.array([row["params"] for row in weights], dtype=float)
    if "avg-wbits" in budget.limits:
        rows.append(({i * nb + t: params[i] * b for i in range(len(weights)) for t, b in enumerate(bits)}, -np.inf,
                     budget.limits["avg-wbits"] * params.sum()))  # fmt: skip
    if "size-mb" in budget.limits:
        rows.append(({i * nb + t: params[i] * b / 8e6 for i in range(len(weights)) for t, b in enumerate(bits)}, -np.inf,
                     budget.limits["size-mb"]))  # fmt: skip
    if "avg-abits" in budget.limits:
        elements = np.array([row["elements"] for row in acts], dtype=float)
        rows.append(({n_w + j * nb + t: elements[j] * b for j in range(len(acts)) for t, b in enumerate(bits)}, -np.inf,
                     budget.limits["avg-abits"] * elements.sum()))  # fmt: skip
    if n_z:
        bops: dict[int, float] = {}
        for p, (i, j) in enumerate(pairs):
            for t, bw in enumerate(bits):
                for u, ba in enumerate(bits):
                    z = n_w + n_a + (p * nb + t) * nb + u
                    x, y = i * nb + t, n_w + j * nb + u
                    # z >= x + y - 1 is all the linearisation needs: z costs nothing and only counts against the budget
                    rows.append(({z: 1.0, x: -1.0, y: -1.0}, -1.0, np.inf))
                    bops[z] = weights[i]["macs"] * bw * ba / 1e9
        paired = {i for i, _ in pairs}
        for i, row in enumerate(weights):  # a conv on a float input (the image): the runtime quantizes that input at 8 bits
            if i not in paired:
                bops |= {i * nb + t: row["macs"] * bw * 8 / 1e9 for t, bw in enumerate(bits)}
        rows.append((bops, -np.inf, budget.limits["bops"]))
    matrix = lil_matrix((len(rows), n))
    for r, (coefficients, _, _) in enumerate(rows):
        for c, v in coefficients.items():
            matrix[r, c] = v
    constraint = LinearConstraint(matrix.tocsr(), [lo for _, lo, _ in rows], [hi for _, _, hi in rows])
    options = {"time_limit": 120, "mip_rel_gap": 0.0}  # the exact optimum, so the tie-break in monotone_costs holds
    found = milp(cost, constraints=constraint, integrality=np.ones(n), bounds=Bounds(0, 1), options=options)
    if found.x is None:
        raise UserError(f"no per-layer widths from {bits} meet --budget {budget}",
                        f"loosen the budget (the narrowest plan needs {_narrowest(weights, acts, bits)}) or analyse narrower widths")  # fmt: skip
    choice = np.round(found.x).astype(int)
    w_bits = [bits[int(np.argmax(choice[i * nb : (i + 1) * nb]))] for i in range(len(weights))]
    a_bits = [bits[int(np.argmax(choice[n_w + j * nb : n_w + (j + 1) * nb]))] for j in range(len(acts))]
    objective = sum(monotone_costs(row["sensitivity"], [b], bits)[0] for row, b in zip(weights + acts, w_bits + a_bits, strict=True))
    return {"config": to_config(weights, acts, w_bits, a_bits, stem), "budget": str(budget), "optimal": bool(found.status == 0),
            "objective": round(objective, 6), **totals(weights, acts, w_bits, a_bits)}  # fmt: skip


def monotone_costs(sensitivity: dict[str, float], widths: list[int], analysed: list[int], tie_break: float = 0.0) -> list[float]:
    """The cost of each of `widths`: the measured sensitivity made non-negative and never lower at a narrower width.

    A measured loss change is noisy: a layer can score a little *better* at 4 bits than at 8 on the
    validation images, and the optimiser would then buy that noise (an activation budget left free
    came out at 5.9 bits on average). More bits never hurt in expectation, so a width costs at least
    what any wider analysed one costs; among equal costs a tiny per-bit charge (far below any measured
    difference) makes the wider width win.
    """
    widest = max(analysed)
    return [max(max(sensitivity[str(w)] for w in analysed if w >= b), 0.0) + tie_break * (widest - b) for b in widths]


def _by_layer(points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Activation points grouped by the module they follow: a config sets one width per module name, and a module
    called twice (a ResNet block's one ReLU) has two points. Sensitivities add, as the objective assumes throughout."""
    groups: dict[str, dict[str, Any]] = {}
    for row in points:
        group = groups.setdefault(row["layer"], {"layer": row["layer"], "points": [], "sensitivity": {}, "elements": 0})
        group["points"].append(row["point"])
        for b, v in row["sensitivity"].items():
            group["sensitivity"][b] = group["sensitivity"].get(b, 0.0) + v
        group["elements"] += row.get("elements", 0)
    return list(groups.values())


def _narrowest(weights: list[dict[str, Any]], acts: list[dict[str, Any]], bits: list[int]) -> str:
    low = totals(weights, acts, [min(bits)] * len(weights), [min(bits)] * len(acts))
    return f"avg-wbits={low['avg_wbits']:g}, size-mb={low['size_mb']:g}"


def totals(weights: list[dict[str, Any]], acts: list[dict[str, Any]], w_bits: list[int], a_bits: list[int]) -> dict[str, Any]:
    """What a plan costs: mean weight width, packed weight size, mean activation width (when sizes are known)."""
    params = np.array([row["params"] for row in weights], dtype=float)
    out: dict[str, Any] = {"avg_wbits": round(float(params @ np.array(w_bits)) / float(params.sum()), 4),
                           "size_mb": round(float(params @ np.array(w_bits)) / 8e6, 6)}  # fmt: skip
    elements = np.array([row.get("elements", 0) for row in acts], dtype=float)
    if elements.sum() > 0:
        out["avg_abits"] = round(float(elements @ np.array(a_bits)) / float(elements.sum()), 4)
    return out


def to_config(weights: list[dict[str, Any]], acts: list[dict[str, Any]], w_bits: list[int], a_bits: list[int],
              stem: tuple[str, ...] = ()) -> QuantConfig:  # fmt: skip
    """The plan as a QuantConfig: the most common widths as defaults, an exact-name override per layer that differs.

    Stem layers are always written out, since the config's default stem override (w8a8) would otherwise win.
    """
    w_default = max(set(w_bits), key=w_bits.count)
    a_default = max(set(a_bits), key=a_bits.count)
    specs: dict[str, dict[str, int]] = {}
    for row, b in zip(weights, w_bits, strict=True):
        specs.setdefault(row["layer"], {})["w"] = b
    for row, b in zip(acts, a_bits, strict=True):
        specs.setdefault(row["layer"], {})["a"] = b
    overrides = [
        Override(pattern=layer, spec=LayerSpec(w=spec.get("w"), a=spec.get("a")))
        for layer, spec in specs.items()
        if any(fnmatch.fnmatchcase(layer, p) for p in stem)
        or spec.get("w", w_default) != w_default
        or spec.get("a", a_default) != a_default
    ]
    return QuantConfig(w=w_default, a=a_default, overrides=tuple(overrides))
