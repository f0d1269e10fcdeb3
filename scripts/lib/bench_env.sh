# Shared by scripts/bench-bridge, bench-batch and bench-chain (sourced after scripts/lib/common.sh):
# builds aq-bridge as the packages ship it (release, Swift runtime linked in statically), aq and
# aq-bench; starts the private RabbitMQ unless it runs (stopped again on exit); gives the run a
# fresh virtual host (`aq-bench-<pid>-<n>`, deleted on exit) with our topology. Sets BRIDGE, BIN, WORK, RESULTS, URL, MGMT and
# AQ (the aq-bridge command line: signing on, health/metrics server on a free port); `one LABEL
# MODE TASKS [aq-bench flags...] -- COMMAND...` runs aq-bench once and appends its JSON line to
# $RESULTS.
aq_ensure_packages gcc librabbitmq-dev libcurl4-openssl-dev rabbitmq-server python3

# (One --product per build: SwiftPM builds only the last one it is given.)
swift build "${AQ_STATIC_BUILD[@]}" --product aq-bridge >/dev/null
BRIDGE=$(swift build "${AQ_STATIC_BUILD[@]}" --show-bin-path)/aq-bridge
for product in aq aq-bench; do swift build -c release --product "$product" >/dev/null; done
BIN=$(swift build -c release --show-bin-path)
WORK=$(mktemp -d /tmp/aq-bench.XXXXXX)
RESULTS=$WORK/runs.jsonl

aq_bench_started=0
MGMT=$(aq_management_url)
# A virtual host of its own, deleted at the end: quorum queues of a just-deleted virtual host can
# still be shutting down, and declaring them again under the same name then fails (541).
VHOST=aq-bench-$$-$RANDOM
aq_bench_cleanup() {
    curl -fsS -u guest:guest -X DELETE "$MGMT/api/vhosts/$VHOST" >/dev/null 2>&1 || true
    if [ "$aq_bench_started" = 1 ]; then aq_broker_stop; fi
}
trap aq_bench_cleanup EXIT
if ! aq_broker_running; then aq_broker_start; aq_bench_started=1; fi
# Virtual hosts left by runs that were killed (their process is gone), and the old fixed name.
for stale in $(curl -fsS -u guest:guest "$MGMT/api/vhosts?columns=name" | python3 -c 'import json, sys; print(" ".join(v["name"] for v in json.load(sys.stdin)))'); do
    case "$stale" in
        aq-bench) ;;
        aq-bench-*) pid=${stale#aq-bench-}; pid=${pid%%-*}; ! kill -0 "$pid" 2>/dev/null || continue ;;
        *) continue ;;
    esac
    curl -fsS -u guest:guest -X DELETE "$MGMT/api/vhosts/$stale" >/dev/null 2>&1 || true
done
curl -fsS -u guest:guest -X PUT "$MGMT/api/vhosts/$VHOST" >/dev/null
curl -fsS -u guest:guest -X PUT "$MGMT/api/permissions/$VHOST/guest" -H 'content-type: application/json' \
    -d '{"configure":".*","write":".*","read":".*"}' >/dev/null
URL="$(aq_broker_url | sed 's#/%2F$##')/$VHOST"
AQ_AMQP_URL=$URL "$BIN/aq" topology apply -f topology --management-url "$MGMT" >/dev/null

SECRET="whsec_$(head -c 32 /dev/urandom | base64)"
AQ=(env AQ_SIGNING_SECRETS="$SECRET" AQ_LISTEN=127.0.0.1:0 "$BRIDGE" --topology topology --queue default)
one() {  # one LABEL MODE TASKS [aq-bench flags...] -- COMMAND...
    local label=$1 mode=$2 tasks=$3; shift 3
    "$BIN/aq-bench" --url "$URL" --queue aq.work.default -n "$tasks" --mode "$mode" --label "$label" \
        --bridge-log "$WORK/$label.log" "$@" | tee -a "$RESULTS" >&2
}
