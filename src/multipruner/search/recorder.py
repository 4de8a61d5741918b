"""Each decoder layer's input, recorded during one forward, so that a later call can restart any layer.

The hidden states entering layer ``i`` and its call arguments (mask, rotary tables: whatever the family
passes) are all a layer needs. The scorer re-runs candidates' tails from them; compensation walks the
pruned model layer by layer from them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


class LayerInputRecorder:
    """Forward pre-hooks that keep each decoder layer's input hidden states and keyword arguments.

    Use it as a context manager around the forward to record: the hooks are removed on the way out,
    also when the forward raises.
    """

    def __init__(self, layers: nn.ModuleList):
        self.inputs: list[torch.Tensor | None] = [None] * len(layers)
        self.kwargs: list[dict] = [{} for _ in layers]
        self._handles = [
            layer.register_forward_pre_hook(self._hook(i), with_kwargs=True) for i, layer in enumerate(layers)
        ]

    def _hook(self, index: int) -> Callable:
        def record(module, args, kwargs):
            if args:
                self.inputs[index], self.kwargs[index] = args[0], dict(kwargs)
            else:
                kw = dict(kwargs)
                self.inputs[index], self.kwargs[index] = kw.pop("hidden_states"), kw

        return record

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()

    def __enter__(self) -> LayerInputRecorder:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def layer_output(out) -> torch.Tensor:
    """The hidden states out of a decoder layer or branch call (some families return a tuple)."""
    return out[0] if isinstance(out, tuple) else out
