"""tritonclient, a real third-party V2 client, against tlserve in the same process."""

from __future__ import annotations

import numpy as np
import tritonclient.grpc as triton

from tests.conftest import TINY_SIZE, ServerThread
from tlserve.client import Client


def test_tritonclient_speaks_to_tlserve(server: ServerThread) -> None:
    client = triton.InferenceServerClient(url=server.target)
    try:
        assert client.is_server_live()
        assert client.is_server_ready()
        assert client.is_model_ready("tiny")
        meta = client.get_model_metadata("tiny")
        assert meta.inputs[0].name == "images" and meta.inputs[0].datatype == "UINT8"

        images = np.random.default_rng(3).integers(0, 256, (4, TINY_SIZE, TINY_SIZE, 3), np.uint8)
        infer_input = triton.InferInput("images", list(images.shape), "UINT8")
        infer_input.set_data_from_numpy(images)
        result = client.infer(
            "tiny", [infer_input], outputs=[triton.InferRequestedOutput("probabilities")]
        )
        probabilities = result.as_numpy("probabilities")
    finally:
        client.close()
    with Client(server.target) as ours:  # both clients live in one process
        expected = ours.infer("tiny", {"images": images}, timeout=5)["probabilities"]
    np.testing.assert_array_equal(probabilities, expected)
