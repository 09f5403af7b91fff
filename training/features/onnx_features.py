"""Frozen-backbone features through onnxruntime: torch's numbers, several times faster on CPU.

Feature extraction runs the frozen :class:`~tlserve.training.backbone.modules.ImageEmbedder`
over every image once. On CPU, PyTorch eager runs it far slower than
onnxruntime runs the same graph (``make bench-train`` prints both), so the
embedder is exported once, traced as the model export traces
(:mod:`~tlserve.training.features.onnx_trace`), cached on disk next to the features
(keyed by its weights, layers, preprocessing, opset and torch version), and
run in onnxruntime.

The fast path is exact within the export check's tolerances
(:data:`~tlserve.training.features.onnx_trace.EMBEDDING_RTOL` x ``|torch|`` +
:data:`~tlserve.training.features.onnx_trace.EMBEDDING_ATOL`): every extraction first
compares onnxruntime with torch on a few of its own images and falls back to
torch when they disagree or the module cannot be exported. The torch path runs
the weights in channels_last, the faster layout for CPU convolutions.
bf16 autocast is faster still but not exact, so extraction never uses it.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from tlserve.contract.errors import ExportError
from tlserve.contract.rules import CPU_PROVIDER, OUTPUT_EMBEDDINGS
from tlserve.training.backbone.layers import PooledFeatures
from tlserve.training.backbone.modules import ImageEmbedder
from tlserve.training.features.onnx_trace import (
    EMBEDDING_ATOL,
    EMBEDDING_RTOL,
    OPSET,
    embedding_excess,
    trace_to_onnx,
)

__all__ = [
    "ENGINES",
    "EXPORT_PAYS_OFF_IMAGES",
    "OnnxEmbedder",
    "batch_embedder",
    "embedder_key",
    "export_embedder",
    "load_or_export",
]

log = logging.getLogger(__name__)

ENGINES = ("auto", "onnxruntime", "torch")
# "auto" exports only when it pays: exporting lite0 costs about as much CPU
# as embedding this many images with torch instead of onnxruntime (measured
# by `make bench-train`). A cached export is always used.
EXPORT_PAYS_OFF_IMAGES = 512
_CHECK_IMAGES = 2  # compared with torch before each onnxruntime extraction (a fixed cost)

Embed = Callable[[np.ndarray], np.ndarray]


class OnnxEmbedder:
    """An exported embedder in an onnxruntime CPU session: uint8 NHWC in, float32 ``[N, D]`` out.

    ``spinning`` keeps onnxruntime's default of pool threads that spin between runs.
    """

    def __init__(self, model: bytes | Path, *, spinning: bool = False) -> None:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Images are decoded in other processes while this session runs, and
        # pool threads that spin between runs take their CPU: measured on a
        # shared 2-core machine (lite0, 320 images, 3 interleaved rounds),
        # extraction reached 100% of the raw limit without spinning, 77% with.
        # (The server, with nothing else to run, keeps onnxruntime's default.)
        options.add_session_config_entry(
            "session.intra_op.allow_spinning", "1" if spinning else "0"
        )
        source = str(model) if isinstance(model, Path) else model
        self.session = ort.InferenceSession(source, options, providers=[CPU_PROVIDER])
        self.input = self.session.get_inputs()[0].name

    def __call__(self, images: np.ndarray) -> np.ndarray:
        (embeddings,) = self.session.run([OUTPUT_EMBEDDINGS], {self.input: images})
        return np.asarray(embeddings, dtype=np.float32)


def embedder_key(embedder: ImageEmbedder) -> str:
    """A hex digest of what the exported graph depends on."""
    layers = embedder.backbone.layers if isinstance(embedder.backbone, PooledFeatures) else None
    # Only what the graph holds: the input size and the normalisation. The crop
    # and the interpolation happen before the graph, so the geometries ``auto``
    # compares at one size share one export.
    spec = embedder.preprocessing
    graph_input = f"{spec.height}x{spec.width} mean {spec.mean} std {spec.std}"
    what = (
        f"onnx-embedder opset {OPSET} torch {torch.__version__} "
        f"{type(embedder.backbone).__name__} {layers} {graph_input}"
    )
    digest = hashlib.sha256(what.encode())
    for name, tensor in embedder.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def export_embedder(embedder: ImageEmbedder, images: np.ndarray) -> bytes:
    """``embedder`` as a serialised ONNX model with a dynamic batch axis (torch.export-based)."""
    embedder.eval()
    try:
        proto = trace_to_onnx(embedder, images, [OUTPUT_EMBEDDINGS])
    except ExportError:
        raise
    # torch.export raises many unrelated types (unsupported ops, data-dependent
    # control flow, guards); each means the same here: use torch instead.
    except Exception as exc:
        raise ExportError(f"cannot export {type(embedder.backbone).__name__}: {exc}") from exc
    model: bytes = proto.SerializeToString()
    return model


def load_or_export(
    embedder: ImageEmbedder, images: np.ndarray, directory: Path | None
) -> OnnxEmbedder:
    """The cached export of ``embedder`` in ``directory``, else a new one (cached there).

    ``images`` (uint8, prepared for ``embedder``) trace the export and check it:
    raises :class:`ExportError` when onnxruntime and torch disagree beyond the
    tolerances, or when the module cannot be exported.
    """
    path = directory / f"embedder-{embedder_key(embedder)}.onnx" if directory else None
    if path is not None and path.is_file():
        try:
            fast = _session(path)
            check_against_torch(fast, embedder, images)
        except ExportError as exc:
            log.warning("ignoring the cached export %s: %s", path, exc)
        else:
            return fast
    model = export_embedder(embedder, images)
    fast = _session(model)
    check_against_torch(fast, embedder, images)
    if path is not None:
        _save(path, model)
    return fast


def _session(model: bytes | Path) -> OnnxEmbedder:
    try:
        return OnnxEmbedder(model)
    # onnxruntime's own errors (Fail, InvalidGraph, NoSuchFile...) derive from
    # Exception only; any of them means this export cannot be used.
    except Exception as exc:
        raise ExportError(f"onnxruntime cannot load the exported embedder: {exc}") from exc


def check_against_torch(fast: Embed, embedder: ImageEmbedder, images: np.ndarray) -> float:
    """Largest ``|onnx - torch|`` on a few ``images``; :class:`ExportError` past tolerance."""
    sample = np.ascontiguousarray(images[:_CHECK_IMAGES])
    with torch.inference_mode():
        expected = embedder(torch.from_numpy(sample.copy())).numpy()
    try:
        got = fast(sample)
    except Exception as exc:  # onnxruntime's errors, as in _session
        raise ExportError(f"onnxruntime cannot run the exported embedder: {exc}") from exc
    if got.shape != expected.shape:
        raise ExportError(f"onnxruntime gave {got.shape}, torch {expected.shape}")
    difference = np.abs(got - expected)
    if not embedding_excess(got, expected) <= 0.0:  # also catches NaN
        raise ExportError(
            f"onnxruntime features differ from torch's by up to {float(np.max(difference)):.3g} "
            f"(limit {EMBEDDING_ATOL:g} + {EMBEDDING_RTOL:g} x |torch|)"
        )
    return float(np.max(difference))


def _save(path: Path, model: bytes) -> None:
    """Atomically (temp file + rename); a failure to cache is only a warning."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".onnx", delete=False) as tmp:
            tmp.write(model)
        os.replace(tmp.name, path)
    except OSError as exc:
        log.warning("could not cache the exported embedder in %s: %s", path.parent, exc)


@contextlib.contextmanager
def channels_last(module: torch.nn.Module) -> Iterator[None]:
    """Hold ``module``'s weights in channels_last, restoring the usual layout afterwards.

    The module is shared with the backbone that is later trained or exported;
    only the memory layout changes, never a value.
    """
    module.to(memory_format=torch.channels_last)
    try:
        yield
    finally:
        module.to(memory_format=torch.contiguous_format)


@contextlib.contextmanager
def batch_embedder(
    embedder: ImageEmbedder, *, engine: str, directory: Path | None, images: int
) -> Iterator[Embed]:
    """A function embedding uint8 batches, on the fastest exact path for ``engine``.

    ``auto`` takes onnxruntime when an export is cached in ``directory`` or at
    least :data:`EXPORT_PAYS_OFF_IMAGES` ``images`` are to be embedded, else
    torch; a failed export or check falls back to torch (logged).
    ``onnxruntime`` insists (raises :class:`ExportError`); ``torch`` never exports.
    The path is chosen at the first batch, whose images check the export.
    """
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    embedder.eval()
    chosen: list[Embed] = []
    layouts = contextlib.ExitStack()

    def run_torch(batch: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            embeddings: np.ndarray = embedder(torch.from_numpy(batch)).numpy()
        return embeddings.astype(np.float32, copy=False)

    def choose(batch: np.ndarray) -> Embed:
        cached = (
            directory is not None
            and (directory / f"embedder-{embedder_key(embedder)}.onnx").is_file()
        )
        if engine == "torch" or (
            engine == "auto" and not cached and images < EXPORT_PAYS_OFF_IMAGES
        ):
            layouts.enter_context(channels_last(embedder))
            return run_torch
        try:
            fast = load_or_export(embedder, batch, directory)
        except ExportError as exc:
            if engine == "onnxruntime":
                raise
            log.warning("features through torch: %s", exc)
            layouts.enter_context(channels_last(embedder))
            return run_torch
        log.info("features through onnxruntime (checked against torch)")
        return fast

    def embed(batch: np.ndarray) -> np.ndarray:
        if not chosen:
            chosen.append(choose(batch))
        return chosen[0](batch)

    with layouts:
        yield embed
