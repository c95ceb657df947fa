# The agent image: `docker build -t ghcr.io/lb-dev/lb:0.1.0 .`
# The build stage installs what the project's own setup step installs (nightly's rust-src and
# bpf-linker against LLVM 22), then builds `lb` with its eBPF programs embedded.
FROM rust:1.95-bookworm AS build
RUN rustup toolchain install nightly --profile minimal
WORKDIR /src
COPY . .
RUN cargo xtask setup --build-only \
 && cargo build --release --package lb-userspace --bin lb

FROM debian:bookworm-slim
COPY --from=build /src/target/release/lb /usr/local/bin/lb
# Runs as root with only CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON (see deploy/daemonset.yaml).
ENTRYPOINT ["/usr/local/bin/lb"]
CMD ["--help"]
