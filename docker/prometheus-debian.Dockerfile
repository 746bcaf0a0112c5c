# Prometheus for the test stack, without a registry: Debian's prometheus binary (from
# the `prometheus` package that .ci/run installs on the host) in the local debootstrap
# base image. The build context holds just that binary (.ci/check_containers.py makes it).
ARG RUNTIME_BASE=nexa/debian-base:bookworm
FROM ${RUNTIME_BASE}
COPY prometheus /usr/local/bin/prometheus
RUN mkdir -p /prometheus && chown nobody:nogroup /prometheus
USER nobody
EXPOSE 9090
ENTRYPOINT ["/usr/local/bin/prometheus"]
