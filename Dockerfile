# The Python services in one image: ext_authz (`python -m extauth.server`), the meter
# (`python -m meter`), migrations and `gatewayctl`. Envoy, PostgreSQL and Redis run from their
# official images (docker-compose.yml).
#
#   docker build -t inference-gateway .
#
# Nothing secret is built in: the master keyring, the database password and any API key are mounted
# at run time (deploy/secrets/, see deploy/gateway.env.example). Pin the base by digest in your
# registry mirror: --build-arg PYTHON_IMAGE=python:3.11.17-slim-trixie@sha256:...
ARG PYTHON_IMAGE=python:3.11.17-slim-trixie

# ---- build: a virtualenv with the package and its runtime dependencies (no dev extras) ----
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore
RUN python -m venv /opt/gateway
WORKDIR /src
# Dependencies first, in their own layer: rebuilt only when pyproject.toml changes. The packages only
# `gatewayctl up` uses on a workstation (Envoy's wheel, embedded PostgreSQL and Redis) are left out;
# deploy/image/requirements.py names them.
COPY pyproject.toml ./
COPY deploy/image/requirements.py /tmp/requirements.py
RUN python /tmp/requirements.py pyproject.toml > /tmp/requirements.txt \
    && /opt/gateway/bin/pip install -r /tmp/requirements.txt
COPY extauth ./extauth
COPY meter ./meter
COPY control ./control
RUN /opt/gateway/bin/pip install --no-deps . \
    && /opt/gateway/bin/pip uninstall -y pip setuptools \
    && /opt/gateway/bin/python -c "import extauth.server, meter.__main__, control.cli, control.migrate"

# ---- runtime ----
FROM ${PYTHON_IMAGE}
RUN groupadd --system --gid 10001 gateway \
    && useradd --system --uid 10001 --gid gateway --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin gateway
COPY --from=build /opt/gateway /opt/gateway
COPY deploy/image/entrypoint.sh /usr/local/bin/gateway-entrypoint
ENV PATH=/opt/gateway/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    GATEWAY_STATE_DIR=/tmp/gateway
WORKDIR /tmp
USER 10001:10001
ENTRYPOINT ["gateway-entrypoint"]
CMD ["python", "-m", "extauth.server"]
