# Role "backend" (b1 at .3, b2 at .4, by MAC): the README's ipip steps,
# word for word, then an HTTP server that names this backend. Connecting
# to port 9999 stops the server, as a backend dying would (the client's
# failover step).
ip link set eth0 mtu 1600
case "$(cat /sys/class/net/eth0/address)" in
    *:03) name=b1; n=3 ;;
    *) name=b2; n=4 ;;
esac
ip addr add "198.18.210.$n/24" dev eth0
ip -6 addr add "2001:db8:d2::$n/64" dev eth0 nodad
# Clients are behind the router.
ip route add default via 198.18.210.254
ip -6 route add default via 2001:db8:d2::fe
dash -e /deploy-backend.sh || fail "the README's backend steps failed"
for t in tunl0 ip6tnl0; do
    ip link show "$t" | grep -q "UP" || fail "$t is not up after the README's steps"
done
echo "XDPLB-VM: $name: README backend steps done: tunl0 and ip6tnl0 up (the kernel's modules), VIPs on lo"
mkdir -p /www
echo "backend $name" > /www/index.html
# 200 KB for the path-MTU check.
head -c 204800 /dev/zero > /www/big
httpd -f -p 80 -h /www &
server=$!
# UDP: answers from the VIP (bound to it), as DSR needs.
socat UDP4-RECVFROM:53,bind=198.18.0.10,fork SYSTEM:"echo backend $name" &
# An echo service for long-lived connections (the operator's upgrade).
socat TCP4-LISTEN:7,fork,reuseaddr EXEC:cat &
nc -l -p 9999 -e kill "$server" &
sleep 900
