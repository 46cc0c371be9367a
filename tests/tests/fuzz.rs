//! 100,000 random, truncated and bit-flipped packets through the balancer:
//! never XDP_ABORTED, never a failed run, and the exclusive per-reason
//! counters add up to exactly the packets sent.

use std::net::Ipv4Addr;

use integration_tests::{
    lab::{self, Lab, CLIENT4, CLIENT6},
    packet, require_root, run,
};
use xdp_common::{reason, XDP_DROP, XDP_PASS, XDP_TX};

const PACKETS: u64 = 100_000;
/// BPF_PROG_TEST_RUN refuses XDP input shorter than an Ethernet header.
const MIN_FRAME: usize = 14;

/// xorshift64*: deterministic, so a failure replays from its seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// Valid packets of every kind the balancer handles, to mutate.
fn seeds() -> Vec<Vec<u8>> {
    let web4 = Ipv4Addr::new(198, 18, 0, 10);
    let web6 = match lab::WEB6.addr {
        std::net::IpAddr::V6(a) => a,
        std::net::IpAddr::V4(_) => unreachable!("WEB6 is IPv6"),
    };
    let tcp = packet::tcp4(CLIENT4, web4, 40000, 80, b"GET / HTTP/1.1\r\n\r\n");
    let tcp6 = packet::tcp6(CLIENT6, web6, 40000, 443, b"hello");
    let reply = packet::tcp4(web4, CLIENT4, 80, 40000, b"reply");
    let reply6 = packet::tcp6(web6, CLIENT6, 443, 40000, b"reply");
    vec![
        tcp.clone(),
        packet::udp4(CLIENT4, Ipv4Addr::new(198, 18, 0, 11), 41000, 53, b"query"),
        tcp6.clone(),
        packet::udp6(CLIENT6, web6, 41000, 53, b"q"),
        packet::with_vlan(&tcp, 0x8100, 10),
        packet::with_ipv4_options(&tcp, 4),
        packet::as_ipv4_fragment(&tcp, true, 0),
        packet::with_ipv6_extension(&tcp6, 44),
        packet::icmp4_frag_needed(Ipv4Addr::new(198, 18, 200, 1), web4, &reply),
        packet::icmp6_too_big(
            std::net::Ipv6Addr::new(0x2001, 0xdb8, 0x200, 0, 0, 0, 0, 1),
            web6,
            &reply6,
        ),
        packet::tcp4(CLIENT4, Ipv4Addr::new(198, 18, 0, 15), 40000, 80, b"x"),
        packet::arp(),
    ]
}

fn mutate(rng: &mut Rng, seeds: &[Vec<u8>]) -> Vec<u8> {
    match rng.below(4) {
        // Pure noise.
        0 => {
            let len = MIN_FRAME + rng.below(200);
            (0..len).map(|_| rng.next() as u8).collect()
        }
        // Truncated.
        1 => {
            let s = &seeds[rng.below(seeds.len())];
            s[..MIN_FRAME + rng.below(s.len() - MIN_FRAME + 1)].to_vec()
        }
        // Bit flips, maybe truncated too.
        _ => {
            let mut s = seeds[rng.below(seeds.len())].clone();
            for _ in 0..1 + rng.below(4) {
                let i = rng.below(s.len());
                s[i] ^= 1 << rng.below(8);
            }
            if rng.below(3) == 0 {
                s.truncate(MIN_FRAME + rng.below(s.len() - MIN_FRAME + 1));
            }
            s
        }
    }
}

#[test]
fn random_packets_never_abort_and_counters_add_up() {
    if !require_root() {
        return;
    }
    let lab = Lab::new().expect("loading the lab");
    let program = lab.dp.program().unwrap();
    let seeds = seeds();
    let seed = 0x5eed_cafe_f00d_u64;
    let mut rng = Rng(seed);
    let before = lab.stats();
    let mut actions = [0u64; 5];
    for i in 0..PACKETS {
        let pkt = mutate(&mut rng, &seeds);
        let r = run(program, &pkt)
            .unwrap_or_else(|e| panic!("packet {i} (seed {seed:#x}): test run failed: {e:#}"));
        assert!(
            [XDP_DROP, XDP_PASS, XDP_TX].contains(&r.action),
            "packet {i} (seed {seed:#x}) returned action {}: {}",
            r.action,
            integration_tests::hex(&pkt)
        );
        actions[r.action as usize] += 1;
    }
    let after = lab.stats();
    let counted: u64 = reason::ACTIONS
        .iter()
        .map(|&i| after[i as usize] - before[i as usize])
        .sum();
    println!(
        "{PACKETS} packets: pass {} drop {} tx {}; per reason: {}",
        actions[XDP_PASS as usize],
        actions[XDP_DROP as usize],
        actions[XDP_TX as usize],
        reason::ACTIONS
            .iter()
            .map(|&i| {
                let i = i as usize;
                format!("{}={}", reason::NAMES[i], after[i] - before[i])
            })
            .collect::<Vec<_>>()
            .join(" ")
    );
    assert_eq!(
        counted, PACKETS,
        "exclusive counters must add up to the packets sent"
    );
    // The mix exercised the interesting outcomes, not just one.
    for why in [
        reason::MALFORMED,
        reason::TX_ENCAP,
        reason::PASS_NOT_VIP,
        reason::FRAGMENT,
    ] {
        assert!(
            after[why as usize] > before[why as usize],
            "no packet counted as {}",
            reason::NAMES[why as usize]
        );
    }
    // Transmitted packets equal the tx reasons.
    let tx: u64 = [reason::TX_ENCAP, reason::TX_L2_DSR, reason::TX_ICMP]
        .iter()
        .map(|&r| after[r as usize] - before[r as usize])
        .sum();
    assert_eq!(tx, actions[XDP_TX as usize]);
}
