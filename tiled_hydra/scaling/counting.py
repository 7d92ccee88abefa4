"""Components of a model slot, and what each one costs (paper 003, Eq. 1-3).

A slot's components are found by name, never from a per-model table:
- ``backbone``: the frozen run backbone (``slot.backbone``);
- every direct named child of ``slot.model`` (``flows``, ``bottleneck``, ``decoder``, ``pca``,
  and for the models still to come ``teacher``, ``student``, ``autoencoder``, ``unet``, ...);
  any other direct child of the slot joins the same way;
- the head: the parameters and buffers of ``slot.model`` itself (PaDiM's per-patch Gaussians,
  PatchCore's memory bank) together with the work of ``slot.model.forward`` outside its child
  modules (Mahalanobis distance, faiss kNN search, upsampling, blur).  It is named after its
  largest table of fitted statistics (``whitening``, ``memory_bank``), or ``head`` when it has none;
- ``other``: the rest of the step (feature concatenation, normalisation, ...), time only.

Memory as paper 003 defines it (Eq. 1): M = sum over layers l of p(l) d_p + a(l) d_a, with
p(l) the parameters of layer l and a(l) = H_out W_out C_out its output activation (Eq. 3), at
batch size 1.  Layers are the leaf modules; a(l) is the size of a leaf's output tensors.  A
layer called several times in one step (DDAD's U-Net over its denoising steps) counts once, as
the paper counts the sequential U-Net once: the largest of its outputs over the calls.  The
head's activation is the output of ``slot.model.forward`` (the anomaly map and score).  Tensors
made by functional code between layers (PaDiM's whitened deltas, faiss' distance tables) are not
layers: they appear only in the measured peak.
"""

from __future__ import annotations

import re
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

BACKBONE = "backbone"
HEAD = "head"
OTHER = "other"


def tensor_bytes(tensors) -> int:
    """numel * element_size summed over the tensors found in an output (tensor, tuple, list, dict)."""
    if isinstance(tensors, torch.Tensor):
        return tensors.numel() * tensors.element_size()
    if isinstance(tensors, (tuple, list)):
        return sum(tensor_bytes(t) for t in tensors)
    if isinstance(tensors, dict):
        return sum(tensor_bytes(t) for t in tensors.values())
    return 0


def state_bytes(module: nn.Module, recurse: bool = True) -> int:
    """Bytes of parameters and buffers (Eq. 1's p(l) d_p; buffers hold fitted statistics)."""
    tensors = list(module.parameters(recurse=recurse)) + [b for b in module.buffers(recurse=recurse) if b is not None]
    return sum(t.numel() * t.element_size() for t in tensors)


def leaves(module: nn.Module) -> list[nn.Module]:
    """The layers of Eq. 1: modules without children (a leaf component is its own layer)."""
    found = [m for m in module.modules() if next(m.children(), None) is None]
    return found or [module]


def callables(module: nn.Module) -> list[nn.Module]:
    """Modules whose calls bracket a component's time: the module itself, or, for containers that
    are never called (ModuleList, ModuleDict), their members."""
    if isinstance(module, (nn.ModuleList, nn.ModuleDict)):
        return [m for child in module.children() for m in callables(child)]
    return [module]


def head_name(model: nn.Module) -> str:
    """The head is named after the model's largest own table of fitted statistics: a floating-point
    buffer or parameter with at least two non-singleton dimensions (PaDiM's ``whitening``,
    PatchCore's ``memory_bank`` (M, D)); index vectors and per-channel constants do not name it.
    A table held in numbered blocks (PaDiM's ``whitening_0``, ``whitening_1``, ...) is one table."""
    sizes: dict[str, int] = defaultdict(int)
    for name, t in [*model.named_buffers(recurse=False), *model.named_parameters(recurse=False)]:
        if t is not None and t.is_floating_point() and sum(s > 1 for s in t.shape) >= 2:
            sizes[re.sub(r"_\d+$", "", name)] += t.numel()
    return max(sizes, key=sizes.get) if sizes else HEAD


def components(slot: nn.Module) -> dict[str, nn.Module]:
    """Named components of a slot (see the module docstring), in step order: backbone first."""
    parts: dict[str, nn.Module] = {}
    for name, child in slot.named_children():
        if name == "model":
            continue
        parts[name] = child
    model = getattr(slot, "model", None)
    if isinstance(model, nn.Module):
        for name, child in model.named_children():
            parts[name if name not in parts else f"model.{name}"] = child
    return parts


class ComponentProbe:
    """Forward hooks on a slot: activation bytes per layer and wall-clock time per component.

    ``with probe.recording(): slot.predict_tiles(x)`` fills ``activation_bytes()`` and
    ``seconds`` (summed over the calls of the last recording).  On CUDA every hook synchronises,
    so time is the device's, not the launch queue's.
    """

    def __init__(self, slot: nn.Module, device: torch.device | str = "cpu"):
        self.slot = slot
        self.sync = torch.device(device).type == "cuda"
        self.parts = components(slot)
        model = getattr(slot, "model", None)
        self.model = model if isinstance(model, nn.Module) else None
        self.head = head_name(self.model) if self.model is not None else HEAD
        self.layer_of: dict[nn.Module, str] = {}
        for name, module in self.parts.items():
            for leaf in leaves(module):
                self.layer_of.setdefault(leaf, name)
        self._handles: list = []
        self.reset()

    @property
    def names(self) -> list[str]:
        """Component names in report order: backbone, model children, head, other."""
        return list(self.parts) + [self.head, OTHER]

    def state_bytes(self) -> dict[str, int]:
        out = {name: state_bytes(module) for name, module in self.parts.items()}
        out[self.head] = state_bytes(self.model, recurse=False) if self.model is not None else 0
        out[OTHER] = 0
        return out

    def reset(self) -> None:
        self.layer_bytes: dict[nn.Module, int] = {}
        self.head_output_bytes = 0
        self.seconds: dict[str, float] = defaultdict(float)
        self._start: dict[int, float] = {}

    def activation_bytes(self) -> dict[str, int]:
        out = dict.fromkeys(self.names, 0)
        for layer, size in self.layer_bytes.items():
            out[self.layer_of[layer]] += size
        out[self.head] += self.head_output_bytes
        return out

    # -- hooks ----------------------------------------------------------------------------
    def now(self) -> float:
        if self.sync:
            torch.cuda.synchronize()
        return time.perf_counter()

    def _pre(self, module, args):
        self._start[id(module)] = self.now()

    def _post_timer(self, name: str):
        def hook(module, args, output):
            self.seconds[name] += self.now() - self._start.pop(id(module))
        return hook

    def _layer(self, module, args, output):
        self.layer_bytes[module] = max(self.layer_bytes.get(module, 0), tensor_bytes(output))

    def _head_output(self, module, args, output):
        self.head_output_bytes = max(self.head_output_bytes, tensor_bytes(output))

    @contextmanager
    def recording(self) -> Iterator["ComponentProbe"]:
        self.reset()
        hooks = []
        for layer in self.layer_of:
            hooks.append(layer.register_forward_hook(self._layer))
        for name, module in self.parts.items():
            for target in callables(module):
                hooks.append(target.register_forward_pre_hook(self._pre))
                hooks.append(target.register_forward_hook(self._post_timer(name)))
        if self.model is not None:
            hooks.append(self.model.register_forward_pre_hook(self._pre))
            hooks.append(self.model.register_forward_hook(self._post_timer("__model__")))
            hooks.append(self.model.register_forward_hook(self._head_output))
        try:
            yield self
        finally:
            for handle in hooks:
                handle.remove()

    def component_seconds(self, total: float) -> dict[str, float]:
        """Seconds per component of a step that took ``total`` seconds.

        Head = time inside ``slot.model.forward`` minus the model children called from there;
        other = the rest of the step.  Child time spent outside ``forward`` (e.g. a model's
        ``embed`` calling a child) stays with the child.
        """
        out = {name: self.seconds.get(name, 0.0) for name in self.parts}
        model_children = set(self.model._modules) if self.model is not None else set()
        inside = self.seconds.get("__model__", 0.0)
        # children of the model are normally called from its forward; cap at the forward's time
        child_time = sum(out[n] for n in self.parts if n in model_children)
        out[self.head] = max(0.0, inside - child_time)
        out[OTHER] = max(0.0, total - sum(out.values()))
        return out
