# Role "gen": a packet generator beside the LB. xdplb loadgen sends to the
# UDP VIP on port 55, the kernel's pktgen to the one on port 54; the LB
# prints what it counted for each, and vmtest compares.
ip link set eth0 mtu 1600
ip addr add 198.18.210.5/24 dev eth0
# The client (behind the router) asks when the generators are done.
ip route add 198.18.211.0/24 via 198.18.210.254
# virtio_net transmits XDP frames only with an XDP program attached (its
# XDP queues); decap passes everything that is not a tunnel to its VIPs.
xdplb decap attach --interface eth0 --vip 198.18.99.99 --mode native > /tmp/decap 2>&1 \
    || { cat /tmp/decap; fail "no XDP program on the generator's NIC"; }
# Let the LB come up first: its port 9997 answers once it is set up (its
# sharing steps detach and restart the dataplane, counters with it).
for i in $(seq 1 120); do
    [ -n "$(echo probe | nc -w 2 198.18.210.2 9997 2>/dev/null)" ] && break
    sleep 1
done
sleep 2
xdplb loadgen --interface eth0 --dst-mac 52:54:00:00:01:02 --src 198.18.210.5 \
    --dst 198.18.0.10 --dport 55 --flows 100 --count 10000 --rate 5000 --duration 20 > /tmp/gen 2>&1 \
    || { cat /tmp/gen; fail "loadgen"; }
left=$(sed -n 's/^left eth0: \([0-9]*\) .*/\1/p' /tmp/gen)
sed 's/^/XDPLB-VM: loadgen: /' /tmp/gen
echo "XDPLB-VM: loadgen left $left"
# pktgen: the same count and rate, UDP to port 54.
pg() { echo "$1" > "$2" || fail "pktgen: $1"; }
pg "add_device eth0" /proc/net/pktgen/kpktgend_0
pg "count 10000" /proc/net/pktgen/eth0
pg "pkt_size 64" /proc/net/pktgen/eth0
pg "ratep 5000" /proc/net/pktgen/eth0
pg "dst 198.18.0.10" /proc/net/pktgen/eth0
pg "src_min 198.18.210.5" /proc/net/pktgen/eth0
pg "dst_mac 52:54:00:00:01:02" /proc/net/pktgen/eth0
pg "udp_dst_min 54" /proc/net/pktgen/eth0
pg "udp_dst_max 54" /proc/net/pktgen/eth0
pg "udp_src_min 1024" /proc/net/pktgen/eth0
pg "udp_src_max 1123" /proc/net/pktgen/eth0
pg "flag UDPSRC_RND" /proc/net/pktgen/eth0
echo start > /proc/net/pktgen/pgctrl
sent=$(sed -n 's/.*Result: OK: .* \([0-9]*\) (.*/\1/p;s/^ *Current:$//' /proc/net/pktgen/eth0 | head -1)
sed -n 's/^\(Result:.*\)/XDPLB-VM: pktgen: \1/p' /proc/net/pktgen/eth0
sed -n 's/^ *pkts-sofar: \([0-9]*\).*/XDPLB-VM: pktgen sent \1/p' /proc/net/pktgen/eth0
# The client begins its checks once the generators are done (5000 frames
# a second crowd the LB's TCG guest: a UDP query was lost under them):
# port 9989 tells it, for up to 3 minutes.
echo done | timeout 180 nc -l -p 9989 > /dev/null 2>&1
# Let the LB report its counts before this guest powers off.
sleep 5
