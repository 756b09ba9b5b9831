# GPU image: CUDA PyTorch base plus megatron_pept with the gpu (flash-attn, transformer-engine), deepspeed and
# quant (bitsandbytes, torchao) extras.
#   docker build -t megatron_pept .
#   docker run --gpus all --ipc=host -v $PWD/runs:/workspace/runs megatron_pept \
#       python -m megatron_pept.train --config configs/quickstart.yaml
# The base image must match your cluster's driver; override with --build-arg BASE_IMAGE=...
ARG BASE_IMAGE=pytorch/pytorch:2.6.0-cuda12.4-cudnn9-devel
FROM ${BASE_IMAGE}

ENV PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    MAX_JOBS=8 \
    TORCH_CUDA_ARCH_LIST="8.0;9.0"

RUN apt-get update \
    && apt-get install -y --no-install-recommends git ninja-build openssh-client pdsh \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /workspace
# Dependencies first, so code edits do not rebuild flash-attn and transformer-engine.
COPY pyproject.toml README.md ./
COPY megatron_pept/__init__.py megatron_pept/__init__.py
# flash-attn and transformer-engine compile against the image's torch: no build isolation.
RUN pip install packaging wheel ninja \
    && pip install --no-build-isolation -e ".[gpu,deepspeed,quant]"
COPY . .
RUN pip install --no-build-isolation --no-deps -e . \
    && python -c "import megatron_pept.train, flash_attn, transformer_engine.pytorch, deepspeed, bitsandbytes"
