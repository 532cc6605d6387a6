# store-svc image: the service on Python 3.11, settings from STORE_* environment.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
WORKDIR /app
COPY pyproject.toml README.md ./
COPY store_svc ./store_svc
RUN pip install --no-cache-dir . && useradd --system --uid 10001 store && mkdir -p /data \
    && chown store /data
USER store
VOLUME ["/data"]
# The container is healthy when the service says it is ready (over NATS).
HEALTHCHECK --interval=10s --timeout=5s --start-period=20s --retries=3 \
    CMD ["store-svc", "ready", "--timeout", "3"]
ENTRYPOINT ["store-svc"]
CMD ["run"]
