# The operator's steps on a Debian 12 host under systemd (operator.rs):
# what someone who runs keepalived or HAProxy does with the package. Each
# result line starts with XDPLB-VM; the last is PASS or FAIL.
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
say() { echo "XDPLB-VM: $*"; }
journal() { journalctl -u xdplb --no-pager -o cat; }
fail() {
    say "FAIL $*"
    journalctl -u xdplb --no-pager -n 40 -o short-monotonic | sed 's/^/XDPLB-VM: journal: /'
    systemctl poweroff --force --force
    exit 1
}
# Wait up to $1 seconds for "$2 ..." to succeed.
wait_for() {
    limit=$1
    shift
    for i in $(seq 1 "$limit"); do
        "$@" > /dev/null 2>&1 && return 0
        sleep 1
    done
    return 1
}
journal_has() { journal | grep -q -- "$1"; }
active() { [ "$(systemctl is-active xdplb)" = active ]; }
main_pid() { systemctl show -p MainPID --value xdplb; }
dpkg_i() { DEBIAN_FRONTEND=noninteractive dpkg --force-confold -i "$1" > /tmp/dpkg.log 2>&1 || { sed 's/^/XDPLB-VM: dpkg: /' /tmp/dpkg.log; fail "dpkg -i $1"; }; }
no_dataplane() {
    ! ip link show eth0 | grep -q "prog/xdp" && [ ! -e /sys/fs/bpf/xdplb ]
}
say "kernel $(uname -r), $(systemctl --version | head -1)"

ip link set eth0 mtu 1600 up
ip addr add 198.18.210.2/24 dev eth0
ip route add 198.18.211.0/24 via 198.18.210.254

# 1. Install: nothing starts on its own (the shipped config is an example).
dpkg_i /xdplb-test/xdplb_1.deb
say "installed $(dpkg-query -W -f '${Version}' xdplb): $(grep '^xdplb:' /tmp/dpkg.log)"
[ "$(systemctl is-enabled xdplb)" = disabled ] || fail "a first install enabled the service"
active && fail "a first install started the service"
cat > /etc/xdplb/xdplb.toml <<'CONF'
interface = "eth0"
xdp_mode = "native"

[tables]
max_vips = 8
max_backends = 16
ring_size = 13
max_flows = 4096

[forwarding]
gateway_mac = "52:54:00:00:01:fe"

# Not the default path: a reload of a file the daemon refuses must still
# find it (the CLI reads this key from a file that does not validate).
[api]
socket = "/run/xdplb/ops.sock"

[[vip]]
name = "web"
address = "198.18.0.10"
protocol = "tcp"
forwarding = "ipip"
health = { kind = "tcp", port = 80, interval_ms = 300, timeout_ms = 250, rise = 1, fall = 3 }

[[vip.backend]]
address = "198.18.210.3"
CONF
cp /etc/xdplb/xdplb.toml /tmp/one-backend.toml

# 2. Enable and start.
systemctl enable --now xdplb > /tmp/enable.log 2>&1 || fail "systemctl enable --now xdplb: $(cat /tmp/enable.log)"
active || fail "not active after enable --now"
say "enabled and started; status: $(systemctl show -p StatusText --value xdplb)"

# 3. The journal's text carries the facts.
wait_for 60 journal_has "backend 198.18.210.3 of VIP web .* is up" ||
    fail "no journal line names backend 198.18.210.3 of VIP web coming up"
say "journal: $(journal | grep -m1 'backend 198.18.210.3 of VIP web')"

# 4. The watchdog: a stopped daemon is killed and restarted; the pinned
#    dataplane keeps forwarding.
pid=$(main_pid)
restarts=$(systemctl show -p NRestarts --value xdplb)
kill -STOP "$pid"
restarted() { [ "$(main_pid)" != "$pid" ] && [ "$(main_pid)" != 0 ] && active; }
wait_for 60 restarted || fail "the watchdog did not restart a stopped daemon within 60 s"
say "watchdog: stopped daemon $pid replaced by $(main_pid) (restarts $restarts -> $(systemctl show -p NRestarts --value xdplb)): $(journalctl -u xdplb --no-pager -o cat | grep -m1 -i watchdog)"

# 5. Reload refused: systemctl reload fails, the journal says why, the
#    running state stays.
sed -i 's/forwarding = "ipip"/forwarding = "gre"/' /etc/xdplb/xdplb.toml
if systemctl reload xdplb 2>/tmp/reload.err; then
    fail "systemctl reload succeeded with a refused config"
fi
active || fail "a refused reload stopped the service"
wait_for 10 journal_has "reload the config: refused" || fail "no journal line for the refused reload"
say "reload refused: exit non-zero; journal: $(journal | grep -m1 'reload the config: refused')"
xdplb status | grep -q "web" || fail "the running VIP is gone after a refused reload"

# 6. Reload accepted: a second backend, and a VIP whose only backend does
#    not exist; the journal says what changed, the status line names the
#    VIP that cannot forward.
cp /tmp/one-backend.toml /etc/xdplb/xdplb.toml
printf '\n[[vip.backend]]\naddress = "198.18.210.4"\n' >> /etc/xdplb/xdplb.toml
cat >> /etc/xdplb/xdplb.toml <<'CONF'

[[vip]]
name = "void"
address = "198.18.0.11"
protocol = "tcp"
forwarding = "ipip"
health = { kind = "tcp", port = 80, interval_ms = 300, timeout_ms = 250, rise = 1, fall = 1 }

[[vip.backend]]
address = "198.18.210.9"
CONF
systemctl reload xdplb || fail "systemctl reload of a good config failed"
wait_for 10 journal_has "reload the config: accepted: VIP void added; VIP web: backend 198.18.210.4 added" ||
    fail "no journal line says what the reload changed"
say "reload accepted; journal: $(journal | grep -m1 'reload the config: accepted')"
status_is() { systemctl show -p StatusText --value xdplb | grep -q -- "$1"; }
wait_for 30 status_is "^degraded: no usable backend for VIP void " ||
    fail "the status line does not name VIP void: $(systemctl show -p StatusText --value xdplb)"
say "status with a VIP without backends: $(systemctl show -p StatusText --value xdplb)"
xdplb vip del void > /dev/null || fail "vip del void"
wait_for 10 journal_has "delete VIP void: accepted (asked by uid 0, pid" || fail "no journal line for the VIP deletion"
wait_for 30 status_is "^forwarding$" || fail "the status line is not forwarding: $(systemctl show -p StatusText --value xdplb)"
say "status once every VIP has a backend: $(systemctl show -p StatusText --value xdplb)"

# 7. Runtime changes: who asked, what changed.
xdplb backend drain web 198.18.210.4 > /dev/null || fail "drain"
xdplb backend undrain web 198.18.210.4 > /dev/null || fail "undrain"
wait_for 10 journal_has "drain backend 198.18.210.4 of VIP web: accepted (asked by uid 0, pid" ||
    fail "no journal line for the drain with its asker"
say "journal: $(journal | grep -m1 'drain backend 198.18.210.4 of VIP web')"
wait_for 60 journal_has "backend 198.18.210.4 of VIP web .* is up" || fail "backend 198.18.210.4 never came up"

# 8. Stopped: the pinned dataplane goes on forwarding, and `xdplb status`
#    shows what it forwards, marked as such (exit 3: not running).
systemctl stop xdplb || fail "systemctl stop"
xdplb status > /tmp/status.txt 2>&1
rc=$?
[ "$rc" = 3 ] || fail "xdplb status with the daemon stopped exited $rc: $(cat /tmp/status.txt)"
grep -q "^NO DAEMON" /tmp/status.txt && grep -q "^VIP web 198.18.0.10:\*/tcp" /tmp/status.txt &&
    grep -q "198.18.210.4 *up" /tmp/status.txt || fail "xdplb status while stopped: $(cat /tmp/status.txt)"
say "status while stopped: $(tr '\n' '|' < /tmp/status.txt)"
systemctl start xdplb || fail "systemctl start"

# 9. Upgrade to a rebuilt package under the client's traffic.
ready=""
for i in $(seq 1 60); do
    ready=$(socat -t 60 -T 60 - TCP4:198.18.211.1:7001 2>/dev/null </dev/null) && [ -n "$ready" ] && break
    sleep 2
done
case "$ready" in "ready 8") ;; *) fail "the client's traffic did not start ($ready)" ;; esac
pid=$(main_pid)
dpkg_i /xdplb-test/xdplb_2.deb
active || fail "not active after the upgrade"
[ "$(main_pid)" != "$pid" ] || fail "the upgrade did not restart the daemon"
sleep 5
result=$(socat -t 60 -T 60 - TCP4:198.18.211.1:7002 2>/dev/null </dev/null)
say "upgrade to $(dpkg-query -W -f '${Version}' xdplb) under traffic (daemon $pid -> $(main_pid)): $result"
case "$result" in
    "long-lived 8 broken 0 new "*" failed 0") ;;
    *) fail "the upgrade broke connections: $result" ;;
esac

# 10. Remove: the daemon stops, the dataplane is detached, no dangling link.
dpkg -r xdplb > /tmp/dpkg.log 2>&1 || fail "dpkg -r: $(cat /tmp/dpkg.log)"
pgrep -x xdplb > /dev/null && fail "the daemon still runs after dpkg -r"
no_dataplane || fail "the dataplane is still attached after dpkg -r"
dangling=$(find /etc/systemd/system -xtype l)
[ -z "$dangling" ] || fail "dangling links after dpkg -r: $dangling"
[ -e /etc/xdplb/xdplb.toml ] || fail "dpkg -r removed the config"
say "removed: daemon stopped, dataplane detached, config kept, no dangling links"

# 11. Purge, from a running install.
dpkg_i /xdplb-test/xdplb_2.deb
systemctl enable --now xdplb > /dev/null 2>&1 || fail "enable after reinstall"
active || fail "not active after reinstall"
dpkg -P xdplb > /tmp/dpkg.log 2>&1 || fail "dpkg -P: $(cat /tmp/dpkg.log)"
pgrep -x xdplb > /dev/null && fail "the daemon still runs after dpkg -P"
no_dataplane || fail "the dataplane is still attached after dpkg -P"
for p in /etc/xdplb /run/xdplb /usr/sbin/xdplb /lib/systemd/system/xdplb.service; do
    [ -e "$p" ] && fail "$p is left after dpkg -P"
done
dangling=$(find /etc/systemd/system -xtype l)
[ -z "$dangling" ] || fail "dangling links after dpkg -P: $dangling"
say "purged: nothing left"
say "PASS"
systemctl poweroff --force --force
