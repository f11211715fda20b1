# syntax=docker/dockerfile:1
# The renewal job's image: `python -m renewer run`, nothing else (no Pulumi, no tests).
# Built on Fly's remote builder by the Pulumi program (infra/flyctl.py); its label is a
# hash of this file, .dockerignore, requirements.lock and renewer/, so keep that list in
# step with what is copied here. For full reproducibility pin the base by digest too:
# FROM python:3.11-slim-bookworm@sha256:<digest>.

# --- build stage: a virtualenv holding exactly the locked runtime dependencies --------
FROM python:3.11-slim-bookworm AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
# Dependencies in their own layer, before the source: a code change reuses this layer.
COPY requirements.lock /tmp/requirements.lock
RUN /opt/venv/bin/pip install --no-cache-dir --no-deps -r /tmp/requirements.lock

# --- final stage: the same base, the venv, our package, a non-root user ---------------
FROM python:3.11-slim-bookworm
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PATH=/opt/venv/bin:$PATH
# A fixed UID/GID so file ownership is predictable; no login shell.
RUN groupadd --system --gid 10001 renewer \
 && useradd --system --uid 10001 --gid renewer --no-log-init --create-home \
      --home-dir /home/renewer --shell /usr/sbin/nologin renewer
COPY --from=build /opt/venv /opt/venv
WORKDIR /app
# Owned by root and read-only for the job: it never rewrites its own code.
COPY renewer/ /app/renewer/
RUN python -m compileall -q /app/renewer
USER 10001:10001
# Secrets arrive as Fly secrets in the environment at run time, never via ARG/ENV here.
# Exec form: the job is PID 1 and receives SIGTERM when Fly stops the machine.
ENTRYPOINT ["python", "-m", "renewer"]
CMD ["run"]
