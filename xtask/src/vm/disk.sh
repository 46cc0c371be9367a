# Role "disk": the operator's host. Its root is the Debian system on the
# virtio disk (operator.rs builds it); systemd takes over as PID 1 and
# runs the steps in /xdplb-test/operator.sh.
mkdir -p /newroot
mount -t ext4 /dev/vda /newroot || fail "cannot mount the Debian root on /dev/vda"
umount /sys/fs/bpf /tmp
for fs in dev proc sys run; do
    mount --move "/$fs" "/newroot/$fs"
done
exec switch_root /newroot /lib/systemd/systemd
