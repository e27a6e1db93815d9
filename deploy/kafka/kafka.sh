#!/usr/bin/env bash
# demandstream's own Apache Kafka launcher: KRaft brokers for development, tests and demos.
#
#   kafka.sh up [--brokers 1|3] [--port 9092] [--fresh] [--sasl-ssl-port P]
#   kafka.sh down|status [--port 9092]
#   kafka.sh stop-broker N|start-broker N [--port 9092]
#
# The broker jars (Apache Kafka 4.1.1 from Maven Central) are fetched once with Maven into
# ${DEMANDSTREAM_CACHE:-$HOME/.cache/demandstream}/kafka-4.1.1/libs. Each cluster keeps its state
# (node dirs, logs, pid files, cluster id) under
# ${DEMANDSTREAM_KAFKA_RUN:-$HOME/.cache/demandstream/run}/kafka-<port>/, so clusters on different
# ports (a test cluster on 19092, a demo on 9092) coexist. Run `kafka.sh --help` for details.
set -euo pipefail

readonly KAFKA_VERSION=4.1.1
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
readonly HERE
readonly CACHE_ROOT=${DEMANDSTREAM_CACHE:-$HOME/.cache/demandstream}
readonly LIBS=$CACHE_ROOT/kafka-$KAFKA_VERSION/libs
readonly RUN_ROOT=${DEMANDSTREAM_KAFKA_RUN:-$HOME/.cache/demandstream/run}
# Seconds to wait for a node to answer on its port and log "Kafka Server started"; a cold JVM on a
# busy 2-core machine takes 10-20 s, so 60 s only trips on a real failure.
readonly START_TIMEOUT=${DEMANDSTREAM_KAFKA_START_TIMEOUT:-60}
# Seconds `down` gives the nodes for a controlled shutdown (SIGTERM) before it SIGKILLs them.
readonly STOP_TIMEOUT=30
# The controller (KRaft quorum) listener of node i sits at client port + 1000 + i. Deriving it from the
# client port means one number (--port) names a whole cluster, and clusters whose client ports differ
# (19092, 19192, 9092) never collide on controller ports either, without a second flag to keep in sync.
# DEMANDSTREAM_KAFKA_CONTROLLER_PORT_OFFSET overrides it for tests that must keep every port they use in
# a narrow range (it must be at least 3, so controllers never sit on a 3-node cluster's client ports).
readonly CONTROLLER_PORT_OFFSET=${DEMANDSTREAM_KAFKA_CONTROLLER_PORT_OFFSET:-1000}
# Small heap: the dev machine has 2 cores and little memory to spare next to the tests; override with
# DEMANDSTREAM_KAFKA_HEAP_OPTS for benchmarks.
readonly HEAP_OPTS=${DEMANDSTREAM_KAFKA_HEAP_OPTS:--Xmx512m -Xms256m}
# Internal topics (__consumer_offsets, __transaction_state) default to 50 partitions each; on a dev
# broker that is 100 (x3 in 3-broker mode) replicas to create and load for nothing, and it slows the
# first consumer group and the first transaction by seconds. 8 still spreads groups across partitions.
readonly INTERNAL_TOPIC_PARTITIONS=8
# Line that kafka.Kafka (KafkaRaftServer) logs once the node serves clients.
readonly STARTED_MARKER='Kafka Server started'
# Credentials of the SCRAM admin user created at format time when --sasl-ssl-port is given.
readonly SCRAM_ADMIN_USER=admin
readonly SCRAM_ADMIN_PASSWORD=admin-secret
# A second SCRAM user without any right of its own: tests grant it ACLs as a shop's operators would.
readonly SCRAM_SHOP_USER=shop
readonly SCRAM_SHOP_PASSWORD=shop-secret
# The mutual-TLS listener (--sasl-ssl-port P) of node i is at P + MTLS_PORT_OFFSET + i; its client
# certificate's subject, and so the principal the ACLs see (a super user here).
readonly MTLS_PORT_OFFSET=10
readonly MTLS_CLIENT_DN="CN=demandstream-mtls"
# Password of the generated dev keystores; they hold a throw-away self-signed CA, nothing secret.
readonly KEYSTORE_PASSWORD=demandstream-dev
# Bumped when the generated TLS material changes, so that a cluster directory kept from before gets new
# material at its next 'up' (2: the CA carries keyUsage, which Python 3.13's strict verification needs).
readonly TLS_MATERIAL_VERSION=3

say() { printf 'kafka.sh: %s\n' "$*"; }
die() {
    printf 'kafka.sh: error: %s\n' "$1" >&2
    exit "${2:-1}"
}

usage() {
    cat <<EOF
usage: kafka.sh COMMAND [options]

commands:
  up               start the cluster (idempotent: exits 0 if it already runs; starts nodes that are down)
  down             stop all nodes (SIGTERM, then SIGKILL after ${STOP_TIMEOUT} s); idempotent
  status           print each node's pid/port/state; exit 0 when all nodes are up, 3 otherwise
  stop-broker N    SIGKILL node N (0-based), keeping its storage (fault tests)
  start-broker N   restart node N on its existing storage

options:
  --port P          client port of node 0 (default \$DEMANDSTREAM_KAFKA_PORT or 9092); node i uses P+i
                    and its controller listener P+${CONTROLLER_PORT_OFFSET}+i
  --brokers 1|3     cluster size for 'up' (default: the size the cluster was created with, else 1)
  --fresh           'up' only: stop the cluster and wipe its data first
  --sasl-ssl-port S 'up' only: add a SASL_SSL (SCRAM-SHA-512/256, PLAIN) listener on S+i and a mutual-TLS (SSL,
                    client certificate <run dir>/client.pem and .key) listener on S+${MTLS_PORT_OFFSET}+i, CA at <run dir>/ca.pem,
                    super user ${SCRAM_ADMIN_USER}/${SCRAM_ADMIN_PASSWORD}, user ${SCRAM_SHOP_USER}/${SCRAM_SHOP_PASSWORD} with
                    only the ACLs granted to it (StandardAuthorizer); needs a fresh cluster

environment: DEMANDSTREAM_CACHE (jar cache root), DEMANDSTREAM_KAFKA_RUN (run state root),
  DEMANDSTREAM_KAFKA_PORT, DEMANDSTREAM_KAFKA_START_TIMEOUT, DEMANDSTREAM_KAFKA_HEAP_OPTS,
  DEMANDSTREAM_KAFKA_CONTROLLER_PORT_OFFSET (tests)
EOF
}

# ---------------------------------------------------------------------------------------------------
# Command line

COMMAND=""
NODE_ARG=""
PORT=${DEMANDSTREAM_KAFKA_PORT:-9092}
BROKERS_ARG=""
FRESH=0
SASL_SSL_PORT_ARG=""

parse_args() {
    [[ $# -gt 0 ]] || {
        usage >&2
        exit 2
    }
    while [[ $# -gt 0 ]]; do
        case "$1" in
            -h | --help)
                usage
                exit 0
                ;;
            --port | --brokers | --sasl-ssl-port)
                [[ $# -ge 2 ]] || die "$1 needs a value" 2
                case "$1" in
                    --port) PORT=$2 ;;
                    --brokers) BROKERS_ARG=$2 ;;
                    --sasl-ssl-port) SASL_SSL_PORT_ARG=$2 ;;
                esac
                shift 2
                ;;
            --port=*) PORT=${1#*=} && shift ;;
            --brokers=*) BROKERS_ARG=${1#*=} && shift ;;
            --sasl-ssl-port=*) SASL_SSL_PORT_ARG=${1#*=} && shift ;;
            --fresh) FRESH=1 && shift ;;
            up | down | status | stop-broker | start-broker)
                [[ -z $COMMAND ]] || die "only one command at a time (got '$COMMAND' and '$1')" 2
                COMMAND=$1
                shift
                if [[ $COMMAND == stop-broker || $COMMAND == start-broker ]]; then
                    [[ $# -gt 0 && $1 =~ ^[0-9]+$ ]] || die "$COMMAND needs a node number N (0-based)" 2
                    NODE_ARG=$1
                    shift
                fi
                ;;
            *) die "unknown argument '$1' (see kafka.sh --help)" 2 ;;
        esac
    done
    [[ -n $COMMAND ]] || die "no command given (up, down, status, stop-broker N, start-broker N)" 2
    [[ $CONTROLLER_PORT_OFFSET =~ ^[1-9][0-9]*$ ]] && ((CONTROLLER_PORT_OFFSET >= 3)) ||
        die "DEMANDSTREAM_KAFKA_CONTROLLER_PORT_OFFSET must be a number >= 3, got '$CONTROLLER_PORT_OFFSET'" 2
    is_port "$PORT" || die "--port must be a TCP port number, got '$PORT'" 2
    if [[ -n $BROKERS_ARG && $BROKERS_ARG != 1 && $BROKERS_ARG != 3 ]]; then
        die "--brokers must be 1 or 3, got '$BROKERS_ARG'" 2
    fi
    if [[ -n $SASL_SSL_PORT_ARG ]]; then
        is_port "$SASL_SSL_PORT_ARG" || die "--sasl-ssl-port must be a TCP port number" 2
    fi
    if [[ $COMMAND != up && ($FRESH == 1 || -n $SASL_SSL_PORT_ARG) ]]; then
        die "--fresh and --sasl-ssl-port only apply to 'up'" 2
    fi
}

is_port() { [[ $1 =~ ^[0-9]+$ ]] && ((10#$1 >= 1 && 10#$1 <= 65535 - CONTROLLER_PORT_OFFSET - 2)); }

# ---------------------------------------------------------------------------------------------------
# Prerequisites and the jar cache

require_java() {
    command -v java >/dev/null 2>&1 ||
        die "java not found: install a JDK 17 or newer (Debian/Ubuntu: apt-get install openjdk-17-jdk-headless)"
    local version major
    version=$(java -version 2>&1 | sed -n 's/.*version "\([^"]*\)".*/\1/p' | head -n 1)
    major=${version%%.*}
    [[ $major == 1 ]] && major=$(cut -d. -f2 <<<"$version")
    [[ $major =~ ^[0-9]+$ ]] || die "cannot read the java version from 'java -version' (got '$version')"
    ((major >= 17)) || die "java $version is too old: Kafka $KAFKA_VERSION needs JDK 17 or newer"
}

CLEANUP_PATHS=()
cleanup() {
    local path
    for path in "${CLEANUP_PATHS[@]+"${CLEANUP_PATHS[@]}"}"; do
        rm -rf -- "$path"
    done
}
trap cleanup EXIT

# Fetch the broker jars once. Maven copies into a temp dir next to the cache, which is then renamed into
# place: a rename is atomic, so an interrupted fetch leaves only a stray libs.tmp.* dir, never half a cache.
ensure_libs() {
    if [[ -f $LIBS/kafka_2.13-$KAFKA_VERSION.jar ]]; then
        return 0
    fi
    command -v mvn >/dev/null 2>&1 ||
        die "mvn not found: install Apache Maven 3.6+ to fetch the Kafka jars (Debian/Ubuntu: apt-get install maven)"
    local parent tmp log started
    parent=$(dirname "$LIBS")
    mkdir -p "$parent"
    tmp=$(mktemp -d "$parent/libs.tmp.XXXXXX")
    log=$tmp.log
    CLEANUP_PATHS+=("$tmp" "$log")
    say "fetching Apache Kafka $KAFKA_VERSION jars from Maven Central into $LIBS (once, about 45 MB)"
    started=$SECONDS
    if ! mvn -q -B -f "$HERE/pom.xml" dependency:copy-dependencies \
        -DincludeScope=runtime -DoutputDirectory="$tmp" >"$log" 2>&1; then
        tail -n 20 "$log" >&2
        die "maven could not fetch the Kafka jars (see above; is Maven Central reachable?)"
    fi
    [[ -f $tmp/kafka_2.13-$KAFKA_VERSION.jar ]] || die "maven finished but kafka_2.13-$KAFKA_VERSION.jar is missing"
    # mv -T refuses to replace a non-empty directory: if a concurrent fetch got there first, keep theirs.
    if ! mv -T "$tmp" "$LIBS" 2>/dev/null; then
        [[ -f $LIBS/kafka_2.13-$KAFKA_VERSION.jar ]] || die "cannot move the fetched jars into $LIBS"
    fi
    say "fetched $(find "$LIBS" -name '*.jar' | wc -l) jars in $((SECONDS - started)) s"
}

# ---------------------------------------------------------------------------------------------------
# Cluster layout and state

RUN=""
BROKERS=1
SASL_SSL_PORT=""
CLUSTER_ID=""

load_state() {
    RUN=$RUN_ROOT/kafka-$PORT
    BROKERS=1
    SASL_SSL_PORT=""
    CLUSTER_ID=""
    if [[ -f $RUN/brokers ]]; then BROKERS=$(<"$RUN/brokers"); fi
    if [[ -f $RUN/sasl-ssl-port ]]; then SASL_SSL_PORT=$(<"$RUN/sasl-ssl-port"); fi
    if [[ -f $RUN/cluster.id ]]; then CLUSTER_ID=$(<"$RUN/cluster.id"); fi
    return 0
}

# Serialise commands that change one cluster (two `up`s racing would format and start it twice).
lock_cluster() {
    mkdir -p "$RUN"
    exec 9>"$RUN/.lock"
    flock -w 300 9 || die "another kafka.sh holds $RUN/.lock for more than 300 s"
}

node_dir() { printf '%s/node-%s' "$RUN" "$1"; }
client_port() { echo $((PORT + $1)); }
controller_port() { echo $((PORT + CONTROLLER_PORT_OFFSET + $1)); }
sasl_port() { echo $((SASL_SSL_PORT + $1)); }
mtls_port() { echo $((SASL_SSL_PORT + MTLS_PORT_OFFSET + $1)); }

# Write file $1 with content $2 so that a concurrent reader (an unlocked `status`, a test polling it)
# sees the old content or the new one, never an empty or half-written file: write a temp file, rename it.
# (Writers hold the cluster lock, so $$ makes the temp name unique.)
write_atomic() {
    printf '%s\n' "$2" >"$1.tmp.$$"
    mv -f -- "$1.tmp.$$" "$1"
}

# Whether process $1 exists and has not exited (a zombie, exited but not yet reaped, counts as gone).
proc_alive() {
    kill -0 "$1" 2>/dev/null || return 1
    local stat
    { read -r stat <"/proc/$1/stat"; } 2>/dev/null || return 1
    stat=${stat##*) }
    [[ ${stat:0:1} != [ZX] ]]
}

# Whether process $1 runs node $2's broker: its argv holds node $2's server.properties. True for the
# nohup, setsid and java images alike (each execs the next with the same arguments), false for the
# forked shell that has not reached exec yet; see launch_node.
runs_node() {
    local -a argv
    local arg want
    want=$(node_dir "$2")/server.properties
    { mapfile -d '' -t argv <"/proc/$1/cmdline"; } 2>/dev/null || return 1
    for arg in "${argv[@]+"${argv[@]}"}"; do
        [[ $arg == "$want" ]] && return 0
    done
    return 1
}

# The pid of node $1 if that process is alive and is really our broker for this node (the pid file may
# be stale and its pid reused by something else after a reboot or SIGKILL). launch_node writes the pid
# file only once the broker has exec'd, so the command-line check never sees a node that is starting.
node_pid() {
    local pid_file pid=""
    pid_file=$(node_dir "$1")/kafka.pid
    [[ -f $pid_file ]] || return 1
    { read -r pid <"$pid_file"; } 2>/dev/null || true
    [[ $pid =~ ^[0-9]+$ ]] || return 1
    proc_alive "$pid" || return 1
    runs_node "$pid" "$1" || return 1
    echo "$pid"
}

# SIGKILL process $1 and wait (up to $2 s, default 30) until it is gone, so that its ports are free
# when this returns. Returns 1 if it still exists after that (stuck in the kernel).
kill_and_wait() {
    local pid=$1 limit=$((${2:-30} * 4)) waited=0
    kill -KILL "$pid" 2>/dev/null || true
    while proc_alive "$pid"; do
        ((waited < limit)) || return 1
        sleep 0.25
        waited=$((waited + 1))
    done
}

port_open() { (: <>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

node_up() {
    node_pid "$1" >/dev/null && port_open "$(client_port "$1")"
}

all_up() {
    local i
    for ((i = 0; i < BROKERS; i++)); do
        node_up "$i" || return 1
    done
}

new_cluster_id() {
    # Kafka's Uuid.randomUuid(): 16 random bytes, URL-safe base64 without padding, never starting with '-'
    # (it would read as a command-line option). Done in bash to save a JVM start.
    local id
    while :; do
        id=$(head -c 16 /dev/urandom | base64 | tr '+/' '-_' | tr -d '=\n')
        [[ $id == -* ]] || break
    done
    echo "$id"
}

quorum_voters() {
    local i voters=""
    for ((i = 0; i < BROKERS; i++)); do
        voters+="${voters:+,}$i@127.0.0.1:$(controller_port "$i")"
    done
    echo "$voters"
}

write_server_properties() {
    local i=$1 dir rf min_isr listeners advertised protocol_map
    dir=$(node_dir "$i")
    if ((BROKERS == 1)); then
        rf=1 min_isr=1
    else
        # Three replicas, two must acknowledge: acks=all keeps working with any one node down.
        rf=3 min_isr=2
    fi
    listeners="PLAINTEXT://127.0.0.1:$(client_port "$i"),CONTROLLER://127.0.0.1:$(controller_port "$i")"
    protocol_map="PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT"
    if [[ -n $SASL_SSL_PORT ]]; then
        listeners+=",SASL_SSL://127.0.0.1:$(sasl_port "$i"),SSL://127.0.0.1:$(mtls_port "$i")"
        protocol_map+=",SASL_SSL:SASL_SSL,SSL:SSL"
    fi
    advertised=$listeners
    cat >"$dir/server.properties" <<EOF
# Written by deploy/kafka/kafka.sh before every start of this node; change kafka.sh, not this file.
# A development/test broker: combined KRaft broker+controller, bound to 127.0.0.1 only.
process.roles=broker,controller
node.id=$i
controller.quorum.voters=$(quorum_voters)
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listeners=$listeners
advertised.listeners=$advertised
listener.security.protocol.map=$protocol_map
log.dirs=$dir/data

# The product creates its own topics, and a real shop's cluster usually forbids auto-creation,
# so the dev broker forbids it too: a missing topic shows up here, not in production.
auto.create.topics.enable=false
num.partitions=4
default.replication.factor=$rf
min.insync.replicas=$min_isr

# Consumer offsets and transactions (exactly-once is tested; transactions need no switch in Kafka 4,
# only a transaction state topic that this cluster can actually replicate).
offsets.topic.replication.factor=$rf
offsets.topic.num.partitions=$INTERNAL_TOPIC_PARTITIONS
transaction.state.log.replication.factor=$rf
transaction.state.log.min.isr=$min_isr
transaction.state.log.num.partitions=$INTERNAL_TOPIC_PARTITIONS
share.coordinator.state.topic.replication.factor=$rf
share.coordinator.state.topic.min.isr=$min_isr

# Tests start consumers one after another; waiting 3 s for more members to join only slows them down.
group.initial.rebalance.delay.ms=0
EOF
    if [[ -n $SASL_SSL_PORT ]]; then
        cat >>"$dir/server.properties" <<EOF

# SASL_SSL listener for clients that test TLS + SCRAM; PLAINTEXT stays for the tests' own tooling.
# Every mechanism the product offers (DEMANDSTREAM_SASL_MECHANISM), for the same two users: SCRAM (the
# credentials are stored in the cluster at format time) and PLAIN (as hosted Kafka services use it).
sasl.enabled.mechanisms=SCRAM-SHA-512,SCRAM-SHA-256,PLAIN
listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required;
listener.name.sasl_ssl.scram-sha-256.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required;
listener.name.sasl_ssl.plain.sasl.jaas.config=org.apache.kafka.common.security.plain.PlainLoginModule required user_${SCRAM_ADMIN_USER}="${SCRAM_ADMIN_PASSWORD}" user_${SCRAM_SHOP_USER}="${SCRAM_SHOP_PASSWORD}";
ssl.keystore.type=PKCS12
ssl.keystore.location=$RUN/tls/broker.p12
ssl.keystore.password=$KEYSTORE_PASSWORD
ssl.key.password=$KEYSTORE_PASSWORD
ssl.client.auth=none
# The SSL listener authenticates clients by certificate (mutual TLS), signed by the same CA.
listener.name.ssl.ssl.client.auth=required
ssl.truststore.type=PKCS12
ssl.truststore.location=$RUN/tls/truststore.p12
ssl.truststore.password=$KEYSTORE_PASSWORD

# ACLs, as a shop's secured cluster has them: the SCRAM admin and the PLAINTEXT listener (the tests'
# tooling, the controller) are super users; user ${SCRAM_SHOP_USER} may do only what ACLs grant it.
authorizer.class.name=org.apache.kafka.metadata.authorizer.StandardAuthorizer
super.users=User:${SCRAM_ADMIN_USER};User:ANONYMOUS;User:${MTLS_CLIENT_DN}
EOF
    fi
}

# Self-signed CA plus one broker certificate for 127.0.0.1/localhost, shared by all nodes of the cluster.
# Clients trust <run>/ca.pem.
make_tls_material() {
    local tls=$RUN/tls pw=$KEYSTORE_PASSWORD validity_days=3650
    if [[ -f $tls/broker.p12 && -f $RUN/ca.pem && -f $tls/version && $(<"$tls/version") == "$TLS_MATERIAL_VERSION" ]]; then
        return 0
    fi
    command -v keytool >/dev/null 2>&1 || die "keytool not found: it ships with the JDK (openjdk-17-jdk-headless)"
    command -v openssl >/dev/null 2>&1 || die "openssl not found (Debian package openssl)"
    rm -rf "$tls"
    mkdir -p "$tls"
    say "generating a self-signed CA and broker certificate in $tls"
    {
        # A CA as RFC 5280 wants it (basicConstraints and keyUsage, both critical): Python 3.13's default
        # TLS context verifies with VERIFY_X509_STRICT and refuses a CA without keyUsage.
        keytool -genkeypair -alias ca -keyalg RSA -keysize 2048 -validity "$validity_days" \
            -dname "CN=demandstream dev CA" -ext bc:c=ca:true -ext ku:c=keyCertSign,cRLSign -storetype PKCS12 \
            -keystore "$tls/ca.p12" -storepass "$pw" -keypass "$pw"
        keytool -exportcert -rfc -alias ca -keystore "$tls/ca.p12" -storepass "$pw" -file "$tls/ca.pem"
        keytool -genkeypair -alias broker -keyalg RSA -keysize 2048 -validity "$validity_days" \
            -dname "CN=localhost" -storetype PKCS12 \
            -keystore "$tls/broker.p12" -storepass "$pw" -keypass "$pw"
        keytool -certreq -alias broker -keystore "$tls/broker.p12" -storepass "$pw" -file "$tls/broker.csr"
        keytool -gencert -alias ca -keystore "$tls/ca.p12" -storepass "$pw" -validity "$validity_days" \
            -ext "SAN=dns:localhost,ip:127.0.0.1" -ext ku:c=digitalSignature,keyEncipherment \
            -ext eku=serverAuth -rfc -infile "$tls/broker.csr" -outfile "$tls/broker.pem"
        # The broker keystore must hold the chain (CA first, then the CA-signed certificate).
        keytool -importcert -noprompt -alias ca -keystore "$tls/broker.p12" -storepass "$pw" -file "$tls/ca.pem"
        keytool -importcert -alias broker -keystore "$tls/broker.p12" -storepass "$pw" -file "$tls/broker.pem"
        # Mutual TLS: the broker trusts the CA for client certificates; the client's key is PEM (Python's
        # ssl and kafka-python read PEM), made by openssl and signed by the CA.
        keytool -importcert -noprompt -alias ca -storetype PKCS12 -keystore "$tls/truststore.p12" \
            -storepass "$pw" -file "$tls/ca.pem"
        openssl req -new -newkey rsa:2048 -nodes -subj "/${MTLS_CLIENT_DN}" -keyout "$tls/client.key" \
            -out "$tls/client.csr"
        keytool -gencert -alias ca -keystore "$tls/ca.p12" -storepass "$pw" -validity "$validity_days" \
            -ext ku:c=digitalSignature,keyEncipherment -ext eku=clientAuth -rfc -infile "$tls/client.csr" \
            -outfile "$tls/client.pem"
    } >"$tls/keytool.log" 2>&1 || {
        tail -n 20 "$tls/keytool.log" >&2
        die "keytool failed to generate the TLS material (see above)"
    }
    cp "$tls/ca.pem" "$RUN/ca.pem"
    cp "$tls/client.pem" "$tls/client.key" "$RUN/"
    echo "$TLS_MATERIAL_VERSION" >"$tls/version"
}

java_opts() {
    local dir=$1
    local -a heap
    read -r -a heap <<<"$HEAP_OPTS"
    JAVA_OPTS=("${heap[@]}" -Djava.awt.headless=true
        -Dlog4j2.configurationFile="$HERE/log4j2.properties" -Dkafka.logs.dir="$dir")
}

# Format node $1's storage once (KRaft needs meta.properties before the first start). With static
# controller.quorum.voters there is no --standalone/--initial-controllers.
format_node() {
    local i=$1 dir
    dir=$(node_dir "$i")
    [[ -f $dir/data/meta.properties ]] && return 0
    local -a JAVA_OPTS extra=()
    java_opts "$dir"
    if [[ -n $SASL_SSL_PORT ]]; then
        local mechanism user
        for mechanism in SCRAM-SHA-512 SCRAM-SHA-256; do
            for user in "$SCRAM_ADMIN_USER:$SCRAM_ADMIN_PASSWORD" "$SCRAM_SHOP_USER:$SCRAM_SHOP_PASSWORD"; do
                extra+=(--add-scram "$mechanism=[name=${user%%:*},password=${user#*:}]")
            done
        done
    fi
    # StorageTool runs for a few seconds: C1-only JIT and the serial GC spare the (shared, 2-core) CPU
    # that tiered compilation and G1's threads would burn on a process that exits right away.
    java "${JAVA_OPTS[@]}" -XX:TieredStopAtLevel=1 -XX:+UseSerialGC -cp "$LIBS/*" kafka.tools.StorageTool format \
        -t "$CLUSTER_ID" -c "$dir/server.properties" "${extra[@]}" >"$dir/format.log" 2>&1 9>&-
}

# The part of log $1 written after byte offset $2. (grep reads it all: with `grep -q` and pipefail an early
# exit would SIGPIPE tail and turn a match into a failure.) If the log is now shorter than $2, log4j has
# rolled it over to $1.1 since (size policy): what was written since is the rest of $1.1 plus all of $1.
log_since() {
    if (($(file_size "$1") < $2)); then
        tail -c +"$(($2 + 1))" "$1.1" 2>/dev/null || true
        cat "$1" 2>/dev/null || true
    else
        tail -c +"$(($2 + 1))" "$1" 2>/dev/null || true
    fi
}

file_size() { if [[ -f $1 ]]; then stat -c %s "$1"; else echo 0; fi; }

# Launch node $1 in the background, detached from this shell's session (so Ctrl-C in the terminal that
# ran a test does not take the broker down), and record its pid, in the pid file and in LAUNCHED_PIDS.
# Sets LAUNCH_OFFSET to the log size before the start, from where wait_started looks for the started line.
LAUNCH_OFFSET=0
declare -A LAUNCHED_PIDS=()
launch_node() {
    local i=$1 dir pid deadline
    dir=$(node_dir "$i")
    LAUNCH_OFFSET=$(file_size "$dir/server.log")
    local -a JAVA_OPTS
    java_opts "$dir"
    # fd 9 holds the cluster lock; the broker must not inherit it, or the lock would live as long as it.
    nohup setsid java "${JAVA_OPTS[@]}" -cp "$LIBS/*" kafka.Kafka "$dir/server.properties" \
        >>"$dir/stdout.log" 2>&1 </dev/null 9>&- &
    pid=$!
    # nohup and setsid exec in place here (a script's background job is no process-group leader), so
    # $! is the JVM itself, but not yet: between fork and exec, $pid is a copy of this shell, and its
    # /proc/$pid/cmdline is this script's command line, not the broker's. On a busy 2-core machine that
    # window lasts long enough for node_pid to see "no broker for this node" and call a healthy,
    # starting node dead (issue #10: "exited while starting", then SIGKILLed by kill_started_nodes).
    # So wait for the exec before anyone can see the pid: until the pid file exists, node_pid reads no
    # pid (or a stale one it rejects), and after that always the broker's own command line. wait_started
    # judges liveness by the pid forked here, never by the command line.
    LAUNCHED_PIDS[$i]=$pid
    deadline=$((SECONDS + START_TIMEOUT))
    while proc_alive "$pid" && ! runs_node "$pid" "$i" && ((SECONDS < deadline)); do
        sleep 0.05
    done
    write_atomic "$dir/kafka.pid" "$pid"
}

# (Regular files only: tail on a FIFO or device would wait for its writer, here the broker, to end.)
print_log_tail() {
    local dir
    dir=$(node_dir "$1")
    {
        echo "---- last lines of $dir/server.log ----"
        [[ -f $dir/server.log ]] && tail -n 30 "$dir/server.log" 2>/dev/null || echo "(no server.log)"
        echo "---- last lines of $dir/stdout.log ----"
        [[ -f $dir/stdout.log ]] && tail -n 10 "$dir/stdout.log" 2>/dev/null || echo "(no stdout.log)"
    } >&2
}

# Wait until each given node answers on its client port AND has logged the started line since its launch.
# Arguments: pairs "node offset". All nodes are waited on together: in 3-broker mode no node finishes
# starting before a quorum (2 of 3) of controllers runs.
wait_started() {
    local -A offsets=()
    while [[ $# -gt 0 ]]; do
        offsets[$1]=$2
        shift 2
    done
    local deadline=$((SECONDS + START_TIMEOUT)) i dir
    while ((${#offsets[@]} > 0)); do
        for i in "${!offsets[@]}"; do
            dir=$(node_dir "$i")
            # Alive means: the process launch_node forked still exists (our child: its pid cannot be
            # reused while we run). Its command line is not consulted here (see launch_node).
            if ! proc_alive "${LAUNCHED_PIDS[$i]}"; then
                print_log_tail "$i"
                kill_started_nodes
                die "node $i (port $(client_port "$i")) exited while starting (log above)"
            fi
            if port_open "$(client_port "$i")" &&
                log_since "$dir/server.log" "${offsets[$i]}" | grep -F "$STARTED_MARKER" >/dev/null; then
                say "node $i up on 127.0.0.1:$(client_port "$i") (pid ${LAUNCHED_PIDS[$i]})"
                unset "offsets[$i]"
            fi
        done
        ((${#offsets[@]} == 0)) && break
        if ((SECONDS >= deadline)); then
            for i in "${!offsets[@]}"; do print_log_tail "$i"; done
            kill_started_nodes
            die "node(s) ${!offsets[*]} not started within $START_TIMEOUT s (log above)"
        fi
        sleep 0.5
    done
}

# After a failed start, do not leave half-started JVMs behind: they would hold the ports and make the
# next `up` believe the cluster partly runs. Kills by the pid launch_node forked (whether or not it has
# exec'd the JVM yet), and waits for each to be gone.
STARTED_NODES=()
kill_started_nodes() {
    local i pid
    for i in "${STARTED_NODES[@]+"${STARTED_NODES[@]}"}"; do
        pid=${LAUNCHED_PIDS[$i]:-}
        if [[ -n $pid ]] && proc_alive "$pid"; then
            kill_and_wait "$pid" 10 || true
            say "killed node $i (pid $pid) after the failed start"
        fi
        rm -f "$(node_dir "$i")/kafka.pid"
    done
}

check_ports_free() {
    local i=$1 port
    local -a ports=("$(client_port "$i")" "$(controller_port "$i")")
    if [[ -n $SASL_SSL_PORT ]]; then ports+=("$(sasl_port "$i")" "$(mtls_port "$i")"); fi
    for port in "${ports[@]}"; do
        if port_open "$port"; then
            die "port $port (node $i) is already in use by another process; pick another --port"
        fi
    done
}

# Start the given nodes (already formatted or formattable) and wait for them.
start_nodes() {
    local i k
    local -a nodes=("$@") waits=() format_pids=()
    for i in "$@"; do
        check_ports_free "$i"
        mkdir -p "$(node_dir "$i")"
        write_server_properties "$i"
    done
    # Format in parallel: each StorageTool run is a JVM start of a few seconds.
    for i in "$@"; do
        format_node "$i" &
        format_pids+=("$!")
    done
    for k in "${!format_pids[@]}"; do
        i=${nodes[$k]}
        if ! wait "${format_pids[$k]}"; then
            cat "$(node_dir "$i")/format.log" >&2
            die "formatting the storage of node $i failed (output above)"
        fi
    done
    for i in "$@"; do
        launch_node "$i"
        STARTED_NODES+=("$i")
        waits+=("$i" "$LAUNCH_OFFSET")
    done
    wait_started "${waits[@]}"
}

# ---------------------------------------------------------------------------------------------------
# Commands

stop_all() {
    local i pid waited=0
    local -A pids=()
    for ((i = 0; i < BROKERS; i++)); do
        if pid=$(node_pid "$i"); then
            pids[$i]=$pid
            kill -TERM "$pid" 2>/dev/null || true
        fi
    done
    if ((${#pids[@]} == 0)); then
        return 1
    fi
    say "stopping node(s) ${!pids[*]} on port $PORT (SIGTERM, up to $STOP_TIMEOUT s)"
    while ((waited < STOP_TIMEOUT * 2)); do
        for i in "${!pids[@]}"; do
            proc_alive "${pids[$i]}" || unset "pids[$i]"
        done
        ((${#pids[@]} == 0)) && break
        sleep 0.5
        waited=$((waited + 1))
    done
    for i in "${!pids[@]}"; do
        say "node $i (pid ${pids[$i]}) ignored SIGTERM for $STOP_TIMEOUT s; sending SIGKILL"
        kill_and_wait "${pids[$i]}" "$STOP_TIMEOUT" || say "node $i (pid ${pids[$i]}) still exists after SIGKILL"
    done
    for ((i = 0; i < BROKERS; i++)); do
        rm -f "$(node_dir "$i")/kafka.pid"
    done
    return 0
}

cmd_up() {
    require_java
    lock_cluster
    if ((FRESH)) && [[ -d $RUN ]]; then
        stop_all || true
        say "wiping $RUN (--fresh)"
        find "$RUN" -mindepth 1 -maxdepth 1 ! -name .lock -exec rm -rf -- {} +
        load_state
    fi
    local requested=${BROKERS_ARG:-$BROKERS}
    if [[ -n $CLUSTER_ID ]]; then
        if [[ $requested != "$BROKERS" ]]; then
            die "the cluster on port $PORT was created with $BROKERS broker(s); use --fresh to recreate it with $requested"
        fi
        if [[ -n $SASL_SSL_PORT_ARG && $SASL_SSL_PORT_ARG != "$SASL_SSL_PORT" ]]; then
            die "the cluster on port $PORT was created without --sasl-ssl-port $SASL_SSL_PORT_ARG; add --fresh"
        fi
    else
        BROKERS=$requested
        SASL_SSL_PORT=$SASL_SSL_PORT_ARG
    fi
    if all_up; then
        say "cluster on port $PORT is already running ($BROKERS node(s)); bootstrap $(bootstrap)"
        return 0
    fi
    local i started=$SECONDS
    local -a down=()
    for ((i = 0; i < BROKERS; i++)); do
        if node_pid "$i" >/dev/null; then
            # Alive but not answering: a half-dead JVM. Restart it rather than wait on it forever.
            node_up "$i" || {
                kill_and_wait "$(node_pid "$i")" || true
                down+=("$i")
            }
        else
            down+=("$i")
        fi
    done
    # Before anything is written: a port taken by another program is the most likely user mistake.
    for i in "${down[@]}"; do check_ports_free "$i"; done
    ensure_libs
    if [[ -z $CLUSTER_ID ]]; then
        CLUSTER_ID=$(new_cluster_id)
        write_atomic "$RUN/brokers" "$BROKERS"
        if [[ -n $SASL_SSL_PORT ]]; then write_atomic "$RUN/sasl-ssl-port" "$SASL_SSL_PORT"; fi
        # cluster.id last: `status` takes its presence to mean the cluster exists.
        write_atomic "$RUN/cluster.id" "$CLUSTER_ID"
        say "new cluster $CLUSTER_ID with $BROKERS node(s) in $RUN"
    fi
    if [[ -n $SASL_SSL_PORT ]]; then make_tls_material; fi
    say "starting node(s) ${down[*]} on port $PORT"
    start_nodes "${down[@]}"
    say "cluster up in $((SECONDS - started)) s; bootstrap $(bootstrap)"
    if [[ -n $SASL_SSL_PORT ]]; then
        say "SASL_SSL on 127.0.0.1:$SASL_SSL_PORT (SCRAM-SHA-512 $SCRAM_ADMIN_USER/$SCRAM_ADMIN_PASSWORD, CA $RUN/ca.pem)"
        say "mutual TLS on 127.0.0.1:$(mtls_port 0) (client certificate $RUN/client.pem, key $RUN/client.key)"
    fi
}

bootstrap() {
    local i out=""
    for ((i = 0; i < BROKERS; i++)); do
        out+="${out:+,}127.0.0.1:$(client_port "$i")"
    done
    echo "$out"
}

cmd_down() {
    if [[ ! -d $RUN ]]; then
        say "no cluster on port $PORT (nothing in $RUN); nothing to stop"
        return 0
    fi
    lock_cluster
    if stop_all; then
        say "cluster on port $PORT stopped"
    else
        say "cluster on port $PORT is not running"
    fi
}

cmd_status() {
    if [[ ! -f $RUN/cluster.id ]]; then
        say "no cluster on port $PORT (nothing in $RUN)"
        exit 3
    fi
    local i pid state n_up=0
    for ((i = 0; i < BROKERS; i++)); do
        pid=$(node_pid "$i") || pid=-
        if [[ $pid != - ]] && port_open "$(client_port "$i")"; then
            state=up
            n_up=$((n_up + 1))
        elif [[ $pid != - ]]; then
            state="starting or hung (process alive, port closed)"
        else
            state=down
        fi
        printf 'node %s: pid %s, port %s, controller port %s: %s\n' \
            "$i" "$pid" "$(client_port "$i")" "$(controller_port "$i")" "$state"
    done
    if ((n_up == BROKERS)); then
        say "cluster on port $PORT up ($n_up/$BROKERS nodes); bootstrap $(bootstrap)"
        exit 0
    fi
    say "cluster on port $PORT not fully running ($n_up/$BROKERS nodes up)"
    exit 3
}

check_node_arg() {
    [[ -f $RUN/cluster.id ]] || die "no cluster on port $PORT; run 'kafka.sh up --port $PORT' first"
    ((10#$NODE_ARG < BROKERS)) || die "node $NODE_ARG does not exist: the cluster on port $PORT has nodes 0..$((BROKERS - 1))"
}

cmd_stop_broker() {
    check_node_arg
    lock_cluster
    local i=$((10#$NODE_ARG)) pid
    if ! pid=$(node_pid "$i"); then
        say "node $i on port $(client_port "$i") is already down"
        return 0
    fi
    # SIGKILL on purpose: fault tests want a crash, not a controlled shutdown. Wait until the process is
    # gone, so that a start-broker right after finds its ports free.
    kill_and_wait "$pid" "$STOP_TIMEOUT" || die "node $i (pid $pid) still exists $STOP_TIMEOUT s after SIGKILL"
    rm -f "$(node_dir "$i")/kafka.pid"
    say "killed node $i (pid $pid, port $(client_port "$i"))"
}

cmd_start_broker() {
    check_node_arg
    require_java
    lock_cluster
    local i=$((10#$NODE_ARG))
    if node_up "$i"; then
        say "node $i on port $(client_port "$i") is already up"
        return 0
    fi
    [[ -f $(node_dir "$i")/data/meta.properties ]] ||
        die "node $i has no formatted storage; run 'kafka.sh up --port $PORT' instead"
    ensure_libs
    say "starting node $i on port $(client_port "$i")"
    start_nodes "$i"
}

main() {
    parse_args "$@"
    load_state
    case "$COMMAND" in
        up) cmd_up ;;
        down) cmd_down ;;
        status) cmd_status ;;
        stop-broker) cmd_stop_broker ;;
        start-broker) cmd_start_broker ;;
    esac
}

main "$@"
