# syntax=docker/dockerfile:1.7
# The operator: kopf, the kubernetes client and the torch-free part of pollinate-runtime
# (the Flower control client, the S3 store reader). Never torch: it schedules training.
#
#   docker build -f images/operator.Dockerfile -t ghcr.io/pollinate-dev/operator:0.1.0 .
#
# tests/unit/test_images.py installs the same package set into a clean environment and
# checks that it imports, runs `pollinate-operator --help`, and has no torch.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
ARG UV_IMAGE=ghcr.io/astral-sh/uv:0.12.24

FROM ${UV_IMAGE} AS uv

FROM ${PYTHON_IMAGE} AS build
COPY --from=uv /uv /usr/local/bin/uv
WORKDIR /src
COPY requirements/dev.lock requirements/dev.lock
COPY client-runtime/ client-runtime/
COPY operator/ operator/
# dev.lock as constraints: exactly the versions the tests ran with, and only those the two
# packages need. The import check fails the build if torch ever slips in.
RUN uv venv --python /usr/local/bin/python3.11 /opt/pollinate \
 && uv pip install --no-cache --python /opt/pollinate/bin/python \
      --constraint requirements/dev.lock ./client-runtime ./operator \
 && /opt/pollinate/bin/python -c "import pollinate_operator.handlers" \
 && ! /opt/pollinate/bin/python -c "import torch" 2>/dev/null

FROM ${PYTHON_IMAGE}
# 65532: the user every Pollinate pod runs as (pollinate_operator/manifests/security.py).
RUN groupadd --gid 65532 pollinate \
 && useradd --uid 65532 --gid 65532 --home-dir /tmp --no-create-home --shell /usr/sbin/nologin pollinate
COPY --from=build /opt/pollinate /opt/pollinate
# The root filesystem is read-only in the pod; /tmp is its one writable mount.
ENV PATH=/opt/pollinate/bin:$PATH \
    HOME=/tmp \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
USER 65532:65532
# Metrics (POLLINATE_METRICS_PORT) and kopf's liveness endpoint (--liveness).
EXPOSE 8080 8081
ENTRYPOINT ["pollinate-operator"]
