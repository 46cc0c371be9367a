//! `cargo bench -p xdp-user --bench maglev`: Maglev population time for a
//! 65537-slot ring and 10/100/1000 backends, median of repeated runs, beside
//! the baseline of filling the same table round-robin (the floor any
//! population pays to touch every slot).

use xdp_user::maglev::measure_population;

const SLOTS: u32 = 65537;
const RUNS: usize = 21;

fn main() {
    println!("maglev population, {SLOTS} slots, median of {RUNS} runs");
    println!(
        "{:>9} {:>14} {:>16} {:>7}",
        "backends", "maglev", "round-robin", "ratio"
    );
    for n in [10u32, 100, 1000] {
        let (maglev, baseline) = measure_population(n, SLOTS, RUNS);
        println!(
            "{n:>9} {:>11.3} ms {:>13.3} ms {:>6.0}x",
            maglev.as_secs_f64() * 1e3,
            baseline.as_secs_f64() * 1e3,
            maglev.as_secs_f64() / baseline.as_secs_f64()
        );
    }
}
