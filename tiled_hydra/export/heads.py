"""Traceable forms of the slot models: what ``torch.onnx.export`` records for each slot.

Each head computes what the engine computes for a slot's tiles, as fixed graph operations over
a batch of any size:

``FeatureHead``  the model's own ``predict_features`` (Reverse Distillation, and any model that
                 traces as it is);
``FastflowHead`` FastFlow's forward after its layer norm with the shapes fixed;
``PadimHead``    PaDiM's Mahalanobis map over the whitening's row blocks (the model's forward
                 sizes its chunks with Python numbers from the input shape, which a trace freezes);
``PadimIPCAHead`` PaDiM-IPCA's subspace Mahalanobis distance (``mT`` has no ONNX form);
``PatchcoreHead`` PatchCore's nearest-neighbour search as an exact L2 over the whole memory bank
                 (|p|^2 + |m|^2 - 2 p.m, as faiss's IndexFlatL2 computes it for batches of queries)
                 with ArgMin/TopK, so the bank is a constant of the graph and no faiss is needed;
``PixelHead``    models that take the tiles' pixels (EfficientAD); bfloat16 autocast, which an
                 ONNX graph cannot express, is reproduced by rounding to bfloat16 exactly where
                 autocast does (:class:`Bf16Conv2d`).

:func:`traceable` makes the shared Gaussian blur one convolution per call while tracing: its
batch chunking (a memory bound for large batches) would freeze the trace's batch size.
"""

from __future__ import annotations

import contextlib
import copy

import torch
import torch.nn.functional as F
from torch import nn

from tiled_hydra.core import filters
from tiled_hydra.core.filters import gaussian_blur, upsample
from tiled_hydra.models.padim.torch_model import concat_stages, row_block_bounds


@contextlib.contextmanager
def traceable():
    """The blur without batch chunks (one convolution pass for any batch) while a graph is traced."""
    saved = filters._BLUR_CHUNK_BYTES
    filters._BLUR_CHUNK_BYTES = 2**62
    try:
        yield
    finally:
        filters._BLUR_CHUNK_BYTES = saved


class FeatureHead(nn.Module):
    def __init__(self, model, tile_size: tuple[int, int]):
        super().__init__()
        self.net, self.tile_size = model.model, tuple(tile_size)  # the slot's own weights, not the backbone's
        self.__dict__["predict_features"] = model.predict_features  # called, not registered as a submodule

    def forward(self, *stages: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.predict_features(list(stages), self.tile_size)


class FastflowHead(nn.Module):
    """FastFlow's map; its layer norm's shape is fixed here (read from the stages it normalises, a
    trace would record it as a shape computation, which ONNX's LayerNormalization cannot take)."""

    def __init__(self, model, tile_size: tuple[int, int], stages: tuple[torch.Tensor, ...]):
        super().__init__()
        self.net, self.tile_size = model.model, tuple(tile_size)
        self.shapes = [tuple(int(v) for v in s.shape[1:]) for s in stages]

    def forward(self, *stages: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        normalized = tuple(F.layer_norm(s, shape) for s, shape in zip(stages, self.shapes))  # fastflow.normalize
        return self.net(normalized, self.tile_size)


class PadimHead(nn.Module):
    def __init__(self, model, tile_size: tuple[int, int]):
        super().__init__()
        padim = model.model
        self.tile_size, self.blur_sigma = tuple(tile_size), float(padim.blur_sigma)
        self.register_buffer("channel_index", padim.channel_index.clone())
        self.register_buffer("mean", padim.mean.detach().float().clone())
        self.blocks = nn.ParameterList(nn.Parameter(b.detach().float().clone(), requires_grad=False) for b in padim.whitening_blocks)
        self.ends = row_block_bounds(len(padim.channel_index))[1:]

    def forward(self, *stages: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # embed() picks each stage's channels before upsampling; nearest upsampling copies values, so
        # concatenating first and picking after gives the same numbers
        embedding = concat_stages(list(stages)).index_select(1, self.channel_index)
        h, w = embedding.shape[-2:]
        delta = embedding.flatten(2).permute(2, 0, 1) - self.mean.unsqueeze(1)  # (P, B, D)
        squared = None
        for end, block in zip(self.ends, self.blocks):  # |W delta|^2 summed over W's row blocks, in order
            part = torch.matmul(delta[:, :, :end], block).square().sum(-1)
            squared = part if squared is None else squared + part
        maps = squared.sqrt().t().reshape(-1, h, w)
        maps = gaussian_blur(upsample(maps, self.tile_size), self.blur_sigma)
        return maps, maps.flatten(1).amax(dim=1)


class PadimIPCAHead(nn.Module):
    """PaDiM-IPCA's Mahalanobis distance in the kept subspace, in the model's dtype (float64 by default);
    the transposed components and inverse variances are constants of the graph."""

    def __init__(self, model, tile_size: tuple[int, int]):
        super().__init__()
        ipca = model.model
        pca = ipca.pca
        self.tile_size, self.blur_sigma = tuple(tile_size), float(ipca.blur_sigma)
        self.register_buffer("channel_index", ipca.channel_index.clone())
        self.register_buffer("mean", pca.mean.detach().clone().unsqueeze(-1))  # (P, m, 1)
        self.register_buffer("components_t", pca.components.detach().mT.contiguous())  # (P, c, m)
        self.register_buffer("inverse_variances", pca.inverse_variances(ipca.variance_rtol).detach().clone().unsqueeze(-1))

    def forward(self, *stages: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        embedding = concat_stages(list(stages)).index_select(1, self.channel_index)  # PadimIPCAModel.features
        h, w = embedding.shape[-2:]
        samples = embedding.flatten(2).permute(2, 1, 0)  # (P, m, B)
        projected = torch.matmul(self.components_t, samples.to(self.mean.dtype) - self.mean)  # (P, c, B)
        distances = (projected.square() * self.inverse_variances).sum(-2).sqrt()  # (P, B)
        maps = distances.t().reshape(-1, h, w).float()
        maps = gaussian_blur(upsample(maps, self.tile_size), self.blur_sigma)
        return maps, maps.flatten(1).amax(dim=1)


def squared_l2(queries: torch.Tensor, bank: torch.Tensor, bank_norms: torch.Tensor) -> torch.Tensor:
    """(Q, D), (M, D) -> (Q, M) squared distances, |q|^2 + |m|^2 - 2 q.m (faiss's form for query batches)."""
    return queries.square().sum(1, keepdim=True) + bank_norms.unsqueeze(0) - 2 * queries @ bank.t()


class PatchcoreHead(nn.Module):
    def __init__(self, model, tile_size: tuple[int, int]):
        super().__init__()
        self.patchcore = model.model
        self.tile_size = tuple(tile_size)
        bank = self.patchcore.memory_bank.detach().float()
        self.register_buffer("bank", bank.clone())
        self.register_buffer("bank_norms", bank.square().sum(1))
        self.k = min(int(self.patchcore.num_neighbors), len(bank))

    def forward(self, *stages: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        embedding = self.patchcore.embed(list(stages))
        d, h, w = embedding.shape[1:]
        patches = embedding.permute(0, 2, 3, 1).reshape(-1, d)
        nearest_squared, nearest = squared_l2(patches, self.bank, self.bank_norms).min(dim=1)
        patch_scores = nearest_squared.clamp_min(0).sqrt().reshape(-1, h * w)  # (B, h w)
        nearest = nearest.reshape(-1, h * w)
        # the image score (PatchcoreModel.image_scores): the worst patch, damped by its item's neighbourhood
        worst = patch_scores.argmax(dim=1, keepdim=True)  # (B, 1)
        top_score = patch_scores.gather(1, worst).squeeze(1)
        top_patch = patches.reshape(-1, h * w, d).gather(1, worst.unsqueeze(2).expand(-1, 1, d)).squeeze(1)  # (B, D)
        top_item = self.bank.index_select(0, nearest.gather(1, worst).squeeze(1))
        _, support = squared_l2(top_item, self.bank, self.bank_norms).topk(self.k, dim=1, largest=False)  # (B, k)
        neighbours = self.bank.index_select(0, support.reshape(-1)).reshape(-1, self.k, d)
        distances = (neighbours - top_patch.unsqueeze(1)).square().sum(-1).sqrt()
        weight = 1 - torch.exp(top_score - torch.logsumexp(distances, dim=1))
        maps = upsample(patch_scores.reshape(-1, h, w), self.tile_size, mode="nearest")
        return gaussian_blur(maps, self.patchcore.blur_sigma), weight * top_score


def bf16(x: torch.Tensor) -> torch.Tensor:
    """Rounded to the nearest bfloat16 (ties to even), kept as float32."""
    return x.to(torch.bfloat16).to(torch.float32)


class Bf16Conv2d(nn.Module):
    """A convolution as CPU autocast runs it in bfloat16: input, weight and bias rounded to bfloat16,
    products summed in float32, the output rounded to bfloat16."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        self.conv = copy.deepcopy(conv)
        with torch.no_grad():
            self.conv.weight.copy_(bf16(conv.weight))
            if conv.bias is not None:
                self.conv.bias.copy_(bf16(conv.bias))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return bf16(self.conv(bf16(x)))


class Bf16Output(nn.Module):
    """An op autocast leaves in bfloat16 when its input is (average pooling): computed in float32, rounded."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return bf16(self.module(x))


def emulate_bf16(network: nn.Module) -> nn.Module:
    """A copy of ``network`` whose convolutions and pools round as bfloat16 autocast does. ReLU and
    dropout (eval) are exact on bfloat16 values; every interpolation feeds a convolution, which
    rounds its input."""
    out = copy.deepcopy(network)
    for name, child in list(out.named_children()):
        if isinstance(child, nn.Conv2d):
            setattr(out, name, Bf16Conv2d(child))
        elif isinstance(child, nn.AvgPool2d):
            setattr(out, name, Bf16Output(child))
        elif len(list(child.children())):
            setattr(out, name, emulate_bf16(child))
    return out


class PixelHead(nn.Module):
    """A slot that takes tiles' pixels in [0, 1] (EfficientAD)."""

    #: Check tolerance of the export (relative to the map's range). In bfloat16, a float32 sum that
    #: lies within float32 rounding of a bfloat16 rounding boundary rounds either way depending on the
    #: order of the sum, which differs between oneDNN and onnxruntime: ~1e-4 of the outputs move by
    #: one bfloat16 step per convolution, and the moves add up over the networks' depth.
    check_tolerance = 1e-3

    def __init__(self, model):
        super().__init__()
        net = copy.deepcopy(model.model)
        if getattr(net, "precision", "32") == "bf16":
            self.check_tolerance = 1e-2
            for name in ("teacher", "student", "autoencoder"):
                setattr(net, name, emulate_bf16(getattr(net, name)))
            net.precision = "32"  # the rounding is in the modules now, not in an autocast context
        self.net = net.eval()

    def forward(self, tiles: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.net(tiles)


def head_for(model, tile_size: tuple[int, int], inputs: tuple[torch.Tensor, ...]) -> nn.Module:
    """The traceable head of a loaded slot model; ``inputs``: a sample of what it takes."""
    name = type(model).__name__
    if name == "Padim":
        return PadimHead(model, tile_size).eval()
    if name == "Patchcore":
        return PatchcoreHead(model, tile_size).eval()
    if name == "PadimIPCA":
        return PadimIPCAHead(model, tile_size).eval()
    if name == "Fastflow":
        return FastflowHead(model, tile_size, inputs).eval()
    if model.backbone_features:
        return FeatureHead(model, tile_size).eval()
    return PixelHead(model).eval()
