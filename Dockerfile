# One image for every role: the three GPU pools and the callback outbox (bin/worker, the
# entrypoint), Flower (bin/flower), the metrics exporter (ourvidz metrics), the legacy bridge.
# Dependencies come from the lock (requirements/runtime.lock, made by bin/lock with pip-compile);
# torch, pinned on its own in requirements/torch.txt, is the CUDA build:
#   default: the package index's own torch wheel, built with CUDA 13.0: needs NVIDIA driver >= 580
#   older driver (>= 570, CUDA 12.8): --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128
#                                     --build-arg TORCH_CUDA=12.8
# The build fails if the torch it installed is not the stated CUDA build.
FROM python:3.11-slim
ARG TORCH_INDEX=
ARG TORCH_CUDA=13.0
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 HF_HUB_OFFLINE=1
RUN apt-get update && apt-get install -y --no-install-recommends libgl1 libglib2.0-0 \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY requirements ./requirements
RUN python -m venv /app/.venv \
    && /app/.venv/bin/pip install ${TORCH_INDEX:+--index-url "$TORCH_INDEX"} -r requirements/torch.txt \
    && /app/.venv/bin/python -c "import sys, torch; sys.exit(torch.version.cuda != '$TORCH_CUDA')" \
    && /app/.venv/bin/pip install -r requirements/runtime.lock
COPY setup.cfg pyproject.toml README.md  ./
COPY ourvidz_tasks ./ourvidz_tasks
COPY bin ./bin
RUN /app/.venv/bin/pip install --no-deps /app && /app/.venv/bin/pip check
ENV PATH=/app/.venv/bin:$PATH
RUN useradd --create-home --uid 1000 ourvidz
USER ourvidz
# Flower; the metrics exporter; the metrics of sdxl, chat, wan, outbox (OURVIDZ_METRICS_PORT + offset)
EXPOSE 5555 9100 9101 9102 9103 9104
ENTRYPOINT ["/app/bin/worker"]
