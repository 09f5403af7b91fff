"""Training precision and device: bf16 autocast runs through the same loop, weights stay float32."""

from __future__ import annotations

import pytest
import torch

from tlserve.training.fit.precision import resolve_precision, training_device
from tlserve.training.fit.strategies import FitContext
from tlserve.training.fit.strategies.finetune import FineTune


def test_precision_names_and_auto() -> None:
    cpu = torch.device("cpu")
    assert resolve_precision("float32", cpu) == "float32"
    assert resolve_precision("bf16", cpu) == "bf16"
    assert resolve_precision("auto", cpu) == "float32"  # bf16 steps measured slower on CPU
    with pytest.raises(ValueError, match="precision must be one of"):
        resolve_precision("fp8", cpu)
    assert training_device().type == ("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.parametrize("precision", ["float32", "bf16"])
def test_a_bf16_run_trains_and_hands_back_a_float32_network_on_the_cpu(
    shapes_context: FitContext, precision: str
) -> None:
    context = shapes_context
    fitted = FineTune(epochs=2, lr=0.05, augment="none", precision=precision).fit(context)
    assert fitted.params["precision"] == f"{precision} on {training_device().type}"
    assert len(fitted.history) == 2 and all(row["train_loss"] > 0 for row in fitted.history)
    weights = [*fitted.embedder.parameters(), *fitted.head.parameters()]
    assert {p.dtype for p in weights} == {torch.float32}
    assert {p.device.type for p in weights} == {"cpu"}  # exported on the CPU
