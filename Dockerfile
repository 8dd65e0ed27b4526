# captionbot on an NVIDIA GPU. The PyPI torch 2.14.1 wheel is built for CUDA 13.0 and
# brings its own CUDA libraries, so the base only needs the driver-facing runtime.
FROM nvidia/cuda:13.0.0-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    HF_HOME=/models/huggingface

RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev build-essential fonts-dejavu-core \
    && rm -rf /var/lib/apt/lists/*

RUN useradd --create-home --uid 1000 captionbot \
    && mkdir -p /app/data /models \
    && chown -R captionbot:captionbot /app /models
WORKDIR /app

# Dependencies first, so code changes do not reinstall PyTorch.
COPY --chown=captionbot:captionbot pyproject.toml README.md ./
COPY --chown=captionbot:captionbot core/__init__.py core/py.typed core/
COPY --chown=captionbot:captionbot bot/__init__.py bot/py.typed bot/
COPY --chown=captionbot:captionbot adapters/__init__.py adapters/
RUN python3 -m venv /venv && /venv/bin/pip install --upgrade pip && /venv/bin/pip install -e '.[chat]'

COPY --chown=captionbot:captionbot . .
USER captionbot
ENV PATH=/venv/bin:$PATH

# The store (database and images) lives in /app/data; downloaded weights in /models.
VOLUME ["/app/data", "/models"]
EXPOSE 8080
ENTRYPOINT ["python", "-m", "bot"]
CMD ["run", "--profile", "gpu", "--listen", "0.0.0.0:8080"]
