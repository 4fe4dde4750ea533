# syntax=docker/dockerfile:1
# The MLflow tracking server image for infra/mlflow: mlflow (same version as pyproject.toml pins for
# clients) + the Postgres driver + boto3 for the S3 artifact store. No credentials inside: the pod
# gets the database password from a Secret and S3 access from its IAM role.
#
#   docker build -f infra/docker/mlflow.Dockerfile -t <registry>/tvr-mlflow:3.17.2 infra/docker
FROM python:3.11.14-slim-bookworm
ENV PYTHONUNBUFFERED=1 \
    MLFLOW_DISABLE_TELEMETRY=true
RUN pip install --no-cache-dir mlflow==3.17.2 psycopg2-binary==2.9.13 boto3==1.44.5 \
 && useradd --create-home --uid 1000 --shell /usr/sbin/nologin mlflow
USER 1000:1000
WORKDIR /home/mlflow
EXPOSE 5000
ENTRYPOINT ["mlflow", "server"]
CMD ["--host=0.0.0.0", "--port=5000"]
