# Every way to run anything in tlserve is a target here: the README, CI and the
# Dockerfile call these and nothing else.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
TORCH_PINS := torch==2.14.1 torchvision==0.29.1

.PHONY: setup demo test browser lint typecheck image-test proto wheel bench bench-train bench-serve bench-calibration bench-ood bench-overload bench-auto k8s image clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q $(TORCH_PINS)
	$(PIP) install -q -e '.[train,serve,dev]'
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(PY) -m tlserve.cli.demo

test: lint typecheck image-test browser
	$(VENV)/bin/pytest -m "not image"

# Chromium and its driver for tests/server/test_page.py (the model page in a real
# browser); quick when they are there. CI runs as root on Debian.
browser:
	command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
		{ apt-get update -qq && apt-get install -y -qq chromium chromium-driver; }

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# The folders install as tlserve.* (package-dir mapping); mypy sees them the
# same way through a tree of links.
typecheck: setup
	rm -rf build/typecheck && mkdir -p build/typecheck/tlserve
	for d in contract client server training protos cli; do ln -s ../../../$$d build/typecheck/tlserve/$$d; done
	cd build/typecheck && ../../$(VENV)/bin/mypy --config-file ../../pyproject.toml \
		-p tlserve.contract -p tlserve.client -p tlserve.server -p tlserve.training -p tlserve.cli

# Generated stubs are committed (the bare client install then needs no
# grpcio-tools); regenerate after editing protos/*.proto.
proto:
	mkdir -p build/gen
	$(PY) -m grpc_tools.protoc -Itlserve/protos=protos \
		--python_out=build/gen --pyi_out=build/gen --grpc_python_out=build/gen \
		protos/grpc_service.proto protos/tlserve_v1.proto protos/health.proto
	sed -i -e 's/^DESCRIPTOR = _descriptor_pool.Default().AddSerializedFile(/DESCRIPTOR = POOL.AddSerializedFile(/' \
		-e 's/^from google.protobuf.internal import builder as _builder$$/&\nfrom tlserve.protos._pool import POOL/' \
		build/gen/tlserve/protos/*_pb2.py
	grep -q "POOL.AddSerializedFile" build/gen/tlserve/protos/grpc_service_pb2.py
	cp build/gen/tlserve/protos/*.py build/gen/tlserve/protos/*.pyi protos/

# Benchmarks print their figures; speed targets live here, not in tests.
bench: bench-train bench-serve

bench-train: setup
	$(PY) bench/train.py

bench-serve: setup
	$(PY) bench/serve.py

bench-calibration: setup
	$(PY) bench/calibration.py

# Which out-of-distribution score, its AUROC, and what it costs per image.
bench-ood: setup
	$(PY) bench/ood.py

# auto vs every single strategy on three small real datasets (slow: trains them all).
# auto against every single strategy: three small sets and two medium ones
# (1,000 training images at 128 px; Fashion-MNIST from Debian's package).
# BENCH_AUTO_ARGS="--sets medium" (or small) runs a subset.
bench-auto: setup
	@test -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz || \
		(apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist)
	$(PY) bench/auto.py $(BENCH_AUTO_ARGS)

# Goodput under 10x overload (2,000 calls in flight, 2 s deadlines) against a
# `tlserve serve` process, and how fast a light caller is refused.
bench-overload: setup
	$(PY) bench/overload.py

# The wheel the Docker images install (Dockerfile, stage "build").
wheel: setup
	$(PIP) wheel -q --no-deps --wheel-dir build/wheels .

# Kubernetes manifests as the cluster gets them (validated in `make test`).
k8s:
	kubectl kustomize deploy/overlays/gpu

# The serve-cpu image as production runs it, built and run with podman (no
# Docker engine needed): tests/deploy/test_image.py. podman, runc and
# debootstrap come from apt where missing; the stand-in base image and the
# build's layers stay in podman's store between runs.
image-test: setup
	bash deploy/podman/install.sh
	$(VENV)/bin/pytest -m image tests/deploy/test_image.py

# Needs a Docker engine (none on the development machines).
image: wheel
	docker build --target serve-gpu -t tlserve:serve-gpu .

clean:
	rm -rf build dist *.egg-info .mypy_cache .pytest_cache .ruff_cache
