# syntax=docker/dockerfile:1
# tokengate container image: a release build on Debian bookworm, run on distroless
# cc-debian12 (glibc and libgcc, which the binary links dynamically; CA certificates for https
# upstreams and introspection; no shell), as the unprivileged user 65532.
#
#   docker build --build-arg TOKENGATE_COMMIT=$(git rev-parse --short=12 HEAD) -t tokengate:0.1.0 .
#   docker run --rm -v "$PWD/config.example.toml:/etc/tokengate/tokengate.toml:ro" tokengate:0.1.0 check --config /etc/tokengate/tokengate.toml
#
# The Helm chart (helm/tokengate) runs this image as a sidecar with the config in a ConfigMap.
# No image is published: build it, push it to your registry and set tokengate.image.repository.
#
# Both stages are pinned so a rebuild gets the same toolchain: the builder to the exact Rust
# release this repository is built and tested with (`rustc --version`; bump it deliberately,
# tests/helm.rs checks it is an exact X.Y.Z no older than Cargo.toml's rust-version), the
# runtime to a distroless tag (add @sha256:<digest> to pin the bytes as well).

FROM rust:1.95.0-bookworm AS build
WORKDIR /src
# The commit for tokengate_build_info (.git is not in the build context):
#   docker build --build-arg TOKENGATE_COMMIT=$(git rev-parse --short=12 HEAD) -t tokengate .
ARG TOKENGATE_COMMIT=unknown
# Exactly what `cargo build` of the lib and the binary reads: the manifest and lock file,
# build.rs (the commit), src/ (with the page's CSS and JS) and config.example.toml (built into
# `tokengate demo`). Tests, benches and examples are not built. tests/docker.rs builds from a
# copy of exactly these COPY lines, so a file the build needs cannot be forgotten here.
COPY Cargo.toml Cargo.lock build.rs config.example.toml ./
COPY src ./src
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    TOKENGATE_COMMIT="$TOKENGATE_COMMIT" cargo build --release --locked --bin tokengate \
    && install -D -m 0755 target/release/tokengate /out/tokengate \
    && /out/tokengate check --config config.example.toml

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/tokengate /usr/local/bin/tokengate
USER 65532:65532
# Main listener (the chart's tokengate.port) and the admin listener (/metrics, /healthz, /readyz).
EXPOSE 8443 9901
ENTRYPOINT ["/usr/local/bin/tokengate"]
CMD ["serve", "--config", "/etc/tokengate/tokengate.toml"]
