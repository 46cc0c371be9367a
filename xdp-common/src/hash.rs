//! The flow hash. The balancer uses it to pick a ring slot for a new flow and
//! to derive the outer source address; tests and tools use the same function
//! to predict which backend a flow lands on.
//!
//! It is MurmurHash3's 32-bit block mix and finaliser over the flow's words:
//! cheap in eBPF (no loops the verifier must bound, no tables) and well
//! distributed for Maglev slot selection.

use crate::{FlowKey, VIP_F_HASH, VIP_F_HASH_NO_SOURCE_PORT, VIP_F_HASH_SOURCE_PORT};

const SEED: u32 = 0x5bd1_e995;

#[inline(always)]
fn mix(h: u32, k: u32) -> u32 {
    let k = k
        .wrapping_mul(0xcc9e_2d51)
        .rotate_left(15)
        .wrapping_mul(0x1b87_3593);
    (h ^ k)
        .rotate_left(13)
        .wrapping_mul(5)
        .wrapping_add(0xe654_6b64)
}

#[inline(always)]
fn finish(mut h: u32, len: u32) -> u32 {
    h ^= len;
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

#[inline(always)]
fn word(b: &[u8; 16], i: usize) -> u32 {
    u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]])
}

#[inline(always)]
fn mix_addr(h: u32, a: &[u8; 16]) -> u32 {
    let h = mix(h, word(a, 0));
    let h = mix(h, word(a, 4));
    let h = mix(h, word(a, 8));
    mix(h, word(a, 12))
}

/// Hash of a flow in the client-to-VIP direction.
///
/// With `source_only` the hash covers the client address alone (per-VIP
/// client stickiness); otherwise the whole 5-tuple. The result depends only
/// on the key's bytes, so it is the same on every host and architecture.
#[inline(always)]
pub fn flow_hash(key: &FlowKey, source_only: bool) -> u32 {
    let h = mix_addr(SEED, &key.src);
    if source_only {
        return finish(h, 16);
    }
    rest(h, key, key.sport)
}

/// The 5-tuple hash after the source address, with `sport` for the
/// source port.
#[inline(always)]
fn rest(h: u32, key: &FlowKey, sport: u16) -> u32 {
    let h = mix_addr(h, &key.dst);
    let s = sport.to_ne_bytes();
    let d = key.dport.to_ne_bytes();
    let h = mix(h, u32::from_le_bytes([s[0], s[1], d[0], d[1]]));
    let h = mix(h, u32::from(key.proto) | (u32::from(key.family) << 8));
    finish(h, 40)
}

/// The hash that picks a flow's ring slot for a VIP with `VipMeta::flags`
/// `flags`: over the fields its `VIP_F_HASH` bits choose; `full`, the
/// flow's [`flow_hash`] over the 5-tuple, when they choose none.
#[inline(always)]
pub fn ring_hash(key: &FlowKey, flags: u32, full: u32) -> u32 {
    let h = mix_addr(SEED, &key.src);
    match flags & VIP_F_HASH {
        0 => full,
        VIP_F_HASH_SOURCE_PORT => finish(mix(h, u32::from(key.sport)), 20),
        VIP_F_HASH_NO_SOURCE_PORT => rest(h, key, 0),
        // VIP_F_SOURCE_HASH, and any combination (never written).
        _ => finish(h, 16),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(src_last: u8, sport: u16) -> FlowKey {
        let mut k = FlowKey {
            sport: sport.to_be(),
            dport: 80u16.to_be(),
            proto: crate::PROTO_TCP,
            family: crate::FAMILY_V4,
            ..FlowKey::default()
        };
        k.src[..4].copy_from_slice(&[198, 18, 1, src_last]);
        k.dst[..4].copy_from_slice(&[198, 18, 0, 10]);
        k
    }

    #[test]
    fn hash_is_stable() {
        // Pinned values: a change here changes every LB node's backend choice,
        // so it must be deliberate (and rolled out to all nodes at once).
        assert_eq!(flow_hash(&key(1, 40000), false), 0x9582_3223);
        assert_eq!(flow_hash(&key(1, 40000), true), 0xfd48_871e);
    }

    #[test]
    fn source_only_ignores_ports_and_destination() {
        let a = key(7, 1000);
        let mut b = key(7, 2000);
        b.dst[3] = 99;
        assert_eq!(flow_hash(&a, true), flow_hash(&b, true));
        assert_ne!(flow_hash(&a, false), flow_hash(&b, false));
    }

    #[test]
    fn ring_hash_covers_the_chosen_fields() {
        let a = key(7, 1000);
        let full = |k: &FlowKey| flow_hash(k, false);
        // Another source port, then another destination.
        let mut port = key(7, 2000);
        let mut dst = key(7, 1000);
        dst.dst[3] = 99;
        let same =
            |flags, b: &FlowKey| ring_hash(&a, flags, full(&a)) == ring_hash(b, flags, full(b));
        assert!(!same(0, &port) && !same(0, &dst));
        assert!(same(crate::VIP_F_SOURCE_HASH, &port) && same(crate::VIP_F_SOURCE_HASH, &dst));
        assert!(!same(VIP_F_HASH_SOURCE_PORT, &port) && same(VIP_F_HASH_SOURCE_PORT, &dst));
        assert!(same(VIP_F_HASH_NO_SOURCE_PORT, &port) && !same(VIP_F_HASH_NO_SOURCE_PORT, &dst));
        // The 5-tuple choice is the flow hash itself; source-only is the
        // old source hash, so pinned rings keep their placements.
        assert_eq!(ring_hash(&a, 0, full(&a)), full(&a));
        assert_eq!(
            ring_hash(&a, crate::VIP_F_SOURCE_HASH, 0),
            flow_hash(&a, true)
        );
        port.sport = a.sport;
        assert!(same(VIP_F_HASH_SOURCE_PORT, &port));
    }

    #[test]
    fn ports_spread_over_slots() {
        // 10,000 source ports over 101 slots: every slot is hit, none is
        // more than twice its fair share.
        let mut slots = [0u32; 101];
        for port in 0..10_000u16 {
            slots[(flow_hash(&key(1, port), false) % 101) as usize] += 1;
        }
        let fair = 10_000 / 101;
        assert!(slots.iter().all(|&n| n > 0 && n < 2 * fair), "{slots:?}");
    }
}
