# Two images, one venv each (/app/.venv), every dependency from the locks (bin/lock, pip-compile):
#   --target light (ourvidz-tasks-light): `pip install .`, no torch (requirements/light.lock): the
#       callback outbox consumer (bin/worker outbox), Flower (bin/flower), the metrics exporter and
#       the CLI (ourvidz), the legacy bridge (bin/bridge)
#   --target worker, the default (ourvidz-tasks): `pip install '.[worker]'` (requirements/runtime.lock):
#       the three GPU pools (bin/worker sdxl|chat|wan), or all of them supervised in one container
#       (`bin/worker all`, the default command: one GPU pod, docs/operators.md). torch, pinned on its own in
#       requirements/torch.txt, is the CUDA build:
#   default: the package index's own torch wheel, built with CUDA 13.0: needs NVIDIA driver >= 580
#   older driver (>= 570, CUDA 12.8): --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128
#                                     --build-arg TORCH_CUDA=12.8
#   a CPU host (tiny models, bin/compose-check): --build-arg TORCH_CUDA=cpu with the CPU wheel in docker/wheels/
# The build fails if the torch it installed is not the stated CUDA build.
#
# Where no registry serves python:3.11-slim, BASE names any Debian-like image with python3 and
# python3-venv (bin/compose-check imports one made by debootstrap). Behind a TLS-intercepting proxy,
# or with local wheels, the files go in through the context: docker/ca/*.crt (trusted by pip with
# --build-arg PIP_CERT=/usr/local/share/ourvidz-ca/NAME.crt) and docker/wheels/*.whl (looked up
# first); any other pip option by its environment name: --build-arg PIP_INDEX_URL=... (docker/README.md).
ARG BASE=python:3.11-slim
FROM ${BASE} AS base
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 HF_HUB_OFFLINE=1 PATH=/app/.venv/bin:$PATH
WORKDIR /app
RUN python3 -m venv /app/.venv && useradd --create-home --uid 1000 ourvidz
COPY docker/ca/ /usr/local/share/ourvidz-ca/
COPY requirements ./requirements
# Flower; the metrics exporter; the metrics of sdxl, chat, wan, outbox (OURVIDZ_METRICS_PORT + offset)
EXPOSE 5555 9100 9101 9102 9103 9104
ENTRYPOINT ["/app/bin/worker"]

# the project itself, installed last in both images: a code change rebuilds no dependency layer
FROM scratch AS source
COPY setup.cfg pyproject.toml README.md /app/
COPY ourvidz_tasks /app/ourvidz_tasks
COPY bin /app/bin

FROM base AS light
ARG PIP_CERT
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
RUN pip install -r requirements/light.lock
COPY --from=source /app /app
RUN pip install --no-deps /app && pip check
USER ourvidz

FROM base AS worker
ARG TORCH_INDEX=
ARG TORCH_CUDA=13.0
ARG PIP_CERT
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
COPY docker/wheels/ /tmp/wheels/
RUN apt-get update && apt-get install -y --no-install-recommends libgl1 libglib2.0-0 \
    && rm -rf /var/lib/apt/lists/*
RUN pip install --find-links /tmp/wheels ${TORCH_INDEX:+--index-url "$TORCH_INDEX"} -r requirements/torch.txt \
    && python -c "import sys, torch; sys.exit((torch.version.cuda or 'cpu') != '$TORCH_CUDA')" \
    && pip install -r requirements/runtime.lock
COPY --from=source /app /app
RUN pip install --no-deps /app && pip check
# the spool and tiny-model cache: a named volume mounted here starts with this owner, not root's
RUN install -d -o ourvidz -g ourvidz /home/ourvidz/.cache /home/ourvidz/.cache/ourvidz_tasks
USER ourvidz
# one GPU pod: every pool of OURVIDZ_POD supervised (docs/operators.md); compose names one role per service
CMD ["all"]
