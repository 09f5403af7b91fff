"""The REST endpoints' handlers: decode the request, call the core or the control
plane, encode the answer (what a gRPC servicer does; errors, limits and
counting are :mod:`tlserve.server.edge.rest.routes`')."""

from __future__ import annotations

from typing import Any

from tlserve.contract.errors import InvalidInput, ModelNotFound
from tlserve.contract.rules import tlserve_version
from tlserve.server.core.control import ModelControl
from tlserve.server.core.describe import EXTENSIONS
from tlserve.server.core.inference import InferenceCore
from tlserve.server.edge.rest.exchange import Exchange, multipart_files
from tlserve.server.edge.rest.page import STATIC, STATIC_DIR, figure, models_summary, report_html
from tlserve.server.edge.rest.tensors import HEADER_LENGTH, encode_response, parse_infer_request

__all__ = ["Handlers"]

_IMAGE_TYPES = frozenset({"image/jpeg", "image/png", "application/octet-stream"})
_PAGE_SECURITY = [
    ("x-content-type-options", "nosniff"),
    (
        "content-security-policy",
        "default-src 'self'; img-src 'self' blob: data:; style-src 'self'; frame-ancestors 'none'",
    ),
]


def _model(exchange: Exchange) -> tuple[str, str]:
    return exchange.params["name"], exchange.params.get("version", "")


class Handlers:
    """One method per endpoint, each taking the :class:`Exchange` it answers."""

    def __init__(self, core: InferenceCore, control: ModelControl) -> None:
        self.core = core
        self.control = control
        self.max_body = core.registry.config.max_message_bytes
        self._static = {name: (STATIC_DIR / name).read_bytes() for name in STATIC}

    # -- KServe v2: health and metadata ---------------------------------------------

    async def live(self, exchange: Exchange) -> None:
        await exchange.json(200, {"live": True})

    async def ready(self, exchange: Exchange) -> None:
        ready = self.core.ready
        await exchange.json(200 if ready else 503, {"ready": ready})

    async def server_metadata(self, exchange: Exchange) -> None:
        await exchange.json(
            200,
            {"name": "tlserve", "version": tlserve_version(), "extensions": list(EXTENSIONS)},
        )

    async def model_metadata(self, exchange: Exchange) -> None:
        described = self.control.describe(*_model(exchange))
        model = described.loaded.model
        parameters = {"execution_provider": model.provider}
        if model.card is not None:
            parameters.update(model.card.to_props())

        def tensors(specs: Any) -> list[dict[str, Any]]:
            return [{"name": s.name, "datatype": s.datatype, "shape": list(s.shape)} for s in specs]

        await exchange.json(
            200,
            {
                "name": described.loaded.name,
                "versions": list(described.versions),
                "platform": "onnxruntime_onnx",
                "inputs": tensors(model.inputs),
                "outputs": tensors(model.outputs),
                "parameters": parameters,
            },
        )

    async def model_ready(self, exchange: Exchange) -> None:
        name, version = _model(exchange)
        self.core.registry.get(name, version)  # ModelNotFound: 404
        ready = self.control.model_ready(name, version)
        await exchange.json(200 if ready else 503, {"name": name, "ready": ready})

    # -- KServe v2: inference, and classification of encoded images -------------------

    async def infer(self, exchange: Exchange) -> None:
        name, version = _model(exchange)
        self.core.registry.get(name, version)  # 404 before the body is read
        length = exchange.headers.get(HEADER_LENGTH)
        if length is not None and not length.isdigit():
            raise InvalidInput(f"Inference-Header-Content-Length {length[:40]!r} is not a number")
        body = await exchange.body(self.max_body)
        request = parse_infer_request(body, None if length is None else int(length))
        loaded, outputs = await self.core.infer(
            name, version, request.inputs, deadline=exchange.deadline
        )
        if request.outputs:
            unknown = sorted(set(request.outputs) - set(outputs))
            if unknown:
                raise InvalidInput(
                    f"model {loaded.name!r} has no outputs {unknown}; it has {sorted(outputs)}"
                )
            outputs = {n: outputs[n] for n in request.outputs}
        head = {"model_name": loaded.name, "model_version": loaded.version, "id": request.id}
        answer, header_length = encode_response(head, outputs, request)
        if header_length is None:
            await exchange.answer(200, answer)
        else:
            await exchange.answer(
                200,
                answer,
                "application/octet-stream",
                [(HEADER_LENGTH, str(header_length))],
            )

    async def classify(self, exchange: Exchange) -> None:
        name, version = _model(exchange)
        self.core.registry.get(name, version)
        top_k = exchange.query("top_k") or "0"
        if not top_k.isdigit() or int(top_k) > 1_000_000:
            raise InvalidInput(f"top_k must be a whole number, got {top_k[:40]!r}")
        kind = exchange.content_type()
        if kind != "multipart/form-data" and kind not in _IMAGE_TYPES:
            raise InvalidInput(
                "send the images as multipart/form-data file parts, or one image as the body "
                f"(Content-Type image/jpeg or image/png); got Content-Type {kind[:80]!r}"
            )
        body = await exchange.body(self.max_body)
        if kind == "multipart/form-data":
            images = multipart_files(exchange.headers["content-type"], body, self.core.max_images)
        else:
            images = [body]
        loaded, results = await self.core.classify(
            name, version, images, top_k=int(top_k), deadline=exchange.deadline
        )
        await exchange.json(
            200,
            {
                "model_name": loaded.name,
                "model_version": loaded.version,
                "id": exchange.query("id") or "",
                "results": [
                    {
                        "labels": [
                            {"label": p.label, "index": p.index, "score": p.score} for p in row
                        ],
                        "ood_score": row.ood_score,
                        "out_of_distribution": row.out_of_distribution,
                    }
                    for row in results
                ],
            },
        )

    # -- the page ----------------------------------------------------------------------

    async def page_file(self, exchange: Exchange) -> None:
        file = exchange.params.get("file") or "index.html"
        if file not in self._static:
            raise ModelNotFound(f"no page file {file[:80]!r}")
        await exchange.answer(200, self._static[file], STATIC[file], _PAGE_SECURITY)

    async def page_models(self, exchange: Exchange) -> None:
        await exchange.json(
            200, {"ready": self.core.ready, "models": models_summary(self.core.registry)}
        )

    async def page_report(self, exchange: Exchange) -> None:
        name, version = _model(exchange)
        page = report_html(self.core.registry, name, version).encode()
        await exchange.answer(200, page, STATIC["index.html"], _PAGE_SECURITY)

    async def page_figure(self, exchange: Exchange) -> None:
        name, version = _model(exchange)
        data = figure(self.core.registry, name, version, exchange.params["file"])
        await exchange.answer(200, data, "image/png", _PAGE_SECURITY)
