# The serving image: no TensorFlow, only what `pip install .` pulls.
FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 WHALEID_DATA_DIR=/data
WORKDIR /app
COPY pyproject.toml README.md LICENSE ./
COPY service ./service
COPY migrations ./migrations
COPY model_export ./model_export
COPY training ./training
RUN pip install --no-cache-dir '.[heic]'
VOLUME /data
EXPOSE 8000
CMD ["whaleid", "serve", "--host", "0.0.0.0", "--port", "8000"]
