"""tlserve training: turn a folder of labelled images into a served ONNX model.

::

    from tlserve.training import TrainConfig, train
    result = train(TrainConfig(Path("examples/fashion-mnist"), model_repository=Path("models"),
                               name="fashion", strategy="auto", time_budget=600))

Modules: :mod:`~tlserve.training.data.folders` (find the images),
:mod:`~tlserve.training.backbone.backbones` (pretrained CNNs),
:mod:`~tlserve.training.features.extract`, :mod:`~tlserve.training.fit.strategies`,
:mod:`~tlserve.training.fit.evaluate`, :mod:`~tlserve.training.artifact.export` and
:mod:`~tlserve.training.artifact.publish`. This package imports torch; the client and
the server never import it.
"""

from __future__ import annotations

from tlserve.training.backbone.backbones import Backbone, create_backbone
from tlserve.training.config import TrainConfig
from tlserve.training.data.folders import DataError, Dataset, load_dataset
from tlserve.training.train import TrainResult, train

__all__ = [
    "Backbone",
    "DataError",
    "Dataset",
    "TrainConfig",
    "TrainResult",
    "create_backbone",
    "load_dataset",
    "train",
]
