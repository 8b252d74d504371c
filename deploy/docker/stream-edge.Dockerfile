# syntax=docker/dockerfile:1
# The stream edge: verifies stream tokens and relays SSE from the LLM backends.
# Build from the repository root:
#   docker build -f deploy/docker/stream-edge.Dockerfile -t llm-gateway/stream-edge .
# Configuration is the environment (README, .env.example, docs/operations.md).
ARG PYTHON_VERSION=3.12

# --- build: a virtualenv with the package and its dependencies ---
FROM python:${PYTHON_VERSION}-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/llm-gateway
WORKDIR /src
COPY pyproject.toml README.md ./
COPY shared ./shared
COPY control_plane ./control_plane
COPY stream_edge ./stream_edge
COPY mock_llm ./mock_llm
COPY llm_gateway ./llm_gateway
# A regular (not editable) install: only the installed tree moves to the runtime
# stage, already byte-compiled (the runtime writes no .pyc: its root may be read-only).
RUN /opt/llm-gateway/bin/pip install .

# --- runtime: the virtualenv, a non-root user, nothing else ---
FROM python:${PYTHON_VERSION}-slim AS runtime
RUN groupadd --system --gid 10001 llmgw \
    && useradd --system --uid 10001 --gid llmgw --home-dir /srv/llm-gateway \
       --shell /usr/sbin/nologin llmgw \
    && install -d -o llmgw -g llmgw /srv/llm-gateway /srv/llm-gateway/var/spool
COPY --from=build /opt/llm-gateway /opt/llm-gateway
ENV PATH=/opt/llm-gateway/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    LLMGW_LOG_FORMAT=json
WORKDIR /srv/llm-gateway
# The spool (LLMGW_SPOOL_DIR, var/spool here) keeps usage reports while Redis is down:
# mount a writable volume on it (the root may be read-only). Created here as the
# service's user, so a new Docker volume there is writable by it.
VOLUME ["/srv/llm-gateway/var/spool"]
USER 10001:10001
EXPOSE 8001
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8001/healthz', timeout=2).status != 200)"]
# SIGTERM drains: running streams get LLMGW_DRAIN_SECONDS (20) to finish, uvicorn
# waits 10 s more, then the outbox is flushed. Give the container longer than that
# (compose: stop_grace_period; Kubernetes: terminationGracePeriodSeconds).
STOPSIGNAL SIGTERM
ENTRYPOINT ["llm-gateway"]
CMD ["stream-edge", "--host", "0.0.0.0", "--port", "8001"]
