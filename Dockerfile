# syntax=docker/dockerfile:1
# Study Query LLM dashboard image.
#   docker build -t study-query-llm .
#   docker run --rm -p 127.0.0.1:5006:5006 --env-file .env -v sqllm-data:/app/data study-query-llm
# No settings or secrets are baked in: keys, DATABASE_URL and sign-in come from the
# environment at run time (docker compose passes .env). The SQLite record lives in the
# /app/data volume. The database is migrated at every start, before the server listens.

ARG PYTHON_VERSION=3.11

# --- build: wheels for the project and every dependency ---------------------------------
FROM python:${PYTHON_VERSION}-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY src ./src
RUN python -m pip install --no-cache-dir --upgrade pip wheel \
 && python -m pip wheel --no-cache-dir --wheel-dir /wheels ".[postgres]"

# --- runtime: the installed wheels, a non-root user, nothing else -------------------------
FROM python:${PYTHON_VERSION}-slim AS runtime
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    BOKEH_RESOURCES=server
RUN groupadd --system --gid 10001 app \
 && useradd --system --uid 10001 --gid app --home-dir /app --no-create-home \
        --shell /usr/sbin/nologin app
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    python -m pip install --no-cache-dir --no-index --find-links=/wheels "study-query-llm[postgres]"
COPY --chmod=0755 docker/entrypoint.sh /usr/local/bin/docker-entrypoint
WORKDIR /app
RUN mkdir -p /app/data && chown -R app:app /app
USER app
VOLUME ["/app/data"]
EXPOSE 5006
HEALTHCHECK --interval=30s --timeout=15s --start-period=90s --retries=3 \
    CMD ["python", "-m", "panel_app.health"]
ENTRYPOINT ["docker-entrypoint"]
CMD ["study-query-llm-dashboard", "--address", "0.0.0.0"]
