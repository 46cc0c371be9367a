use super::*;

fn backend(last: u8, vip_id: u32, state: u32) -> Backend {
    Backend {
        addr: addr_bytes(IpAddr::from([198, 18, 1, last])).0,
        family: u32::from(FAMILY_V4),
        state,
        vip_id,
        ..Backend::default()
    }
}

#[test]
fn a_slot_changes_generation_only_when_it_changes_backend() {
    use xdp_common::backend_state::*;
    let at = |generation, b: Backend| Backend { generation, ..b };
    let one = at(7, backend(1, 0, UP));
    // The same backend keeps it: drain, down, a new MAC.
    for next in [
        backend(1, 0, DRAINING),
        backend(1, 0, DOWN),
        Backend {
            mac: [2, 0, 0, 0, 0, 9],
            ..backend(1, 0, UP)
        },
    ] {
        assert_eq!(generation_after(&one, &next), 7);
    }
    // Freed: the slot keeps the last generation...
    assert_eq!(generation_after(&one, &Backend::default()), 7);
    // ...and whatever takes it next, even the same address, is new.
    let freed = at(7, Backend::default());
    assert_eq!(generation_after(&freed, &backend(1, 0, UP)), 8);
    // Another address, or another VIP, in place of a live one: new.
    assert_eq!(generation_after(&one, &backend(2, 0, UP)), 8);
    assert_eq!(generation_after(&one, &backend(1, 1, UP)), 8);
    assert_eq!(
        generation_after(&at(u32::MAX, backend(1, 0, UP)), &backend(2, 0, UP)),
        0
    );
}
