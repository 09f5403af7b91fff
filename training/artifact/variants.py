"""What a faster model variant shares, whatever its number format.

- which nodes stay in float (:func:`float_regions`),
- how it is measured against the float32 model (:func:`compare_variants`:
  held-out accuracy, top-1 agreement, images/s in alternating passes),
- and how the figures land in the model cards (:func:`record_variants`).
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from tlserve.contract.card import ModelCard
from tlserve.contract.errors import InvalidInput
from tlserve.contract.rules import (
    CPU_PROVIDER,
    INPUT_IMAGES,
    OUTPUT_EMBEDDINGS,
    OUTPUT_PROBABILITIES,
)
from tlserve.contract.variants import SPEED_BATCHES, SPEED_PASSES, host_cpu, variant_file

__all__ = [
    "COMPUTE_OPS",
    "Figures",
    "HeldOut",
    "Measured",
    "compare_variants",
    "float_regions",
    "load_session",
    "name_nodes",
    "probabilities",
    "record_variants",
    "top1",
]

#: The ops whose arithmetic a variant speeds up; what lies before the first
#: and after the last of them stays float.
COMPUTE_OPS = frozenset({"Conv", "ConvTranspose", "MatMul", "Gemm"})


@dataclass(frozen=True)
class HeldOut:
    """Labelled images the variants are scored on: uint8 ``[N, H, W, 3]``, labels ``[N]``."""

    images: np.ndarray
    labels: np.ndarray


@dataclass(frozen=True)
class Figures:
    """One variant's held-out accuracy (None without labels) and images/s by batch size."""

    name: str
    accuracy: float | None
    images_per_second: dict[int, float]


@dataclass(frozen=True)
class Measured:
    """Float32 reference vs the candidate variant, measured here."""

    reference: Figures
    candidate: Figures
    agreement: float  # top-1 agreement of the two on the held-out images
    held_out: int
    provider: str
    host: str
    # Candidate / reference images/s per batch size: the median of per-pass ratios
    # (a pass measures both back to back, so host drift cancels within it).
    ratios: dict[int, float] = dataclasses.field(default_factory=dict)

    @property
    def speedup(self) -> float:
        """The smallest images/s ratio over the measured batch sizes (conservative)."""
        if self.ratios:
            return min(self.ratios.values())
        return min(
            self.candidate.images_per_second[b] / self.reference.images_per_second[b]
            for b in self.reference.images_per_second
        )

    @property
    def accuracy_drop_points(self) -> float | None:
        """Accuracy points lost (negative: gained); None without held-out labels."""
        ref, cand = self.reference.accuracy, self.candidate.accuracy
        return None if ref is None or cand is None else 100 * (ref - cand)


def name_nodes(model: onnx.ModelProto) -> None:
    """Give unnamed nodes unique names: quantizers and converters exclude nodes by name."""
    taken = {node.name for node in model.graph.node if node.name}
    for index, node in enumerate(model.graph.node):
        if not node.name:
            name = f"tlserve_{node.op_type}_{index}"
            while name in taken:
                name += "_"
            node.name = name
            taken.add(name)


def float_regions(model: onnx.ModelProto) -> set[str]:
    """Names of the nodes to keep float: no compute op upstream, or none downstream.

    Upstream of the first convolution is the in-graph normalisation of the
    uint8 input (kept exact); downstream of the last one are pooling, the
    embeddings, the classifier head and any other output's nodes. Nodes
    consuming ``embeddings`` count as head even when they are MatMuls.
    """
    nodes = list(model.graph.node)
    producer = {out: i for i, node in enumerate(nodes) for out in node.output}
    consumers: dict[str, list[int]] = {}
    for i, node in enumerate(nodes):
        for name in node.input:
            consumers.setdefault(name, []).append(i)
    head = _reach([OUTPUT_EMBEDDINGS], consumers, nodes, downstream=True)
    body = [i for i, n in enumerate(nodes) if n.op_type in COMPUTE_OPS and i not in head]
    after = _reach([out for i in body for out in nodes[i].output], consumers, nodes, True)
    before = _reach([inp for i in body for inp in nodes[i].input], producer, nodes, False)
    compute_downstream = before | set(body)
    compute_upstream = after | set(body)
    return {
        nodes[i].name
        for i in range(len(nodes))
        if i not in compute_downstream or i not in compute_upstream
    }


def _reach(
    start: Sequence[str],
    links: dict[str, list[int]] | dict[str, int],
    nodes: list[onnx.NodeProto],
    downstream: bool,
) -> set[int]:
    """Indices of nodes reachable from tensors ``start``, following consumers or producers."""
    seen: set[int] = set()
    stack = list(start)
    while stack:
        found = links.get(stack.pop())
        for i in found if isinstance(found, list) else [] if found is None else [found]:
            if i not in seen:
                seen.add(i)
                stack.extend(nodes[i].output if downstream else nodes[i].input)
    return seen


def compare_variants(
    reference: Path,
    candidate: Path,
    held_out: HeldOut | None,
    *,
    name: str,
    providers: Sequence[str] = (CPU_PROVIDER,),
    seconds: float = 0.4,
) -> Measured:
    """Score both on ``held_out`` and time them in alternating passes on this host.

    ``name`` is the candidate's (``int8``, ``fp16``); the reference is float32.
    """
    sessions = [load_session(p, providers) for p in (reference, candidate)]
    shape = [d if isinstance(d, int) else 1 for d in sessions[0].get_inputs()[0].shape]
    probe = held_out.images if held_out is not None else np.zeros(shape, np.uint8)
    predictions = [top1(s, probe) for s in sessions]
    accuracies = [
        None if held_out is None else float(np.mean(p == held_out.labels)) for p in predictions
    ]
    passes = _speeds(sessions, probe, seconds)
    speeds = [{b: statistics.median(v) for b, v in found.items()} for found in passes]
    ratios = {
        b: statistics.median(c / r for c, r in zip(passes[1][b], passes[0][b], strict=True))
        for b in SPEED_BATCHES
    }
    return Measured(
        reference=Figures("float32", accuracies[0], speeds[0]),
        candidate=Figures(name, accuracies[1], speeds[1]),
        ratios=ratios,
        agreement=float(np.mean(predictions[0] == predictions[1])),
        held_out=0 if held_out is None else len(held_out.labels),
        provider=sessions[1].get_providers()[0],
        host=host_cpu(),
    )


def load_session(path: Path, providers: Sequence[str] = (CPU_PROVIDER,)) -> Any:
    """An onnxruntime session of ``path`` on ``providers``."""
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=list(providers))


def probabilities(session: Any, images: np.ndarray, batch: int = 32) -> np.ndarray:
    """The session's ``probabilities`` for each image, float32 ``[N, C]``."""
    chunks = [
        session.run([OUTPUT_PROBABILITIES], {INPUT_IMAGES: images[i : i + batch]})[0]
        for i in range(0, len(images), batch)
    ]
    return np.asarray(np.concatenate(chunks), dtype=np.float32)


def top1(session: Any, images: np.ndarray) -> np.ndarray:
    """The session's top-1 class for each image."""
    return np.asarray(probabilities(session, images).argmax(axis=1), dtype=np.int64)


def _speeds(
    sessions: list[Any], images: np.ndarray, seconds: float
) -> list[dict[int, list[float]]]:
    """Images/s of each session per batch size, one figure per pass; within a pass the
    sessions run back to back, so drift on a shared machine hits both alike."""
    runs: list[dict[int, list[float]]] = [{b: [] for b in SPEED_BATCHES} for _ in sessions]
    for _ in range(SPEED_PASSES):
        for batch in SPEED_BATCHES:
            feed = {INPUT_IMAGES: np.resize(images, (batch, *images.shape[1:]))}
            for session, found in zip(sessions, runs, strict=True):
                session.run(None, feed)  # warm this shape
                count, started = 0, time.perf_counter()
                while (elapsed := time.perf_counter() - started) < seconds or count == 0:
                    session.run(None, feed)
                    count += batch
                found[batch].append(count / elapsed)
    return runs


def record_variants(
    path: Path,
    published: Sequence[str],
    budget_points: float,
    outcomes: Mapping[str, tuple[str, Measured]],
) -> None:
    """Write the variants' figures into the card of the float32 model at ``path``, and
    name each published variant file's own kind in its card (``notes.variant``)."""
    card = _read_card(path)
    metrics = dict(card.metrics)
    notes = {**card.notes, "variant": "float32"}
    for variant, (reason, measured) in outcomes.items():
        for figures in (measured.reference, measured.candidate):
            if figures.accuracy is not None:
                metrics[f"{figures.name}_accuracy"] = figures.accuracy
            for batch, speed in figures.images_per_second.items():
                metrics[f"{figures.name}_images_per_second_b{batch}"] = round(speed, 1)
        metrics[f"{variant}_top1_agreement"] = measured.agreement
        metrics[f"{variant}_speedup"] = round(measured.speedup, 3)
        notes[f"{variant}_reason"] = reason
        notes["variants_measured_on"] = f"{measured.provider}, {measured.host}"
    notes["variants"] = ",".join(published)
    notes["variant_budget_points"] = f"{budget_points:g}"
    _write_card(path, dataclasses.replace(card, metrics=metrics, notes=notes))
    for variant in published:
        target = path.with_name(variant_file(variant))
        own = _read_card(target)
        _write_card(target, dataclasses.replace(own, notes={**own.notes, "variant": variant}))


def _read_card(path: Path) -> ModelCard:
    props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    card = ModelCard.from_props(props)
    if card is None:
        raise InvalidInput(f"{path} carries no tlserve model card to record the variants in")
    return card


def _write_card(path: Path, card: ModelCard) -> None:
    model = onnx.load(str(path))
    props = {p.key: p.value for p in model.metadata_props}
    props.update(card.to_props())
    del model.metadata_props[:]
    for key, value in props.items():
        model.metadata_props.add(key=key, value=value)
    onnx.save(model, str(path))
