# GPU image: CUDA 12.8 + cuDNN (devel: nvcc for the GPU extras), torch 2.13.0 (the tested version, as in README and
# tests) from PyTorch's cu128 index, and megatron_pept installed from its wheel (not editable) with the deepspeed,
# quant and hf extras (EXTRAS); flash-attn and transformer-engine (the gpu extra) only with WITH_GPU_EXTRAS=1.
#   docker build -t megatron_pept .
#   docker build --build-arg WITH_GPU_EXTRAS=1 -t megatron_pept:gpu .     # compiles flash-attn + TE (slow)
#   docker run --gpus all --ipc=host -v $PWD/runs:/workspace/runs megatron_pept            # CMD: the quickstart
#   docker run --gpus all --ipc=host megatron_pept megatron-pept-train --config relora_350m data.path=...
#   docker run megatron_pept bash -c 'ls $(megatron-pept-launch-dir)'                    # the launch scripts
# The base image must suit your cluster's driver (CUDA 12.8: driver >= 570). For another CUDA line override both,
# e.g. --build-arg BASE_IMAGE=nvidia/cuda:13.0.1-cudnn-devel-ubuntu24.04
#      --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu130
# Behind a mirror: --build-arg PIP_INDEX_URL=... (and PIP_FIND_LINKS, PIP_TRUSTED_HOST; TORCH_INDEX_URL too).
ARG BASE_IMAGE=nvidia/cuda:12.8.1-cudnn-devel-ubuntu22.04
FROM ${BASE_IMAGE}

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
ARG WITH_GPU_EXTRAS=0
ARG EXTRAS=deepspeed,quant,hf
ARG PIP_INDEX_URL
ARG PIP_FIND_LINKS
ARG PIP_TRUSTED_HOST

ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    MAX_JOBS=8 \
    TORCH_CUDA_ARCH_LIST="8.0;9.0" \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:${PATH}

# pdsh and openssh-client: DeepSpeed's multi-node runner; ninja and the compilers: the GPU extras and DeepSpeed ops.
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev build-essential git ninja-build \
        openssh-client pdsh ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv \
    && pip install --upgrade pip "setuptools>=68" wheel packaging ninja

RUN pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"

# Dependencies before the code, so code edits reuse these layers. The package itself is removed again here and
# installed from the full sources below; configs/ and launch/ are copied because setup.py maps them into it. No
# build isolation: DeepSpeed builds against the installed torch.
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY configs/ configs/
COPY launch/ launch/
COPY megatron_pept/__init__.py megatron_pept/__init__.py
RUN pip install --no-build-isolation ".[${EXTRAS}]" \
    && pip uninstall -y megatron_pept \
    && python -c "import torch; assert torch.__version__.startswith('${TORCH_VERSION}'), torch.__version__" \
    && python -c "import importlib, sys; m = dict(deepspeed='deepspeed', quant='bitsandbytes', hf='transformers'); \
                  [importlib.import_module(m[e]) for e in sys.argv[1].split(',') if e in m]" "${EXTRAS}"

# flash-attn and transformer-engine compile against the installed torch and the image's CUDA toolkit: no build
# isolation (they import torch in their build), and a layer of their own.
RUN if [ "${WITH_GPU_EXTRAS}" = "1" ]; then \
        pip install --no-build-isolation ".[gpu]" \
        && pip uninstall -y megatron_pept \
        && python -c "import flash_attn, transformer_engine.pytorch"; \
    fi

COPY . /src
RUN pip install --no-build-isolation --no-deps /src \
    && cd / && rm -rf /src \
    && python -c "import megatron_pept.train" \
    && megatron-pept-train --config quickstart --print-config > /dev/null \
    && ls "$(megatron-pept-launch-dir)/torchrun.sh"

WORKDIR /workspace
# The quickstart: the debug LLaMA on the built-in generated corpus (written under /workspace, no download), from
# the configuration shipped in the package.
CMD ["megatron-pept-train", "--config", "quickstart"]
