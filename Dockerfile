# Unfold service image.
#
#   docker build --network=host -t unfold:local \
#       --build-arg EXTRA_CA_CERTS="$(cat /usr/local/share/ca-certificates/*.crt 2>/dev/null)" .
#   docker run --rm -p 127.0.0.1:8000:8000 -v unfold-data:/data unfold:local
#
# The GPU variant (NVIDIA; CUDA libraries from pip wheels, the driver from the host through the
# NVIDIA container toolkit; same base image):
#
#   docker build --network=host -t unfold:gpu --build-arg UNFOLD_EXTRAS=gpu \
#       --build-arg EXTRA_CA_CERTS="$(cat /usr/local/share/ca-certificates/*.crt 2>/dev/null)" .
#   docker run --rm --gpus all -p 127.0.0.1:8000:8000 -v unfold-data:/data unfold:gpu
#
# Two stages on debian:bookworm-slim (Python 3.11 from Debian): the builder creates a
# virtual environment in /opt/venv and installs the project into it (not editable); the
# final stage has only python3, that venv and a non-root user.
# Written for the legacy builder: no "# syntax=" line, no BuildKit-only features.

# ---------------------------------------------------------------------------------------
FROM debian:bookworm-slim AS builder

ARG DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
 && apt-get clean \
 && rm -rf /var/lib/apt/lists/*

# Optional extra CA certificates (PEM, one or more), for builds behind an intercepting HTTPS
# proxy. Empty by default, and then this step changes nothing. Only the builder stage sees it.
# One file per certificate (extra-1.crt, ...), as update-ca-certificates expects.
ARG EXTRA_CA_CERTS=""
RUN if [ -n "$EXTRA_CA_CERTS" ]; then \
        printf '%s\n' "$EXTRA_CA_CERTS" \
          | awk '/-----BEGIN CERTIFICATE-----/ { n++ } n { print > ("/usr/local/share/ca-certificates/extra-" n ".crt") }' \
     && ls /usr/local/share/ca-certificates/extra-1.crt > /dev/null \
     && update-ca-certificates; \
    fi

# pip uses the system bundle (which includes any extra CA above), its default index, and
# no configuration from the host: nothing but the files below enters the image.
ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_INPUT=1 \
    PYTHONDONTWRITEBYTECODE=1

RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /src

# Runtime dependencies first, read from pyproject.toml, so that this slow layer stays
# cached while only the code changes: the project's dependencies and those of the extras named
# in UNFOLD_EXTRAS (comma-separated; "gpu" for NVIDIA GPUs; never the test or bench extras).
ARG UNFOLD_EXTRAS=""
COPY pyproject.toml ./
RUN UNFOLD_EXTRAS="$UNFOLD_EXTRAS" python3 -c 'import os, tomllib; p = tomllib.load(open("pyproject.toml", "rb"))["project"]; extras = [e for e in os.environ["UNFOLD_EXTRAS"].split(",") if e]; print("\n".join(p["dependencies"] + [d for e in extras for d in p["optional-dependencies"][e]]))' \
        > /tmp/requirements.txt \
 && pip install -r /tmp/requirements.txt

# Then the project itself, as a regular (non-editable) install.
COPY README.md ./
COPY solvers ./solvers
COPY service ./service
# pip and setuptools are not needed at run time: drop them from the venv.
RUN pip install --no-deps . \
 && test -x /opt/venv/bin/unfold \
 && cd / && python3 -c 'import solvers, service' \
 && python3 -m pip uninstall -y -q pip setuptools

# ---------------------------------------------------------------------------------------
FROM debian:bookworm-slim

ARG DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 \
 && apt-get clean \
 && rm -rf /var/lib/apt/lists/*

RUN useradd --system --uid 10001 --user-group --home-dir /home/unfold --create-home \
        --shell /usr/sbin/nologin unfold \
 && mkdir -p /data \
 && chown unfold:unfold /data

COPY --from=builder /opt/venv /opt/venv

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    UNFOLD_DATA_DIR=/data \
    UNFOLD_HOST=0.0.0.0 \
    UNFOLD_PORT=8000
# The backends JAX may use: the CPU image only the CPU; an image built with extras (the GPU
# variant) "cuda,cpu": a GPU passed in (--gpus) that CUDA cannot initialise stops the start-up
# with JAX's error instead of a quiet fall-back to the CPU (with no GPU device in the container,
# JAX runs on the CPU). Override with --build-arg JAX_PLATFORMS=... or at run time (-e).
ARG UNFOLD_EXTRAS=""
ARG JAX_PLATFORMS=${UNFOLD_EXTRAS:+cuda,}cpu
ENV JAX_PLATFORMS=$JAX_PLATFORMS
# (The service keeps JAX's persistent compilation cache in $UNFOLD_DATA_DIR/jax-cache, i.e. in
# the volume, unless UNFOLD_COMPILATION_CACHE=false.)

# A named volume mounted here starts with this directory's owner (unfold).
VOLUME /data
WORKDIR /home/unfold
USER unfold

EXPOSE 8000

# No curl in the image: probe readiness with the standard library.
HEALTHCHECK --interval=5s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python3", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/readyz' % os.environ.get('UNFOLD_PORT', '8000'), timeout=4)"]

CMD ["unfold", "serve"]
