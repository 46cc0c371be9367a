# Role "steady": the client of the operator's host. Once the operator asks
# (a connection to port 7001), it opens long-lived connections to the
# VIP's echo service and makes a new HTTP connection every 100 ms; when
# the operator asks again (port 7002), it answers how many of each broke.
ip addr add 198.18.211.1/24 dev eth0
ip route add default via 198.18.211.254
LONG=8
cat > /start.sh <<'SH'
. /traffic.sh
traffic_start LONG
echo "ready $ready"
SH
cat > /stop.sh <<'SH'
. /traffic.sh
traffic_stop LONG
echo "long-lived LONG broken $broken new $new failed $failed"
touch /tmp/done
SH
sed -i "s/LONG/$LONG/g" /start.sh /stop.sh
# -t: the operator sends nothing and half-closes at once; the answer
# still goes back when the script is done.
socat -t 120 TCP4-LISTEN:7001,reuseaddr SYSTEM:"sh /start.sh" &
socat -t 120 TCP4-LISTEN:7002,reuseaddr SYSTEM:"sh /stop.sh" &
# The operator's host decides when this ends (it powers the bed off).
sleep 900
