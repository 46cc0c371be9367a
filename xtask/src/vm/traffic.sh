# Traffic that must not break, for the beds' failover steps (sourced by a
# client role). `traffic_start N` opens N long-lived connections to the
# VIP's echo service (a line every 200 ms each) and a new HTTP connection
# every 100 ms, noting when each is answered; `$ready` says how many of
# the N echoed. `traffic_stop N` ends them: `$broken` long-lived
# connections stopped echoing, `$new` new connections were tried,
# `$failed` of them unanswered. Answer times are in /tmp/answered
# (seconds of uptime). Each may run in a process of its own.
traffic_start() {
    # A fresh round: nothing an earlier one left counts.
    rm -f /tmp/echo.* /tmp/end.* /tmp/size.* /tmp/new /tmp/answered
    touch /tmp/run
    for i in $(seq 1 "$1"); do
        # A connection reset ends socat early, noted in /tmp/end.$i.
        ( ( while [ -e /tmp/run ]; do echo "line $i"; sleep 0.2; done ) \
            | socat -T 20 - TCP4:198.18.0.10:7 > /tmp/echo.$i 2>/dev/null
          echo $? > /tmp/end.$i ) < /dev/null > /dev/null 2>&1 &
    done
    ( ok=0; failed=0
      while [ -e /tmp/run ]; do
          who=$(printf 'GET / HTTP/1.0\r\n\r\n' | nc -w 3 198.18.0.10 80 2>/dev/null | sed -n 's/^backend //p')
          if [ -n "$who" ]; then
              ok=$((ok + 1))
              read up _ < /proc/uptime
              echo "$up" >> /tmp/answered
          else
              failed=$((failed + 1))
          fi
          echo "$ok $failed" > /tmp/new
          sleep 0.1
      done ) < /dev/null > /dev/null 2>&1 &
    for t in $(seq 1 100); do
        ready=0
        for i in $(seq 1 "$1"); do [ -s /tmp/echo.$i ] && ready=$((ready + 1)); done
        [ "$ready" = "$1" ] && break
        sleep 0.2
    done
}
traffic_stop() {
    # Progress first: every connection still echoing (its output grows).
    for i in $(seq 1 "$1"); do wc -c < /tmp/echo.$i > /tmp/size.$i; done
    sleep 2
    broken=0
    for i in $(seq 1 "$1"); do
        if [ -e /tmp/end.$i ] || [ "$(wc -c < /tmp/echo.$i)" = "$(cat /tmp/size.$i)" ]; then
            broken=$((broken + 1))
        fi
    done
    rm -f /tmp/run
    sleep 0.5
    read ok failed < /tmp/new
    new=$((ok + failed))
}
