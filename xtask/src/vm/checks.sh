# Role "checks": one guest, two virtio NICs on hubs of their own.
ip link set eth1 up || fail "no eth1"
echo "XDPLB-VM: eth0 driver $(basename "$(readlink /sys/class/net/eth0/device/driver)")"

# The verifier accepts every program.
xdplb verify > /tmp/verify 2>&1 || { cat /tmp/verify; fail "the verifier refused a program"; }
sed 's/^/XDPLB-VM: verify: /' /tmp/verify

# The balancer attaches in native mode to virtio_net and gets in sync.
cat > /etc/xdplb/xdplb.toml <<'CONF'
interface = "eth0"
xdp_mode = "native"

[tables]
max_vips = 4
max_backends = 16
ring_size = 13
max_flows = 1024

[forwarding]
gateway_mac = "52:54:00:00:00:fe"

[[vip]]
name = "dns"
address = "198.18.0.10"
port = 53
protocol = "udp"
forwarding = "ipip"
health = { kind = "none" }

[[vip.backend]]
address = "198.18.200.2"
CONF
# Wait up to 20 s for the daemon on socket $1 to be in sync; its status
# is left in $2.
wait_in_sync() {
    for i in $(seq 1 100); do
        xdplb status --socket "$1" --json > "$2" 2>/dev/null \
            && grep -q '"in_sync": true' "$2" && return
        sleep 0.2
    done
}

xdplb run --config /etc/xdplb/xdplb.toml > /tmp/run.log 2>&1 &
wait_in_sync /run/xdplb/admin.sock /tmp/status
grep -q '"attached": true' /tmp/status || { cat /tmp/run.log; fail "the balancer did not attach to eth0"; }
echo "XDPLB-VM: balancer attached to eth0 in native mode, in sync"

# The decapsulator attaches natively to the other NIC.
xdplb decap attach --interface eth1 --vip 198.18.0.10 --mode native > /tmp/decap 2>&1 \
    || { cat /tmp/decap; fail "decap did not attach to eth1"; }
echo "XDPLB-VM: decap attached to eth1 in native mode"

# The generator transmits through virtio's XDP queues and says so.
xdplb loadgen --interface eth1 --dst-mac 52:54:00:00:00:01 --src 198.18.50.1 \
    --dst 198.18.0.10 --dport 53 --count 2000 --duration 20 > /tmp/gen 2>&1 \
    || { cat /tmp/gen; fail "loadgen"; }
sed 's/^/XDPLB-VM: loadgen: /' /tmp/gen

# What a veth delivers of the XDP_TX frames sent out of it, by how its peer
# is set up, and whether the daemon's "forwarding" agrees (it may be
# cautious, never optimistic). The balancer on lb0 encapsulates what the
# generator sends from lb1 and sends it back out of lb0; lb1's RX counts
# what arrived.
veth_case() { # name gro(on|off) bridge(yes|no) xdp(no|native|generic)
    ip link add lb0 type veth peer name lb1 || fail "veth: no veth"
    ip link set lb0 up
    if [ "$3" = yes ]; then
        ip link add br0 type bridge || fail "veth: no bridge"
        ip link set lb1 master br0
        ip link set br0 up
    fi
    ip link set lb1 up
    ethtool -K lb1 gro "$2" > /dev/null 2>&1 || fail "veth: ethtool -K lb1 gro $2"
    cat > /etc/xdplb/veth.toml <<CONF
interface = "lb0"
xdp_mode = "native"
[tables]
max_vips = 2
max_backends = 4
ring_size = 13
max_flows = 1024
[forwarding]
gateway_mac = "$(cat /sys/class/net/lb1/address)"
[api]
socket = "/run/xdplb/veth.sock"
metrics = "127.0.0.1:9478"
[daemon]
pin_dir = "/sys/fs/bpf/veth"
[[vip]]
name = "dns"
address = "198.18.5.10"
port = 9
protocol = "udp"
forwarding = "ipip"
health = { kind = "none" }
[[vip.backend]]
address = "198.18.5.20"
CONF
    xdplb run --config /etc/xdplb/veth.toml > /tmp/veth-run.log 2>&1 &
    pid=$!
    wait_in_sync /run/xdplb/veth.sock /tmp/veth-status
    if [ "$4" != no ]; then
        xdplb decap attach --interface lb1 --vip 198.18.5.99 --mode "$4" \
            --pin-dir /sys/fs/bpf/veth-decap > /tmp/veth-decap 2>&1 \
            || { cat /tmp/veth-decap; fail "veth: no XDP program on lb1"; }
    fi
    sleep 1.5
    xdplb status --socket /run/xdplb/veth.sock --json > /tmp/veth-status 2>/dev/null
    xdplb loadgen --interface lb1 --dst-mac "$(cat /sys/class/net/lb0/address)" --src 198.18.5.1 \
        --dst 198.18.5.10 --dport 9 --count 200 --rate 2000 --duration 10 --count-at rx:lb1 \
        > /tmp/veth-gen 2>&1
    arrived=$(sed -n 's/^arrived at rx:lb1: \([0-9]*\) .*/\1/p' /tmp/veth-gen)
    forwarding=no
    grep -q '"forwarding": true' /tmp/veth-status && forwarding=yes
    echo "XDPLB-VM: veth: peer $1: ${arrived:-?} of 200 arrived; the daemon says forwarding=$forwarding"
    kill "$pid"; wait "$pid" 2>/dev/null
    [ "$4" != no ] && xdplb decap detach --pin-dir /sys/fs/bpf/veth-decap > /dev/null 2>&1
    xdplb detach --pin-dir /sys/fs/bpf/veth > /dev/null 2>&1
    ip link del lb0
    [ "$3" = yes ] && ip link del br0
    if [ "$forwarding" = yes ] && [ "${arrived:-0}" -lt 180 ]; then
        cat /tmp/veth-gen
        fail "veth: the daemon says forwarding where lb1 ($1) got ${arrived:-0} of 200"
    fi
}
veth_case "no XDP, GRO off" off no no
veth_case "no XDP, GRO on" on no no
veth_case "no XDP, GRO on, bridge port" on yes no
veth_case "XDP program" off no native
veth_case "XDP program in generic mode" off no generic

echo "XDPLB-VM: PASS"
