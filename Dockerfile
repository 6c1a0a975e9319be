# syntax=docker/dockerfile:1
#
# llada-server image.
#
#   docker build -t llada-server:cpu .                          # CPU (default)
#   docker build --build-arg VARIANT=cuda -t llada-server:cuda .
#   docker run --rm -p 8000:8000 llada-server:cpu               # built-in demo model
#   docker run --rm --gpus all -p 8000:8000 -v /path/to/ckpts:/models:ro \
#       -e LLADA_MODEL=/models/llada llada-server:cuda
#
# Configuration is by LLADA_* environment variables (or CLI flags after the image name).

ARG VARIANT=cpu

# ---- builder: a wheel of the project ------------------------------------------------------
FROM python:3.11-slim AS builder
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
# The context is filtered by .dockerignore (no .venv, .git, caches, models).
COPY . /src
RUN pip wheel --no-deps --wheel-dir /wheels .

# ---- runtime bases: one per VARIANT, each with torch for its device ------------------------
FROM python:3.11-slim AS runtime-cpu
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python3 -m pip install "torch>=2.5,<3" --index-url https://download.pytorch.org/whl/cpu

FROM nvidia/cuda:12.4.1-runtime-ubuntu22.04 AS runtime-cuda
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-pip ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && ln -sf /usr/bin/python3 /usr/local/bin/python
RUN python3 -m pip install "torch>=2.5,<3" --index-url https://download.pytorch.org/whl/cu124

# ---- runtime: the selected base plus the server --------------------------------------------
FROM runtime-${VARIANT} AS runtime
ENV PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
COPY --from=builder /wheels /tmp/wheels
# torch is already installed above, so pip keeps the device-specific build.
RUN python3 -m pip install /tmp/wheels/*.whl && rm -rf /tmp/wheels

RUN useradd --create-home --uid 10001 --user-group --shell /usr/sbin/nologin llada \
    && mkdir -p /models \
    && chown llada:llada /models
USER llada
WORKDIR /home/llada

ENV LLADA_HOST=0.0.0.0 LLADA_PORT=8000
VOLUME /models
EXPOSE 8000

# /health is 200 only when the model is loaded and the engine loop is alive (503 otherwise,
# which urlopen raises). Loading an 8B checkpoint takes a while: hence the start period.
HEALTHCHECK --interval=15s --timeout=5s --start-period=300s --retries=3 \
    CMD python3 -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:${LLADA_PORT}/health', timeout=4)" || exit 1

ENTRYPOINT ["llada-server"]
