"""The units a reconstruction optimises one at a time, found from the traced graph of any CNN.

A unit must take one tensor and give one tensor, so that it can be run alone on cached inputs and
its output compared with the float model's. Such boundaries are the graph's cut points: nodes
after which theirs is the only value still needed (inside a residual block the skip is live too,
so no cut falls there). AdaRound's units are single layers (a conv and the BatchNorm after it);
BRECQ's are blocks: consecutive cut segments are merged while their convs sit in the same block,
where a block is the module at the depth at which the graph's residual segments live
(`layer1.0` in a ResNet, `features.3.conv` in a MobileNetV2, `features.2.1.block` in an
EfficientNet), so an inverted-residual block without a skip is still one unit, and the stem and
the last conv are units of their own.
"""

from dataclasses import dataclass
from typing import Literal

from torch import fx, nn

from ssql_deploy.quant.placement import ADD_OPS
from ssql_deploy.quant.quantizer import QuantConv2d

Granularity = Literal["layer", "block"]


@dataclass(frozen=True)
class Unit:
    name: str
    entry: fx.Node  # the one tensor going in
    nodes: tuple[fx.Node, ...]  # in graph order, the last one is the unit's output
    layers: tuple[str, ...]  # the quantized convs inside

    @property
    def exit(self) -> fx.Node:
        return self.nodes[-1]


def _conv_path(gm: fx.GraphModule, node: fx.Node) -> str | None:
    if node.op == "call_module" and isinstance(gm.get_submodule(str(node.target)), QuantConv2d):
        return str(node.target)
    return None


def cut_points(gm: fx.GraphModule) -> list[fx.Node]:
    """Nodes whose value is, right after them, the only one any later node still needs."""
    nodes = [n for n in gm.graph.nodes if n.op != "output"]
    last_use = {n: i for i, node in enumerate(gm.graph.nodes) for n in node.all_input_nodes}
    cuts, live = [], set()
    for i, node in enumerate(nodes):
        live = {n for n in live if last_use.get(n, -1) > i} | ({node} if node.users else set())
        if live == {node}:
            cuts.append(node)
    return cuts


def _segments(gm: fx.GraphModule) -> list[tuple[fx.Node, list[fx.Node]]]:
    order = list(gm.graph.nodes)
    cuts = cut_points(gm)
    return [(a, order[order.index(a) + 1 : order.index(b) + 1]) for a, b in zip(cuts, cuts[1:], strict=False)]


def _block_depth(gm: fx.GraphModule, segments: list[tuple[fx.Node, list[fx.Node]]]) -> int | None:
    """The module depth of the graph's residual blocks: the common prefix of the convs of each segment with an Add."""
    depths = []
    for _, nodes in segments:
        convs = [p.split(".") for n in nodes if (p := _conv_path(gm, n))]
        if convs and any(n.op == "call_function" and n.target in ADD_OPS for n in nodes):
            common = 0
            while all(len(c) > common + 1 and c[common] == convs[0][common] for c in convs):
                common += 1
            depths.append(common)
    deep = [d for d in depths if d > 0]
    return min(deep) if deep else None


def find_units(gm: fx.GraphModule, granularity: Granularity) -> list[Unit]:
    if granularity == "layer":
        units = []
        for node in gm.graph.nodes:
            path = _conv_path(gm, node)
            if path is None:
                continue
            users = list(node.users)
            bn = users[0] if len(users) == 1 and users[0].op == "call_module" and isinstance(gm.get_submodule(str(users[0].target)), nn.BatchNorm2d) else None  # fmt: skip
            units.append(Unit(path, node.args[0], (node, bn) if bn is not None else (node,), (path,)))  # type: ignore[arg-type]
        return units
    segments = _segments(gm)
    depth = _block_depth(gm, segments)
    merged: list[tuple[str | None, fx.Node, list[fx.Node]]] = []
    for entry, nodes in segments:
        paths = [p for n in nodes if (p := _conv_path(gm, n))]
        key = None if not paths else (".".join(paths[0].split(".")[:depth]) if depth else paths[0])
        if merged and (key is None or key == merged[-1][0] or merged[-1][0] is None):
            previous_key, previous_entry, previous_nodes = merged[-1]
            merged[-1] = (previous_key or key, previous_entry, previous_nodes + nodes)
        else:
            merged.append((key, entry, list(nodes)))
    units = []
    for key, entry, nodes in merged:
        layers = tuple(p for n in nodes if (p := _conv_path(gm, n)))
        if layers:
            units.append(Unit(str(key), entry, tuple(nodes), layers))
    return units


def unit_module(gm: fx.GraphModule, unit: Unit) -> fx.GraphModule:
    """The unit alone, as a module of one input sharing `gm`'s submodules (and so its parameters and quantizers)."""
    graph = fx.Graph()
    env = {unit.entry: graph.placeholder("x")}
    for node in unit.nodes:
        env[node] = graph.node_copy(node, lambda n: env[n])
    graph.output(env[unit.exit])
    return fx.GraphModule(gm, graph)


def value_module(gm: fx.GraphModule, target: fx.Node) -> fx.GraphModule:
    """The network up to `target`, returning its value (the input of a unit, or a float unit's output)."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for node in gm.graph.nodes:
        env[node] = graph.node_copy(node, lambda n: env[n])
        if node is target:
            break
    graph.output(env[target])
    return fx.GraphModule(gm, graph)
