//! Maglev table population (Eisenbud et al., NSDI 2016), weighted. Pure: no
//! I/O, no aya.
//!
//! Each backend's permutation of the table comes from a hash of its identity
//! (its address), and backends take their turns in identity order, so two
//! LB hosts with the same backend set build the same table whatever order
//! their configs list them in. Weights work by accumulation: every round a
//! backend adds its weight to a credit and claims one slot per `max_weight`
//! of credit, so slot shares follow weight shares.

use xdp_common::NO_BACKEND;

/// One backend as the ring sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RingBackend {
    /// Stable identity: the backend's address bytes. Seeds the permutation.
    pub identity: Vec<u8>,
    /// Relative share; 0 leaves the backend out of the ring.
    pub weight: u32,
    /// What the ring stores for it (the dataplane backend id).
    pub id: u32,
}

/// FNV-1a 64 followed by a murmur3 finaliser: stable across hosts, builds
/// and Rust versions (unlike `std`'s hasher), and well mixed.
fn hash64(bytes: &[u8], seed: u64) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64 ^ seed;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

const OFFSET_SEED: u64 = 0x6d61_676c_6576_0001;
const SKIP_SEED: u64 = 0x6d61_676c_6576_0002;

/// Whether `n` is prime (ring sizes must be, for every skip to cover it).
pub fn is_prime(n: u32) -> bool {
    if n < 2 {
        return false;
    }
    if n.is_multiple_of(2) {
        return n == 2;
    }
    let mut d = 3u64;
    while d * d <= u64::from(n) {
        if u64::from(n).is_multiple_of(d) {
            return false;
        }
        d += 2;
    }
    true
}

/// Build a ring of `size` slots (prime) over `backends`. Slots hold backend
/// ids; with no weighted backend every slot is `NO_BACKEND`.
pub fn populate(backends: &[RingBackend], size: u32) -> Vec<u32> {
    let m = size as usize;
    let mut ring = vec![NO_BACKEND; m];
    let mut members: Vec<&RingBackend> = backends.iter().filter(|b| b.weight > 0).collect();
    if members.is_empty() || m == 0 {
        return ring;
    }
    members.sort_by(|a, b| a.identity.cmp(&b.identity).then(a.id.cmp(&b.id)));
    let max_weight = u64::from(members.iter().map(|b| b.weight).max().unwrap_or(1));
    let perms: Vec<(u64, u64)> = members
        .iter()
        .map(|b| {
            let offset = hash64(&b.identity, OFFSET_SEED) % size as u64;
            let skip = if size > 1 {
                hash64(&b.identity, SKIP_SEED) % (size as u64 - 1) + 1
            } else {
                1
            };
            (offset, skip)
        })
        .collect();
    let mut next = vec![0u64; members.len()];
    let mut credit = vec![0u64; members.len()];
    let mut filled = 0usize;
    'fill: loop {
        for (i, member) in members.iter().enumerate() {
            credit[i] += u64::from(member.weight);
            while credit[i] >= max_weight {
                credit[i] -= max_weight;
                let (offset, skip) = perms[i];
                // The next slot in this backend's permutation that is free.
                let slot = loop {
                    let c = ((offset + next[i] * skip) % size as u64) as usize;
                    next[i] += 1;
                    if ring[c] == NO_BACKEND {
                        break c;
                    }
                };
                ring[slot] = member.id;
                filled += 1;
                if filled == m {
                    break 'fill;
                }
            }
        }
    }
    ring
}

/// Median time to populate a `size`-slot ring for `n` backends (weights
/// 1..=4), and the median time to fill the same table round-robin (the floor
/// of touching every slot), over `runs` runs each. What `cargo bench` and
/// `cargo xtask bench` report.
pub fn measure_population(
    n: u32,
    size: u32,
    runs: usize,
) -> (std::time::Duration, std::time::Duration) {
    let backends: Vec<RingBackend> = (0..n)
        .map(|i| RingBackend {
            identity: vec![10, (i >> 16) as u8, (i >> 8) as u8, i as u8],
            weight: 1 + i % 4,
            id: i,
        })
        .collect();
    let median = |f: &dyn Fn() -> Vec<u32>| {
        let mut samples: Vec<std::time::Duration> = (0..runs.max(1))
            .map(|_| {
                let started = std::time::Instant::now();
                std::hint::black_box(f());
                started.elapsed()
            })
            .collect();
        samples.sort();
        samples[samples.len() / 2]
    };
    (
        median(&|| populate(&backends, size)),
        median(&|| (0..size).map(|s| s % n.max(1)).collect()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const M: u32 = 65537;

    fn backend(i: u32, weight: u32) -> RingBackend {
        RingBackend {
            identity: vec![198, 18, (i >> 8) as u8, i as u8],
            weight,
            id: i,
        }
    }

    fn shares(ring: &[u32], n: usize) -> Vec<usize> {
        let mut out = vec![0; n];
        for &id in ring {
            out[id as usize] += 1;
        }
        out
    }

    #[test]
    fn primes() {
        assert!(is_prime(65537) && is_prime(13) && is_prime(2));
        assert!(!is_prime(65536) && !is_prime(1) && !is_prime(0) && !is_prime(65535));
    }

    #[test]
    fn equal_weights_balance_within_one_percent() {
        for n in [3u32, 10, 100] {
            let backends: Vec<_> = (0..n).map(|i| backend(i, 1)).collect();
            let ring = populate(&backends, M);
            let fair = f64::from(M) / f64::from(n);
            for (i, &s) in shares(&ring, n as usize).iter().enumerate() {
                let off = (s as f64 - fair).abs() / fair;
                assert!(
                    off <= 0.01,
                    "n={n} backend {i}: {s} slots, fair {fair:.1} ({:.2}% off)",
                    off * 100.0
                );
            }
        }
    }

    #[test]
    fn weighted_shares_follow_weights_within_one_percent() {
        let weights = [1u32, 2, 3, 4, 10];
        let backends: Vec<_> = weights
            .iter()
            .enumerate()
            .map(|(i, &w)| backend(i as u32, w))
            .collect();
        let ring = populate(&backends, M);
        let total: u32 = weights.iter().sum();
        for (i, &s) in shares(&ring, weights.len()).iter().enumerate() {
            let want = f64::from(M) * f64::from(weights[i]) / f64::from(total);
            let off = (s as f64 - want).abs() / want;
            assert!(
                off <= 0.01,
                "backend {i} weight {}: {s} slots, want {want:.1}",
                weights[i]
            );
        }
    }

    #[test]
    fn identical_tables_whatever_the_order() {
        let mut backends: Vec<_> = (0..50).map(|i| backend(i, 1 + i % 3)).collect();
        let a = populate(&backends, M);
        backends.reverse();
        let b = populate(&backends, M);
        backends.swap(3, 17);
        let c = populate(&backends, M);
        assert_eq!(a, b);
        assert_eq!(a, c);
    }

    #[test]
    fn removing_one_of_n_moves_about_one_nth() {
        for n in [10u32, 100] {
            let backends: Vec<_> = (0..n).map(|i| backend(i, 1)).collect();
            let before = populate(&backends, M);
            let removed = n / 2;
            let after = populate(
                &backends
                    .iter()
                    .filter(|b| b.id != removed)
                    .cloned()
                    .collect::<Vec<_>>(),
                M,
            );
            let moved = before.iter().zip(&after).filter(|(a, b)| a != b).count();
            let collateral = before
                .iter()
                .zip(&after)
                .filter(|(a, b)| a != b && **a != removed)
                .count();
            let ideal = f64::from(M) / f64::from(n);
            println!(
                "n={n}: removing one backend moved {moved} slots (ideal {ideal:.0}); collateral {collateral} ({:.2}% of the table)",
                100.0 * collateral as f64 / f64::from(M)
            );
            assert!(after.iter().all(|&id| id != removed));
            // Every slot of the removed backend moves; others mostly stay.
            assert!(moved as f64 >= ideal * 0.99);
            assert!(
                (collateral as f64) < 0.02 * f64::from(M),
                "collateral {collateral}"
            );
        }
    }

    #[test]
    fn no_backends_means_no_backend_everywhere() {
        assert!(populate(&[], 13).iter().all(|&s| s == NO_BACKEND));
        assert!(populate(&[backend(0, 0)], 13)
            .iter()
            .all(|&s| s == NO_BACKEND));
        assert!(populate(&[backend(7, 5)], 13).iter().all(|&s| s == 7));
    }
}
