//! The fleet's verdict on a backend, from the verdicts of the hosts that
//! judge it: pure, so every host computes the same one from the same
//! inputs.

use crate::config::HealthRule;

/// The fleet's verdict (true: up) from this host's own verdict (None: it
/// has none, e.g. its checks have not run yet or cannot run here) and the
/// live peers'. None when no host judges the backend.
///
/// - `any`: up while any host sees it up; it leaves the ring only when
///   every host's checks fail. A backend whose checks are blocked from some
///   hosts stays in every ring, so flows that change hosts keep it.
/// - `majority`: up while at least half of the hosts see it up.
pub fn fleet_verdict(
    rule: HealthRule,
    own: Option<bool>,
    peers: impl IntoIterator<Item = bool>,
) -> Option<bool> {
    let (mut up, mut down) = (0u32, 0u32);
    for v in own.into_iter().chain(peers) {
        if v {
            up += 1;
        } else {
            down += 1;
        }
    }
    if up + down == 0 {
        return None;
    }
    Some(match rule {
        HealthRule::Any => up > 0,
        HealthRule::Majority => up >= down,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules() {
        use HealthRule::*;
        let t = true;
        let f = false;
        for (rule, own, peers, want) in [
            (Any, None, vec![], None),
            (Any, Some(t), vec![], Some(t)),
            (Any, Some(f), vec![], Some(f)),
            (Any, None, vec![f, t], Some(t)),
            // The partial partition: checks blocked from two of three.
            (Any, Some(f), vec![f, t], Some(t)),
            (Any, Some(f), vec![f, f], Some(f)),
            (Majority, Some(f), vec![f, t], Some(f)),
            (Majority, Some(t), vec![f], Some(t)),
            (Majority, Some(t), vec![f, f], Some(f)),
            (Majority, None, vec![t, t, f], Some(t)),
        ] {
            assert_eq!(
                fleet_verdict(rule, own, peers.clone()),
                want,
                "{rule:?} {own:?} {peers:?}"
            );
        }
    }
}
