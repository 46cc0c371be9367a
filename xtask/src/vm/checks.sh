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
xdplb run --config /etc/xdplb/xdplb.toml > /tmp/run.log 2>&1 &
for i in $(seq 1 100); do
    if xdplb status --json > /tmp/status 2>/dev/null && grep -q '"in_sync": true' /tmp/status; then
        break
    fi
    sleep 0.2
done
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

echo "XDPLB-VM: PASS"
