# Role "lb": xdplb on two uplinks: eth2, a NIC on a segment of its own,
# and bond0, an active-backup bond of two multiqueue virtio NICs on the
# backends' segment (native XDP on bonding; its frames arrive with its
# ports' indexes, which must find the bond's next hop). The router sends
# the IPv4 VIP's flows through both (ECMP). A port-less TCP VIP
# over IPv4 (ipip) and one over IPv6 (ip6ip6), two backends behind the
# segment's router. Connecting to port 9999 takes the bond's active NIC
# down, as a dead NIC or switch port would (the client's failover step).
# (Loading the bonding module made a bond0 in its default mode.)
ip link del bond0 2>/dev/null
ip link add bond0 type bond mode active-backup miimon 100 num_grat_arp 3 num_unsol_na 3
for nic in eth0 eth1; do
    ip link set "$nic" down
    ip link set "$nic" master bond0
done
ip link set bond0 mtu 1600 up
ip addr add 198.18.210.2/24 dev bond0
ip -6 addr add 2001:db8:d2::2/64 dev bond0 nodad
ip link set eth2 mtu 1600 up
ip addr add 198.18.212.2/24 dev eth2
# The client's segment, for its requests to this host (ports 9999, 9998).
ip route add 198.18.211.0/24 via 198.18.210.254
active_nic() {
    sed -n 's/^Currently Active Slave: //p' /proc/net/bonding/bond0
}
for i in $(seq 1 50); do
    [ -n "$(active_nic)" ] && [ "$(active_nic)" != None ] && break
    sleep 0.1
done
echo "XDPLB-VM: bond0 (active-backup) of eth0 and eth1, active $(active_nic)"
cat > /fail-nic.sh <<'SH'
active=$(sed -n 's/^Currently Active Slave: //p' /proc/net/bonding/bond0)
read t0 _ < /proc/uptime
ip link set "$active" down
for i in $(seq 1 500); do
    now=$(sed -n 's/^Currently Active Slave: //p' /proc/net/bonding/bond0)
    [ -n "$now" ] && [ "$now" != "$active" ] && [ "$now" != None ] && break
    sleep 0.01
done
read t1 _ < /proc/uptime
echo "$active $now $(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.2f", b - a }') $(cat /sys/class/net/eth2/statistics/rx_packets)" > /tmp/failover
SH
# The client's request (port 9999) is acted on by the loop below, which
# then tells what the failover did on port 9998.
nc -l -p 9999 > /tmp/fail-request 2>&1 &
# eth2 is shared with Debian's xdp-filter through libxdp's dispatcher:
# the filter first (a dispatcher of its own, which xdplb then joins; on
# bond0 xdplb makes one). Its rule drops TCP and UDP to port 9996 here,
# before the balancer runs; port 9997 is not filtered. The client's
# sharing step has each restarted under its traffic (port 9995).
filter_on() {
    xdp-filter load eth2 && xdp-filter port 9996
}
filter_on > /tmp/filter.log 2>&1 || { sed 's/^/XDPLB-VM: xdp-filter: /' /tmp/filter.log; fail "xdp-filter did not load on eth2"; }
cat > /etc/xdplb/xdplb.toml <<'CONF'
interface = "eth2"
xdp_mode = "native"

# A member of libxdp's dispatcher on each interface, after xdp-filter
# (whose priority is lower).
[libxdp]
run_priority = 60

# The second uplink: the bond, to the backends' segment's router.
[[uplink]]
interface = "bond0"
gateway_mac = "52:54:00:00:01:fe"

[tables]
max_vips = 8
max_backends = 16
ring_size = 13
max_flows = 4096

[forwarding]
# eth2's router (the bed's namespace, on its second segment): it sends
# each tunnel packet on to its backend.
gateway_mac = "52:54:00:00:02:fe"

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
# Start the daemon; it failed if it exits, or is not answering after a
# minute.
start_xdplb() {
    xdplb run --config /etc/xdplb/xdplb.toml >> /tmp/run.log 2>&1 &
    for i in $(seq 1 300); do
        xdplb status > /dev/null 2>&1 && return 0
        pidof xdplb > /dev/null || return 1
        sleep 0.2
    done
    return 1
}
shared=1
if ! start_xdplb; then
    # Linux 6.13 (and 6.12's stable updates) lets an extension that
    # changes packet data replace only a function that does too; the
    # slots of Debian 12's libxdp (1.3.1, before 1.5.5) do not. xdplb
    # must say so, and runs alone on eth2 instead (the filter unloaded).
    grep -q "libxdp's dispatcher before 1.5.5" /tmp/run.log || { sed 's/^/XDPLB-VM: run: /' /tmp/run.log; fail "xdplb run did not start"; }
    echo "XDPLB-VM: libxdp's dispatcher refused, as expected on this kernel with libxdp 1.3.1: $(grep -o "this kernel lets.*1.5.5 or later" /tmp/run.log | head -1)"
    shared=""
    xdp-filter unload eth2 > /tmp/filter.log 2>&1 || fail "xdp-filter did not unload: $(cat /tmp/filter.log)"
    sed -i '/^\[libxdp\]/,/^run_priority/d' /etc/xdplb/xdplb.toml
    start_xdplb || { sed 's/^/XDPLB-VM: run: /' /tmp/run.log; fail "xdplb run did not start alone"; }
fi
# Native XDP on a bond: the kernel puts the program on every slave (which
# netlink reports on the bond only).
ip -d link show bond0 | grep -q "xdp" || fail "no XDP program on bond0: $(ip -d link show bond0)"
ip -d link show eth2 | grep -q "xdp" || fail "no XDP program on eth2: $(ip -d link show eth2)"
echo "XDPLB-VM: xdplb attached natively to eth2 and bond0: $(xdplb status | head -1)"
members() {
    xdp-loader status "$1" 2>&1 | awk -v i="$1" '$1 == i || $1 == "=>" { printf "%s%s", sep, $0; sep = " | " }' | tr -s ' '
}
if [ -n "$shared" ]; then
echo "XDPLB-VM: libxdp's dispatcher on eth2: $(members eth2)"
echo "XDPLB-VM: libxdp's dispatcher on bond0: $(members bond0)"
members eth2 | grep -q xdpfilt || fail "xdp-filter left eth2's dispatcher when xdplb joined"
members eth2 | grep -q xdp_lb_libxdp || fail "xdplb is not in eth2's dispatcher"
since() { awk -v a="$1" -v b="$(cut -d' ' -f1 /proc/uptime)" 'BEGIN { printf "%.2f", b - a }'; }
# The self-check: a foreign tool takes xdplb's member out of eth2's
# dispatcher (libxdp rebuilds it with the filter alone); xdplb joins again.
ours=$(xdp-loader status eth2 | awk '$1 == "=>" && $3 == "xdp_lb_libxdp" { print $4 }')
read t0 _ < /proc/uptime
xdp-loader unload --id "$ours" eth2 > /tmp/unload.log 2>&1 || { sed 's/^/XDPLB-VM: xdp-loader: /' /tmp/unload.log; fail "xdp-loader could not unload xdplb's member (id $ours)"; }
members eth2 | grep -q xdp_lb_libxdp && fail "xdp-loader left xdplb's member in eth2's dispatcher: $(members eth2)"
for i in $(seq 1 100); do
    members eth2 | grep -q xdp_lb_libxdp && break
    sleep 0.1
done
members eth2 | grep -q "xdpfilt.*xdp_lb_libxdp" || fail "xdplb did not join eth2's dispatcher again after xdp-loader took it out: $(members eth2)"
echo "XDPLB-VM: xdp-loader took xdplb (id $ours) out of eth2's dispatcher; xdplb joined again after $(since "$t0") s, beside the filter: $(members eth2)"
# `xdplb detach` takes xdplb out of both dispatchers, the filter kept on
# eth2 (bond0, where xdplb was alone, runs nothing after); then xdplb
# starts again and joins both.
kill -TERM $(pidof xdplb)
for i in $(seq 1 100); do
    pidof xdplb > /dev/null || break
    sleep 0.1
done
xdplb detach --config /etc/xdplb/xdplb.toml > /tmp/detach.log 2>&1 || { sed 's/^/XDPLB-VM: detach: /' /tmp/detach.log; fail "xdplb detach failed"; }
members eth2 | grep -q xdpfilt || fail "xdplb detach took xdp-filter off eth2: $(members eth2)"
members eth2 | grep -q xdp_lb_libxdp && fail "xdplb detach left xdplb in eth2's dispatcher: $(members eth2)"
ip -d link show bond0 | grep -q "prog/xdp" && fail "xdplb detach left a program on bond0: $(members bond0)"
echo "XDPLB-VM: xdplb detach: eth2 keeps $(members eth2); bond0: $(members bond0)"
start_xdplb || { sed 's/^/XDPLB-VM: run: /' /tmp/run.log; fail "xdplb run did not start again after detach"; }
members eth2 | grep -q "xdpfilt.*xdp_lb_libxdp" || fail "xdplb did not join eth2's dispatcher again after detach: $(members eth2)"
echo "XDPLB-VM: started again: $(xdplb status | head -1)"
# Each restarted under the client's traffic, on its request (port 9995,
# "lb" or "filter"): xdplb killed and started again (it replaces its
# member, keeping the filter's), or xdp-filter unloaded and loaded again
# with its maps kept (libxdp re-links xdplb's member). The report goes
# back on port 9994.
cat > /restart.sh <<'SH'
read t0 _ < /proc/uptime
seen=$(grep -c "self-check failed" /tmp/run.log)
rm -f /tmp/restart-error
case "$(cat /tmp/restart-request)" in
    lb*)
        what=xdplb
        kill -9 $(pidof xdplb)
        start_xdplb || echo "xdplb did not start again" > /tmp/restart-error ;;
    *)
        what=xdp-filter
        xdp-filter unload --keep-maps eth2 > /tmp/filter.log 2>&1
        filter_on >> /tmp/filter.log 2>&1 || echo "xdp-filter did not load again: $(cat /tmp/filter.log)" > /tmp/restart-error ;;
esac
took=$(since "$t0")
sleep 2
checks=$(($(grep -c "self-check failed" /tmp/run.log) - seen))
echo "self-check failures $checks; $what restarted in $took s; eth2 then: $(members eth2); $(cat /tmp/restart-error 2>/dev/null)" > /tmp/restarted
SH
# What the client's datagrams were counted as, on its request (port 9993,
# answered on 9992): the dns VIP's packets (xdplb) and the filter's hits
# on port 9996.
counts() {
    echo "$(xdplb stats | sed -n 's/^VIP dns *\([0-9]*\) packets.*/\1/p') $(xdp-filter status | awk '$1 == 9996 { print $3 }')"
}
fi
# Set up: port 9997 tells the client so (the client waits for it), and
# whether eth2 is shared; 9996 is filtered where it is.
eth2_mode=alone
[ -n "$shared" ] && eth2_mode=shared
for port in 9996 9997; do
    ( for i in $(seq 1 100); do echo "open $eth2_mode" | nc -l -p "$port"; done ) > /dev/null 2>&1 &
done
nc -l -p 9995 > /tmp/restart-request 2>&1 &
nc -l -p 9993 > /tmp/count-request 2>&1 &
rx() { cat "/sys/class/net/$1/statistics/rx_packets"; }
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
    # A program on eth2 restarted, whenever the client asks.
    if [ -s /tmp/restart-request ]; then
        . /restart.sh
        echo "XDPLB-VM: restarted on eth2: $(cat /tmp/restarted)"
        served=$((served + 1))
        cp /tmp/restarted /tmp/restarted.$served
        nc -l -p 9994 < /tmp/restarted.$served > /dev/null 2>&1 &
        nc -l -p 9995 > /tmp/restart-request 2>&1 &
    fi
    # The counts, whenever the client asks.
    if [ -s /tmp/count-request ]; then
        served=$((served + 1))
        counts > /tmp/counts.$served
        nc -l -p 9992 < /tmp/counts.$served > /dev/null 2>&1 &
        nc -l -p 9993 > /tmp/count-request 2>&1 &
    fi
    # The NIC failover, once the client asks for it.
    if [ -s /tmp/fail-request ] && [ -z "$told_failover" ]; then
        sh /fail-nic.sh
        echo "XDPLB-VM: bond0 failover (NIC down, NIC active, seconds, packets eth2 received): $(cat /tmp/failover)"
        nc -l -p 9998 < /tmp/failover > /dev/null 2>&1 &
        told_failover=1
    fi
    # What the balancer saw, every 20 s.
    if [ $((i % 20)) = 0 ]; then
        echo "XDPLB-VM: received: eth2 $(rx eth2), eth0 $(rx eth0), eth1 $(rx eth1)"
        sed 's/^/XDPLB-VM: status: /' /tmp/status
        xdplb stats | grep -v " 0$" | sed 's/^/XDPLB-VM: stats: /'
    fi
done
