# One image for every fedloom role: api, worker (experiments queue) and aggregator (aggregation queue).
FROM python:3.11-slim
WORKDIR /app
ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1
# torch first, so the project's range is already satisfied. For a CPU-only image pass
# --build-arg TORCH_INDEX_ARGS="--index-url <PyTorch's CPU wheel index>".
ARG TORCH_INDEX_ARGS=""
RUN pip install $TORCH_INDEX_ARGS "torch==2.13.0"
COPY pyproject.toml README.md ./
COPY fedloom ./fedloom
COPY fedloom_tools ./fedloom_tools
COPY fedloom_core ./fedloom_core
COPY workflows ./workflows
COPY activities ./activities
COPY api ./api
COPY workers ./workers
# The server extra: every role here (and the demo client, which needs only the torch extra).
RUN pip install .[server]
EXPOSE 8080
CMD ["fedloom", "api", "--host", "0.0.0.0", "--port", "8080"]
