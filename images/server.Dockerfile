# syntax=docker/dockerfile:1.7
# The Flower server of a Federation: SuperLink (`pollinate-superlink`, which starts
# `flwr-serverapp` for each run) plus Pollinate's server app (aggregation, central DP,
# checkpoints and adapter versions in S3). No torch: the server never trains.
#
#   docker build -f images/server.Dockerfile -t ghcr.io/pollinate-dev/server:0.1.0 .
#
# The operator runs it as `pollinate-superlink --host ... --port ... --ssl-* --database ...`
# (pollinate_operator/manifests/server.py): `flower-superlink` with a longer wait for its
# SQLite lock (pollinate_runtime/superlink.py). tests/unit/test_images.py installs the same
# package set into a clean environment and checks the server app imports without torch.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
ARG UV_IMAGE=ghcr.io/astral-sh/uv:0.12.24

FROM ${UV_IMAGE} AS uv

FROM ${PYTHON_IMAGE} AS build
COPY --from=uv /uv /usr/local/bin/uv
WORKDIR /src
COPY requirements/dev.lock requirements/dev.lock
COPY client-runtime/ client-runtime/
# flwr[dp]: the RDP accountant behind a TrainingRound's privacy.noiseMultiplier > 0
# (pollinate_runtime/privacy.py); pollinate-runtime alone does not pull it in.
RUN uv venv --python /usr/local/bin/python3.11 /opt/pollinate \
 && uv pip install --no-cache --python /opt/pollinate/bin/python \
      --constraint requirements/dev.lock ./client-runtime "flwr[dp]" \
 && /opt/pollinate/bin/python -c "import pollinate_runtime.server_app" \
 && ! /opt/pollinate/bin/python -c "import torch" 2>/dev/null

FROM ${PYTHON_IMAGE}
RUN groupadd --gid 65532 pollinate \
 && useradd --uid 65532 --gid 65532 --home-dir /var/lib/pollinate --no-create-home \
      --shell /usr/sbin/nologin pollinate
COPY --from=build /opt/pollinate /opt/pollinate
# The pod mounts its state (FLWR_HOME, HOME) at /var/lib/pollinate and TLS at
# /etc/pollinate/tls; the root filesystem stays read-only.
ENV PATH=/opt/pollinate/bin:$PATH \
    FLWR_HOME=/var/lib/pollinate/flwr \
    HOME=/var/lib/pollinate/home \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
USER 65532:65532
# Flower's one HTTP port: fleet, control and runtime APIs (pollinate_operator/settings.py).
EXPOSE 9092
ENTRYPOINT ["pollinate-superlink"]
CMD ["--help"]
