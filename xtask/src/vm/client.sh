# Role "client": HTTP to the VIP through the LB; the backend answers
# directly (DSR). (busybox-static's wget crashes; nc speaks HTTP/1.0.)
ip addr add 198.18.210.1/24 dev eth0
ip route add 198.18.0.10/32 via 198.18.210.2
get() {
    printf 'GET / HTTP/1.0\r\n\r\n' | nc -w 3 198.18.0.10 80 > /tmp/reply 2>/dev/null \
        && grep -q "backend b1" /tmp/reply
}
# Wait for the LB and backend to come up (TCG boots are slow).
up=""
for i in $(seq 1 60); do
    if get; then
        up=1
        break
    fi
    sleep 1
done
if [ -z "$up" ]; then
    ping -c 2 -W 1 198.18.210.2 2>&1 | sed 's/^/XDPLB-VM: ping lb: /'
    ping -c 2 -W 1 198.18.210.3 2>&1 | sed 's/^/XDPLB-VM: ping backend: /'
    sed 's/^/XDPLB-VM: arp: /' /proc/net/arp
    sed 's/^/XDPLB-VM: dev: /' /proc/net/dev
    ip route | sed 's/^/XDPLB-VM: route: /'
    fail "no answer from the VIP within 2 minutes"
fi
echo "XDPLB-VM: first answer through the LB after ${i} s: $(tail -n 1 /tmp/reply)"
ok=0
bad=0
for i in $(seq 1 50); do
    if get; then
        ok=$((ok + 1))
    else
        bad=$((bad + 1))
    fi
done
echo "XDPLB-VM: $ok of 50 new TCP connections answered by the ipip backend, $bad failed"
[ "$bad" = 0 ] || fail "$bad connections failed"
echo "XDPLB-VM: PASS"
