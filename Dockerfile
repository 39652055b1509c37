# syntax=docker/dockerfile:1
# The Forge operator image: kopf, the Kubernetes client and prometheus-client; no torch, no ML libraries.
# Build from the repository root:  docker build -t forge-operator:0.1.0 .
# The Helm chart (charts/forge) runs this image's entry point unchanged, configured by FORGE_* variables.

# --- build: a wheel of the operator package, installed with its pinned dependencies into a virtual environment ---
FROM python:3.11-slim-bookworm AS build

ENV PYTHONDONTWRITEBYTECODE=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY constraints.txt ./constraints.txt
COPY operator/pyproject.toml ./operator/pyproject.toml
COPY operator/forge_operator/ ./operator/forge_operator/
# constraints.txt pins the whole development environment; only the operator's own dependencies get installed.
RUN pip install --no-cache-dir -c constraints.txt ./operator \
    && pip uninstall --yes pip setuptools wheel

# --- runtime: the virtual environment only, as a non-root user ---
FROM python:3.11-slim-bookworm

LABEL org.opencontainers.image.title="forge-operator" \
      org.opencontainers.image.description="Forge: ForgeJob -> Kubeflow PyTorchJob operator (kopf)" \
      org.opencontainers.image.licenses="Apache-2.0"

# No .pyc files are written at run time: the chart mounts the root filesystem read-only.
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PATH=/opt/venv/bin:$PATH
COPY --from=build /opt/venv /opt/venv
RUN groupadd --gid 10001 forge \
    && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin forge \
    && python -c "import forge_operator.main" \
    && ! python -c "import torch" 2>/dev/null

USER 10001:10001
# 8080: kopf's liveness endpoint /healthz (FORGE_HEALTH_PORT); 9300: Prometheus /metrics (FORGE_METRICS_PORT).
EXPOSE 8080 9300
ENTRYPOINT ["forge-operator"]
