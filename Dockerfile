# llmfoundry_lite on CUDA: PyTorch 2.7 (CUDA 12.6, cuDNN 9) + flash-attn + this package.
#   docker build -t llmfoundry-lite .
#   docker run --gpus all --ipc=host -v $PWD:/work -w /work llmfoundry-lite train recipes/llama/125m.yaml --nproc 8
# --ipc=host (or a large --shm-size): dataloader workers and streaming share memory through /dev/shm.
FROM pytorch/pytorch:2.7.0-cuda12.6-cudnn9-devel

ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    TOKENIZERS_PARALLELISM=false

RUN apt-get update \
    && apt-get install -y --no-install-recommends git \
    && rm -rf /var/lib/apt/lists/*

# flash-attn compiles against the torch already in the image (no build isolation), so its binary matches
# this torch/CUDA; a wheel built for another torch fails at import with "undefined symbol"
# (`llmfoundry-lite doctor` reports it). MAX_JOBS bounds the compiler's memory use.
RUN pip install packaging ninja \
    && MAX_JOBS=8 pip install --no-build-isolation "flash-attn>=2.6,<3"

WORKDIR /opt/llmfoundry_lite
COPY pyproject.toml README.md ./
COPY llmfoundry_lite ./llmfoundry_lite
COPY recipes ./recipes
COPY scripts ./scripts
# torch is pinned to the image's 2.7.0, so pip keeps it instead of downloading another build.
RUN pip install ".[gpu]" && llmfoundry-lite doctor

WORKDIR /work
ENTRYPOINT ["llmfoundry-lite"]
CMD ["--help"]
