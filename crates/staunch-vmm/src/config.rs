//! VM configuration: from command-line options or a TOML/JSON file.

use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {err}")]
    Read { path: String, err: std::io::Error },
    #[error("config file {path}: {msg}")]
    Parse { path: String, msg: String },
    #[error("invalid disk spec '{0}': expected PATH, PATH,ro or vhost-user=SOCKET")]
    Disk(String),
    #[error("invalid net spec '{0}': expected vhost-user=SOCKET[,mac=MAC]")]
    Net(String),
    #[error("invalid MAC address '{0}': six hex bytes like 52:54:00:12:34:56, not a multicast address")]
    Mac(String),
    #[error("invalid serial spec '{0}': expected stdio, null, file:PATH or unix:PATH")]
    Serial(String),
    #[error("--mem {0} MiB: must be between 16 and 1048576")]
    Mem(u64),
    #[error("--vcpus {0}: must be between 1 and {1}")]
    Vcpus(u8, u8),
    #[error("no kernel given (--kernel PATH or `kernel` in the config file)")]
    NoKernel,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskConfig {
    pub path: PathBuf,
    #[serde(default)]
    pub read_only: bool,
    /// `path` is a vhost-user-blk backend's socket, not a file.
    #[serde(default)]
    pub vhost_user: bool,
}

impl DiskConfig {
    pub fn parse(spec: &str) -> Result<Self, ConfigError> {
        if let Some(sock) = spec.strip_prefix("vhost-user=") {
            if sock.is_empty() || sock.contains(',') {
                return Err(ConfigError::Disk(spec.into()));
            }
            return Ok(DiskConfig { path: sock.into(), read_only: false, vhost_user: true });
        }
        let mut parts = spec.split(',');
        let path = parts.next().filter(|p| !p.is_empty()).ok_or_else(|| ConfigError::Disk(spec.into()))?;
        let mut read_only = false;
        for opt in parts {
            match opt {
                "ro" => read_only = true,
                "rw" => read_only = false,
                _ => return Err(ConfigError::Disk(spec.into())),
            }
        }
        Ok(DiskConfig { path: path.into(), read_only, vhost_user: false })
    }
}

/// A virtio-net device whose queues a vhost-user-net backend (`staunch
/// net`) serves; the VMM keeps its configuration (the MAC, a link that is
/// always up).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetConfig {
    pub socket: PathBuf,
    /// `aa:bb:cc:dd:ee:ff`; none: a locally administered address derived
    /// from the socket path (stable across restarts of the VMM).
    #[serde(default)]
    pub mac: Option<String>,
}

impl NetConfig {
    pub fn parse(spec: &str) -> Result<Self, ConfigError> {
        let bad = || ConfigError::Net(spec.into());
        let mut parts = spec.split(',');
        let sock =
            parts.next().and_then(|p| p.strip_prefix("vhost-user=")).filter(|p| !p.is_empty()).ok_or_else(bad)?;
        let mut mac = None;
        for opt in parts {
            match opt.split_once('=') {
                Some(("mac", m)) => {
                    parse_mac(m)?;
                    mac = Some(m.to_string());
                }
                _ => return Err(bad()),
            }
        }
        Ok(NetConfig { socket: sock.into(), mac })
    }

    /// The device's MAC address.
    pub fn mac(&self) -> Result<[u8; 6], ConfigError> {
        match &self.mac {
            Some(m) => parse_mac(m),
            None => {
                // FNV-1a of the path: the same VM gets the same address.
                let mut h: u32 = 0x811c_9dc5;
                for b in self.socket.as_os_str().as_encoded_bytes() {
                    h = (h ^ *b as u32).wrapping_mul(0x0100_0193);
                }
                let [a, b, c, d] = h.to_be_bytes();
                Ok([0x02, 0x53, a, b, c, d])
            }
        }
    }
}

pub fn parse_mac(s: &str) -> Result<[u8; 6], ConfigError> {
    let bad = || ConfigError::Mac(s.into());
    let mut out = [0u8; 6];
    let mut parts = s.split(':');
    for b in &mut out {
        let p = parts.next().filter(|p| p.len() == 2).ok_or_else(bad)?;
        *b = u8::from_str_radix(p, 16).map_err(|_| bad())?;
    }
    if parts.next().is_some() || out[0] & 1 != 0 {
        return Err(bad());
    }
    Ok(out)
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum SerialConfig {
    #[default]
    Stdio,
    Null,
    File(PathBuf),
    Unix(PathBuf),
}

impl SerialConfig {
    pub fn parse(spec: &str) -> Result<Self, ConfigError> {
        match spec.split_once(':') {
            None if spec == "stdio" => Ok(SerialConfig::Stdio),
            None if spec == "null" => Ok(SerialConfig::Null),
            Some(("file", p)) if !p.is_empty() => Ok(SerialConfig::File(p.into())),
            Some(("unix", p)) if !p.is_empty() => Ok(SerialConfig::Unix(p.into())),
            _ => Err(ConfigError::Serial(spec.into())),
        }
    }
}

fn default_mem() -> u64 {
    256
}
fn default_vcpus() -> u8 {
    1
}
fn default_kvm() -> String {
    "/dev/kvm".into()
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    pub kernel: PathBuf,
    #[serde(default)]
    pub initrd: Option<PathBuf>,
    #[serde(default)]
    pub cmdline: String,
    #[serde(default = "default_mem")]
    pub mem_mib: u64,
    #[serde(default = "default_vcpus")]
    pub vcpus: u8,
    #[serde(default)]
    pub disks: Vec<DiskConfig>,
    /// After the disks on the virtio-mmio bus.
    #[serde(default)]
    pub nets: Vec<NetConfig>,
    #[serde(default)]
    pub serial: SerialConfig,
    /// The KVM device node (tests point it elsewhere to check the error).
    #[serde(default = "default_kvm")]
    pub kvm_device: String,
    /// Control socket (JSON lines): pause, resume, status, upgrade, ...
    #[serde(default)]
    pub api_socket: Option<PathBuf>,
    /// Append structured events (JSON lines) here.
    #[serde(default)]
    pub events: Option<PathBuf>,
    /// A handler busy this long (ms) is hung: escalate to crash re-exec.
    #[serde(default)]
    pub hang_ms: Option<u64>,
    /// Keep a prepared successor process ready (its VM and memory slots
    /// built), so a crash or an upgrade hands the guest over in ~2 ms
    /// instead of rebuilding the VM inside the pause.
    #[serde(default = "default_spare")]
    pub spare: bool,
}

fn default_spare() -> bool {
    true
}

impl VmConfig {
    pub fn new(kernel: impl Into<PathBuf>) -> Self {
        VmConfig {
            kernel: kernel.into(),
            initrd: None,
            cmdline: String::new(),
            mem_mib: default_mem(),
            vcpus: default_vcpus(),
            disks: Vec::new(),
            nets: Vec::new(),
            serial: SerialConfig::default(),
            kvm_device: default_kvm(),
            api_socket: None,
            events: None,
            hang_ms: None,
            spare: true,
        }
    }

    /// Read a TOML (`.toml`) or JSON (anything else) config file.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let p = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|err| ConfigError::Read { path: p.clone(), err })?;
        let parsed = if path.extension().is_some_and(|e| e == "toml") {
            toml::from_str(&text).map_err(|e| e.to_string())
        } else {
            serde_json::from_str(&text).map_err(|e| e.to_string())
        };
        parsed.map_err(|msg| ConfigError::Parse { path: p, msg })
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.kernel.as_os_str().is_empty() {
            return Err(ConfigError::NoKernel);
        }
        if !(16..=1 << 20).contains(&self.mem_mib) {
            return Err(ConfigError::Mem(self.mem_mib));
        }
        let max = staunch_kvm::vm::MAX_VCPUS;
        if self.vcpus == 0 || self.vcpus > max {
            return Err(ConfigError::Vcpus(self.vcpus, max));
        }
        for n in &self.nets {
            n.mac()?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs() {
        assert_eq!(
            DiskConfig::parse("a.img,ro").unwrap(),
            DiskConfig { path: "a.img".into(), read_only: true, vhost_user: false }
        );
        assert!(DiskConfig::parse("vhost-user=/run/b.sock").unwrap().vhost_user);
        assert!(DiskConfig::parse("vhost-user=").is_err());
        assert!(DiskConfig::parse(",ro").is_err());
        assert!(DiskConfig::parse("a,rx").is_err());
        assert_eq!(SerialConfig::parse("file:/x").unwrap(), SerialConfig::File("/x".into()));
        assert!(SerialConfig::parse("tcp:1").is_err());
        assert!(SerialConfig::parse("file:").is_err());
        let n = NetConfig::parse("vhost-user=/run/n.sock,mac=52:54:00:ab:cd:ef").unwrap();
        assert_eq!(n.mac().unwrap(), [0x52, 0x54, 0, 0xab, 0xcd, 0xef]);
        let d = NetConfig::parse("vhost-user=/run/n.sock").unwrap().mac().unwrap();
        assert_eq!(d, NetConfig::parse("vhost-user=/run/n.sock").unwrap().mac().unwrap());
        assert_eq!(d[0] & 3, 2, "locally administered, unicast");
        for bad in [
            "/run/n.sock",
            "vhost-user=",
            "vhost-user=/s,mac=01:00:5e:00:00:01",
            "vhost-user=/s,mac=52:54",
            "vhost-user=/s,mac=52:54:00:12:34:5g",
            "vhost-user=/s,queues=2",
        ] {
            assert!(NetConfig::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn toml_and_unknown_fields() {
        let c: VmConfig =
            toml::from_str("kernel = \"k\"\nvcpus = 2\n[[disks]]\npath = \"d\"\nread_only = true\n").unwrap();
        assert_eq!(c.vcpus, 2);
        assert!(c.disks[0].read_only);
        assert!(toml::from_str::<VmConfig>("kernel = \"k\"\nbogus = 1\n").is_err());
        let j: VmConfig = serde_json::from_str(r#"{"kernel":"k","serial":{"file":"/tmp/s"}}"#).unwrap();
        assert_eq!(j.serial, SerialConfig::File("/tmp/s".into()));
    }
}
