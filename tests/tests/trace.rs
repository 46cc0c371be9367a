//! `xdplb trace` against a running system: the decision of each packet it
//! was asked for, named as an operator reads it, and nothing for packets it
//! was not; off again when it ends, by count or by signal. The build before
//! it had no trace command.

use std::{
    io::{BufRead as _, BufReader, Read as _},
    net::{IpAddr, Ipv4Addr},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use integration_tests::{
    daemon::{wait_for, xdplb_bin},
    e2e::{http_get, System, HEALTH},
    require_root,
    topology::Spec,
};
use xdp_user::dataplane::trace::Pinned;

const VIP4: IpAddr = IpAddr::V4(Ipv4Addr::new(198, 18, 0, 10));

/// `xdplb trace` with `args`, once it says it is tracing.
fn trace(sys: &System, args: &[&str]) -> Child {
    let config = sys.configs[0].to_string_lossy().into_owned();
    let mut child = Command::new(xdplb_bin())
        .args(["trace", "--config", &config])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting xdplb trace");
    let mut first = String::new();
    BufReader::new(child.stderr.as_mut().expect("stderr"))
        .read_line(&mut first)
        .expect("reading xdplb trace's stderr");
    assert!(first.starts_with("tracing"), "xdplb trace said: {first}");
    child
}

/// Wait (bounded) for `child` to exit; its stdout lines.
fn finish(mut child: Child, limit: Duration) -> Vec<String> {
    let deadline = Instant::now() + limit;
    while child.try_wait().expect("waiting").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("xdplb trace still running after {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let status = child.wait().expect("exit status");
    let mut out = String::new();
    child
        .stdout
        .take()
        .expect("stdout")
        .read_to_string(&mut out)
        .expect("reading stdout");
    assert!(
        status.success(),
        "xdplb trace failed: {status}; printed {out}"
    );
    out.lines().map(str::to_owned).collect()
}

#[test]
fn trace_names_each_decision_it_was_asked_for_and_turns_itself_off() {
    if !require_root() {
        return;
    }
    // A short idle bound: backends whose first checks pass in different
    // windows change the ring in between, and its changed slots consult
    // conntrack (a SYN there is placed `flow_new`) until they settle, two
    // idle bounds later (600 s at the default), and a sweep clears them.
    let spec = Spec {
        tag: "trace".into(),
        lbs: 1,
        backends: 2,
        clients: 1,
        vips: vec![VIP4],
        lb_segment: false,
    };
    let sys = System::start_spec(&spec, |topo, j, pins, socket| {
        topo.lb_config(j, pins, socket, HEALTH, &[], false)
            .replacen("[forwarding]\n", "[forwarding]\nflow_idle_timeout = 3\n", 1)
    })
    .unwrap();
    sys.wait_checked(Duration::from_secs(10)).unwrap();
    let settled = wait_for(Duration::from_secs(30), || {
        let s = sys.status(0).ok()?;
        (s["changed_slots"] == serde_json::json!([0, 0])).then_some(())
    });
    assert!(
        settled.is_some(),
        "changed ring slots never settled: {:?}",
        sys.status(0)
    );
    let pinned = Pinned::new(&sys.pins[0].0);
    let client = sys.topo.clients[0].v4;

    // One HTTP exchange: the SYN opens the flow, the rest follow it.
    let child = trace(&sys, &["--vip", "web0", "--count", "3"]);
    let name = sys.from_client(0, || http_get(VIP4)).unwrap().unwrap();
    let lines = finish(child, Duration::from_secs(10));
    let backend = sys.topo.backends[name[1..].parse::<usize>().unwrap()].v4;
    println!("trace of one HTTP request:\n  {}", lines.join("\n  "));
    assert_eq!(lines.len(), 3, "{lines:?}");
    assert!(
        lines[0].starts_with(&format!("web0 {client}:"))
            && lines[0].contains(&format!(
                "> {VIP4}:80 tcp: TX tx_encap, placed flow_ring, backend {backend} (#"
            )),
        "the SYN: {}",
        lines[0]
    );
    for l in &lines[1..] {
        assert!(
            l.contains("TX tx_encap, placed flow_ring") && l.contains(&backend.to_string()),
            "the rest of the connection: {l}"
        );
    }
    assert_eq!(
        pinned.trace_filter().unwrap().enabled,
        0,
        "off after --count"
    );

    // A trace that died unread (SIGKILL) leaves its events in the ring;
    // those of one more exchange are left there on purpose.
    pinned
        .set_trace_filter(&xdp_common::TraceFilter {
            enabled: 1,
            vip_id: xdp_common::TRACE_ANY_VIP,
            ..Default::default()
        })
        .unwrap();
    sys.from_client(0, || http_get(VIP4)).unwrap().unwrap();
    pinned
        .set_trace_filter(&xdp_common::TraceFilter::default())
        .unwrap();

    // Asked for other clients only: nothing (neither this exchange nor the
    // one left unread), until SIGTERM ends it.
    let child = trace(&sys, &["--client", "198.18.99.0/24"]);
    sys.from_client(0, || http_get(VIP4)).unwrap().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    // SAFETY: signals our own child.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    let lines = finish(child, Duration::from_secs(5));
    assert!(
        lines.is_empty(),
        "nothing matched, nothing printed: {lines:?}"
    );
    assert_eq!(
        pinned.trace_filter().unwrap().enabled,
        0,
        "off after SIGTERM"
    );

    // Bad requests are refused with the reason.
    let config = sys.configs[0].to_string_lossy().into_owned();
    for (args, why) in [
        (vec!["--vip", "nosuch"], "no VIP named \"nosuch\""),
        (
            vec!["--client", "198.18.0.0/40"],
            "\"198.18.0.0/40\" is not an address or prefix",
        ),
    ] {
        let out = Command::new(xdplb_bin())
            .args(["trace", "--config", &config])
            .args(&args)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains(why),
            "{args:?}: {err}"
        );
    }
}
