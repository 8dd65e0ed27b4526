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

# The engine's own cache (config.toml's model_cache, .cache/models beside the config: tiny
# builds, EasyOCR's scratch folder, the load times that make warm-up estimates) is linked
# into the models volume, so a recreated container keeps it.
RUN useradd --create-home --uid 1000 captionbot \
    && mkdir -p /app/data /app/.cache /models/captionbot \
    && ln -s /models/captionbot /app/.cache/models \
    && chown -R captionbot:captionbot /app /models
WORKDIR /app

# Dependencies first, so code changes do not reinstall PyTorch. offline-ocr puts EasyOCR's
# English weights in the image, so no container downloads them from GitHub at its first OCR.
COPY --chown=captionbot:captionbot pyproject.toml README.md ./
COPY --chown=captionbot:captionbot core/__init__.py core/py.typed core/
COPY --chown=captionbot:captionbot bot/__init__.py bot/py.typed bot/
COPY --chown=captionbot:captionbot adapters/__init__.py adapters/
RUN python3 -m venv /venv && /venv/bin/pip install --upgrade pip \
    && /venv/bin/pip install -e '.[chat,offline-ocr,ray]'

COPY --chown=captionbot:captionbot . .
USER captionbot
ENV PATH=/venv/bin:$PATH

# The store (database and images) lives in /app/data; downloaded weights in /models. Both
# are made above and owned by uid 1000: Docker copies that ownership into a new named
# volume, whereas a bind-mounted host folder keeps its own (root, if Docker created it).
VOLUME ["/app/data", "/models"]
EXPOSE 8080
# Healthy while every part answers /readyz: the store, the engine's device thread, and each
# chat platform it runs. Loading the models on the first requests does not count against it.
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8080/readyz', timeout=4).status != 200)"]
ENTRYPOINT ["python", "-m", "bot"]
CMD ["run", "--profile", "gpu", "--listen", "0.0.0.0:8080"]
