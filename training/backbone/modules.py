"""The torch modules that become the ONNX graph.

:class:`ImageEmbedder` is what features are computed with during training
*and* the front of the exported graph, so the embeddings a model was fitted on
and the embeddings the server computes come from one piece of code: uint8
``[N, H, W, 3]`` RGB in, cast, normalisation and NHWC→NCHW inside.
"""

from __future__ import annotations

import torch

from tlserve.contract.card import Preprocessing
from tlserve.training.backbone.backbones import Backbone

__all__ = ["ImageClassifier", "ImageEmbedder"]


class ImageEmbedder(torch.nn.Module):
    """uint8 ``[N, H, W, 3]`` RGB images → float32 embeddings ``[N, D]``.

    ``preprocessing`` is kept: it says how the uint8 input must be prepared
    (:func:`~tlserve.contract.images.prepare_image`) and holds the mean/std
    applied here.
    """

    scale: torch.Tensor
    shift: torch.Tensor

    def __init__(self, backbone: torch.nn.Module, preprocessing: Preprocessing) -> None:
        super().__init__()
        self.backbone = backbone
        self.preprocessing = preprocessing
        mean = torch.tensor(preprocessing.mean, dtype=torch.float32).view(1, 3, 1, 1)
        std = torch.tensor(preprocessing.std, dtype=torch.float32).view(1, 3, 1, 1)
        # (x / 255 - mean) / std folded into one multiply-add.
        self.register_buffer("scale", 1.0 / (255.0 * std))
        self.register_buffer("shift", -mean / std)

    @classmethod
    def from_backbone(cls, backbone: Backbone) -> ImageEmbedder:
        """The embedder for ``backbone``, sharing (not copying) its module."""
        return cls(backbone.module, backbone.preprocessing)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.permute(0, 3, 1, 2).to(torch.float32)
        x = x * self.scale + self.shift
        embeddings: torch.Tensor = self.backbone(x)
        return embeddings


class ImageClassifier(torch.nn.Module):
    """uint8 images → (``probabilities`` ``[N, C]``, ``embeddings`` ``[N, D]``).

    ``head`` maps embeddings to logits; the softmax is part of the graph.
    """

    def __init__(self, embedder: ImageEmbedder, head: torch.nn.Module) -> None:
        super().__init__()
        self.embedder = embedder
        self.head = head

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        embeddings = self.embedder(images)
        probabilities = torch.softmax(self.head(embeddings), dim=-1)
        return probabilities, embeddings
