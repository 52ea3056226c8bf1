# megatron-solopo on an NGC PyTorch image (CUDA torch, Transformer Engine and apex included).
#
#   docker build -t megatron-solopo .
#   docker run --gpus all --ipc=host --rm -it -v /data:/data -v /ckpt:/ckpt megatron-solopo
#
# Slurm + pyxis: `enroot import dockerd://megatron-solopo` and pass the .sqsh as --container-image.
# Launch scripts for Slurm: examples/slurm/.
ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:25.09-py3
FROM ${BASE_IMAGE}

# NGC images pin their packages in /etc/pip/constraint.txt. We add packages and never replace the
# image's torch, Transformer Engine or apex: megatron-core is installed without dependencies.
ENV PIP_CONSTRAINT="" \
    CUDA_DEVICE_MAX_CONNECTIONS=1 \
    PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True

WORKDIR /opt/megatron-solopo
COPY pyproject.toml setup.py README.md Makefile ./
COPY megatron_solopo ./megatron_solopo
COPY tools ./tools
COPY examples ./examples

RUN pip install --no-cache-dir --no-deps "megatron-core==0.19.2" \
 && pip install --no-cache-dir psutil sentencepiece pyyaml tqdm "transformers>=4.45" safetensors tokenizers tensorboard \
 && pip install --no-cache-dir --no-deps -e . \
 && python -c "import torch, megatron_solopo, megatron.core; from megatron_solopo.model.build import te_available; print('torch', torch.__version__, 'TE', te_available())"
