//! QUIC_SERVERS: the server ids of QUIC VIPs' backends.

use std::collections::BTreeMap;

use anyhow::{Context as _, Result};
use aya::maps::HashMap;
use xdp_common::{map_names as names, QuicServerKey};

use super::Dataplane;

impl Dataplane {
    /// Every server id entry: (VIP id, server id) -> backend id.
    pub fn quic_servers(&self) -> Result<BTreeMap<QuicServerKey, u32>> {
        let map: HashMap<_, QuicServerKey, u32> =
            HashMap::try_from(self.map(names::QUIC_SERVERS)?)?;
        map.iter()
            .map(|e| e.context("reading QUIC_SERVERS"))
            .collect()
    }

    /// Bring QUIC_SERVERS to `want`. With `removals_only`, only remove the
    /// entries `want` lacks or maps elsewhere: done before backend ids are
    /// freed, so no server id ever names the backend that reuses an id.
    pub fn sync_quic_servers(
        &mut self,
        want: &BTreeMap<QuicServerKey, u32>,
        removals_only: bool,
    ) -> Result<()> {
        let have = self.quic_servers()?;
        let mut map: HashMap<_, QuicServerKey, u32> =
            HashMap::try_from(self.map_mut(names::QUIC_SERVERS)?)?;
        let what = |key: &QuicServerKey| {
            format!("QUIC server id {} of VIP id {}", key.server_id, key.vip_id)
        };
        super::sync_entries(
            &mut map,
            (&have, want),
            removals_only,
            |map, key| {
                map.remove(key)
                    .with_context(|| format!("removing {}", what(key)))
            },
            |map, key, id| {
                map.insert(key, id, 0)
                    .with_context(|| format!("writing {}", what(key)))
            },
        )
    }
}
