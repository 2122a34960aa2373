# Headwater services (worker, learner, serving) for the production-like compose stack.
FROM python:3.11-slim
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 HF_HUB_OFFLINE=1
WORKDIR /app
COPY pyproject.toml setup.py README.md ./
COPY core core
COPY headwater headwater
COPY streams streams
COPY features features
COPY learner learner
COPY detection detection
COPY serving serving
# The CPU build of torch: the default index would pull several GB of CUDA wheels. A C
# compiler builds the detection engine's C parts (setup.py) and leaves in the same layer.
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev \
 && pip install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0 \
 && pip install '.[content,s3]' \
 && (cd / && python -c "import detection._fastparse") \
 && apt-get purge -y gcc libc6-dev && apt-get autoremove -y && rm -rf /var/lib/apt/lists/*
# Mount points of named volumes belong to the service user: Docker fills a new named
# volume from the image's directory, ownership included (tests/test_compose.py checks it).
RUN useradd --create-home --uid 10001 headwater && mkdir -p /data /models && chown headwater /data /models
USER headwater
ENV HEADWATER_STATE_DIR=/data HEADWATER_MODEL_STORE=/data/models
ENTRYPOINT ["headwater"]
