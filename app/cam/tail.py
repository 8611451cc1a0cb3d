"""The part of a model after one of its layers, as a module of its own, when that is exact.

``model_tail(model, "layer4")`` traces the model with ``torch.fx`` and keeps the nodes between the
layer's output and the model's output. It returns ``None`` when the output also depends on the
input by another path (a skip connection around the layer), when the layer runs more than once, or
when the model cannot be traced: then the caller runs the whole model with a hook instead.
"""

from __future__ import annotations

import logging

import torch.fx
from torch import nn

logger = logging.getLogger(__name__)


def model_tail(model: nn.Module, layer: str) -> torch.fx.GraphModule | None:
    """``tail(activation) == model(x)`` for the activation that ``layer`` outputs on ``x``."""
    tracer = _LayerAsLeaf(layer)
    try:
        traced = tracer.trace(model)
    except Exception as exc:  # data-dependent control flow, untraceable ops: no fast path
        logger.debug("no fx tail for %s: %s", layer, exc)
        return None
    calls = [n for n in traced.nodes if n.op == "call_module" and n.target == layer]
    if len(calls) != 1:
        return None
    start = calls[0]
    output = next(n for n in traced.nodes if n.op == "output")
    needed: set[torch.fx.Node] = set()
    stack = [output]
    while stack:
        node = stack.pop()
        if node in needed:
            continue
        needed.add(node)
        if node is start:
            continue
        if node.op == "placeholder":
            return None  # the output reaches the input without passing through the layer
        stack.extend(node.all_input_nodes)
    graph = torch.fx.Graph()
    env = {start: graph.placeholder("activation")}
    for node in traced.nodes:
        if node in needed and node is not start:
            env[node] = graph.node_copy(node, lambda n: env[n])
    return torch.fx.GraphModule(model, graph)


class _LayerAsLeaf(torch.fx.Tracer):
    """Traces through containers as usual, but keeps the target layer as one call."""

    def __init__(self, layer: str) -> None:
        super().__init__()
        self.layer = layer

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return qualified_name == self.layer or super().is_leaf_module(module, qualified_name)
