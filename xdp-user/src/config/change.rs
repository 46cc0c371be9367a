//! An operator's change to the desired state, in two forms that must agree:
//! applied to a [`Config`] (pure), and edited into the config file's TOML
//! document, touching only what changes so comments and layout stay.

use std::net::IpAddr;

use anyhow::{anyhow, bail, Context as _, Result};
use toml_edit::{ArrayOfTables, DocumentMut, Item, Table, Value};

use super::{BackendConfig, Config, InitialState, Vip, MAX_WEIGHT};

#[derive(Clone, Debug, PartialEq)]
pub enum Change {
    VipAdd(Vip),
    VipDel(String),
    BackendAdd(String, BackendConfig),
    BackendDel(String, IpAddr),
    /// Drain (true) or undrain (false).
    BackendDrain(String, IpAddr, bool),
    BackendWeight(String, IpAddr, u32),
}

fn find_vip<'a>(c: &'a mut Config, name: &str) -> Result<&'a mut Vip> {
    c.vips
        .iter_mut()
        .find(|v| v.name == name)
        .ok_or_else(|| anyhow!("no VIP named {name:?}"))
}

fn find_backend(vip: &mut Vip, address: IpAddr) -> Result<&mut BackendConfig> {
    let name = vip.name.clone();
    vip.backends
        .iter_mut()
        .find(|b| b.address == address)
        .ok_or_else(|| anyhow!("VIP {name:?} has no backend {address}"))
}

impl Change {
    /// The config this change asks for (validated by the caller), or why it
    /// makes no sense. `current` is never touched.
    pub fn apply_to(&self, current: &Config) -> Result<Config> {
        let mut c = current.clone();
        match self {
            Self::VipAdd(vip) => {
                if current.vip(&vip.name).is_some() {
                    bail!("a VIP named {:?} already exists", vip.name);
                }
                c.vips.push(vip.clone());
            }
            Self::VipDel(name) => {
                find_vip(&mut c, name)?;
                c.vips.retain(|v| &v.name != name);
            }
            Self::BackendAdd(vip, backend) => {
                let v = find_vip(&mut c, vip)?;
                if v.backends.iter().any(|b| b.address == backend.address) {
                    bail!("VIP {vip:?} already has backend {}", backend.address);
                }
                v.backends.push(backend.clone());
            }
            Self::BackendDel(vip, address) => {
                let v = find_vip(&mut c, vip)?;
                find_backend(v, *address)?;
                v.backends.retain(|b| b.address != *address);
            }
            Self::BackendDrain(vip, address, drain) => {
                let b = find_backend(find_vip(&mut c, vip)?, *address)?;
                // Undrain puts a draining or down backend back in service.
                b.state = if *drain {
                    InitialState::Drain
                } else {
                    InitialState::Up
                };
            }
            Self::BackendWeight(vip, address, weight) => {
                if *weight > MAX_WEIGHT {
                    bail!("weight {weight} out of range 0..={MAX_WEIGHT}");
                }
                find_backend(find_vip(&mut c, vip)?, *address)?.weight = *weight;
            }
        }
        Ok(c)
    }

    /// Make the same change in the file's document.
    pub fn edit(&self, doc: &mut DocumentMut) -> Result<()> {
        match self {
            Self::VipAdd(vip) => {
                let table = to_table(vip)?;
                let vips = doc
                    .entry("vip")
                    .or_insert(Item::ArrayOfTables(ArrayOfTables::new()));
                vips.as_array_of_tables_mut()
                    .ok_or_else(|| not_tables("vip"))?
                    .push(table);
            }
            Self::VipDel(name) => {
                let vips = vip_tables(doc)?;
                let i = vip_index(vips, name)?;
                vips.remove(i);
                if vips.is_empty() {
                    doc.remove("vip");
                }
            }
            Self::BackendAdd(vip, backend) => {
                let table = to_table(backend)?;
                let v = vip_table(doc, vip)?;
                match v
                    .entry("backend")
                    .or_insert(Item::ArrayOfTables(ArrayOfTables::new()))
                {
                    Item::ArrayOfTables(a) => a.push(table),
                    Item::Value(Value::Array(a)) => a.push(table.into_inline_table()),
                    _ => return Err(not_tables("vip.backend")),
                }
            }
            Self::BackendDel(vip, address) => {
                let v = vip_table(doc, vip)?;
                let empty = match v.get_mut("backend") {
                    Some(Item::ArrayOfTables(a)) => {
                        let i = (0..a.len())
                            .find(|&i| {
                                a.get(i)
                                    .is_some_and(|t| is_address(t.get("address"), *address))
                            })
                            .ok_or_else(|| missing_backend(vip, *address))?;
                        a.remove(i);
                        a.is_empty()
                    }
                    Some(Item::Value(Value::Array(a))) => {
                        let i = a
                            .iter()
                            .position(|t| {
                                t.as_inline_table()
                                    .and_then(|t| t.get("address"))
                                    .and_then(Value::as_str)
                                    .and_then(|s| s.parse::<IpAddr>().ok())
                                    == Some(*address)
                            })
                            .ok_or_else(|| missing_backend(vip, *address))?;
                        a.remove(i);
                        a.is_empty()
                    }
                    _ => return Err(missing_backend(vip, *address)),
                };
                if empty {
                    v.remove("backend");
                }
            }
            Self::BackendDrain(vip, address, drain) => {
                let state = if *drain { "drain" } else { "up" };
                with_backend(doc, vip, *address, |b| {
                    let draining = b.get("state").and_then(|s| s.as_str()) == Some("drain");
                    if *drain || draining {
                        set_kept(b, "state", Value::from(state));
                    }
                })?;
            }
            Self::BackendWeight(vip, address, weight) => {
                with_backend(doc, vip, *address, |b| {
                    set_kept(b, "weight", Value::from(i64::from(*weight)))
                })?;
            }
        }
        Ok(())
    }
}

fn not_tables(key: &str) -> anyhow::Error {
    anyhow!(
        "`{key}` in the config file is not written as [[{key}]] tables: make this change by \
         hand and run `xdplb reload`"
    )
}

fn missing_backend(vip: &str, address: IpAddr) -> anyhow::Error {
    anyhow!("the config file has no backend {address} under VIP {vip:?}")
}

fn to_table<T: serde::Serialize>(value: &T) -> Result<Table> {
    let doc = toml_edit::ser::to_document(value).context("serialising the change")?;
    Ok(doc.as_table().clone())
}

fn vip_tables(doc: &mut DocumentMut) -> Result<&mut ArrayOfTables> {
    doc.get_mut("vip")
        .and_then(Item::as_array_of_tables_mut)
        .ok_or_else(|| not_tables("vip"))
}

fn vip_index(vips: &ArrayOfTables, name: &str) -> Result<usize> {
    (0..vips.len())
        .find(|&i| {
            vips.get(i)
                .and_then(|t| t.get("name"))
                .and_then(Item::as_str)
                == Some(name)
        })
        .ok_or_else(|| anyhow!("the config file has no VIP named {name:?}"))
}

fn vip_table<'a>(doc: &'a mut DocumentMut, name: &str) -> Result<&'a mut Table> {
    let vips = vip_tables(doc)?;
    let i = vip_index(vips, name)?;
    vips.get_mut(i)
        .ok_or_else(|| anyhow!("VIP {name:?} vanished"))
}

fn is_address(item: Option<&Item>, address: IpAddr) -> bool {
    item.and_then(Item::as_str)
        .and_then(|s| s.parse::<IpAddr>().ok())
        == Some(address)
}

/// Run `f` on the backend table (or inline table) of `address` in `vip`.
fn with_backend(
    doc: &mut DocumentMut,
    vip: &str,
    address: IpAddr,
    f: impl FnOnce(&mut dyn toml_edit::TableLike),
) -> Result<()> {
    let v = vip_table(doc, vip)?;
    match v.get_mut("backend") {
        Some(Item::ArrayOfTables(a)) => {
            let t = a
                .iter_mut()
                .find(|t| is_address(t.get("address"), address))
                .ok_or_else(|| missing_backend(vip, address))?;
            f(t);
        }
        Some(Item::Value(Value::Array(a))) => {
            let t = a
                .iter_mut()
                .filter_map(Value::as_inline_table_mut)
                .find(|t| {
                    t.get("address")
                        .and_then(Value::as_str)
                        .and_then(|s| s.parse::<IpAddr>().ok())
                        == Some(address)
                })
                .ok_or_else(|| missing_backend(vip, address))?;
            f(t);
        }
        _ => return Err(missing_backend(vip, address)),
    }
    Ok(())
}

/// Set `key` to `value`, keeping the comment and spacing around the old one.
fn set_kept(table: &mut dyn toml_edit::TableLike, key: &str, mut value: Value) {
    if let Some(old) = table.get(key).and_then(Item::as_value) {
        *value.decor_mut() = old.decor().clone();
    }
    table.insert(key, Item::Value(value));
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = r#"# the operator's notes
interface = "eth0"   # uplink

[forwarding]
gateway_mac = "02:00:00:00:00:fe"

# web tier
[[vip]]
name = "web"
address = "198.18.0.10"
port = 80
protocol = "tcp"
forwarding = "ipip"

[[vip.backend]]
address = "198.18.1.1"   # rack 1
weight = 100             # full share

[[vip.backend]]
address = "198.18.1.2"
"#;

    fn round(change: Change) -> String {
        let c = Config::parse(FILE).unwrap();
        let want = change.apply_to(&c).unwrap();
        let mut doc: DocumentMut = FILE.parse().unwrap();
        change.edit(&mut doc).unwrap();
        let text = doc.to_string();
        assert_eq!(Config::parse(&text).unwrap(), want, "{text}");
        text
    }

    #[test]
    fn edits_keep_comments_and_say_what_the_change_says() {
        let a: IpAddr = "198.18.1.1".parse().unwrap();
        let t = round(Change::BackendWeight("web".into(), a, 7));
        assert!(t.contains("weight = 7             # full share"), "{t}");
        assert!(t.starts_with("# the operator's notes\ninterface = \"eth0\"   # uplink"));
        assert!(t.contains("# web tier"));
        let t = round(Change::BackendDrain("web".into(), a, true));
        assert!(t.contains("state = \"drain\""), "{t}");
        let t = round(Change::BackendDel("web".into(), a));
        assert!(!t.contains("198.18.1.1") && t.contains("# web tier"), "{t}");
        let t = round(Change::BackendAdd(
            "web".into(),
            BackendConfig {
                address: "198.18.1.3".parse().unwrap(),
                weight: 5,
                mac: None,
                state: InitialState::Up,
                server_id: None,
            },
        ));
        assert!(t.contains("# rack 1") && t.contains("198.18.1.3"), "{t}");
        let mut vip = Config::parse(FILE).unwrap().vips[0].clone();
        vip.name = "web2".into();
        vip.port = Some(8080);
        let t = round(Change::VipAdd(vip));
        assert!(
            t.contains("name = \"web2\"") && t.contains("# rack 1"),
            "{t}"
        );
        let t = round(Change::VipDel("web".into()));
        assert!(
            t.contains("# the operator's notes") && !t.contains("198.18.1.1"),
            "{t}"
        );
    }
}
