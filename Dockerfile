# syntax=docker/dockerfile:1
#
# Tollgate's container image: `tollgate serve` (the ext_proc gRPC server) by default; the same
# image runs `tollgate migrate`, `tollgate usage`, `tollgate fake-provider`, ...
#
#   docker build -t tollgate:0.1.0 .
#
# Two stages: the first builds Tollgate's wheel from the sources, the second installs that
# wheel (no dev extras) into a virtualenv on a fresh base, so no build backend, source tree or
# pip cache reaches the final image. tests/unit/test_dockerfile.py checks these properties and
# tests/integration/test_wheel_install.py runs the same build and install commands outside
# Docker. Deployment notes: docs/deploy.md.

# ---- stage 1: build the wheel ----------------------------------------------------------------
FROM python:3.12.12-slim-bookworm AS build

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1

WORKDIR /src
# Only what the wheel is made of (see .dockerignore): the project metadata and the package.
COPY pyproject.toml README.md ./
COPY src/ src/
RUN python -m pip wheel --no-deps --wheel-dir /dist .

# ---- stage 2: the runtime image --------------------------------------------------------------
FROM python:3.12.12-slim-bookworm AS runtime

ARG SOURCE_URL=https://github.com/tollgate-dev/tollgate

LABEL org.opencontainers.image.title="tollgate" \
      org.opencontainers.image.description="Per-user usage and cost attribution for LLM traffic: an Envoy ext_proc server with a Postgres ledger" \
      org.opencontainers.image.source="${SOURCE_URL}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="0.1.0"

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/tollgate/bin:$PATH \
    TOLLGATE_STATE_DIR=/var/lib/tollgate \
    TOLLGATE_GRPC_ADDRESS=unix:/run/tollgate/extproc.sock \
    TOLLGATE_METRICS_ADDRESS=0.0.0.0:9464

# A fixed, numeric, unprivileged identity: Envoy must run with the same UID to reach the
# owner-only (0600) ext_proc socket, and Kubernetes' runAsNonRoot can verify a numeric USER.
# /var/lib/tollgate holds the journal (records not yet shipped to Postgres); /run/tollgate the
# ext_proc socket. Both are owned by 10001 and closed to everyone else.
RUN groupadd --system --gid 10001 tollgate \
    && useradd --system --uid 10001 --gid 10001 --no-create-home \
        --home-dir /var/lib/tollgate --shell /usr/sbin/nologin tollgate \
    && install -d -o 10001 -g 10001 -m 0700 /var/lib/tollgate /run/tollgate

# The wheel comes from the build stage through a bind mount, so not even it is left in a layer.
RUN --mount=type=bind,from=build,source=/dist,target=/dist \
    python -m venv /opt/tollgate \
    && /opt/tollgate/bin/pip install --no-cache-dir /dist/*.whl

USER 10001:10001
WORKDIR /var/lib/tollgate
VOLUME ["/var/lib/tollgate"]

# Tollgate's HTTP endpoint: /metrics, /healthz, /readyz. The ext_proc server listens on the
# unix socket above (share /run/tollgate with Envoy), so it has no port to expose.
EXPOSE 9464

# No HEALTHCHECK on purpose: the image is meant for Kubernetes, whose liveness and readiness
# probes use /healthz and /readyz (Docker's HEALTHCHECK is ignored there). docker-compose.yml
# declares its own healthcheck against /readyz.

ENTRYPOINT ["tollgate"]
CMD ["serve"]
