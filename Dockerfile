# docker-event-relay container image.
#
#   docker build -t docker-event-relay .
#   docker run -d --name docker-event-relay \
#     -v /var/run/docker.sock:/var/run/docker.sock:ro \
#     --group-add "$(stat -c %g /var/run/docker.sock)" \
#     -v relay-state:/var/lib/docker-event-relay \
#     -p 9477:9477 \
#     -e RELAY_SINKS='[{"type": "kafka", "bootstrap_servers": ["kafka:9092"]}]' \
#     docker-event-relay
#
# The engine socket: the relay only reads (GET /info, GET /events), so mount it read-only.
# `:ro` keeps the socket file from being replaced, not the API from being written to: whoever
# can connect to the socket controls the engine. The relay runs as an unprivileged user
# (uid/gid 10001) that can connect only with the socket's group, hence `--group-add` with the
# socket's group id on the host (usually the `docker` group; 0 where the socket is root:root).
#
# State: the checkpoint (where to resume after a restart) lives in /var/lib/docker-event-relay;
# keep it on a volume so a restarted container resumes where it stopped.
#
# BASE_IMAGE: any Debian-like image with python3 (3.11 or newer) and its venv module, the same
# for both stages (the venv points at the base's interpreter). The default is pinned by digest
# by whoever publishes; an offline build can pass a locally made base (scripts/build-image.sh).
# pip settings come in as build arguments (PIP_INDEX_URL, PIP_FIND_LINKS, PIP_NO_INDEX...):
# build arguments are environment variables of RUN steps and pip reads them from there; they
# stay in the builder stage.

ARG BASE_IMAGE=python:3.11.13-slim-bookworm

FROM ${BASE_IMAGE} AS builder
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
ARG PIP_FIND_LINKS
ARG PIP_NO_INDEX
ARG PIP_TRUSTED_HOST
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python3 -m venv /opt/relay
WORKDIR /src
COPY pyproject.toml README* ./
COPY relay ./relay
COPY sinks ./sinks
# Compiled bytecode ships in the image: the runtime root filesystem may be read-only, and
# compiling at every start would cost CPU and memory on every node. pip and setuptools are
# not needed at run time.
RUN /opt/relay/bin/pip install --no-compile . \
    && /opt/relay/bin/pip uninstall --yes pip setuptools wheel \
    && /opt/relay/bin/python -m compileall -q -j 0 /opt/relay/lib \
    && /opt/relay/bin/docker-event-relay check-config

FROM ${BASE_IMAGE}
LABEL org.opencontainers.image.title="docker-event-relay" \
      org.opencontainers.image.description="Relay Docker Engine events as CloudEvents to Kafka, MQTT and webhooks" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --system --gid 10001 relay \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin relay \
    && mkdir -p /var/lib/docker-event-relay \
    && chown 10001:10001 /var/lib/docker-event-relay
COPY --from=builder /opt/relay /opt/relay
ENV PATH=/opt/relay/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    RELAY_STATE_DIR=/var/lib/docker-event-relay \
    RELAY_HTTP__PORT=9477
USER 10001:10001
WORKDIR /var/lib/docker-event-relay
VOLUME ["/var/lib/docker-event-relay"]
EXPOSE 9477
# No curl in the image: the interpreter that is there anyway does the request.
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python3", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('RELAY_HTTP__PORT', '9477') + '/healthz', timeout=4)"]
# Exec form: the relay is PID 1 and receives SIGTERM itself (it stops reading, drains its
# outboxes for RELAY_DRAIN_TIMEOUT seconds, writes the checkpoint). It starts no child
# processes, so there is nothing for an init to reap. Give `docker stop` a timeout longer
# than the drain timeout (`--stop-timeout`, default 10 s like the drain).
STOPSIGNAL SIGTERM
ENTRYPOINT ["docker-event-relay"]
CMD ["run"]
