# One image for every role: the three GPU pools and the callback outbox (bin/worker, the
# entrypoint), Flower (bin/flower), the metrics exporter (ourvidz metrics), the legacy bridge.
# CUDA builds of torch come from PyPI's default torch wheel (CUDA 12.x).
FROM python:3.11-slim
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 HF_HUB_OFFLINE=1
RUN apt-get update && apt-get install -y --no-install-recommends libgl1 libglib2.0-0 \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY setup.cfg pyproject.toml README.md celeryconfig.py ./
COPY ourvidz_tasks ./ourvidz_tasks
COPY bin ./bin
RUN python -m venv /app/.venv && /app/.venv/bin/pip install torch && /app/.venv/bin/pip install /app
ENV PATH=/app/.venv/bin:$PATH
RUN useradd --create-home --uid 1000 ourvidz
USER ourvidz
# Flower; the metrics exporter; the metrics of sdxl, chat, wan, outbox (OURVIDZ_METRICS_PORT + offset)
EXPOSE 5555 9100 9101 9102 9103 9104
ENTRYPOINT ["/app/bin/worker"]
