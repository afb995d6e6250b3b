# syntax=docker/dockerfile:1
# One image for the services: posts-command, posts-query, comments-command, reports-query and replay, built in
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
    && cp target/release/posts-command target/release/posts-query target/release/comments-command target/release/reports-query target/release/replay target/release/gateway /out/

# Same Debian release as the build stage, so the glibc matches.
FROM debian:bookworm-slim
RUN useradd --system --uid 10001 --home-dir /nonexistent --shell /usr/sbin/nologin posts \
    && mkdir -p /data/query /data/reports \
    && chown posts:posts /data/query /data/reports
COPY --from=build /out/ /usr/local/bin/
USER posts
# Inside a container the services must listen on all interfaces; the NATS
# URL and replica count come from docker-compose.yml.
ENV COMMAND_LISTEN=0.0.0.0:3000 \
    QUERY_LISTEN=0.0.0.0:4000 \
    QUERY_DATA_DIR=/data/query \
    COMMENTS_COMMAND_LISTEN=0.0.0.0:3001 \
    REPORTS_QUERY_LISTEN=0.0.0.0:4001 \
    REPORTS_DATA_DIR=/data/reports
EXPOSE 3000 3001 4000 4001
CMD ["posts-command"]
