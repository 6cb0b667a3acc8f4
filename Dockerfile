# fedmq: one image for the aggregator, the site agents and the one-shot init jobs.
#   docker build -t fedmq .
# torch is installed first from the CPU wheel index (the PyPI default would pull the CUDA build),
# pinned like the Makefile's TORCH_SPEC; then the project with its remaining dependencies.
FROM python:3.11-slim

ARG TORCH_SPEC=torch==2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN pip install --index-url "${TORCH_INDEX}" "${TORCH_SPEC}"

WORKDIR /opt/fedmq
# dependency layer first so source edits do not reinstall everything
COPY pyproject.toml README.md* ./
COPY fedmq ./fedmq
COPY shared ./shared
COPY broker ./broker
COPY aggregator ./aggregator
COPY site_agent ./site_agent
COPY experiments ./experiments
RUN pip install .

# Unprivileged runtime user. Every mount point exists and belongs to it, so named volumes
# mounted there start out owned by fedmq (Docker copies the ownership into a new volume).
RUN groupadd --system --gid 10001 fedmq \
 && useradd --system --uid 10001 --gid fedmq --home-dir /var/lib/fedmq --shell /usr/sbin/nologin fedmq \
 && mkdir -p /var/lib/fedmq /data /keys/ckks /keys/pinned /keys/signing /config \
 && chown -R fedmq:fedmq /var/lib/fedmq /data /keys

USER fedmq
WORKDIR /var/lib/fedmq
ENTRYPOINT ["fedmq"]
CMD ["--help"]
