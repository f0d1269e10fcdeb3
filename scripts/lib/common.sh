# Shared shell helpers for scripts/run, scripts/test and scripts/broker. Source, don't run.
# shellcheck shell=bash

AQ_ROOT=${AQ_ROOT:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)}

aq_log() { printf '\033[1m[aq]\033[0m %s\n' "$*" >&2; }

# The build the packages ship (scripts/package) and the benchmarks measure: release, the Swift
# runtime linked in statically, linked by lld with packed relative relocations (DT_RELR, glibc
# 2.36 and later, as in Debian 12). The binaries stay position-independent, but their relocation
# records take 34 KB instead of 1.9 MB, all of it read at every start and then resident: aq-bridge
# idle 30.0 -> 27.8 MB RSS. Our code and the packages' are compiled with a section per function,
# and lld lays out first the functions aq-bridge runs (scripts/lib/aq-bridge.order, made by
# scripts/order-symbols), so they share as few pages as possible: resident code 10.5 -> 6 MB with
# 10,000 tasks in flight. Use: swift build "${AQ_STATIC_BUILD[@]}" --product NAME.
AQ_STATIC_BUILD=(-c release --static-swift-stdlib --scratch-path .build-static
    -Xswiftc -Xclang-linker -Xswiftc -fuse-ld=lld -Xlinker -z -Xlinker pack-relative-relocs
    -Xswiftc -Xfrontend -Xswiftc -function-sections
    -Xlinker "--symbol-ordering-file=$AQ_ROOT/scripts/lib/aq-bridge.order" -Xlinker --no-warn-symbol-ordering)

_aq_apt_updated=0
# aq_ensure_packages PKG...: installs the Debian packages that are missing (needs root or sudo).
aq_ensure_packages() {
    local missing=() p
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    local sudo=""
    [ "$(id -u)" -ne 0 ] && sudo="sudo"
    aq_log "installing ${missing[*]}"
    if [ $_aq_apt_updated -eq 0 ]; then
        $sudo apt-get update -q >/dev/null
        _aq_apt_updated=1
    fi
    # policy-rc.d may refuse to start services in containers; we never rely on the system service.
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
}

# --- private RabbitMQ node -------------------------------------------------------------------
# A node of its own: own data folder, own node name, bound to 127.0.0.1, no systemd.
# Ports: AMQP = AQ_BROKER_PORT, management API = +1, Erlang distribution = +2 (rabbitmqctl then
# takes its own ports from +10002 on). 27700 stays clear of RabbitMQ's defaults (5672, 15672,
# 25672, and 35672-35682 for a system broker's CLI tools) and below Linux's ephemeral range
# (32768-60999): a port in that range can be taken, between our check that it is free and the
# node's bind, as the local end of any outgoing connection on the machine (a CI run lost a
# cluster node that way). Without AQ_BROKER_PORT, a start that finds 27700 taken by another
# program (another checkout's private node, say) moves on by tens.
AQ_BROKER_PORT_GIVEN=${AQ_BROKER_PORT:+1}
AQ_BROKER_DIR_GIVEN=${AQ_BROKER_DIR:+1}
AQ_BROKER_PORT=${AQ_BROKER_PORT:-27700}
AQ_BROKER_DIR=${AQ_BROKER_DIR:-$AQ_ROOT/.broker/$AQ_BROKER_PORT}
AQ_RMQ_BIN=/usr/lib/rabbitmq/bin

aq_broker_env() {
    export RABBITMQ_NODENAME="aq$AQ_BROKER_PORT@localhost"
    export RABBITMQ_DIST_PORT=$((AQ_BROKER_PORT + 2))
    # Erlang distribution and epmd on loopback only, like everything else.
    export RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1} ${AQ_BROKER_ERL_ARGS:-}"
    export ERL_EPMD_ADDRESS=127.0.0.1
    export RABBITMQ_MNESIA_BASE=$AQ_BROKER_DIR/mnesia
    export RABBITMQ_LOG_BASE=$AQ_BROKER_DIR/log
    export RABBITMQ_CONFIG_FILE=$AQ_BROKER_DIR/rabbitmq
    export RABBITMQ_ADVANCED_CONFIG_FILE=$AQ_BROKER_DIR/advanced.config
    export RABBITMQ_ENABLED_PLUGINS_FILE=$AQ_BROKER_DIR/enabled_plugins
    export RABBITMQ_PID_FILE=$AQ_BROKER_DIR/rabbitmq.pid
    export RABBITMQ_CONF_ENV_FILE=$AQ_BROKER_DIR/rabbitmq-env.conf
    export HOME=$AQ_BROKER_DIR   # the Erlang cookie lives here, shared by the node and rabbitmqctl
}

# aq_ctl ARGS...: rabbitmqctl against the private node. Its data folder must exist (the Erlang
# cookie lives there), and a CLI that cannot start writes no erl_crash.dump into the checkout.
aq_ctl() { (aq_broker_env; mkdir -p "$AQ_BROKER_DIR"; export ERL_CRASH_DUMP_SECONDS=0; "$AQ_RMQ_BIN/rabbitmqctl" "$@"); }

aq_broker_running() { aq_ctl -q status >/dev/null 2>&1; }

aq_broker_start() {
    aq_ensure_packages rabbitmq-server
    mkdir -p "$AQ_BROKER_DIR/log" "$AQ_BROKER_DIR/mnesia"
    if aq_broker_running; then
        aq_log "private RabbitMQ already running on 127.0.0.1:$AQ_BROKER_PORT"
        return 0
    fi
    cat > "$AQ_BROKER_DIR/rabbitmq.conf" <<CONF
listeners.tcp.1 = 127.0.0.1:$AQ_BROKER_PORT
loopback_users.guest = true
management.tcp.ip = 127.0.0.1
management.tcp.port = $((AQ_BROKER_PORT + 1))
log.console = false
log.file.level = warning
CONF
    echo '[rabbitmq_management].' > "$AQ_BROKER_DIR/enabled_plugins"
    # SO_REUSEADDR, so a restart is not refused while old connections sit in TIME_WAIT.
    echo '[{rabbit, [{tcp_listen_options, [binary, {packet, raw}, {reuseaddr, true}, {backlog, 128}, {nodelay, true}, {linger, {true, 0}}, {exit_on_close, false}]}]}].' > "$AQ_BROKER_DIR/advanced.config"
    : > "$AQ_BROKER_DIR/rabbitmq-env.conf"
    # A node of ours that is still shutting down may hold the port for a moment.
    local i
    if [ -s "$AQ_BROKER_DIR/rabbitmq.pid" ] && kill -0 "$(cat "$AQ_BROKER_DIR/rabbitmq.pid")" 2>/dev/null; then
        for i in $(seq 1 30); do
            aq_port_free "$AQ_BROKER_PORT" && break
            sleep 1
        done
    fi
    if ! aq_port_free "$AQ_BROKER_PORT" && [ -z "$AQ_BROKER_PORT_GIVEN" ] && [ -z "$AQ_BROKER_DIR_GIVEN" ]; then
        local port
        for port in $(seq $((AQ_BROKER_PORT + 10)) 10 $((AQ_BROKER_PORT + 200))); do
            if aq_port_free "$port" && aq_port_free $((port + 1)) && aq_port_free $((port + 2)); then
                aq_log "port $AQ_BROKER_PORT is taken by another program; using $port"
                AQ_BROKER_PORT=$port
                AQ_BROKER_DIR=$AQ_ROOT/.broker/$port
                aq_broker_start
                return
            fi
        done
    fi
    aq_port_free "$AQ_BROKER_PORT" || { aq_log "port $AQ_BROKER_PORT is taken by another program (set AQ_BROKER_PORT)"; return 1; }
    aq_log "starting private RabbitMQ on 127.0.0.1:$AQ_BROKER_PORT (data in $AQ_BROKER_DIR)"
    (aq_broker_env; cd "$AQ_BROKER_DIR" && exec setsid "$AQ_RMQ_BIN/rabbitmq-server" \
        > "$AQ_BROKER_DIR/log/console.log" 2>&1 < /dev/null) &
    local server=$!
    for i in $(seq 1 90); do
        if ! kill -0 "$server" 2>/dev/null; then
            # A port free when checked can still be taken before the node binds it (another
            # program's listener started meanwhile): start again, a few times, before failing.
            if grep -q eaddrinuse "$AQ_BROKER_DIR/log/console.log" 2>/dev/null \
                && [ "${_aq_broker_attempt:-1}" -lt 3 ]; then
                _aq_broker_attempt=$(( ${_aq_broker_attempt:-1} + 1 ))
                aq_log "a port of the private RabbitMQ was taken as it started; starting again"
                sleep 1
                aq_broker_start
                return
            fi
            aq_log "RabbitMQ exited during start-up; its log follows"
            tail -40 "$AQ_BROKER_DIR/log/console.log" >&2 || true
            return 1
        fi
        if aq_ctl -q await_startup --timeout 2 >/dev/null 2>&1 \
            && curl -fsS -u guest:guest "$(aq_management_url)/api/overview" >/dev/null 2>&1; then
            aq_log "RabbitMQ is ready (management API on $(aq_management_url))"
            return 0
        fi
        sleep 1
    done
    aq_log "RabbitMQ did not become ready in time; its log follows"
    tail -40 "$AQ_BROKER_DIR/log/console.log" >&2 || true
    return 1
}

aq_port_free() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

aq_broker_stop() {
    if aq_broker_running; then
        aq_log "stopping private RabbitMQ on 127.0.0.1:$AQ_BROKER_PORT"
        aq_ctl -q shutdown >/dev/null 2>&1 || true
    fi
    if [ -s "$AQ_BROKER_DIR/rabbitmq.pid" ]; then
        local pid i; pid=$(cat "$AQ_BROKER_DIR/rabbitmq.pid")
        for i in $(seq 1 30); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
        kill "$pid" 2>/dev/null || true
        rm -f "$AQ_BROKER_DIR/rabbitmq.pid"
    fi
}

aq_broker_url() { echo "amqp://guest:guest@127.0.0.1:$AQ_BROKER_PORT/%2F"; }
aq_management_url() { echo "http://127.0.0.1:$((AQ_BROKER_PORT + 1))"; }

# --- the system broker the benchmark harness (../shared/bench) expects ---------------------------
# Debian's RabbitMQ on 127.0.0.1:5672 with its management plugin (vhost /bench is the harness's),
# started when it is not running.
aq_system_broker() {
    aq_ensure_packages rabbitmq-server curl pkg-config librabbitmq-dev libcurl4-openssl-dev libssl-dev
    if ! rabbitmqctl -q status >/dev/null 2>&1; then
        aq_log "starting the system RabbitMQ (rabbitmq-server -detached)"
        /usr/sbin/rabbitmq-server -detached
        for _ in $(seq 1 60); do rabbitmqctl -q await_startup --timeout 2 >/dev/null 2>&1 && break; sleep 1; done
    fi
    rabbitmq-plugins -q enable rabbitmq_management >/dev/null
    for _ in $(seq 1 60); do curl -fsS -u guest:guest http://127.0.0.1:15672/api/overview >/dev/null 2>&1 && break; sleep 1; done
}
