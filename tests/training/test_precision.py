"""Training precision and device: bf16 autocast runs through the same loop, weights stay float32.

``auto`` on a CPU is decided where the run runs: by the CPU's flags (faked
here for the host we are not on) and, where it has bf16 instructions, by
timing both precisions.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tlserve.training.fit.precision import (
    choose_precision,
    cpu_has_bf16,
    resolve_precision,
    training_device,
)
from tlserve.training.fit.strategies import FitContext
from tlserve.training.fit.strategies.finetune import FineTune

AVX2_HOST = "model name\t: AMD EPYC 7B13\nflags\t\t: fpu sse sse2 avx avx2 fma\n"
AMX_HOST = (
    "model name\t: Intel Xeon\nflags\t\t: fpu avx2 avx512f avx512_vnni avx512_bf16 amx_bf16\n"
)


def _cpuinfo(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cpuinfo"
    path.write_text(text)
    return path


def test_precision_names_and_auto(tmp_path: Path) -> None:
    cpu = torch.device("cpu")
    assert resolve_precision("float32", cpu) == "float32"
    assert resolve_precision("bf16", cpu) == "bf16"
    (tmp_path / "amx").mkdir()
    avx2, amx = _cpuinfo(tmp_path, AVX2_HOST), _cpuinfo(tmp_path / "amx", AMX_HOST)
    assert not cpu_has_bf16(avx2) and cpu_has_bf16(amx)
    assert not cpu_has_bf16(tmp_path / "absent")  # unknown: no bf16
    assert resolve_precision("auto", cpu, avx2) == "float32"
    assert resolve_precision("auto", cpu, amx) == "measure"
    with pytest.raises(ValueError, match="precision must be one of"):
        resolve_precision("fp8", cpu)
    assert training_device().type == ("cuda" if torch.cuda.is_available() else "cpu")


def test_an_avx2_host_trains_in_float32_without_timing_bf16(tmp_path: Path) -> None:
    timed: list[str] = []

    def speed(precision: str) -> float:
        timed.append(precision)
        return 100.0

    cpuinfo = _cpuinfo(tmp_path, AVX2_HOST)
    chosen = choose_precision("auto", torch.device("cpu"), speed, cpuinfo)
    assert chosen == ("float32", "CPU without bf16 instructions") and timed == []


@pytest.mark.parametrize(
    ("bf16_speed", "chosen"),
    [(60.0, "bf16"), (52.0, "float32"), (30.0, "float32")],  # float32 measures 50
)
def test_a_bf16_host_keeps_bf16_only_where_it_measures_faster(
    tmp_path: Path, bf16_speed: float, chosen: str
) -> None:
    timed: list[str] = []

    def speed(precision: str) -> float:
        timed.append(precision)
        return bf16_speed if precision == "bf16" else 50.0

    cpuinfo = _cpuinfo(tmp_path, AMX_HOST)
    precision, why = choose_precision("auto", torch.device("cpu"), speed, cpuinfo)
    assert precision == chosen
    assert timed == ["float32", "bf16", "float32", "bf16"]  # alternating, twice each
    assert f"{bf16_speed:.1f} (bf16) against 50.0 (float32)" in why
    # Asked for by name, nothing is timed.
    assert choose_precision("bf16", torch.device("cpu"), speed, cpuinfo)[0] == "bf16"
    assert len(timed) == 4


@pytest.mark.parametrize("precision", ["float32", "bf16", "auto"])
def test_a_bf16_run_trains_and_hands_back_a_float32_network_on_the_cpu(
    shapes_context: FitContext, precision: str
) -> None:
    context = shapes_context
    fitted = FineTune(epochs=2, lr=0.05, augment="none", precision=precision).fit(context)
    used = str(fitted.params["precision"])
    expected = (precision,) if precision != "auto" else ("float32", "bf16")
    assert used.split(" (")[0] in {f"{p} on {training_device().type}" for p in expected}
    assert len(fitted.history) == 2 and all(row["train_loss"] > 0 for row in fitted.history)
    weights = [*fitted.embedder.parameters(), *fitted.head.parameters()]
    assert {p.dtype for p in weights} == {torch.float32}
    assert {p.device.type for p in weights} == {"cpu"}  # exported on the CPU
