# Role "lb": xdplb on eth0 (native XDP on a multiqueue virtio NIC), a
# port-less TCP VIP over IPv4 (ipip) and one over IPv6 (ip6ip6), two
# backends behind the segment's router.
ip link set eth0 mtu 1600
ip addr add 198.18.210.2/24 dev eth0
ip -6 addr add 2001:db8:d2::2/64 dev eth0 nodad
cat > /etc/xdplb/xdplb.toml <<'CONF'
interface = "eth0"
xdp_mode = "native"

[tables]
max_vips = 8
max_backends = 16
ring_size = 13
max_flows = 4096

[forwarding]
# The segment's router (the bed's namespace, routing on its bridge): it
# sends each tunnel packet on to its backend.
gateway_mac = "52:54:00:00:01:fe"

[[vip]]
name = "web"
address = "198.18.0.10"
protocol = "tcp"
forwarding = "ipip"
# Generous for TCG guests, whose clocks run unevenly.
health = { kind = "tcp", port = 80, interval_ms = 300, timeout_ms = 250, rise = 1, fall = 3 }

[[vip.backend]]
address = "198.18.210.3"

[[vip.backend]]
address = "198.18.210.4"

# UDP service on 53; load-generator targets: loadgen on 55, pktgen on 54.
[[vip]]
name = "dns"
address = "198.18.0.10"
port = 53
protocol = "udp"
forwarding = "ipip"
health = { kind = "none" }

[[vip.backend]]
address = "198.18.210.3"

[[vip.backend]]
address = "198.18.210.4"

[[vip]]
name = "gen"
address = "198.18.0.10"
port = 55
protocol = "udp"
forwarding = "ipip"
health = { kind = "none" }

[[vip.backend]]
address = "198.18.210.3"

[[vip]]
name = "pktgen"
address = "198.18.0.10"
port = 54
protocol = "udp"
forwarding = "ipip"
health = { kind = "none" }

[[vip.backend]]
address = "198.18.210.3"

[[vip]]
name = "web6"
address = "2001:db8::53"
protocol = "tcp"
forwarding = "ip6ip6"
health = { kind = "tcp", port = 80, interval_ms = 300, timeout_ms = 250, rise = 1, fall = 3 }

[[vip.backend]]
address = "2001:db8:d2::3"

[[vip.backend]]
address = "2001:db8:d2::4"
CONF
xdplb run --config /etc/xdplb/xdplb.toml > /tmp/run.log 2>&1 &
for i in $(seq 1 60); do
    xdplb status > /dev/null 2>&1 && break
    sleep 1
done
xdplb status > /dev/null 2>&1 || { sed 's/^/XDPLB-VM: run: /' /tmp/run.log; fail "xdplb run did not start"; }
reported=""
for i in $(seq 1 600); do
    sleep 1
    xdplb status > /tmp/status 2>&1 || continue
    if grep -q " up " /tmp/status && [ -z "$reported" ]; then
        echo "XDPLB-VM: backend up in the ring after ${i} s"
        reported=1
    fi
    # The router's "fragmentation needed" errors, handed to backends.
    icmp=$(xdplb stats | sed -n 's/^tx_icmp *//p')
    if [ -n "$icmp" ] && [ "$icmp" != 0 ] && [ "$icmp" != "$told" ]; then
        echo "XDPLB-VM: forwarded $icmp ICMP errors to their backends"
        told=$icmp
    fi
    # What the generators' VIPs counted, whenever it changes.
    counts=$(xdplb stats | sed -n 's/^VIP \(gen\|pktgen\) *\([0-9]*\) packets.*/\1=\2/p' | tr '\n' ' ')
    if [ "$counts" != "$last_counts" ]; then
        echo "XDPLB-VM: counted $counts"
        last_counts=$counts
    fi
    # What the balancer saw, every 20 s.
    if [ $((i % 20)) = 0 ]; then
        sed 's/^/XDPLB-VM: status: /' /tmp/status
        xdplb stats | grep -v " 0$" | sed 's/^/XDPLB-VM: stats: /'
    fi
done
