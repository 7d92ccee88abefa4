"""Channels of every feature stage of the shipped backbones, without building them.

``STAGE_CHANNELS[timm_name][i]`` is the channel count of timm's ``features_only`` stage ``i``
(``out_indices``; 1 = stride 4, 2 = stride 8, 3 = stride 16, 4 = stride 32). The configuration check
reads it to bound ``model.net.layers`` and ``model.net.n_features`` before torch or timm load;
tests/test_inputs.py checks it against timm's ``feature_info`` for every conf/backbone/*.yaml.
A backbone missing here is still checked, once built (its model's constructor).
"""

from __future__ import annotations

STAGE_CHANNELS: dict[str, tuple[int, ...]] = {
    "tf_efficientnet_lite0": (16, 24, 40, 112, 320),
    "tf_efficientnet_lite1": (16, 24, 40, 112, 320),
    "tf_efficientnet_lite2": (16, 24, 48, 120, 352),
    "resnet18": (64, 64, 128, 256, 512),
    "wide_resnet50_2": (64, 256, 512, 1024, 2048),
}
