#!/usr/bin/env bash
# Container smoke test: build the image with docker-compose, start it on a free port bound to
# 127.0.0.1, wait until Docker reports it healthy, exercise the HTTP API, restart it and check
# the registered dictionary survived. Always tears the stack down (docker-compose down -v).
#
# Works on a fresh Debian bookworm machine as root with no registry access: it installs
# docker.io / docker-compose / debootstrap / curl when missing, starts dockerd when none is
# running (and stops it again at the end), and builds debian:bookworm-slim with debootstrap
# when that image is not present locally.
#
# Environment knobs: HEALTH_TIMEOUT (seconds, default 180), UNFOLD_PUBLISH_PORT (default: a
# free port), EXTRA_CA_CERTS (default: the host's /usr/local/share/ca-certificates/*.crt).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

PROJECT=unfold-ci
SERVICE=unfold
HEALTH_TIMEOUT=${HEALTH_TIMEOUT:-180}
export DEBIAN_FRONTEND=noninteractive
# Legacy builder only (no registry to pull BuildKit frontends from); compose builds itself.
export DOCKER_BUILDKIT=0 COMPOSE_DOCKER_CLI_BUILD=0

T0=$(date +%s)
step() { printf '\n==> [%3ss] %s\n' "$(($(date +%s) - T0))" "$*"; }
fail() { printf '\nSMOKE TEST FAILED: %s\n' "$*" >&2; exit 1; }

WORK=$(mktemp -d /tmp/unfold-smoke.XXXXXX)
STARTED_DOCKERD_PID=""
STACK_UP=0

compose() { docker-compose -p "$PROJECT" "$@" </dev/null; }

cleanup() {
    local rc=$?
    set +e
    if [[ $STACK_UP == 1 ]]; then
        if [[ $rc != 0 ]]; then
            echo "---- docker-compose ps ----" >&2
            compose ps >&2
            echo "---- docker-compose logs (last 200 lines) ----" >&2
            compose logs --no-color --tail=200 >&2
            echo "---- end of logs ----" >&2
        fi
        step "Tearing down (docker-compose -p $PROJECT down -v)"
        compose down -v --remove-orphans
    fi
    if [[ -n $STARTED_DOCKERD_PID ]]; then
        step "Stopping the dockerd this script started (pid $STARTED_DOCKERD_PID)"
        kill "$STARTED_DOCKERD_PID" 2>/dev/null
        for _ in $(seq 1 30); do
            kill -0 "$STARTED_DOCKERD_PID" 2>/dev/null || break
            sleep 1
        done
    fi
    rm -rf "$WORK"
    if [[ $rc == 0 ]]; then
        printf '\nSMOKE TEST PASSED in %ss\n' "$(($(date +%s) - T0))"
    else
        printf '\nSMOKE TEST FAILED (exit %s) after %ss\n' "$rc" "$(($(date +%s) - T0))" >&2
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --------------------------------------------------------------------------------------
step "Checking tools"
missing=()
command -v docker >/dev/null || missing+=(docker.io)
command -v dockerd >/dev/null || missing+=(docker.io)
command -v docker-compose >/dev/null || missing+=(docker-compose)
command -v debootstrap >/dev/null || missing+=(debootstrap)
command -v curl >/dev/null || missing+=(curl)
command -v python3 >/dev/null || missing+=(python3)
if ((${#missing[@]})); then
    [[ $(id -u) == 0 ]] || fail "missing ${missing[*]} and not root: install them first"
    echo "installing: ${missing[*]}"
    apt-get update -q </dev/null || fail "apt-get update"
    apt-get install -y -q --no-install-recommends "${missing[@]}" </dev/null \
        || fail "apt-get install ${missing[*]}"
fi
docker-compose version --short

# --------------------------------------------------------------------------------------
if docker info >/dev/null 2>&1; then
    step "Using the running Docker daemon"
else
    step "Starting dockerd (none running)"
    dockerd --storage-driver=overlay2 >"$WORK/dockerd.log" 2>&1 </dev/null &
    STARTED_DOCKERD_PID=$!
    for _ in $(seq 1 60); do
        docker info >/dev/null 2>&1 && break
        kill -0 "$STARTED_DOCKERD_PID" 2>/dev/null || { tail -50 "$WORK/dockerd.log" >&2; fail "dockerd exited"; }
        sleep 1
    done
    docker info >/dev/null 2>&1 || { tail -50 "$WORK/dockerd.log" >&2; fail "dockerd did not answer within 60 s"; }
    echo "dockerd pid $STARTED_DOCKERD_PID"
fi
docker version --format 'client {{.Client.Version}}, server {{.Server.Version}}'

# --------------------------------------------------------------------------------------
if docker image inspect debian:bookworm-slim >/dev/null 2>&1; then
    step "Base image debian:bookworm-slim present"
else
    step "Building debian:bookworm-slim locally with debootstrap (no registry access needed)"
    MIRROR=$(awk '/^URIs:/ { print $2; exit }' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
    MIRROR=${MIRROR:-http://deb.debian.org/debian}
    SECURITY=$(awk '/^URIs:/ && /security/ { print $2; exit }' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
    SECURITY=${SECURITY:-http://deb.debian.org/debian-security}
    echo "mirror: $MIRROR"
    ROOTFS="$WORK/rootfs"
    debootstrap --variant=minbase bookworm "$ROOTFS" "$MIRROR" >"$WORK/debootstrap.log" 2>&1 </dev/null \
        || { tail -30 "$WORK/debootstrap.log" >&2; fail "debootstrap"; }
    # Same apt sources layout as the official image; no package lists or caches inside.
    rm -f "$ROOTFS/etc/apt/sources.list"
    cat >"$ROOTFS/etc/apt/sources.list.d/debian.sources" <<EOF
Types: deb
URIs: $MIRROR
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: $SECURITY
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
    # apt and dpkg settings of the official slim image: no apt caches kept in layers, no
    # translations, no docs/man pages/locales.
    cat >"$ROOTFS/etc/apt/apt.conf.d/docker-clean" <<'EOF'
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
EOF
    echo 'Acquire::Languages "none";' >"$ROOTFS/etc/apt/apt.conf.d/docker-no-languages"
    echo 'Acquire::GzipIndexes "true";' >"$ROOTFS/etc/apt/apt.conf.d/docker-gzip-indexes"
    echo 'Apt::AutoRemove::SuggestsImportant "false";' >"$ROOTFS/etc/apt/apt.conf.d/docker-autoremove-suggests"
    cat >"$ROOTFS/etc/dpkg/dpkg.cfg.d/docker" <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/groff/*
path-exclude /usr/share/info/*
path-exclude /usr/share/linda/*
path-exclude /usr/share/lintian/overrides/*
path-exclude /usr/share/locale/*
path-exclude /usr/share/man/*
EOF
    find "$ROOTFS/usr/share/doc" -mindepth 1 ! -type d ! -name copyright -delete
    rm -rf "$ROOTFS"/usr/share/{groff,info,linda,locale,man}/* "$ROOTFS"/usr/share/lintian/overrides/*
    rm -rf "$ROOTFS"/var/lib/apt/lists/* "$ROOTFS"/var/cache/apt/*.bin "$ROOTFS"/var/cache/apt/archives/*.deb
    tar -C "$ROOTFS" -c . | docker import --change 'CMD ["bash"]' - debian:bookworm-slim >/dev/null \
        || fail "docker import of the debootstrap rootfs"
    rm -rf "$ROOTFS"
    docker image inspect debian:bookworm-slim --format 'imported {{.Id}}'
fi

# --------------------------------------------------------------------------------------
step "Building unfold:local (docker-compose build, network host)"
if [[ -z ${EXTRA_CA_CERTS:-} ]]; then
    EXTRA_CA_CERTS=$(cat /usr/local/share/ca-certificates/*.crt 2>/dev/null || true)
fi
export EXTRA_CA_CERTS
compose build "$SERVICE" || fail "image build (docker-compose build)"
docker image inspect unfold:local --format 'unfold:local {{.Id}}, {{.Size}} bytes'

# --------------------------------------------------------------------------------------
step "Starting the stack"
if [[ -z ${UNFOLD_PUBLISH_PORT:-} ]]; then
    UNFOLD_PUBLISH_PORT=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
fi
export UNFOLD_PUBLISH_PORT
BASE="http://127.0.0.1:$UNFOLD_PUBLISH_PORT"
echo "publishing on $BASE"
compose down -v --remove-orphans >/dev/null 2>&1 || true # leftovers of an interrupted run
STACK_UP=1
compose up -d --no-build || fail "docker-compose up"
CID=$(compose ps -q "$SERVICE")
[[ -n $CID ]] || fail "no container for service $SERVICE"
echo "container ${CID:0:12}"

wait_healthy() {
    local deadline=$(($(date +%s) + HEALTH_TIMEOUT)) status running
    while :; do
        status=$(docker inspect -f '{{if .State.Health}}{{.State.Health.Status}}{{else}}no-healthcheck{{end}}' "$CID")
        running=$(docker inspect -f '{{.State.Running}}' "$CID")
        case $status in
            healthy) echo "healthy after $(($(date +%s) - $1)) s"; return 0 ;;
            unhealthy) fail "container reported unhealthy" ;;
            no-healthcheck) fail "the container has no HEALTHCHECK" ;;
        esac
        [[ $running == true ]] || fail "container is not running: $(docker inspect -f '{{.State.Status}} exit={{.State.ExitCode}}' "$CID")"
        (($(date +%s) < deadline)) || fail "not healthy within ${HEALTH_TIMEOUT}s (status: $status)"
        sleep 1
    done
}

step "Waiting for Docker to report the container healthy (timeout ${HEALTH_TIMEOUT}s)"
wait_healthy "$(date +%s)"

# --------------------------------------------------------------------------------------
# http METHOD PATH EXPECTED_STATUS [JSON_BODY]: response body in $WORK/body, fails otherwise.
http() {
    local method=$1 path=$2 expected=$3 body=${4:-} code
    local args=(-sS -o "$WORK/body" -w '%{http_code}' --max-time 120 -X "$method")
    [[ -n $body ]] && args+=(-H 'Content-Type: application/json' --data-binary "$body")
    code=$(curl "${args[@]}" "$BASE$path" </dev/null) || fail "$method $path: curl failed"
    if [[ $code != "$expected" ]]; then
        echo "response body:" >&2
        head -c 2000 "$WORK/body" >&2
        echo >&2
        fail "$method $path: HTTP $code, expected $expected"
    fi
    echo "$method $path -> $code"
}
# check_json 'PYTHON EXPRESSIONS using d (the parsed body)' DESCRIPTION
check_json() {
    python3 - "$WORK/body" "$1" <<'EOF' || fail "$2"
import json, sys
with open(sys.argv[1]) as f:
    d = json.load(f)
try:
    exec(sys.argv[2], {"d": d})
except Exception as e:
    print(f"check failed: {type(e).__name__}: {e}\nbody: {json.dumps(d)[:2000]}", file=sys.stderr)
    sys.exit(1)
EOF
}

step "GET /healthz"
http GET /healthz 200
check_json 'assert d == {"status": "ok"}, d' "/healthz body is not {\"status\":\"ok\"}"
http GET /readyz 200

step "The service runs as a non-root user"
uid=$(docker exec "$CID" id -u) || fail "docker exec id -u"
echo "uid inside the container: $uid"
[[ $uid != 0 ]] || fail "the container runs as root"

step "Register a dictionary (3 identity directions in d_model 4)"
http POST /v1/dictionaries 201 '{"name": "ci-identity", "directions": [[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0]]}'
check_json '
assert d["name"] == "ci-identity", d
assert d["n_features"] == 3 and d["d_model"] == 4, d
assert d["id"], d' "registration response"
DICT_ID=$(python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["id"])' "$WORK/body")
echo "dictionary id: $DICT_ID"

step "Unfold 2*e0 + 0.5*e2 with OMP, k=2"
UNFOLD_REQ='{"activations": [[2.0, 0.0, 0.5, 0.0]], "method": "omp", "k": 2}'
http POST "/v1/dictionaries/$DICT_ID/unfold" 200 "$UNFOLD_REQ"
check_json '
import math
assert len(d["codes"]) == 1, d
c = d["codes"][0]
got = {int(i): float(v) for i, v in zip(c["indices"], c["values"]) if abs(float(v)) > 1e-6}
assert set(got) == {0, 2}, f"indices {c}"
assert math.isclose(got[0], 2.0, abs_tol=1e-4) and math.isclose(got[2], 0.5, abs_tol=1e-4), f"values {got}"
assert len(d["residual_norm"]) == 1 and abs(float(d["residual_norm"][0])) < 1e-4, d["residual_norm"]
print("codes", got, "residual", d["residual_norm"][0])' "unfold of 2*e0 + 0.5*e2 did not recover {0: 2.0, 2: 0.5}"

step "Unfold against the built-in demo dictionary"
http GET /v1/dictionaries/demo 200
DEMO_D=$(python3 -c 'import json, sys; print(int(json.load(open(sys.argv[1]))["d_model"]))' "$WORK/body") \
    || fail "GET /v1/dictionaries/demo: no integer d_model"
echo "demo d_model: $DEMO_D"
DEMO_REQ=$(python3 -c 'import json, sys; n = int(sys.argv[1]); x = [0.0] * n; x[0] = 1.0; print(json.dumps({"activations": [x], "method": "omp", "k": 2}))' "$DEMO_D")
http POST /v1/dictionaries/demo/unfold 200 "$DEMO_REQ"
check_json '
assert len(d["codes"]) == 1, d
c = d["codes"][0]
assert len(c["indices"]) == len(c["values"]) <= 2, c
assert len(d["residual_norm"]) == 1, d' "unfold against the demo dictionary"

step "Restart the container; the registered dictionary must survive"
started_before=$(docker inspect -f '{{.State.StartedAt}}' "$CID")
compose restart "$SERVICE" || fail "docker-compose restart"
[[ $(docker inspect -f '{{.State.StartedAt}}' "$CID") != "$started_before" ]] || fail "container was not restarted"
wait_healthy "$(date +%s)"
http GET "/v1/dictionaries/$DICT_ID" 200
check_json 'assert d["n_features"] == 3 and d["d_model"] == 4, d' "dictionary after restart"
http POST "/v1/dictionaries/$DICT_ID/unfold" 200 "$UNFOLD_REQ"

step "All container checks passed"
