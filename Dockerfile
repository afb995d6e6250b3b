# syntax=docker/dockerfile:1
# One image for the services: posts-command, posts-query, comments-command and replay, built in
# release from the whole workspace. docker-compose.yml picks the binary with
# `command:`. Needs BuildKit (the default builder of current Docker) for the
# cache mounts, which keep the registry and target dir between builds.

FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
# The cache-mounted target dir is not part of the image layer, hence the copy
# out to /out in the same step.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bins \
    && mkdir -p /out \
    && cp target/release/posts-command target/release/posts-query target/release/comments-command target/release/replay /out/

# Same Debian release as the build stage, so the glibc matches.
FROM debian:bookworm-slim
RUN useradd --system --uid 10001 --home-dir /nonexistent --shell /usr/sbin/nologin posts \
    && mkdir -p /data/query \
    && chown posts:posts /data/query
COPY --from=build /out/ /usr/local/bin/
USER posts
# Inside a container the services must listen on all interfaces; the NATS
# URL and replica count come from docker-compose.yml.
ENV COMMAND_LISTEN=0.0.0.0:3000 \
    QUERY_LISTEN=0.0.0.0:4000 \
    QUERY_DATA_DIR=/data/query
EXPOSE 3000 4000
CMD ["posts-command"]
