# Role "steady": the client of the operator's host. Once the operator asks
# (a connection to port 7001), it opens long-lived connections to the
# VIP's echo service and makes a new HTTP connection every 100 ms; when
# the operator asks again (port 7002), it answers how many of each broke.
ip addr add 198.18.211.1/24 dev eth0
ip route add default via 198.18.211.254
LONG=8
cat > /start.sh <<'SH'
touch /tmp/run
for i in $(seq 1 LONG); do
    # One line every 200 ms on a connection that stays open; the echo
    # comes back into /tmp/echo.$i. A connection reset ends socat early.
    ( ( while [ -e /tmp/run ]; do echo "line $i"; sleep 0.2; done ) \
        | socat -T 20 - TCP4:198.18.0.10:7 > /tmp/echo.$i 2>/dev/null
      echo $? > /tmp/end.$i ) < /dev/null > /dev/null 2>&1 &
done
# New connections, one every 100 ms, each must be answered.
( ok=0; failed=0
  while [ -e /tmp/run ]; do
      who=$(printf 'GET / HTTP/1.0\r\n\r\n' | nc -w 3 198.18.0.10 80 2>/dev/null | sed -n 's/^backend //p')
      if [ -n "$who" ]; then ok=$((ok + 1)); else failed=$((failed + 1)); fi
      echo "$ok $failed" > /tmp/new
      sleep 0.1
  done ) < /dev/null > /dev/null 2>&1 &
# Ready once every long-lived connection echoed.
for t in $(seq 1 100); do
    n=0
    for i in $(seq 1 LONG); do [ -s /tmp/echo.$i ] && n=$((n + 1)); done
    [ "$n" = LONG ] && break
    sleep 0.2
done
echo "ready $n"
SH
sed -i "s/LONG/$LONG/g" /start.sh
cat > /stop.sh <<'SH'
# Progress first: every connection still echoing (its output grows).
for i in $(seq 1 LONG); do wc -c < /tmp/echo.$i > /tmp/size.$i; done
sleep 2
broken=0
for i in $(seq 1 LONG); do
    if [ -e /tmp/end.$i ] || [ "$(wc -c < /tmp/echo.$i)" = "$(cat /tmp/size.$i)" ]; then
        broken=$((broken + 1))
    fi
done
rm -f /tmp/run
read ok failed < /tmp/new
echo "long-lived LONG broken $broken new $((ok + failed)) failed $failed"
touch /tmp/done
SH
sed -i "s/LONG/$LONG/g" /start.sh /stop.sh
# -t: the operator sends nothing and half-closes at once; the answer
# still goes back when the script is done.
socat -t 120 TCP4-LISTEN:7001,reuseaddr SYSTEM:"sh /start.sh" &
socat -t 120 TCP4-LISTEN:7002,reuseaddr SYSTEM:"sh /stop.sh" &
# The operator's host decides when this ends (it powers the bed off).
sleep 900
