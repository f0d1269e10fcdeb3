# Shared shell helpers for scripts/run, scripts/test and scripts/broker. Source, don't run.
# shellcheck shell=bash

AQ_ROOT=${AQ_ROOT:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)}

aq_log() { printf '\033[1m[aq]\033[0m %s\n' "$*" >&2; }

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
AQ_BROKER_PORT=${AQ_BROKER_PORT:-35672}
AQ_BROKER_DIR=${AQ_BROKER_DIR:-$AQ_ROOT/.broker/$AQ_BROKER_PORT}
AQ_RMQ_BIN=/usr/lib/rabbitmq/bin

aq_broker_env() {
    export RABBITMQ_NODENAME="aq$AQ_BROKER_PORT@localhost"
    export RABBITMQ_NODE_IP_ADDRESS=127.0.0.1
    export RABBITMQ_NODE_PORT=$AQ_BROKER_PORT
    export RABBITMQ_DIST_PORT=$((AQ_BROKER_PORT + 10000))
    export RABBITMQ_MNESIA_BASE=$AQ_BROKER_DIR/mnesia
    export RABBITMQ_LOG_BASE=$AQ_BROKER_DIR/log
    export RABBITMQ_CONFIG_FILE=$AQ_BROKER_DIR/rabbitmq
    export RABBITMQ_ADVANCED_CONFIG_FILE=$AQ_BROKER_DIR/advanced.config
    export RABBITMQ_ENABLED_PLUGINS_FILE=$AQ_BROKER_DIR/enabled_plugins
    export RABBITMQ_PID_FILE=$AQ_BROKER_DIR/rabbitmq.pid
    export RABBITMQ_CONF_ENV_FILE=$AQ_BROKER_DIR/rabbitmq-env.conf
    export HOME=$AQ_BROKER_DIR   # the Erlang cookie lives here, shared by the node and rabbitmqctl
}

# aq_ctl ARGS...: rabbitmqctl against the private node.
aq_ctl() { (aq_broker_env; "$AQ_RMQ_BIN/rabbitmqctl" "$@"); }

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
log.console = false
log.file.level = warning
CONF
    echo '[].' > "$AQ_BROKER_DIR/enabled_plugins"
    echo '[].' > "$AQ_BROKER_DIR/advanced.config"
    : > "$AQ_BROKER_DIR/rabbitmq-env.conf"
    aq_log "starting private RabbitMQ on 127.0.0.1:$AQ_BROKER_PORT (data in $AQ_BROKER_DIR)"
    (aq_broker_env; cd "$AQ_BROKER_DIR" && setsid "$AQ_RMQ_BIN/rabbitmq-server" \
        > "$AQ_BROKER_DIR/log/console.log" 2>&1 < /dev/null &)
    local i
    for i in $(seq 1 120); do
        if aq_ctl -q await_startup --timeout 5 >/dev/null 2>&1; then
            aq_log "RabbitMQ is ready"
            return 0
        fi
        sleep 1
    done
    aq_log "RabbitMQ did not start; its log follows"
    tail -50 "$AQ_BROKER_DIR/log/console.log" >&2 || true
    return 1
}

aq_broker_stop() {
    if aq_broker_running; then
        aq_log "stopping private RabbitMQ on 127.0.0.1:$AQ_BROKER_PORT"
        aq_ctl -q shutdown >/dev/null 2>&1 || true
    fi
    if [ -s "$AQ_BROKER_DIR/rabbitmq.pid" ]; then
        local pid; pid=$(cat "$AQ_BROKER_DIR/rabbitmq.pid")
        kill "$pid" 2>/dev/null || true
    fi
}

aq_broker_url() { echo "amqp://guest:guest@127.0.0.1:$AQ_BROKER_PORT/%2F"; }
