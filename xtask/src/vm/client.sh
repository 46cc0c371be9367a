# Role "client": HTTP to the VIP through the LB, the backends answering
# directly (DSR); then backend b1 dies and the traffic moves to b2.
# (busybox-static's wget crashes; nc speaks HTTP/1.0.)
# Behind the router, on a segment of its own.
ip addr add 198.18.211.1/24 dev eth0
ip route add default via 198.18.211.254
ip -6 addr add 2001:db8:d3::1/64 dev eth0 nodad
ip -6 route add default via 2001:db8:d3::fe
# One request on a new connection to VIP ${1:-198.18.0.10}; the answering
# backend's name, or nothing.
get() {
    printf 'GET / HTTP/1.0\r\n\r\n' | nc -w 3 "${1:-198.18.0.10}" 80 2>/dev/null \
        | sed -n 's/^backend //p'
}
# One UDP query from a new source port, asked again once after 3 s
# without an answer (as resolvers do: TCG guests on a busy host can be
# slow to fork the responder); the answering backend's name.
udp_get() {
    for attempt in 1 2; do
        who=$(echo ping | socat -T 3 - UDP4:198.18.0.10:53 2>/dev/null | sed -n 's/^backend //p')
        [ -n "$who" ] && break
    done
    echo "$who"
}
# Run "$@" N times (N first); count the answers in b1, b2 and bad.
tally() {
    n=$1
    shift
    b1=0; b2=0; bad=0
    for i in $(seq 1 "$n"); do
        case "$("$@")" in
            b1) b1=$((b1 + 1)) ;;
            b2) b2=$((b2 + 1)) ;;
            *) bad=$((bad + 1)) ;;
        esac
    done
}
# A probe of the LB's eth2 address: what port $1 answers.
probe() {
    echo probe | nc -w 2 198.18.212.2 "$1" 2>/dev/null
}
# The LB is set up once its port 9997 answers (its sharing steps restart
# xdplb): up to 3 minutes.
start=$(date +%s)
while :; do
    eth2=$(probe 9997)
    [ -n "$eth2" ] && break
    [ $(($(date +%s) - start)) -ge 180 ] && fail "the LB did not finish setting up within 3 minutes"
    sleep 1
done
# The generator's traffic crowds the LB's TCG guest: the checks begin
# once it is done (its port 9989 answers), up to 2 minutes.
start=$(date +%s)
until [ -n "$(nc -w 2 198.18.210.5 9989 < /dev/null 2>/dev/null)" ]; do
    [ $(($(date +%s) - start)) -ge 120 ] && fail "the generator did not finish within 2 minutes"
    sleep 1
done
echo "XDPLB-VM: the generator is done after $(($(date +%s) - start)) s"
# Wait until both backends answer (TCG boots are slow), for 2 minutes by
# the clock: a request that times out takes 3 s, and the guest itself is
# killed after 5 minutes, before it could say why.
seen=""
start=$(date +%s)
while :; do
    who=$(get)
    case " $seen " in *" $who "*) ;; *) [ -n "$who" ] && seen="$seen $who" ;; esac
    case "$seen" in *b1*b2*|*b2*b1*) break ;; esac
    [ $(($(date +%s) - start)) -ge 120 ] && break
    sleep 1
done
i=$(($(date +%s) - start))
case "$seen" in
    *b1*b2*|*b2*b1*) ;;
    *)
        ping -c 2 -W 1 198.18.210.2 2>&1 | sed 's/^/XDPLB-VM: ping lb: /'
        sed 's/^/XDPLB-VM: dev: /' /proc/net/dev
        fail "not both backends answered through the VIP within 2 minutes (saw:$seen)"
        ;;
esac
echo "XDPLB-VM: both backends answer through the LB after ${i} s"
tally 60 get
echo "XDPLB-VM: 60 new TCP connections: $b1 to b1, $b2 to b2, $bad failed"
[ "$bad" = 0 ] || fail "$bad connections failed"
[ "$b1" -gt 0 ] && [ "$b2" -gt 0 ] || fail "the LB did not spread connections"

# UDP: 40 queries, each from a new source port, answered from the VIP.
tally 40 udp_get
echo "XDPLB-VM: 40 UDP queries to the VIP: $b1 answered by b1, $b2 by b2, $bad unanswered"
[ "$bad" = 0 ] || fail "$bad UDP queries unanswered"
[ "$b1" -gt 0 ] && [ "$b2" -gt 0 ] || fail "the LB did not spread UDP flows"

# IPv6: the same through the ip6ip6 VIP (the backends' ip6tnl0).
tally 40 get 2001:db8::53
echo "XDPLB-VM: 40 new TCP connections to the IPv6 VIP: $b1 to b1, $b2 to b2, $bad failed"
[ "$bad" = 0 ] || fail "$bad IPv6 connections failed"
[ "$b1" -gt 0 ] && [ "$b2" -gt 0 ] || fail "the LB did not spread IPv6 connections"

# Path MTU: 200 KB from a backend, in 1500-byte packets the router's
# 1400-byte link refuses. The router's "fragmentation needed" goes to the
# VIP, the LB hands it to the backend that owns the flow, the backend
# sends smaller packets: the transfer completes.
for vip in 198.18.0.10 2001:db8::53; do
    bytes=$(printf 'GET /big HTTP/1.0\r\n\r\n' | nc -w 10 "$vip" 80 2>/dev/null | sed '1,/^\r$/d' | wc -c)
    echo "XDPLB-VM: 200 KB over a 1400-byte link from $vip: $bytes bytes arrived"
    [ "$bytes" = 204800 ] || fail "path MTU discovery through the LB failed for $vip ($bytes of 204800 bytes)"
done

# The LB shares eth2 with xdp-filter through libxdp's dispatcher where
# the kernel lets it (port 9997 says "open shared"; "open alone" where
# Debian 12's libxdp cannot take xdplb, which the LB checked): the
# filter's rule drops port 9996 on the LB's eth2 address; 9997 answers.
# Then each is restarted under traffic: 8 long-lived connections, a new
# one every 100 ms, and a stream of datagrams, each counted: to the UDP
# VIP (xdplb counts every one, whichever uplink brings it) and to port
# 9996 (the filter drops and counts every one). Restarting xdplb, neither
# may lose one; restarting the filter, xdplb may not (the filter is away
# for a moment by design).
#
# Tell host $3 (the LB unless given) "$1" on port $2: retried while it
# cannot connect (TCG under the rounds' traffic can take longer than a
# second); the host listens for one.
tell() {
    for t in 1 2 3 4 5; do
        echo "$1" | nc -w 2 "${3:-198.18.210.2}" "$2" && return
        sleep 0.5
    done
    echo "XDPLB-VM: could not tell ${3:-the LB} $1 on port $2"
}
# Ask the LB for a number: "$1" to port $2, the answer from port $3.
ask() {
    tell "$1" "$2"
    for t in $(seq 1 60); do
        answer=$(nc -w 2 198.18.210.2 "$3" < /dev/null 2>/dev/null)
        [ -n "$answer" ] && break
        sleep 1
    done
}
# Datagrams while /tmp/streaming exists, a pair at a time; the pairs
# sent in /tmp/sent.
stream() {
    n=0
    while [ -e /tmp/streaming ]; do
        echo x | socat -u - UDP4:198.18.0.10:53 2>/dev/null
        echo x | socat -u - UDP4:198.18.212.2:9996 2>/dev/null
        n=$((n + 1))
        sleep 0.05
    done
    echo "$n" > /tmp/sent
}
restart_round() {
    ask count 9993 9992
    read vip0 hits0 <<EOF
$answer
EOF
    traffic_start 8
    [ "$ready" = 8 ] || fail "only $ready of 8 long-lived connections echo before $1 restarts"
    # The stream spans the restart: from 3 s before the request until 3 s
    # after the answer (which comes 2 s after the restart).
    touch /tmp/streaming
    stream &
    streaming=$!
    sleep 3
    ask "$1" 9995 9994
    report=$answer
    sleep 3
    rm -f /tmp/streaming
    wait "$streaming"
    sleep 1
    traffic_stop 8
    ask count 9993 9992
    read vip1 hits1 <<EOF
$answer
EOF
    read sent < /tmp/sent
    vip=$((vip1 - vip0))
    hits=$((hits1 - hits0))
    echo "XDPLB-VM: $report"
    echo "XDPLB-VM: through the restart ($1): 8 long-lived connections, $broken broken; $new new connections, $failed failed; $sent datagrams to the VIP, $vip counted by xdplb; $sent to port 9996, $hits dropped by the filter"
    [ -n "$report" ] || fail "the LB did not report the restart of $1"
    case "$report" in *"did not load"*|*"did not start"*) fail "the restart failed: $report" ;; esac
    case "$report" in "self-check failures 0;"*) ;; *) fail "xdplb's self-check saw its dispatcher wrong during the restart: $report" ;; esac
    case "$report" in *xdpfilt*xdp_lb_libxdp*) ;; *) fail "the restart of $1 left a program out of eth2's dispatcher: $report" ;; esac
    [ "$broken" = 0 ] || fail "$broken long-lived connections broke when $1 restarted"
    [ "$failed" = 0 ] || fail "$failed new connections failed when $1 restarted"
    [ "$sent" -ge 5 ] || fail "only $sent datagrams were sent"
    [ "$vip" = "$sent" ] || fail "xdplb counted $vip of $sent datagrams to the VIP while $1 restarted"
    if [ "$1" = lb ]; then
        [ "$hits" = "$sent" ] || fail "the filter dropped $hits of $sent datagrams to port 9996 while xdplb restarted"
    fi
}
shared_step() {
    [ -z "$(probe 9996)" ] || fail "xdp-filter's rule did not drop port 9996 on the LB's eth2"
    echo "XDPLB-VM: xdp-filter beside xdplb on the LB's eth2: port 9996 dropped, 9997 answered"
    restart_round lb
    restart_round filter
    [ -z "$(probe 9996)" ] || fail "port 9996 is no longer dropped after the restarts"
    [ "$(probe 9997)" = "open shared" ] || fail "port 9997 no longer answers after the restarts"
}
. /traffic.sh
case "$eth2" in
    "open shared") shared_step ;;
    "open alone") echo "XDPLB-VM: the LB runs alone on eth2 (libxdp's dispatcher refused on this kernel): no sharing step" ;;
    *) fail "port 9997 on the LB's eth2 did not answer (it is not filtered): ${eth2:-nothing}" ;;
esac

# The LB loses a NIC: its bond's active NIC goes down under traffic. 8
# long-lived connections (a line every 200 ms, echoed) must all go on, and
# a new connection every 100 ms must be answered; the longest wait between
# two answered new connections is the failover as clients see it.
traffic_start 8
[ "$ready" = 8 ] || fail "only $ready of 8 long-lived connections echo before the NIC failover"
sleep 2
read failed_at _ < /proc/uptime
tell fail 9999
sleep 6
traffic_stop 8
gap=$(awk -v t="$failed_at" '$1 >= t - 1 { if (last != "" && $1 - last > max) max = $1 - last; last = $1 } END { printf "%.2f", max }' /tmp/answered)
echo "XDPLB-VM: the LB's active NIC failed: 8 long-lived connections, $broken broken; $new new connections, $failed failed; longest wait between answered new connections ${gap} s (one every 100 ms when all is well)"
for t in $(seq 1 10); do
    nc -w 2 198.18.210.2 9998 < /dev/null > /tmp/lb-failover 2>/dev/null
    [ -s /tmp/lb-failover ] && break
    sleep 1
done
read was now took uplink_rx < /tmp/lb-failover
echo "XDPLB-VM: the LB's bond lost its active NIC ${was:-?}; ${now:-nothing} active ${took:-?} s later; its other uplink (eth2) had received ${uplink_rx:-?} packets"
[ "${uplink_rx:-0}" -gt 100 ] || fail "the router sent (almost) nothing through the LB's second uplink: ${uplink_rx:-?} packets"
[ -n "$was" ] && [ -n "$now" ] && [ "$now" != "$was" ] || fail "the LB's bond did not fail over (${was:-?} -> ${now:-?})"
[ "$broken" = 0 ] || fail "$broken long-lived connections broke when the LB lost a NIC"
[ "$failed" = 0 ] || fail "$failed new connections failed when the LB lost a NIC"

# Failover: b1's server stops. Connections hashed to b1 fail until the
# LB's check takes it out; then 20 in a row must reach b2 (at most 300
# tries), and none may reach b1.
tell die 9999 198.18.210.3
b1=0; b2=0; bad=0; run=0; tries=0
while [ "$run" -lt 20 ] && [ "$tries" -lt 300 ]; do
    tries=$((tries + 1))
    case "$(get)" in
        b1) b1=$((b1 + 1)); run=0 ;;
        b2) b2=$((b2 + 1)); run=$((run + 1)) ;;
        *) bad=$((bad + 1)); run=0 ;;
    esac
done
echo "XDPLB-VM: after b1 died: $tries new connections until 20 in a row reached b2: $bad failed, $b1 reached b1"
[ "$b1" = 0 ] || fail "connections still reached the dead b1"
[ "$run" = 20 ] || fail "no 20 connections in a row reached b2 within 300"
echo "XDPLB-VM: PASS"
