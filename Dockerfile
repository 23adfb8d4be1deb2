# One image for the Dagster webserver, the daemon and the runs they launch.
FROM python:3.12-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    DAGSTER_HOME=/opt/dagster/home \
    RAG_DATA_DIR=/opt/dagster/data

WORKDIR /opt/dagster/app
COPY pyproject.toml README.md ./
COPY rag_assets ./rag_assets
RUN pip install --no-cache-dir '.[deploy]'
COPY workspace.yaml ./
COPY deploy/dagster.yaml ${DAGSTER_HOME}/dagster.yaml

EXPOSE 3000
