# The reconciler daemon: `reconciler run`, configured by RECONCILER_* variables and/or a YAML file.
#   docker build -t reconciler .
#   docker run -v reconciler-state:/var/lib/reconciler -v reconciler-history:/var/lib/reconciler-history \
#     -e RECONCILER_SOURCE_URL=https://git.example.org/ops/fleet.git -e RECONCILER_SERVER_READ_TOKEN_FILE=... \
#     -p 8080:8080 reconciler
# See docs/DEPLOY.md.
ARG BASE=python:3.11-slim
FROM ${BASE}

ARG DEBIAN_FRONTEND=noninteractive
# git fetches the fleet repo and keeps /etc history; ssh-keygen verifies SSH commit signatures;
# gnupg verifies OpenPGP ones. A base image without Python gets Debian's.
RUN apt-get update \
    && apt-get install -y --no-install-recommends git openssh-client gnupg ca-certificates \
    && if ! command -v python3 >/dev/null 2>&1; then \
         apt-get install -y --no-install-recommends python3 python3-venv; \
       fi \
    && rm -rf /var/lib/apt/lists/*

RUN python3 -m venv /opt/reconciler
ENV PATH=/opt/reconciler/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

# Optional: a CA bundle for pip behind a TLS-inspecting proxy (e.g. /etc/ssl/certs/ca-certificates.crt).
ARG PIP_CERT=""
# The dependencies first, from pyproject.toml alone (a stub package): this layer is rebuilt only
# when the dependencies change, not on every change of the code.
COPY pyproject.toml README.md /src/
RUN if [ -z "$PIP_CERT" ]; then unset PIP_CERT; fi \
    && mkdir -p /src/reconciler && touch /src/reconciler/__init__.py \
    && pip install --no-cache-dir --disable-pip-version-check /src && pip uninstall -q -y reconciler \
    && rm -rf /src
COPY pyproject.toml README.md /src/
COPY schemas /src/schemas
COPY reconciler /src/reconciler
RUN if [ -z "$PIP_CERT" ]; then unset PIP_CERT; fi \
    && pip install --no-cache-dir --disable-pip-version-check --no-deps /src && rm -rf /src

RUN useradd --system --uid 10001 --user-group --home-dir /var/lib/reconciler --shell /usr/sbin/nologin reconciler \
    && install -d -m 0700 -o reconciler -g reconciler /var/lib/reconciler /var/lib/reconciler-history

# 0.0.0.0: webhooks must reach the daemon. Beyond loopback it needs a read token for /status, /
# and /metrics (RECONCILER_SERVER_READ_TOKEN or ..._FILE; or RECONCILER_SERVER_PUBLIC_STATUS=true)
# or it refuses to start; /healthz (the HEALTHCHECK below) stays open.
ENV RECONCILER_STATE_DIR=/var/lib/reconciler \
    RECONCILER_HISTORY_REPO=/var/lib/reconciler-history \
    RECONCILER_SERVER_LISTEN=0.0.0.0 \
    RECONCILER_SERVER_PORT=8080 \
    HOME=/var/lib/reconciler

VOLUME ["/var/lib/reconciler", "/var/lib/reconciler-history"]
EXPOSE 8080
USER 10001:10001
WORKDIR /var/lib/reconciler

HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python3", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('RECONCILER_SERVER_PORT', '8080'), timeout=4)"]

# The daemon handles SIGTERM itself: in-flight reconciles get RECONCILER_SHUTDOWN_GRACE seconds.
STOPSIGNAL SIGTERM
ENTRYPOINT ["reconciler", "run"]
