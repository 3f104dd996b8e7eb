//! A VM's definition: what the operator wants to run. It lives in the store
//! under `/staunch/vm/<name>/`, one key per field (documented in
//! docs/host.md), is written by `staunch vm define` from a TOML file, and is
//! checked again by the supervisor, because anyone with store access can
//! write keys. Every error names the key it is about.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::PathBuf;

pub const VM_ROOT: &str = "/staunch/vm";
/// The supervisor's view of each VM (actual state), apart from the
/// definitions so that writing it never triggers the definitions' watch.
pub const STATUS_ROOT: &str = "/staunch/host/vm";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{key}: {msg}")]
pub struct DefError {
    pub key: String,
    pub msg: String,
}

fn err(key: impl Into<String>, msg: impl Into<String>) -> DefError {
    DefError { key: key.into(), msg: msg.into() }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Desired {
    #[default]
    Running,
    Stopped,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum OnPoweroff {
    /// The VM stays stopped (its desired state becomes `stopped`).
    #[default]
    Stop,
    /// The supervisor boots it again.
    Restart,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskDef {
    pub path: PathBuf,
    #[serde(default)]
    pub readonly: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NicDef {
    /// The tap device `staunch net` attaches to (created if missing).
    pub tap: String,
    #[serde(default)]
    pub mac: Option<String>,
    /// The network namespace the tap lives in.
    #[serde(default)]
    pub netns: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmDef {
    pub kernel: PathBuf,
    #[serde(default)]
    pub cmdline: String,
    /// MiB.
    #[serde(default = "d_mem")]
    pub memory: u64,
    #[serde(default = "d_vcpus")]
    pub vcpus: u8,
    #[serde(default)]
    pub disk: Vec<DiskDef>,
    #[serde(default)]
    pub nic: Vec<NicDef>,
    #[serde(default)]
    pub on_poweroff: OnPoweroff,
    #[serde(default)]
    pub state: Desired,
    /// Start the VMM from this snapshot file instead of the kernel (its
    /// first boot only: a restart after that is a cold boot from the disks,
    /// since the disks have moved on from the snapshot).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restore: Option<PathBuf>,
}

fn d_mem() -> u64 {
    256
}
fn d_vcpus() -> u8 {
    1
}

/// Every defined VM with its definition, or what is wrong with it.
pub type Definitions = BTreeMap<String, Result<VmDef, DefError>>;

pub fn check_name(name: &str) -> Result<(), DefError> {
    let ok = !name.is_empty()
        && name.len() <= 32
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
    if ok { Ok(()) } else { Err(err("name", format!("'{name}': 1 to 32 of a-z, 0-9, '-', '_'"))) }
}

fn host_mem_mib() -> u64 {
    let t = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let kib = t.lines().find_map(|l| l.strip_prefix("MemTotal:")).and_then(|v| v.split_whitespace().next());
    kib.and_then(|v| v.parse::<u64>().ok()).map_or(u64::MAX, |k| k / 1024)
}

impl VmDef {
    /// From `staunch vm define`'s TOML file.
    pub fn from_toml(text: &str) -> Result<VmDef, DefError> {
        toml::from_str(text).map_err(|e| {
            let msg = e.message().to_string();
            // toml names the unknown field in its message; the span names
            // the table for other errors.
            err("definition", msg)
        })
    }

    /// What can be checked on this host without the other VMs.
    pub fn validate(&self) -> Result<(), DefError> {
        if self.kernel.as_os_str().is_empty() {
            return Err(err("kernel", "missing"));
        }
        if !self.kernel.is_file() {
            return Err(err("kernel", format!("{} is not a file", self.kernel.display())));
        }
        let host = host_mem_mib();
        if self.memory < 16 || self.memory > host {
            return Err(err("memory", format!("{} MiB: must be 16 MiB to the host's {host} MiB", self.memory)));
        }
        if self.vcpus == 0 || self.vcpus > 64 {
            return Err(err("vcpus", format!("{}: must be 1 to 64", self.vcpus)));
        }
        if let Some(r) = self.restore.as_ref().filter(|r| !r.is_file()) {
            return Err(err("restore", format!("{} is not a file", r.display())));
        }
        for (i, d) in self.disk.iter().enumerate() {
            if !d.path.is_file() {
                return Err(err(format!("disk/{i}/path"), format!("{} is not a file", d.path.display())));
            }
        }
        for (i, n) in self.nic.iter().enumerate() {
            let ok = !n.tap.is_empty() && n.tap.len() < 16 && !n.tap.contains(['/', ' ', '\0']);
            if !ok {
                return Err(err(format!("nic/{i}/tap"), format!("'{}' is not an interface name", n.tap)));
            }
            if let Some(m) = &n.mac {
                staunch_vmm::NetConfig::parse(&format!("vhost-user=/x,mac={m}"))
                    .map_err(|e| err(format!("nic/{i}/mac"), e.to_string()))?;
            }
        }
        Ok(())
    }

    /// The definition as store keys (relative to `/staunch/vm/<name>/`).
    pub fn to_keys(&self) -> BTreeMap<String, String> {
        let mut m = BTreeMap::new();
        m.insert("kernel".into(), self.kernel.display().to_string());
        m.insert("cmdline".into(), self.cmdline.clone());
        m.insert("memory".into(), self.memory.to_string());
        m.insert("vcpus".into(), self.vcpus.to_string());
        m.insert("on_poweroff".into(), word(&self.on_poweroff));
        m.insert("state".into(), word(&self.state));
        if let Some(r) = &self.restore {
            m.insert("restore".into(), r.display().to_string());
        }
        for (i, d) in self.disk.iter().enumerate() {
            m.insert(format!("disk/{i}/path"), d.path.display().to_string());
            m.insert(format!("disk/{i}/readonly"), d.readonly.to_string());
        }
        for (i, n) in self.nic.iter().enumerate() {
            m.insert(format!("nic/{i}/tap"), n.tap.clone());
            if let Some(mac) = &n.mac {
                m.insert(format!("nic/{i}/mac"), mac.clone());
            }
            if let Some(ns) = &n.netns {
                m.insert(format!("nic/{i}/netns"), ns.clone());
            }
        }
        m
    }

    /// Back from store keys; an unknown or malformed key is named.
    pub fn from_keys(keys: &BTreeMap<String, String>) -> Result<VmDef, DefError> {
        let get = |k: &str| keys.get(k).map(String::as_str);
        let num = |k: &'static str, default: u64| -> Result<u64, DefError> {
            get(k).map_or(Ok(default), |v| v.trim().parse().map_err(|_| err(k, format!("'{v}' is not a number"))))
        };
        let mut d = VmDef {
            kernel: get("kernel").ok_or_else(|| err("kernel", "missing"))?.into(),
            cmdline: get("cmdline").unwrap_or("").into(),
            memory: num("memory", d_mem())?,
            vcpus: u8::try_from(num("vcpus", 1)?).map_err(|_| err("vcpus", "must be 1 to 64"))?,
            disk: Vec::new(),
            nic: Vec::new(),
            on_poweroff: enum_key(get("on_poweroff"), "on_poweroff")?.unwrap_or_default(),
            state: enum_key(get("state"), "state")?.unwrap_or_default(),
            restore: get("restore").filter(|r| !r.is_empty()).map(PathBuf::from),
        };
        let mut disks: BTreeMap<usize, (Option<String>, bool)> = BTreeMap::new();
        let mut nics: BTreeMap<usize, NicDef> = BTreeMap::new();
        for (k, v) in keys {
            let parts: Vec<&str> = k.split('/').collect();
            match parts.as_slice() {
                ["kernel" | "cmdline" | "memory" | "vcpus" | "on_poweroff" | "state" | "restore"] => {}
                // Directory nodes of the layout carry no value.
                ["disk" | "nic"] | ["disk" | "nic", _] if v.is_empty() => {}
                ["disk", i, field] => {
                    let i = index(i, k)?;
                    let e = disks.entry(i).or_default();
                    match *field {
                        "path" => e.0 = Some(v.clone()),
                        "readonly" => e.1 = v.parse().map_err(|_| err(k.as_str(), "must be true or false"))?,
                        _ => return Err(err(k.as_str(), "unknown key")),
                    }
                }
                ["nic", i, field] => {
                    let i = index(i, k)?;
                    let e = nics.entry(i).or_insert(NicDef { tap: String::new(), mac: None, netns: None });
                    match *field {
                        "tap" => e.tap = v.clone(),
                        "mac" => e.mac = Some(v.clone()),
                        "netns" => e.netns = Some(v.clone()),
                        _ => return Err(err(k.as_str(), "unknown key")),
                    }
                }
                _ => return Err(err(k.as_str(), "unknown key")),
            }
        }
        for (n, (i, (path, readonly))) in disks.into_iter().enumerate() {
            if i != n {
                return Err(err(format!("disk/{n}"), "missing (disks are numbered from 0 without gaps)"));
            }
            let path = path.ok_or_else(|| err(format!("disk/{i}/path"), "missing"))?;
            d.disk.push(DiskDef { path: path.into(), readonly });
        }
        for (n, (i, nic)) in nics.into_iter().enumerate() {
            if i != n {
                return Err(err(format!("nic/{n}"), "missing (NICs are numbered from 0 without gaps)"));
            }
            if nic.tap.is_empty() {
                return Err(err(format!("nic/{i}/tap"), "missing"));
            }
            d.nic.push(nic);
        }
        Ok(d)
    }
}

fn word<T: Serialize>(v: &T) -> String {
    serde_json::to_value(v).ok().and_then(|v| v.as_str().map(String::from)).unwrap_or_default()
}

fn enum_key<T: for<'de> Deserialize<'de>>(v: Option<&str>, key: &str) -> Result<Option<T>, DefError> {
    v.map(|v| {
        serde_json::from_value(serde_json::Value::String(v.trim().into()))
            .map_err(|_| err(key, format!("'{v}' is not allowed")))
    })
    .transpose()
}

fn index(i: &str, key: &str) -> Result<usize, DefError> {
    i.parse().ok().filter(|n| *n < 64).ok_or_else(|| err(key, "index must be a number below 64"))
}

/// Checks across VMs: two VMs on one disk (the one that does not run yet,
/// or the later name, gets the error).
pub fn check_shared_disks(
    defs: &BTreeMap<String, VmDef>,
    running: &dyn Fn(&str) -> bool,
) -> BTreeMap<String, DefError> {
    let mut owner: BTreeMap<PathBuf, &str> = BTreeMap::new();
    let mut errors = BTreeMap::new();
    let mut order: Vec<&String> = defs.keys().collect();
    order.sort_by_key(|n| (!running(n), n.as_str()));
    for name in order {
        for (i, d) in defs[name].disk.iter().enumerate() {
            let p = std::fs::canonicalize(&d.path).unwrap_or_else(|_| d.path.clone());
            if let Some(other) = owner.get(&p) {
                if *other != name.as_str() {
                    errors.insert(
                        name.clone(),
                        err(format!("disk/{i}/path"), format!("{} is VM {other}'s disk", p.display())),
                    );
                }
            } else {
                owner.insert(p, name);
            }
        }
    }
    errors
}

#[cfg(test)]
mod tests {
    use super::*;

    fn def() -> VmDef {
        VmDef::from_toml("kernel = \"/bin/sh\"\nmemory = 64\n[[disk]]\npath = \"/bin/ls\"\n[[nic]]\ntap = \"tap0\"\nmac = \"52:54:00:00:00:01\"\n").unwrap()
    }

    #[test]
    fn keys_round_trip() {
        let d = def();
        d.validate().unwrap();
        assert_eq!(VmDef::from_keys(&d.to_keys()).unwrap(), d);
    }

    #[test]
    fn bad_definitions_name_the_key() {
        let e = VmDef::from_toml("kernel = \"/bin/sh\"\nmemroy = 3").unwrap_err();
        assert!(e.msg.contains("unknown field `memroy`"), "{e}");
        assert!(VmDef::from_toml("cmdline = \"x\"").unwrap_err().msg.contains("kernel"));
        let mut d = def();
        d.memory = 1 << 40;
        assert_eq!(d.validate().unwrap_err().key, "memory");
        let mut d = def();
        d.kernel = "/nonexistent".into();
        assert_eq!(d.validate().unwrap_err().key, "kernel");
        let mut d = def();
        d.disk[0].path = "/nonexistent".into();
        assert_eq!(d.validate().unwrap_err().key, "disk/0/path");
        let mut k = def().to_keys();
        k.insert("colour".into(), "red".into());
        assert_eq!(VmDef::from_keys(&k).unwrap_err().key, "colour");
        let mut k = def().to_keys();
        k.insert("vcpus".into(), "many".into());
        assert_eq!(VmDef::from_keys(&k).unwrap_err().key, "vcpus");
        let mut k = def().to_keys();
        k.insert("state".into(), "flying".into());
        assert_eq!(VmDef::from_keys(&k).unwrap_err().key, "state");
        let mut k = def().to_keys();
        k.insert("disk/2/path".into(), "/bin/ls".into());
        assert_eq!(VmDef::from_keys(&k).unwrap_err().key, "disk/1");
        let mut k = def().to_keys();
        k.remove("kernel");
        assert_eq!(VmDef::from_keys(&k).unwrap_err().key, "kernel");
        assert!(check_name("Bad/Name").is_err());
    }

    #[test]
    fn two_vms_on_one_disk() {
        let mut defs = BTreeMap::new();
        defs.insert("a".to_string(), def());
        defs.insert("b".to_string(), def());
        let e = check_shared_disks(&defs, &|_| false);
        assert_eq!(e.keys().collect::<Vec<_>>(), ["b"]);
        let e = check_shared_disks(&defs, &|n| n == "b");
        assert_eq!(e.keys().collect::<Vec<_>>(), ["a"]);
    }
}
