//! SOURCE_ROUTES: client prefixes of VIPs with backend subsets.

use std::{collections::BTreeMap, net::IpAddr};

use anyhow::{Context as _, Result};
use aya::maps::{lpm_trie::Key, LpmTrie};
use xdp_common::{map_names as names, source_route_len, SourcePrefix, VipKey};

use super::{addr_bytes, sweep::routes_in, Dataplane};

/// A source route: (VIP id, client prefix address, prefix length).
pub type SourceRoute = (u32, IpAddr, u8);

/// A route as the trie holds it: (VIP id, address bytes, client bits).
pub type Held = (u32, [u8; 16], u32);

fn trie_key((vip_id, addr, bits): Held) -> Key<SourcePrefix> {
    Key::new(
        source_route_len(bits),
        SourcePrefix {
            vip_id: vip_id.to_be_bytes(),
            addr,
        },
    )
}

impl Dataplane {
    /// Every source route, as (VIP id, address bytes, prefix bits), and the
    /// VIPS key of the subset it goes to.
    pub fn source_routes(&self) -> Result<BTreeMap<Held, VipKey>> {
        Ok(routes_in(self.map(names::SOURCE_ROUTES)?)?
            .into_iter()
            .map(|r| ((r.vip_id, r.addr, r.bits), r.subset))
            .collect())
    }

    /// Bring SOURCE_ROUTES to `want`. With `removals_only`, only remove
    /// the routes `want` lacks or sends elsewhere: before the subsets they
    /// name go away.
    pub fn sync_source_routes(
        &mut self,
        want: &BTreeMap<SourceRoute, VipKey>,
        removals_only: bool,
    ) -> Result<()> {
        let have = self.source_routes()?;
        let want: BTreeMap<Held, VipKey> = want
            .iter()
            .map(|(&(vip_id, addr, len), subset)| {
                ((vip_id, addr_bytes(addr).0, u32::from(len)), *subset)
            })
            .collect();
        let mut trie: LpmTrie<_, SourcePrefix, VipKey> =
            LpmTrie::try_from(self.map_mut(names::SOURCE_ROUTES)?)?;
        super::sync_entries(
            &mut trie,
            (&have, &want),
            removals_only,
            |trie, &route| {
                trie.remove(&trie_key(route))
                    .with_context(|| format!("removing a source route of VIP id {}", route.0))
            },
            |trie, &route, subset| {
                trie.insert(&trie_key(route), subset, 0)
                    .with_context(|| format!("writing a source route of VIP id {}", route.0))
            },
        )
    }
}
