#!/usr/bin/env bash
# The kiln demo, run by `make demo` after `make build`:
#   1. the foundation: boot a microVM, snapshot it while it runs, restore it twice;
#   2. kilnd: build examples/python-web (Flask + gunicorn on Debian 12) into a MicroVM
#      image through the AWS lambda-microvms API, following the build log live;
#   3. launch two MicroVMs from it and call each through its own HTTPS endpoint.
#
# Environment:
#   KILN_HOME        data directory (default ~/.local/share/kiln)
#   KILN_DEMO_APP    the example directory to build (default examples/python-web)
#   KILN_DEMO_IMAGE  the image name (default python-web)
#   KILN_DEMO_PORT   kilnd's API port (default: a free one)
#   KILN_BUILD_CA    PEM bundle that build steps trust (default: the host's bundle, when
#                    there is one, so builds work behind a TLS-intercepting proxy)
#   KILN_DEMO_SKIP_FOUNDATION=1  skip part 1
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

export KILN_HOME=${KILN_HOME:-$HOME/.local/share/kiln}
APP_DIR=${KILN_DEMO_APP:-$ROOT/examples/python-web}
IMAGE=${KILN_DEMO_IMAGE:-python-web}
REGION=local
KILN=$ROOT/target/release/kiln
KILND=$ROOT/target/release/kilnd
AWS_BIN=$ROOT/target/pyenv/bin/aws

# ---------------------------------------------------------------------------- helpers

DEMO_START=$SECONDS
SECTION=0
SECTION_START=$SECONDS

bold() { if [[ -t 1 ]]; then printf '\033[1m%s\033[0m\n' "$*"; else printf '%s\n' "$*"; fi; }
say() { printf '    %s\n' "$*"; }
die() {
    printf 'demo: %s\n' "$*" >&2
    exit 1
}

# Starts a numbered section and closes the previous one with its duration.
section() {
    end_section
    SECTION=$((SECTION + 1))
    SECTION_START=$SECONDS
    echo
    bold "== $SECTION. $*"
}
end_section() {
    if ((SECTION > 0)); then
        say "($((SECONDS - SECTION_START)) s)"
    fi
}

# A minute-and-seconds rendering of a duration in seconds.
mmss() { printf '%dm%02ds' $(($1 / 60)) $(($1 % 60)); }

# Requests are signed with the admin key kilnd wrote to $KILN_HOME/credentials on its first
# start (nothing from the user's own AWS setup is used).
aws() {
    env -u AWS_ACCESS_KEY_ID -u AWS_SECRET_ACCESS_KEY -u AWS_SESSION_TOKEN -u AWS_PROFILE \
        AWS_PAGER="" AWS_SHARED_CREDENTIALS_FILE="$KILN_HOME/credentials" \
        "$AWS_BIN" --region "$REGION" --endpoint-url "$API" \
        --output text lambda-microvms "$@"
}
# The same key against kilnd's embedded S3 store (AWS's walkthrough: aws s3 mb / cp).
aws_s3() {
    env -u AWS_ACCESS_KEY_ID -u AWS_SECRET_ACCESS_KEY -u AWS_SESSION_TOKEN -u AWS_PROFILE \
        AWS_PAGER="" AWS_SHARED_CREDENTIALS_FILE="$KILN_HOME/credentials" \
        "$AWS_BIN" --region "$REGION" --endpoint-url "$API" s3 "$@"
}
# curl signing the same way, for kiln's own /kiln/v1 endpoints.
signed_curl() {
    local key
    key=$(awk '/^aws_access_key_id/ {i = $3} /^aws_secret_access_key/ {s = $3} END {print i ":" s}' \
        "$KILN_HOME/credentials")
    curl --aws-sigv4 "aws:amz:$REGION:lambda" --user "$key" "$@"
}

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

[[ -x $KILN && -x $KILND ]] || die "kiln and kilnd are not built: run \`make build\` first"
[[ -x $AWS_BIN ]] || make --no-print-directory pyenv
[[ -f $APP_DIR/Dockerfile ]] || die "$APP_DIR has no Dockerfile"

# ------------------------------------------------------------------- 1. foundation

if [[ ${KILN_DEMO_SKIP_FOUNDATION:-0} != 1 ]]; then
    section "Foundation: can this host run microVMs?"
    "$KILN" doctor
    section "Foundation: boot, snapshot while running, restore twice"
    "$KILN" demo
fi

# ------------------------------------------------------------------------ 2. kilnd

section "Starting kilnd (data in $KILN_HOME)"
PORT=${KILN_DEMO_PORT:-$(free_port)}
API=http://127.0.0.1:$PORT
RUN_DIR=$KILN_HOME/demo-run
mkdir -p "$RUN_DIR"
KILND_LOG=$RUN_DIR/kilnd.log
ENDPOINT_PORT=$(free_port)
kilnd_args=(--home "$KILN_HOME" --api-listen "127.0.0.1:$PORT"
    --endpoint-listen "127.0.0.1:$ENDPOINT_PORT")
CA=${KILN_BUILD_CA:-/etc/ssl/certs/ca-certificates.crt}
if [[ -s $CA ]]; then
    kilnd_args+=(--build-ca "$CA")
    say "build steps trust the CA certificates in $CA"
fi
KILND_PID=
stop_kilnd() {
    if [[ -n $KILND_PID ]] && kill -0 "$KILND_PID" 2>/dev/null; then
        kill -TERM "$KILND_PID" 2>/dev/null || true
        wait "$KILND_PID" 2>/dev/null || true
    fi
}
trap stop_kilnd EXIT
trap 'exit 130' INT TERM
"$KILND" "${kilnd_args[@]}" >"$KILND_LOG" 2>&1 &
KILND_PID=$!
for _ in $(seq 1 300); do
    if curl -fsS "$API/kiln/v1/health" >/dev/null 2>&1; then
        break
    fi
    kill -0 "$KILND_PID" 2>/dev/null || {
        tail -n 20 "$KILND_LOG" >&2
        die "kilnd exited while starting (log: $KILND_LOG)"
    }
    sleep 0.2
done
curl -fsS "$API/kiln/v1/health" >/dev/null || die "kilnd did not answer on $API (log: $KILND_LOG)"
say "kilnd pid $KILND_PID, API on $API, log in $KILND_LOG"
say "requests are signed with the admin key in $KILN_HOME/credentials"
say "managed base images:"
aws list-managed-microvm-images --query 'items[].[imageArn]' | sed 's/^/      /'

# --------------------------------------------------------------- 3. code artifact

section "Packaging $(basename "$APP_DIR") as a code artifact"
# Named after its contents: earlier versions keep pointing at the artifact they were built from.
ZIP=$(python3 - "$APP_DIR" "$RUN_DIR" "$IMAGE" <<'PY'
import hashlib, os, sys, zipfile
src, out_dir, image = sys.argv[1:4]
files = []
for dirpath, dirnames, filenames in os.walk(src):
    dirnames[:] = sorted(d for d in dirnames if d not in ("__pycache__", ".git", ".venv"))
    files += sorted(os.path.join(dirpath, f) for f in filenames)
digest = hashlib.sha256()
for path in files:
    rel = os.path.relpath(path, src)
    with open(path, "rb") as f:
        digest.update(rel.encode() + b"\0" + f.read() + b"\0")
dest = os.path.join(out_dir, f"{image}-{digest.hexdigest()[:12]}.zip")
with zipfile.ZipFile(dest + ".tmp", "w", zipfile.ZIP_DEFLATED) as z:
    for path in files:
        z.write(path, os.path.relpath(path, src))
        print("      " + os.path.relpath(path, src), file=sys.stderr)
os.replace(dest + ".tmp", dest)
print(dest)
PY
)
say "$ZIP ($(du -k "$ZIP" | cut -f1) KiB)"
# kilnd reads no files from its host: the zip goes through its S3 store, as on AWS.
BUCKET=kiln-demo
aws_s3 ls "s3://$BUCKET" >/dev/null 2>&1 || aws_s3 mb "s3://$BUCKET" >/dev/null
ARTIFACT=s3://$BUCKET/$(basename "$ZIP")
aws_s3 cp --only-show-errors "$ZIP" "$ARTIFACT"
say "uploaded to $ARTIFACT"

# --------------------------------------------------------------------- 4. build

BASE_ARN=arn:aws:lambda:$REGION:aws:microvm-image:debian-12
if grep -qiE '^[[:space:]]*FROM[[:space:]]+kiln/busybox' "$APP_DIR/Dockerfile"; then
    BASE_ARN=arn:aws:lambda:$REGION:aws:microvm-image:busybox
fi
image_args=(--base-image-arn "$BASE_ARN"
    --build-role-arn "arn:aws:iam::000000000000:role/kiln-build"
    --code-artifact "{\"uri\": \"$ARTIFACT\"}")

STATE=$(aws get-microvm-image --image-identifier "$IMAGE" --query state 2>/dev/null || true)
case $STATE in
"")
    section "Creating the image $IMAGE (FROM $BASE_ARN)"
    VERSION=$(aws create-microvm-image --name "$IMAGE" "${image_args[@]}" --query imageVersion)
    ;;
CREATING | UPDATING)
    section "Image $IMAGE is $STATE: following the build kilnd resumed"
    VERSION=$(aws list-microvm-image-versions --image-identifier "$IMAGE" \
        --query 'max_by(items, &to_number(imageVersion)).imageVersion')
    ;;
*)
    section "Updating the image $IMAGE (it is $STATE): a new version"
    VERSION=$(aws update-microvm-image --image-identifier "$IMAGE" "${image_args[@]}" \
        --query imageVersion)
    ;;
esac
say "building version $VERSION; the log follows (also at"
say "$API/kiln/v1/images/$IMAGE/versions/$VERSION/build-log)"
echo
BUILD_LOG=$RUN_DIR/$IMAGE-$VERSION.build.log
BUILD_START=$SECONDS
# The stream ends when the build does; if it breaks, fall back to polling the state.
signed_curl -sSN --no-buffer "$API/kiln/v1/images/$IMAGE/versions/$VERSION/build-log?follow=true" |
    tee "$BUILD_LOG" || true
while :; do
    STATE=$(aws get-microvm-image-version --image-identifier "$IMAGE" --image-version "$VERSION" \
        --query state)
    [[ $STATE == PENDING || $STATE == IN_PROGRESS ]] || break
    sleep 2
done
BUILD_SECS=$((SECONDS - BUILD_START))

# -------------------------------------------------------------------- 5. result

section "Result: $IMAGE version $VERSION is $STATE after $(mmss "$BUILD_SECS")"
say "step times (from the build log):"
awk '
    /==> step / { sub(/^\[[ 0-9.]+s\] ==> /, ""); step = $0; next }
    /^\[[ 0-9.]+s\]     done in / { printf "      %8s s  %s\n", $(NF - 1), step; next }
    /^\[[ 0-9.]+s\]     cached$/ { printf "      %8s    %s\n", "cached", step; next }
    /ready after|snapshot taken|filesystem built|image ready/ { sub(/^\[[ 0-9.]+s\] /, ""); print "      " $0 }
' "$BUILD_LOG"
if [[ $STATE != SUCCESSFUL ]]; then
    REASON=$(aws get-microvm-image-version --image-identifier "$IMAGE" --image-version "$VERSION" \
        --query stateReason)
    say "state reason: $REASON"
    say "full build log: $BUILD_LOG; kilnd's log: $KILND_LOG"
    end_section
    exit 1
fi
BUILD_ID=$(aws list-microvm-image-builds --image-identifier "$IMAGE" --image-version "$VERSION" \
    --query 'items[0].buildId')
read -r MEM DISK < <(aws get-microvm-image-build --image-identifier "$IMAGE" \
    --image-version "$VERSION" --build-id "$BUILD_ID" \
    --query '[snapshotBuild.memorySnapshotSizeInBytes, snapshotBuild.diskSnapshotSizeInBytes]')
mib() { awk -v b="$1" 'BEGIN { printf "%.1f MiB", b / 1048576 }'; }
say "build $BUILD_ID: memory snapshot $(mib "$MEM"), disk snapshot $(mib "$DISK")"
say "image versions:"
aws list-microvm-image-versions --image-identifier "$IMAGE" \
    --query 'items[].[imageVersion, state, status]' | sed 's/^/      /'

# -------------------------------------------------------------------- 6. launch

section "Launching two MicroVMs from $IMAGE and calling them over HTTPS"
for n in 1 2; do
    T0=$(date +%s.%N)
    ID=$(aws run-microvm --image-identifier "$IMAGE" --query microvmId)
    T1=$(date +%s.%N)
    TOKEN=$(aws create-microvm-auth-token --microvm-identifier "$ID" --expiration-in-minutes 5 \
        --allowed-ports '[{"port": 8080}]' --query 'authToken."X-aws-proxy-auth"')
    HOST=$ID.kiln.localhost
    for _ in 1 2; do
        BODY=$(curl -fsS --cacert "$KILN_HOME/tls/ca.pem" \
            --resolve "$HOST:$ENDPOINT_PORT:127.0.0.1" \
            -H "X-aws-proxy-auth: $TOKEN" "https://$HOST:$ENDPOINT_PORT/")
        say "$ID answers: $(echo "$BODY" | head -n 1) | $(echo "$BODY" | sed -n 2p)"
    done
    say "RunMicrovm returned in $(awk -v a="$T0" -v b="$T1" 'BEGIN { printf "%.0f ms", (b - a) * 1000 }') (aws CLI start-up included)"
    NO_TOKEN=$(curl -s -o /dev/null -w '%{http_code}' --cacert "$KILN_HOME/tls/ca.pem" \
        --resolve "$HOST:$ENDPOINT_PORT:127.0.0.1" "https://$HOST:$ENDPOINT_PORT/")
    say "without a token: HTTP $NO_TOKEN"
    aws terminate-microvm --microvm-identifier "$ID" >/dev/null
    say "$ID terminated"
done
end_section
SECTION=0
echo
bold "demo done in $(mmss $((SECONDS - DEMO_START)))"
