# Role "backend": the README's ipip steps, word for word, then an HTTP
# server that names this backend.
ip link set eth0 mtu 1600
ip addr add 198.18.210.3/24 dev eth0
sh -e /deploy-backend.sh || fail "the README's backend steps failed"
ip link show tunl0 | grep -q "UP" || fail "tunl0 is not up after the README's steps"
echo "XDPLB-VM: README backend steps done: tunl0 up (the kernel's ipip), VIP on lo"
mkdir -p /www
echo "backend b1" > /www/index.html
httpd -p 80 -h /www || fail "httpd"
sleep 600
