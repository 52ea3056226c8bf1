# megatron-solopo on an NGC PyTorch image (CUDA torch, Transformer Engine and apex included).
#
#   docker build -t megatron-solopo .
#   docker run --gpus all --ipc=host --rm -it -v /data:/data -v /ckpt:/ckpt megatron-solopo
#
# Slurm + pyxis: `enroot import dockerd://megatron-solopo` and pass the .sqsh as --container-image.
# Tests inside the image: docker run --gpus all --rm megatron-solopo python -m pytest tests -q
# Launch scripts for Slurm: examples/slurm/.
ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:25.09-py3
FROM ${BASE_IMAGE}

ENV CUDA_DEVICE_MAX_CONNECTIONS=1 \
    PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True

WORKDIR /opt/megatron-solopo
COPY pyproject.toml setup.py README.md Makefile ./
COPY megatron_solopo ./megatron_solopo
COPY tools ./tools
COPY examples ./examples
COPY tests ./tests
COPY docs ./docs

# NGC images pin their packages in /etc/pip/constraint.txt, which would refuse the transformers
# we need: the constraint is lifted for this step only (never as an ENV, so a later `pip install`
# in the image keeps NGC's torch, Transformer Engine and apex). Nothing here replaces them either:
# megatron-core goes in without dependencies. transformers: the range the test suite runs with.
RUN PIP_CONSTRAINT="" pip install --no-cache-dir --no-deps "megatron-core==0.19.2" \
 && PIP_CONSTRAINT="" pip install --no-cache-dir psutil sentencepiece pyyaml tqdm \
        "transformers>=5.24,<6" safetensors tokenizers tensorboard pytest \
 && PIP_CONSTRAINT="" pip install --no-cache-dir --no-deps -e . \
 && python -c "import torch, megatron_solopo, megatron.core; from megatron_solopo.model.build import te_available; print('torch', torch.__version__, 'TE', te_available())"
