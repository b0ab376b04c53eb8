# One image for every role: the three GPU pools, Flower, and later roles.
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
ENTRYPOINT ["/app/bin/worker"]
