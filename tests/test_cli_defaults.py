"""The ``tlserve`` command's defaults and choices are the packages' own, not copies."""

from __future__ import annotations

import argparse
import dataclasses
import inspect
from pathlib import Path
from typing import Any

import pytest

from tlserve.cli import main as cli
from tlserve.contract.predictions import DEFAULT_TOP_K


def _subcommand(name: str) -> argparse.ArgumentParser:
    [sub] = [a for a in cli._parser()._actions if isinstance(a, argparse._SubParsersAction)]
    parser: argparse.ArgumentParser = sub.choices[name]
    return parser


def test_classify_asks_for_the_contracts_default_top_k() -> None:
    args = cli._parser().parse_args(["classify", "--model", "m", "a.png"])
    assert args.top_k == DEFAULT_TOP_K


def test_train_and_check_embed_with_the_registrys_default_backbone(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from tlserve import training
    from tlserve.training.backbone.backbones import DEFAULT_BACKBONE, list_backbones
    from tlserve.training.check.datacheck import check_folder

    assert DEFAULT_BACKBONE in list_backbones()
    assert {f.name: f.default for f in dataclasses.fields(training.TrainConfig)}[
        "backbone"
    ] == DEFAULT_BACKBONE
    assert inspect.signature(check_folder).parameters["backbone"].default == DEFAULT_BACKBONE

    seen: list[Any] = []

    class Result:
        def summary(self) -> str:
            return ""

    def train(config: Any) -> Result:
        seen.append(config)
        return Result()

    monkeypatch.setattr(training, "train", train)
    argv = ["train", str(tmp_path), "--model-repository", str(tmp_path), "--name", "m"]
    assert cli.main(argv) == 0
    assert seen[0].backbone == DEFAULT_BACKBONE
    # The strategy too: TrainConfig's default (auto), not a copy in the parser.
    assert (
        seen[0].strategy
        == {f.name: f.default for f in dataclasses.fields(training.TrainConfig)}["strategy"]
    )


def test_serve_offers_exactly_the_values_the_config_accepts(tmp_path: Path) -> None:
    from tlserve.contract.errors import ConfigError
    from tlserve.server import config, policy
    from tlserve.server.config import ServerConfig

    choices = {a.dest: a.choices for a in _subcommand("serve")._actions if a.choices}
    assert choices == {
        "device": config.DEVICES,
        "gpu_fallback": config.GPU_FALLBACKS,
        "tune": config.TUNE_MODES,
        "variant": config.VARIANT_CHOICES,
        "queue_policy": policy.QUEUE_POLICIES,
        "model_control": policy.MODEL_CONTROLS,
    }
    for flag, values in choices.items():
        for value in values:
            ServerConfig.load({"model_repository": tmp_path, flag: value}, environ={})
        with pytest.raises(ConfigError, match=f"TLSERVE_{flag.upper()}"):
            ServerConfig.load({"model_repository": tmp_path, flag: "nonsense"}, environ={})


def test_classify_and_training_take_the_same_files_for_images(tmp_path: Path) -> None:
    from tlserve.cli.remote import _walk
    from tlserve.training.data.folders import load_dataset

    names = ["cat/a.png", "cat/b.TIFF", "cat/c.gif", "cat/d.txt", "dog/e.jpeg", "dog/f.webp"]
    for name in names:
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(b"")  # listed by suffix, never decoded here
    (tmp_path / "dog/g.bmp").write_bytes(b"")
    dataset = load_dataset(tmp_path)
    trained = sorted(path for samples in dataset.splits().values() for path, _ in samples)
    assert trained == sorted(_walk([tmp_path]))
    assert len(trained) == 6  # all but the .txt
