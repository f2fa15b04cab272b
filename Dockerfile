# syntax=docker/dockerfile:1
# tokenvault image: a Rust builder, then a distroless runtime (glibc and
# libstdc++, no shell) running as a non-root user.
#
#   docker build -t tokenvault:0.1.0 .
#
# Dependencies are built in their own layer from Cargo.toml and Cargo.lock
# alone, so a source change rebuilds only tokenvault, not RocksDB.

FROM rust:1.88-bookworm AS builder
RUN apt-get update \
 && apt-get install -y --no-install-recommends libclang-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src

# 1. Dependencies only: a stub crate with the real manifest, lock file,
#    build script and protos.
COPY Cargo.toml Cargo.lock build.rs ./
COPY proto ./proto
RUN mkdir src \
 && echo 'fn main() {}' > src/main.rs \
 && touch src/lib.rs \
 && cargo build --release --locked --bin tokenvault \
 && rm -rf src

# 2. The real source.
COPY src ./src
RUN touch src/main.rs src/lib.rs \
 && cargo build --release --locked --bin tokenvault \
 && cp target/release/tokenvault /tokenvault

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=builder /tokenvault /usr/local/bin/tokenvault
# 65532 is distroless's nonroot user; the manifests run as it too.
USER 65532:65532
EXPOSE 50051 50052
ENTRYPOINT ["/usr/local/bin/tokenvault"]
CMD ["serve", "--config", "/etc/tokenvault/config/tokenvault.toml"]
