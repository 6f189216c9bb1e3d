# syntax=docker/dockerfile:1
# retclip-dist training image. Default: CUDA 12.8 runtime with the matching torch wheels, for H100 nodes.
# CPU variant for CI and laptops: docker build --build-arg VARIANT=cpu -t retclip-dist:cpu .
ARG VARIANT=cuda

FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04 AS base-cuda
ENV TORCH_INDEX=https://download.pytorch.org/whl/cu128

FROM ubuntu:24.04 AS base-cpu
ENV TORCH_INDEX=https://download.pytorch.org/whl/cpu

# hadolint ignore=DL3006
FROM base-${VARIANT} AS build
ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev gcc g++ \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY pyproject.toml README.md ./
COPY retclip_dist ./retclip_dist
# torch first from the index that matches the base image, at pyproject.toml's bounds (hadolint wants a
# version here; tests/test_dockerfile.py checks they agree). DeepSpeed builds its ops JIT on first use.
RUN pip install --index-url "${TORCH_INDEX}" "torch>=2.11" "torchvision>=0.26" \
    && DS_BUILD_OPS=0 pip install "/src[deepspeed,s3,dicom]"

# hadolint ignore=DL3006
FROM base-${VARIANT} AS runtime
ENV DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 libgomp1 ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --create-home --uid 10001 retclip
COPY --from=build /opt/venv /opt/venv
COPY --chown=10001:10001 configs /opt/retclip/configs
COPY --chown=10001:10001 launch /opt/retclip/launch
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1
USER 10001:10001
WORKDIR /opt/retclip
CMD ["retclip-train", "--help"]
