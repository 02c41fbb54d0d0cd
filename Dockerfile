# The image deploy/k8s names (model-gateway:0.1.0): `docker build -t model-gateway:0.1.0 .`
# Models are not baked in: mount the model repository at /models (see deploy/k8s).

# Build stage: install the gateway and its wheels into a virtual environment.
FROM python:3.11-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY gateway ./gateway
RUN python -m venv /opt/model-gateway \
    && /opt/model-gateway/bin/pip install --no-cache-dir .

# Final stage: the virtual environment and nothing else (no compilers, no pip cache), as a non-root user.
FROM python:3.11-slim-bookworm
RUN groupadd --system --gid 10001 gateway \
    && useradd --system --uid 10001 --gid gateway --no-create-home --home-dir /nonexistent gateway
COPY --from=build /opt/model-gateway /opt/model-gateway
ENV PATH=/opt/model-gateway/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /var/lib/model-gateway
USER 10001:10001
VOLUME ["/models"]
# inference, admin, Prometheus metrics
EXPOSE 8001 8002 9464
ENTRYPOINT ["gateway", "serve"]
CMD ["--config", "/etc/model-gateway/gateway.yaml", "--listen", "0.0.0.0:8001", "--admin-listen", "0.0.0.0:8002"]
