//! `cargo bench -p xdp-user --bench maglev`: Maglev population time for a
//! 65537-slot ring and 10/100/1000 backends, median of repeated runs, beside
//! the baseline of filling the same table by round-robin (the floor any
//! population pays to touch every slot).

use std::time::{Duration, Instant};

use xdp_user::maglev::{populate, RingBackend};

const SLOTS: u32 = 65537;
const RUNS: usize = 21;

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

fn time(mut f: impl FnMut() -> Vec<u32>) -> Duration {
    median(
        (0..RUNS)
            .map(|_| {
                let started = Instant::now();
                std::hint::black_box(f());
                started.elapsed()
            })
            .collect(),
    )
}

fn main() {
    println!("maglev population, {SLOTS} slots, median of {RUNS} runs");
    println!(
        "{:>9} {:>14} {:>16} {:>7}",
        "backends", "maglev", "round-robin", "ratio"
    );
    for n in [10u32, 100, 1000] {
        let backends: Vec<RingBackend> = (0..n)
            .map(|i| RingBackend {
                identity: vec![10, (i >> 16) as u8, (i >> 8) as u8, i as u8],
                weight: 1 + i % 4,
                id: i,
            })
            .collect();
        let maglev = time(|| populate(&backends, SLOTS));
        let baseline = time(|| (0..SLOTS).map(|s| s % n).collect());
        println!(
            "{n:>9} {:>11.3} ms {:>13.3} ms {:>6.0}x",
            maglev.as_secs_f64() * 1e3,
            baseline.as_secs_f64() * 1e3,
            maglev.as_secs_f64() / baseline.as_secs_f64()
        );
    }
}
