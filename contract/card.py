"""The model card: what a tlserve ONNX model carries about itself.

Training writes it into the ONNX ``metadata_props``; the server and the
client read it back, so a model can be used without the code that made it.
This module is the one reader and writer of that schema. Every key is
prefixed ``tlserve.`` and every value is JSON; ``tlserve.schema`` is the
schema version, bumped on any incompatible change.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["INTERPOLATIONS", "SCHEMA_VERSION", "ModelCard", "Preprocessing", "as_triple"]

SCHEMA_VERSION = 1
INTERPOLATIONS = ("nearest", "bilinear", "bicubic")
_PREFIX = "tlserve."


@dataclass(frozen=True)
class Preprocessing:
    """How an image becomes the model's uint8 ``[H, W, 3]`` input.

    The rule is timm's evaluation transform: convert to RGB, resize the
    shorter side to ``floor(size / crop_pct)`` with ``interpolation``, then
    centre-crop to ``size``. ``mean``/``std`` apply to pixels scaled to
    [0, 1]; they run inside the ONNX graph and are here for information.
    """

    height: int = 224
    width: int = 224
    crop_pct: float = 0.875
    interpolation: str = "bicubic"
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)

    def __post_init__(self) -> None:
        if self.height < 1 or self.width < 1:
            raise ValueError(f"input size must be positive, got {self.height}x{self.width}")
        if not 0.0 < self.crop_pct <= 1.0:
            raise ValueError(f"crop_pct must be in (0, 1], got {self.crop_pct}")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(
                f"interpolation must be one of {INTERPOLATIONS}, got {self.interpolation!r}"
            )

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Preprocessing:
        return cls(
            height=int(data["height"]),
            width=int(data["width"]),
            crop_pct=float(data["crop_pct"]),
            interpolation=str(data["interpolation"]),
            mean=as_triple(data["mean"]),
            std=as_triple(data["std"]),
        )


@dataclass(frozen=True)
class ModelCard:
    """Labels, preprocessing and provenance of one model version."""

    labels: tuple[str, ...]
    preprocessing: Preprocessing
    backbone: str = ""
    strategy: str = ""
    metrics: Mapping[str, float] = field(default_factory=dict)
    created: str = ""
    data_fingerprint: str = ""
    tlserve_version: str = ""
    notes: Mapping[str, str] = field(default_factory=dict)

    def to_props(self) -> dict[str, str]:
        """The card as ONNX ``metadata_props`` (string keys and values)."""
        props = {_PREFIX + "schema": json.dumps(SCHEMA_VERSION)}
        for key, value in asdict(self).items():
            props[_PREFIX + key] = json.dumps(value, sort_keys=True)
        return props

    @classmethod
    def from_props(cls, props: Mapping[str, str]) -> ModelCard | None:
        """Read a card back; ``None`` when the model carries none.

        Raises ``ValueError`` naming the key when a card is present but
        malformed or of a newer schema than this reader knows.
        """
        if _PREFIX + "schema" not in props:
            return None
        try:
            schema = int(json.loads(props[_PREFIX + "schema"]))
            if schema > SCHEMA_VERSION:
                raise ValueError(
                    f"model card schema {schema} is newer than this tlserve reads "
                    f"({SCHEMA_VERSION}); upgrade tlserve"
                )
            values = {
                key[len(_PREFIX) :]: _json(key, value)
                for key, value in props.items()
                if key.startswith(_PREFIX) and key != _PREFIX + "schema"
            }
            return cls.from_dict(values)
        except (KeyError, TypeError, AttributeError, json.JSONDecodeError) as exc:
            raise ValueError(f"malformed tlserve model card: {exc!r}") from exc

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> ModelCard:
        """A card from its fields as plain values (``dataclasses.asdict`` of one, or
        JSON); KeyError/TypeError when a field is missing or of the wrong kind."""
        return cls(
            labels=tuple(str(label) for label in values["labels"]),
            preprocessing=Preprocessing.from_dict(values["preprocessing"]),
            backbone=str(values.get("backbone", "")),
            strategy=str(values.get("strategy", "")),
            metrics={str(k): float(v) for k, v in values.get("metrics", {}).items()},
            created=str(values.get("created", "")),
            data_fingerprint=str(values.get("data_fingerprint", "")),
            tlserve_version=str(values.get("tlserve_version", "")),
            notes={str(k): str(v) for k, v in values.get("notes", {}).items()},
        )


def _json(key: str, value: str) -> Any:
    try:
        return json.loads(value)
    except json.JSONDecodeError as exc:
        raise ValueError(f"model card key {key} is not JSON: {exc}") from exc


def as_triple(values: Any) -> tuple[float, float, float]:
    """Three floats (a mean or std per RGB channel) from any sequence of three numbers."""
    a, b, c = (float(v) for v in values)
    return (a, b, c)
