# syntax=docker/dockerfile:1.7
# One image for every Atelier process:
#   docker build -t atelier:local .
#   docker run atelier:local api | worker [--only ai|main] | migrate
# Stage 1 builds wheels for the project and its dependencies and installs them into a
# virtualenv; stage 2 is a slim runtime with only that virtualenv, run as a non-root user.

ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY atelier ./atelier
COPY activities ./activities
COPY workflows ./workflows
COPY starter ./starter
COPY worker.py ./
RUN pip wheel --wheel-dir /wheels . \
 && python -m venv /opt/atelier \
 && /opt/atelier/bin/pip install --no-index --find-links /wheels atelier
# The Alembic scripts live beside the package's prefix; atelier.migrate looks there.
COPY migrations /opt/atelier/share/atelier/migrations

FROM ${PYTHON_IMAGE} AS runtime
ENV PATH=/opt/atelier/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    ATELIER_API_HOST=0.0.0.0 \
    ATELIER_BLOB_DIR=/data/blobs
# A fixed uid/gid so volume ownership is the same on every host. /data/blobs is created
# here, owned by that user, so a new named volume mounted there inherits the ownership.
RUN groupadd --system --gid 10001 atelier \
 && useradd --system --uid 10001 --gid atelier --home-dir /srv/atelier --create-home \
        --shell /usr/sbin/nologin atelier \
 && mkdir -p /data/blobs \
 && chown atelier:atelier /data/blobs
COPY --from=build /opt/atelier /opt/atelier
COPY --chmod=0755 deploy/docker-entrypoint.sh /usr/local/bin/docker-entrypoint
COPY --chmod=0755 deploy/healthcheck.py /usr/local/bin/atelier-healthcheck
USER atelier
WORKDIR /srv/atelier
EXPOSE 8000
# api: GET /healthz; worker: Temporal reachable; migrate: its exit code (see deploy/healthcheck.py).
HEALTHCHECK --interval=30s --timeout=10s --start-period=30s --retries=3 \
    CMD ["docker-entrypoint", "healthcheck"]
ENTRYPOINT ["docker-entrypoint"]
CMD ["api"]
