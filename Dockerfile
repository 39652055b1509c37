# The Forge operator image: kopf + the Kubernetes client, no torch.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /opt/forge
COPY constraints.txt ./constraints.txt
COPY operator/ ./operator/
RUN pip install -c constraints.txt ./operator \
    && useradd --uid 10001 --no-create-home --shell /usr/sbin/nologin forge

USER 10001
EXPOSE 8080 9090
ENTRYPOINT ["forge-operator"]
