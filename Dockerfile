# syntax=docker/dockerfile:1
# tlserve images. Targets:
#   serve-gpu (default)  CUDA runtime + tlserve[serve-gpu]; no torch
#   serve-cpu            slim Python + tlserve[serve]; no torch
#   train                tlserve[train] for `tlserve train`
# The install steps are the Makefile's (`make wheel`, then pip install of the
# wheel with an extra), so what the tests exercise is what the image runs
# (tests/deploy/test_dockerfile.py holds them together, and runs hadolint).
# Drain: SIGTERM -> NOT_SERVING for TLSERVE_DRAIN_DELAY -> TLSERVE_GRACE for
# in-flight calls. Kubernetes' terminationGracePeriodSeconds (deploy/base: 40)
# must exceed preStop (5) + drain (5) + grace (20).

ARG PYTHON_IMAGE=python:3.11-slim-bookworm
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

# ---- build: one wheel of tlserve --------------------------------------------
FROM ${PYTHON_IMAGE} AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY protos/ protos/
COPY contract/ contract/
COPY client/ client/
COPY server/ server/
COPY training/ training/
COPY cli/ cli/
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

# ---- serve-cpu ----------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS serve-cpu
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir "$(ls /wheels/tlserve-*.whl)[serve]" \
    && useradd --system --uid 10001 --no-create-home tlserve
USER 10001
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    TLSERVE_MODEL_REPOSITORY=/models \
    TLSERVE_HOST=0.0.0.0 \
    TLSERVE_GRPC_PORT=8001 \
    TLSERVE_HTTP_PORT=8000 \
    TLSERVE_METRICS_PORT=8002 \
    TLSERVE_DRAIN_DELAY=5 \
    TLSERVE_GRACE=20
VOLUME ["/models"]
EXPOSE 8001 8002 8000
# SIGTERM starts the drain; Kubernetes' terminationGracePeriodSeconds must
# exceed TLSERVE_DRAIN_DELAY + TLSERVE_GRACE.
STOPSIGNAL SIGTERM
# Docker's own check; on Kubernetes the gRPC probes in deploy/ are the real ones.
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s \
    CMD ["tlserve", "health", "--timeout", "3"]
ENTRYPOINT ["tlserve", "serve"]

# ---- train --------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS train
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir torch==2.14.1 torchvision==0.29.1 \
    && pip install --no-cache-dir "$(ls /wheels/tlserve-*.whl)[train]" \
    && useradd --system --uid 10001 --create-home tlserve
USER 10001
WORKDIR /home/tlserve
ENTRYPOINT ["tlserve", "train"]

# ---- serve-gpu (default) ------------------------------------------------------
FROM ${CUDA_IMAGE} AS serve-gpu
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/tlserve
COPY --from=build /wheels /wheels
RUN /opt/tlserve/bin/pip install --no-cache-dir "$(ls /wheels/tlserve-*.whl)[serve-gpu]" \
    && useradd --system --uid 10001 --no-create-home tlserve
ENV PATH=/opt/tlserve/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    TLSERVE_MODEL_REPOSITORY=/models \
    TLSERVE_HOST=0.0.0.0 \
    TLSERVE_GRPC_PORT=8001 \
    TLSERVE_HTTP_PORT=8000 \
    TLSERVE_METRICS_PORT=8002 \
    TLSERVE_DEVICE=cuda \
    TLSERVE_DRAIN_DELAY=5 \
    TLSERVE_GRACE=20
USER 10001
VOLUME ["/models"]
EXPOSE 8001 8002 8000
STOPSIGNAL SIGTERM
# Docker's own check; on Kubernetes the gRPC probes in deploy/ are the real ones.
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s \
    CMD ["tlserve", "health", "--timeout", "3"]
ENTRYPOINT ["tlserve", "serve"]
