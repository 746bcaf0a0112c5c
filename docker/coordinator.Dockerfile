# The Nexa coordinator image.
#
#   docker build -f docker/coordinator.Dockerfile -t nexa/coordinator .
#       builds Nexa from source in a Rust stage, then a slim Debian runtime (needs a
#       registry for rust:* and debian:*-slim);
#   docker build -f docker/coordinator.Dockerfile --target prebuilt \
#       --build-arg RUNTIME_BASE=nexa/debian-base:bookworm -t nexa/coordinator .
#       copies binaries built on the host (`cargo build --release -p nexa-coordinator
#       -p nexa`) into the runtime base, with no registry at all (what CI does, on the
#       debootstrap base image that .ci/base_image.sh makes). Host binaries must be
#       built against the base's glibc (Debian bookworm) or older.
#
# Stages are ordered so that the classic builder, which builds every stage up to its
# target, never needs the Rust image for `--target prebuilt`.

ARG RUNTIME_BASE=debian:bookworm-slim
ARG RUST_IMAGE=rust:1-bookworm

FROM ${RUNTIME_BASE} AS runtime-base
# tini reaps and forwards signals as PID 1; CA roots for TLS. Installed only when the
# base lacks them (the local debootstrap base already has both; it has no apt lists).
RUN set -eu; \
    if ! command -v tini >/dev/null || [ ! -e /etc/ssl/certs/ca-certificates.crt ]; then \
      apt-get update && apt-get install -y --no-install-recommends tini ca-certificates \
      && rm -rf /var/lib/apt/lists/*; \
    fi; \
    groupadd --system --gid 10001 nexa; \
    useradd --system --uid 10001 --gid nexa --home-dir /var/lib/nexa --shell /usr/sbin/nologin nexa; \
    mkdir -p /var/lib/nexa; chown nexa:nexa /var/lib/nexa
ENV NEXA_LISTEN=0.0.0.0:7070 \
    NEXA_METRICS_LISTEN=0.0.0.0:9100 \
    NEXA_DATA_DIR=/var/lib/nexa \
    NEXA_LOG=info
EXPOSE 7070 9100
VOLUME /var/lib/nexa
WORKDIR /var/lib/nexa
USER nexa
ENTRYPOINT ["/usr/bin/tini", "--", "nexa-coordinator"]
CMD ["serve"]

# Host-built binaries (CI, air-gapped machines).
FROM runtime-base AS prebuilt
COPY target/release/nexa-coordinator target/release/nexa /usr/local/bin/

# From source.
FROM ${RUST_IMAGE} AS build
WORKDIR /src
COPY . .
# Line tables help profiling on a dev machine; the image does not need them.
RUN CARGO_PROFILE_RELEASE_STRIP=debuginfo cargo build --release --locked -p nexa-coordinator -p nexa

FROM runtime-base AS runtime
COPY --from=build /src/target/release/nexa-coordinator /src/target/release/nexa /usr/local/bin/
