# Neon on NVIDIA's NGC PyTorch image, which brings CUDA, cuDNN, NCCL, PyTorch, Transformer Engine
# and apex. 25.10: Python 3.12 and PyTorch 2.9; megatron-core 0.16.1 (the version Neon is tested
# with, pinned in pyproject.toml) ships cp312 wheels.
#
#   docker build -t neon:0.1 .
#   docker run --gpus all --ipc=host --rm -it -v /data:/data neon:0.1
#
# Install step = tools/install_neon.sh, the same script the test suite runs (with --dry-run,
# tests/launch/test_docker.py) in CI: pyproject's dependencies under a constraint that keeps the
# image's own torch. No secrets are baked in: give WANDB_API_KEY etc. at run time.
FROM nvcr.io/nvidia/pytorch:25.10-py3

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    NEON_DIR=/opt/neon

WORKDIR /opt/neon
# .dockerignore keeps virtual environments, runs, checkpoints and git history out of the context.
COPY . /opt/neon
RUN bash tools/install_neon.sh /opt/neon \
    && python -c "import megatron.core, neon, torch; print('megatron-core', megatron.core.__version__, 'torch', torch.__version__)"

# Run as an unprivileged user (pyxis/enroot run containers as the submitting user anyway).
RUN groupadd --gid 10001 neon \
    && useradd --uid 10001 --gid 10001 --create-home --shell /bin/bash neon \
    && mkdir -p /opt/neon/runs \
    && chown 10001:10001 /opt/neon/runs
USER 10001:10001
