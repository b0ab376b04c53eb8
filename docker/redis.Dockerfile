# Redis on the Debian base, for hosts no registry serves redis:7.2-alpine (bin/compose-check):
#   docker build --network host -f docker/redis.Dockerfile --build-arg BASE=ourvidz-base:bookworm -t ourvidz-redis:bookworm docker
ARG BASE=python:3.11-slim
FROM ${BASE}
RUN apt-get update && apt-get install -y --no-install-recommends redis-server \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /data
EXPOSE 6379
CMD ["redis-server"]
