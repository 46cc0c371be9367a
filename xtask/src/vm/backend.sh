# Role "backend" (b1 at .3, b2 at .4, by MAC): the README's ipip steps,
# word for word, then an HTTP server that names this backend. Connecting
# to port 9999 stops the server, as a backend dying would (the client's
# failover step).
ip link set eth0 mtu 1600
case "$(cat /sys/class/net/eth0/address)" in
    *:03) name=b1; addr=198.18.210.3 ;;
    *) name=b2; addr=198.18.210.4 ;;
esac
ip addr add "$addr/24" dev eth0
sh -e /deploy-backend.sh || fail "the README's backend steps failed"
ip link show tunl0 | grep -q "UP" || fail "tunl0 is not up after the README's steps"
echo "XDPLB-VM: $name: README backend steps done: tunl0 up (the kernel's ipip), VIP on lo"
mkdir -p /www
echo "backend $name" > /www/index.html
httpd -f -p 80 -h /www &
server=$!
nc -l -p 9999 -e kill "$server" &
sleep 600
