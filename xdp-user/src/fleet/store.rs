//! The etcd side of a fleet: connect with the `[fleet]` options, read the
//! prefix at one revision, and write VIPs with a compare-and-swap on the
//! revision the writer read.

use std::time::Duration;

use anyhow::{anyhow, bail, Context as _, Result};
use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, GetOptions, Identity, TlsOptions, Txn,
    TxnOp,
};

use super::keys::{self, Desired, Entry};
use crate::config::{Fleet, Vip};

/// The desired state changed in the store after the writer read it.
#[derive(Debug)]
pub struct ChangedSinceRead {
    pub read: i64,
}

impl std::fmt::Display for ChangedSinceRead {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the fleet's VIPs changed since you read them (at etcd revision {}); nothing was written: \
             read them again and retry",
            self.read
        )
    }
}

impl std::error::Error for ChangedSinceRead {}

fn read_file(path: &std::path::Path, what: &str) -> Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("reading fleet.{what} {}", path.display()))
}

/// Connect to the fleet's store. Requests time out after `timeout_ms`, and
/// a store that stops answering is noticed within about twice that.
pub async fn connect(fleet: &Fleet) -> Result<Client> {
    let timeout = Duration::from_millis(fleet.timeout_ms);
    let mut options = ConnectOptions::new()
        .with_connect_timeout(timeout)
        .with_timeout(timeout)
        .with_keep_alive(timeout, timeout)
        .with_keep_alive_while_idle(true)
        .with_require_leader(true);
    if fleet.ca.is_some() || fleet.cert.is_some() {
        let mut tls = TlsOptions::new();
        if let Some(ca) = &fleet.ca {
            tls = tls.ca_certificate(Certificate::from_pem(read_file(ca, "ca")?));
        }
        if let (Some(cert), Some(key)) = (&fleet.cert, &fleet.key) {
            tls = tls.identity(Identity::from_pem(
                read_file(cert, "cert")?,
                read_file(key, "key")?,
            ));
        }
        options = options.with_tls(tls);
    }
    if let (Some(user), Some(file)) = (&fleet.user, &fleet.password_file) {
        let password = String::from_utf8(read_file(file, "password_file")?)
            .map_err(|_| anyhow!("fleet.password_file {} is not text", file.display()))?;
        options = options.with_user(user.clone(), password.trim_end_matches('\n'));
    }
    // One member at a time, each tried until one answers a quorum read:
    // a client balanced over all of them keeps sending to a dead one.
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = fleet.endpoints.len();
    let first = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mut errors = Vec::new();
    for i in 0..n {
        let endpoint = &fleet.endpoints[(first + i) % n];
        let attempt = async {
            let mut client = Client::connect([endpoint], Some(options.clone())).await?;
            client
                .get(
                    format!("{}/", fleet.prefix),
                    Some(
                        GetOptions::new()
                            .with_prefix()
                            .with_keys_only()
                            .with_limit(1),
                    ),
                )
                .await?;
            Ok::<_, etcd_client::Error>(client)
        };
        match tokio::time::timeout(timeout * 2, attempt).await {
            Ok(Ok(client)) => return Ok(client),
            Ok(Err(e)) => errors.push(format!("{endpoint}: {e}")),
            Err(_) => errors.push(format!("{endpoint}: no answer within {:?}", timeout * 2)),
        }
    }
    bail!("no etcd member answered: {}", errors.join("; "))
}

/// Every key under the prefix, at the store's current revision.
pub async fn read_all(client: &mut Client, prefix: &str) -> Result<(i64, Vec<Entry>)> {
    let response = client
        .get(format!("{prefix}/"), Some(GetOptions::new().with_prefix()))
        .await
        .with_context(|| format!("reading {prefix}/ from etcd"))?;
    let revision = response
        .header()
        .map(|h| h.revision())
        .ok_or_else(|| anyhow!("etcd answered without a revision"))?;
    Ok((revision, response.kvs().iter().map(entry).collect()))
}

/// One key as the store holds it.
pub fn entry(kv: &etcd_client::KeyValue) -> Entry {
    Entry {
        key: String::from_utf8_lossy(kv.key()).into_owned(),
        value: kv.value().to_vec(),
        mod_revision: kv.mod_revision(),
    }
}

/// Replace the fleet's VIPs as read in `base` with `vips`, in one
/// transaction that applies only if no VIP changed since `base` was read
/// ([`ChangedSinceRead`] otherwise, writing nothing). Returns the revision
/// written (None: nothing to write).
pub async fn write_vips(
    client: &mut Client,
    prefix: &str,
    base: &Desired,
    vips: &[Vip],
) -> Result<Option<i64>> {
    let mut compares = vec![
        // No VIP key was written after the read (a range compare: every
        // key under vips/ must be older).
        Compare::mod_revision(
            keys::vips_prefix(prefix),
            CompareOp::Less,
            base.revision + 1,
        )
        .with_prefix(),
    ];
    let mut ops = Vec::new();
    for vip in vips {
        let old = base.vips.iter().find(|v| v.name == vip.name);
        if old == Some(vip) {
            continue;
        }
        let key = keys::vip_key(prefix, &vip.name);
        // The key as read: it existed then and was not since deleted, or
        // it did not.
        compares.push(match base.mod_revisions.get(&vip.name) {
            Some(&rev) => Compare::mod_revision(key.clone(), CompareOp::Equal, rev),
            None => Compare::version(key.clone(), CompareOp::Equal, 0),
        });
        ops.push(TxnOp::put(key, keys::vip_value(vip)?, None));
    }
    // Every VIP key read, readable or not, that `vips` does not name.
    let read = base
        .vips
        .iter()
        .map(|v| v.name.as_str())
        .chain(base.mod_revisions.keys().map(String::as_str))
        .collect::<std::collections::BTreeSet<_>>();
    for name in read {
        if vips.iter().all(|v| v.name != name) {
            let key = keys::vip_key(prefix, name);
            if let Some(&rev) = base.mod_revisions.get(name) {
                compares.push(Compare::mod_revision(key.clone(), CompareOp::Equal, rev));
            }
            ops.push(TxnOp::delete(key, None));
        }
    }
    if ops.is_empty() {
        return Ok(None);
    }
    let response = client
        .txn(Txn::new().when(compares).and_then(ops))
        .await
        .context("writing to etcd")?;
    if !response.succeeded() {
        bail!(ChangedSinceRead {
            read: base.revision
        });
    }
    Ok(response.header().map(|h| h.revision()))
}
