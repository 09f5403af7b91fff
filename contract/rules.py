"""The names, file layout and limits that training, server and client agree on.

Each rule is declared here once; every side imports it from here.
"""

from __future__ import annotations

import re
from importlib.metadata import PackageNotFoundError, version

from tlserve.contract.errors import InvalidInput

__all__ = [
    "CPU_PROVIDER",
    "CUDA_PROVIDER",
    "GPU_PROVIDERS",
    "IMAGE_SUFFIXES",
    "INPUT_IMAGES",
    "MAX_IMAGE_PIXELS",
    "MAX_MESSAGE_BYTES",
    "MAX_REQUEST_PIXELS",
    "MODEL_FILE",
    "OUTPUT_EMBEDDINGS",
    "OUTPUT_OOD_SCORE",
    "OUTPUT_PROBABILITIES",
    "TENSORRT_PROVIDER",
    "check_model_name",
    "shown",
    "tlserve_version",
    "valid_model_name",
]

#: A model version is ``<repository>/<model name>/<integer version>/MODEL_FILE``
#: (Triton's layout, so the same repository loads in Triton's ONNX backend).
MODEL_FILE = "model.onnx"

#: The tensors of a tlserve model: uint8 ``[N, H, W, 3]`` in, ``[N, C]``
#: probabilities, ``[N, D]`` pooled backbone features and (in models that
#: carry it) ``[N]`` out-of-distribution score out.
INPUT_IMAGES = "images"
OUTPUT_PROBABILITIES = "probabilities"
OUTPUT_EMBEDDINGS = "embeddings"
OUTPUT_OOD_SCORE = "ood_score"

#: The file suffixes (lower case) taken for images where tlserve walks a folder:
#: training's class folders and ``tlserve classify DIR``. Pillow reads them all
#: (``contract.images.decode_image`` scales 16-bit TIFF greyscale down too).
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff"})

#: Largest image (width x height) decoded anywhere; a 20 kB PNG can claim
#: 50,000 x 50,000 pixels, so this is checked from the header first.
MAX_IMAGE_PIXELS = 64_000_000

#: Default pixel budget of one request, all its images together: four images
#: at the per-image limit, or 256 photos of 1 megapixel.
MAX_REQUEST_PIXELS = 256_000_000

#: Largest gRPC message either side sends or accepts by default (gRPC's own
#: default, 4 MiB, is too small for a batch of images).
MAX_MESSAGE_BYTES = 64 * 1024 * 1024

CPU_PROVIDER = "CPUExecutionProvider"
CUDA_PROVIDER = "CUDAExecutionProvider"
TENSORRT_PROVIDER = "TensorrtExecutionProvider"
GPU_PROVIDERS = (CUDA_PROVIDER, TENSORRT_PROVIDER)

_MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
_SHOWN = 80  # characters of a caller's value that an error message echoes


def valid_model_name(name: str) -> bool:
    """Letters, digits, ``_ . -``, at most 128; no separators, no leading dot, no ``..``."""
    return bool(_MODEL_NAME.fullmatch(name)) and ".." not in name


def check_model_name(name: str) -> str:
    """``name`` if it is a plain model name, else :class:`InvalidInput` saying the rule."""
    if not valid_model_name(name):
        raise InvalidInput(
            f"{shown(name)} is not a valid model name: 1-128 letters, digits, '_', '.' or '-', "
            "starting with a letter or digit, without '..'"
        )
    return name


def shown(value: str) -> str:
    """``repr(value)``, cut short: error messages never echo a caller's value in full."""
    if len(value) <= _SHOWN:
        return repr(value)
    return f"{value[:_SHOWN]!r}... ({len(value)} characters)"


def tlserve_version() -> str:
    """The installed tlserve's version; ``0+unknown`` when run from a bare source tree."""
    try:
        return version("tlserve")
    except PackageNotFoundError:
        return "0+unknown"
