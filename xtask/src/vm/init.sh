#!/bin/busybox sh
# /init of the vmtest guests: mount the basics, load the modules, bring
# eth0 up, then run /roles/<role>.sh for the role= of the kernel command
# line. Result lines start with XDPLB-VM; a role ends with PASS or FAIL.
/bin/busybox --install -s /bin
export PATH=/usr/sbin:/usr/bin:/bin
# busybox's shell runs its own applets before PATH: use iproute2's ip.
ip() { /usr/sbin/ip "$@"; }
mkdir -p /proc /sys /dev /run /tmp /etc/xdplb
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t bpf bpf /sys/fs/bpf
mount -t tmpfs run /run
mount -t tmpfs tmp /tmp
fail() {
    echo "XDPLB-VM: FAIL $*"
    poweroff -f
}
for m in $(cat /lib/modules/order); do
    insmod "/lib/modules/$m" || fail "insmod $m"
done
ip link set lo up
ip link set eth0 up || fail "no eth0: virtio_net did not bind"
role=$(sed -n 's/.*role=\([a-z]*\).*/\1/p' /proc/cmdline)
echo "XDPLB-VM: kernel $(uname -r), role $role"
. "/roles/$role.sh"
poweroff -f
