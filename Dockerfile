# syntax=docker/dockerfile:1
# whaleid images. The default (last) stage is the slim serving image: the service and its
# migrations only; no TensorFlow, no training/ or model_export/. `--target train` builds the
# training and export image (docker compose --profile train).

# Build: the serving virtualenv, installed by the same script that CI replays
# (tests/test_docker.py runs this stage's COPY and RUN steps in a fresh virtualenv).
FROM python:3.11-slim AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 WHALEID_VENV=/opt/whaleid
WORKDIR /src
COPY pyproject.toml README.md LICENSE ./
COPY service ./service
COPY migrations ./migrations
COPY scripts/install-serving.sh scripts/serving_pyproject.py ./scripts/
RUN scripts/install-serving.sh

# Training and export: TensorFlow on the CPU (docs/training.md).
FROM python:3.11-slim AS train
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1
WORKDIR /app
COPY pyproject.toml README.md LICENSE ./
COPY service ./service
COPY migrations ./migrations
COPY training ./training
COPY model_export ./model_export
# The train and export extras pin every version in pyproject.toml.
# hadolint ignore=DL3013
RUN pip install '.[train,export]' \
    && useradd --system --uid 10001 --create-home whaleid
USER 10001
ENTRYPOINT ["whaleid-train"]
CMD ["--help"]

# Serve: the virtualenv from the build stage, run as a non-root user.
FROM python:3.11-slim AS serve
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PATH=/opt/whaleid/bin:$PATH \
    WHALEID_DATA_DIR=/data
RUN useradd --system --uid 10001 --create-home whaleid \
    && mkdir /data \
    && chown whaleid /data
COPY --from=build /opt/whaleid /opt/whaleid
COPY scripts/docker-entrypoint.sh /usr/local/bin/whaleid-entrypoint
USER 10001
VOLUME /data
EXPOSE 8000
# /health answers once the process serves; /ready also needs an active model.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"]
ENTRYPOINT ["whaleid-entrypoint"]
CMD ["--host", "0.0.0.0", "--port", "8000"]
