"""Hidden states of chosen layers only, at chosen positions, taken by forward hooks.

`output_hidden_states=True` keeps every layer's full [b, T, D] output until the forward returns,
so a logging pass would hold L + 1 of them. `HiddenCapture` keeps only the requested indices and
only the requested positions (a copy, so the layer's full output is freed as usual), or hands each
one to a callback and keeps nothing.

Indices are those of `hidden_states` (transformers 5.x): 0 is the input of the first decoder layer
(the embedding output), k in 1..L-1 the output of decoder layer k (attention `layer_idx` k-1), and
L the final-normed output (the final norm's output, which HF puts in the last entry).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from .anatomy import decoder_layers
from .lens import Readout


def _first(output) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


class HiddenCapture:
    """Within the context, a forward records `hidden_states[k][:, positions]` for k in `layers`.

    >>> with HiddenCapture(model, readout, [0, 3, L], slice(P - 1, P - 1 + C)) as cap:
    ...     anatomy.backbone_of(model)(input_ids=ids, attention_mask=mask, use_cache=False)
    >>> cap.hidden[3]   # [b, C, D]

    `on_capture(k, h)`: called with each slice instead of storing it (then `hidden` stays empty).
    """

    def __init__(self, model: nn.Module, readout: Readout, layers: Iterable[int], positions: slice,
                 on_capture: Callable[[int, torch.Tensor], None] | None = None) -> None:
        self.layers = sorted(set(layers))
        bad = [k for k in self.layers if not 0 <= k <= readout.num_layers]
        if bad:
            raise ValueError(f"hidden_states indices {bad} out of range 0..{readout.num_layers}")
        self.model, self.readout, self.positions = model, readout, positions
        self.on_capture = on_capture
        self.hidden: dict[int, torch.Tensor] = {}
        self._handles: list = []
        self._busy = False

    def _keep(self, k: int, h: torch.Tensor) -> None:
        if self._busy:  # a callback that applies the final norm (a logit lens) is not the model's forward
            return
        piece = h[:, self.positions]
        if self.on_capture is not None:
            self._busy = True
            try:
                self.on_capture(k, piece)
            finally:
                self._busy = False
        else:
            self.hidden[k] = piece.detach().clone()

    def __enter__(self) -> HiddenCapture:
        self.hidden.clear()
        blocks = decoder_layers(self.model)
        L = self.readout.num_layers
        for k in self.layers:
            if k == 0:
                def pre(module, args, kwargs):
                    self._keep(0, args[0] if args else kwargs["hidden_states"])
                self._handles.append(blocks[0].register_forward_pre_hook(pre, with_kwargs=True))
            else:
                module = self.readout.norm if k == L else blocks[k - 1]
                self._handles.append(module.register_forward_hook(
                    lambda mod, args, out, k=k: self._keep(k, _first(out))))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
