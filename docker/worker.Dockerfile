# The Nexa worker image: `nexa-worker join` with python3 for pipelines' scripts.
#
#   docker build -f docker/worker.Dockerfile -t nexa/worker .             (from source)
#   docker build -f docker/worker.Dockerfile --target prebuilt \
#       --build-arg RUNTIME_BASE=nexa/debian-base:bookworm -t nexa/worker .
#       (binaries built on the host: `cargo build --release -p nexa-worker`)
#
# GPUs: run with the NVIDIA container runtime (`docker run --gpus all`, or compose's
# docker/compose.gpu.yaml); it mounts the driver's libnvidia-ml.so into the container,
# where the worker's NVML profile finds it. Nothing GPU-specific is baked in here.
#
# Jobs run inside this container, which is their sandbox on a cluster. A volunteer who
# wants every job in its own locked-down container runs the worker binary on the host
# with `--executor docker` instead (see the README).

ARG RUNTIME_BASE=debian:bookworm-slim
ARG RUST_IMAGE=rust:1-bookworm

FROM ${RUNTIME_BASE} AS runtime-base
RUN set -eu; \
    if ! command -v tini >/dev/null || ! python3 -c 'import json, csv, collections' 2>/dev/null \
       || [ ! -e /etc/ssl/certs/ca-certificates.crt ]; then \
      apt-get update && apt-get install -y --no-install-recommends tini ca-certificates \
        python3 && rm -rf /var/lib/apt/lists/*; \
    fi; \
    groupadd --system --gid 10001 nexa; \
    useradd --system --uid 10001 --gid nexa --home-dir /var/lib/nexa-worker --shell /usr/sbin/nologin nexa; \
    mkdir -p /var/lib/nexa-worker; chown nexa:nexa /var/lib/nexa-worker
# The key lives in the volume, so a recreated container is the same worker (its
# reputation, credit and any ban follow the key).
ENV NEXA_WORK_DIR=/var/lib/nexa-worker \
    NEXA_WORKER_KEY=/var/lib/nexa-worker/worker.key \
    NEXA_LOG=info \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
VOLUME /var/lib/nexa-worker
WORKDIR /var/lib/nexa-worker
USER nexa
ENTRYPOINT ["/usr/bin/tini", "--", "nexa-worker"]
CMD ["--help"]

FROM runtime-base AS prebuilt
COPY target/release/nexa-worker /usr/local/bin/

FROM ${RUST_IMAGE} AS build
WORKDIR /src
COPY . .
# Line tables help profiling on a dev machine; the image does not need them.
RUN CARGO_PROFILE_RELEASE_STRIP=debuginfo cargo build --release --locked -p nexa-worker

FROM runtime-base AS runtime
COPY --from=build /src/target/release/nexa-worker /usr/local/bin/
