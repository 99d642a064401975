//! The emulator's seed: the projects, homes, devices, project keys and users it starts with,
//! loaded from a `.toml`/`.json` file or built in code, and validated before use. It must not
//! hold run-time state (that is `state.rs`) and its `Debug` output must never show an API key.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

use anyhow::Context as _;
use serde::{Deserialize, Serialize};

use super::state;

/// Initial content of the emulated MODE project. Load it with [`Seed::from_file`] (`.toml` or
/// `.json`) or build it in code. See `docs/emulator.md` for the file format.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Seed {
    /// MODE project ID reported in `GET /auth`, device and home objects. Default 1.
    #[serde(default = "default_project_id")]
    pub project_id: u64,
    /// Homes (`[[home]]`).
    #[serde(default, alias = "homes")]
    pub home: Vec<SeedHome>,
    /// Devices (`[[device]]`).
    #[serde(default, alias = "devices")]
    pub device: Vec<SeedDevice>,
    /// Project API keys (`[[project_key]]`).
    #[serde(default, alias = "project_keys")]
    pub project_key: Vec<SeedProjectKey>,
    /// User session keys (`[[user]]`).
    #[serde(default, alias = "users")]
    pub user: Vec<SeedUser>,
}

fn default_project_id() -> u64 {
    1
}

impl Default for Seed {
    fn default() -> Self {
        Seed {
            project_id: 1,
            home: Vec::new(),
            device: Vec::new(),
            project_key: Vec::new(),
            user: Vec::new(),
        }
    }
}

/// A home of the project.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SeedHome {
    pub id: u64,
    #[serde(default)]
    pub name: String,
    /// Starts deactivated. Default false.
    #[serde(default)]
    pub deactivated: bool,
}

/// A device instance with its API key.
#[derive(Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SeedDevice {
    pub id: u64,
    pub api_key: String,
    /// The home the device belongs to, if any.
    #[serde(default)]
    pub home_id: Option<u64>,
    /// Default `device-{id}`.
    #[serde(default)]
    pub name: Option<String>,
    /// Free text, default "".
    #[serde(default)]
    pub tag: Option<String>,
    /// Default "generic".
    #[serde(default)]
    pub device_class: Option<String>,
    /// Initial device key-value store (each item bumps the store's rev by one).
    #[serde(default)]
    pub kv: BTreeMap<String, serde_json::Value>,
}

impl fmt::Debug for SeedDevice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SeedDevice")
            .field("id", &self.id)
            .field("api_key", &"<redacted>")
            .field("home_id", &self.home_id)
            .field("name", &self.name)
            .field("tag", &self.tag)
            .field("device_class", &self.device_class)
            .field("kv_items", &self.kv.len())
            .finish()
    }
}

/// Permission of a project API key beyond reading (which every project key has).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Permission {
    /// Read only; every project key has it, listing it changes nothing.
    Read,
    /// Admin tasks: may `PATCH /homes/{id}` (name and `deactivated`).
    Admin,
    /// May send commands (`PUT /devices/{id}/command`).
    Commands,
    /// May write device key-value stores.
    KvWrite,
}

/// A project API key.
#[derive(Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SeedProjectKey {
    pub key: String,
    #[serde(default)]
    pub permissions: Vec<Permission>,
}

impl fmt::Debug for SeedProjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SeedProjectKey")
            .field("key", &"<redacted>")
            .field("permissions", &self.permissions)
            .finish()
    }
}

/// A user session key, member of some homes.
#[derive(Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SeedUser {
    pub key: String,
    /// User ID reported by `GET /auth`; default: position in the list, starting at 1.
    #[serde(default)]
    pub id: Option<u64>,
    #[serde(default)]
    pub home_ids: Vec<u64>,
}

impl fmt::Debug for SeedUser {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SeedUser")
            .field("key", &"<redacted>")
            .field("id", &self.id)
            .field("home_ids", &self.home_ids)
            .finish()
    }
}

impl Seed {
    /// Reads a seed file; the format follows the extension (`.toml` or `.json`).
    pub fn from_file(path: impl AsRef<Path>) -> anyhow::Result<Seed> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading seed file {}", path.display()))?;
        let ext = path
            .extension()
            .and_then(|e| e.to_str())
            .map(|e| e.to_ascii_lowercase());
        let seed: Seed = match ext.as_deref() {
            Some("toml") => toml::from_str(&text)
                .with_context(|| format!("parsing TOML seed {}", path.display()))?,
            Some("json") => serde_json::from_str(&text)
                .with_context(|| format!("parsing JSON seed {}", path.display()))?,
            _ => anyhow::bail!("seed file {} must end in .toml or .json", path.display()),
        };
        seed.validate()
            .with_context(|| format!("invalid seed {}", path.display()))?;
        Ok(seed)
    }

    /// Checks references and uniqueness (IDs, keys, kv key names).
    pub fn validate(&self) -> anyhow::Result<()> {
        let mut homes = std::collections::HashSet::new();
        for h in &self.home {
            anyhow::ensure!(homes.insert(h.id), "home {} is listed twice", h.id);
        }
        let mut keys = std::collections::HashSet::new();
        let mut devices = std::collections::HashSet::new();
        for d in &self.device {
            anyhow::ensure!(devices.insert(d.id), "device {} is listed twice", d.id);
            anyhow::ensure!(
                !d.api_key.is_empty(),
                "device {} has an empty api_key",
                d.id
            );
            anyhow::ensure!(
                keys.insert(d.api_key.as_str()),
                "device {}: its api_key is used more than once",
                d.id
            );
            if let Some(h) = d.home_id {
                anyhow::ensure!(homes.contains(&h), "device {}: unknown home_id {h}", d.id);
            }
            for k in d.kv.keys() {
                anyhow::ensure!(
                    state::valid_kv_key(k),
                    "device {}: invalid kv key {k:?}",
                    d.id
                );
            }
        }
        for (i, p) in self.project_key.iter().enumerate() {
            anyhow::ensure!(!p.key.is_empty(), "project_key #{} is empty", i + 1);
            anyhow::ensure!(
                keys.insert(p.key.as_str()),
                "project_key #{}: key is used more than once",
                i + 1
            );
        }
        for (i, u) in self.user.iter().enumerate() {
            anyhow::ensure!(!u.key.is_empty(), "user #{}: key is empty", i + 1);
            anyhow::ensure!(
                keys.insert(u.key.as_str()),
                "user #{}: key is used more than once",
                i + 1
            );
            for h in &u.home_ids {
                anyhow::ensure!(homes.contains(h), "user #{}: unknown home {h}", i + 1);
            }
        }
        Ok(())
    }
}
