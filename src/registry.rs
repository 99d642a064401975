//! The device table: who each local device is locally and in MODE.
//!
//! Maps a local name or a MODE device ID to a [`DeviceId`] (an index into the table), checks
//! local credentials, and answers "is this topic one of this device's own topics". A config
//! reload ([`Registry::reconcile`]) keeps the ID of every unchanged device, appends new and
//! changed ones and retires removed ones (their slot stays, so an ID never points at another
//! device); [`SharedRegistry`] hands the current table to the parts that must see new devices.
//! It holds secrets but never prints them. It must not know about sockets, SQL or MODE's wire
//! format.

use crate::config::{Config, DeviceConfig, Secret};
use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use tokio::sync::watch;

pub use crate::local::{DeviceId, ModeId, TopicKind};

#[derive(Debug, Clone)]
pub struct Device {
    pub id: DeviceId,
    pub name: String,
    pub mode_id: ModeId,
    pub home_id: Option<u64>,
    pub api_key: Secret,
    pub local_password: Option<Secret>,
    /// `mode_id` as text, for topic matching without allocating.
    pub mode_id_str: String,
}

impl Device {
    fn new(id: DeviceId, d: &DeviceConfig) -> Device {
        Device {
            id,
            name: d.name.clone(),
            mode_id: d.mode_id,
            home_id: d.home_id,
            api_key: d.key().clone(),
            local_password: d.local_password.clone(),
            mode_id_str: d.mode_id.to_string(),
        }
    }

    /// Same identity, home and credentials (a reload keeps such a device's sessions).
    fn same_as(&self, d: &DeviceConfig) -> bool {
        self.name == d.name
            && self.mode_id == d.mode_id
            && self.home_id == d.home_id
            && &self.api_key == d.key()
            && self.local_password == d.local_password
    }
}

#[derive(Debug)]
pub struct Registry {
    /// Every slot ever used, live or retired; `DeviceId` indexes it.
    devices: Vec<Device>,
    live: Vec<bool>,
    by_name: HashMap<String, DeviceId>,
    by_mode_id: HashMap<ModeId, DeviceId>,
}

/// What [`Registry::reconcile`] changed, by slot.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Changes {
    /// New slots: devices added, or changed (a changed device gets a new slot).
    pub added: Vec<DeviceId>,
    /// Slots retired: devices removed, or the old slot of a changed device.
    pub retired: Vec<DeviceId>,
}

impl Changes {
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.retired.is_empty()
    }
}

impl Registry {
    pub fn from_config(cfg: &Config) -> Registry {
        let devices: Vec<Device> = cfg
            .devices
            .iter()
            .enumerate()
            .map(|(id, d)| Device::new(DeviceId(id), d))
            .collect();
        Registry::with_slots(devices, vec![true; cfg.devices.len()])
    }

    fn with_slots(devices: Vec<Device>, live: Vec<bool>) -> Registry {
        let alive = || devices.iter().filter(|d| live[d.id]);
        let by_name = alive().map(|d| (d.name.clone(), d.id)).collect();
        let by_mode_id = alive().map(|d| (d.mode_id, d.id)).collect();
        Registry {
            devices,
            live,
            by_name,
            by_mode_id,
        }
    }

    /// The table for `cfg`, keeping the slot of every device that did not change (same name,
    /// MODE ID, home and credentials). A changed device is retired and appended anew, so
    /// whatever held its old slot (sessions, local connections) is stopped, not reused.
    pub fn reconcile(&self, cfg: &Config) -> (Registry, Changes) {
        let mut devices = self.devices.clone();
        let mut live = vec![false; devices.len()];
        let mut changes = Changes::default();
        for d in &cfg.devices {
            match self.by_name.get(&d.name) {
                Some(&id) if self.devices[id].same_as(d) => live[id] = true,
                _ => {
                    let id = DeviceId(devices.len());
                    devices.push(Device::new(id, d));
                    live.push(true);
                    changes.added.push(id);
                }
            }
        }
        changes.retired = (0..self.devices.len())
            .filter(|&id| self.live[id] && !live[id])
            .map(DeviceId)
            .collect();
        // A retired slot keeps its name and MODE ID (for logs and stale messages), not its
        // secrets.
        for &id in &changes.retired {
            devices[id].api_key = Secret::new("");
            devices[id].local_password = None;
        }
        (Registry::with_slots(devices, live), changes)
    }

    /// Number of slots, live or retired: every `DeviceId` is below it.
    pub fn len(&self) -> usize {
        self.devices.len()
    }

    pub fn is_empty(&self) -> bool {
        self.devices.is_empty()
    }

    /// Whether the slot holds a configured device (not one removed or changed by a reload).
    pub fn is_live(&self, id: DeviceId) -> bool {
        self.live.get(id.index()).copied().unwrap_or(false)
    }

    /// Configured devices.
    pub fn live_count(&self) -> usize {
        self.by_name.len()
    }

    /// The device in a slot, live or retired.
    pub fn get(&self, id: DeviceId) -> &Device {
        &self.devices[id]
    }

    /// The configured (live) devices, in slot order.
    pub fn iter(&self) -> impl Iterator<Item = &Device> {
        self.devices.iter().filter(|d| self.live[d.id])
    }

    pub fn by_mode_id(&self, mode_id: ModeId) -> Option<&Device> {
        self.by_mode_id.get(&mode_id).map(|&i| &self.devices[i])
    }

    /// A device named by its local name or its decimal MODE ID.
    pub fn lookup(&self, name_or_id: &str) -> Option<&Device> {
        if let Some(&i) = self.by_name.get(name_or_id) {
            return Some(&self.devices[i]);
        }
        name_or_id
            .parse::<ModeId>()
            .ok()
            .and_then(|id| self.by_mode_id(id))
    }

    /// Local MQTT login: `MODE id + API key` or `local name + local_password`.
    pub fn authenticate(&self, username: &str, password: &[u8]) -> Option<DeviceId> {
        if let Some(&i) = self.by_name.get(username) {
            let d = &self.devices[i];
            return match &d.local_password {
                Some(p) if p.matches(password) => Some(i),
                _ => None,
            };
        }
        let d = self.by_mode_id(username.parse().ok()?)?;
        d.api_key.matches(password).then_some(d.id)
    }

    /// Splits `/devices/{x}/rest` into the device it names and what the topic is for.
    /// Returns `None` for topics outside `/devices/`.
    pub fn parse_topic<'t>(
        &self,
        topic: &'t str,
    ) -> Option<(Option<DeviceId>, &'t str, TopicKind)> {
        let rest = topic.strip_prefix("/devices/")?;
        let (who, sub) = rest.split_once('/')?;
        let kind = match sub {
            "event" => TopicKind::Event,
            "kv" => TopicKind::Kv,
            "command" => TopicKind::Command,
            _ => TopicKind::Other,
        };
        Some((self.lookup(who).map(|d| d.id), who, kind))
    }

    /// True when `topic` (or a subscription filter) lies in `dev`'s own `/devices/{x}/` space,
    /// with `{x}` its name or MODE ID and no wildcard reaching outside it.
    pub fn owns_topic(&self, dev: DeviceId, topic: &str) -> bool {
        let Some(rest) = topic.strip_prefix("/devices/") else {
            return false;
        };
        let Some((who, sub)) = rest.split_once('/') else {
            return false;
        };
        let d = &self.devices[dev];
        (who == d.name || who == d.mode_id_str) && !sub.is_empty()
    }
}

/// The current [`Registry`], replaced whole on a reload. Readers take a cheap snapshot
/// (`load`); `changed` wakes whoever must react to a reload (local connections of removed
/// devices are closed that way).
#[derive(Debug)]
pub struct SharedRegistry {
    current: RwLock<Arc<Registry>>,
    generation: watch::Sender<u64>,
}

impl SharedRegistry {
    pub fn new(registry: Registry) -> Arc<SharedRegistry> {
        Arc::new(SharedRegistry {
            current: RwLock::new(Arc::new(registry)),
            generation: watch::channel(0).0,
        })
    }

    /// The table in force now.
    pub fn load(&self) -> Arc<Registry> {
        self.current.read().expect("registry lock").clone()
    }

    /// Puts `registry` in force and wakes the watchers.
    pub fn store(&self, registry: Arc<Registry>) {
        *self.current.write().expect("registry lock") = registry;
        self.generation.send_modify(|g| *g += 1);
    }

    /// Changes each time a new table is put in force.
    pub fn changed(&self) -> watch::Receiver<u64> {
        self.generation.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    const PORCH: &str =
        "[[device]]\nname = \"porch\"\nmode_id = 11\napi_key = \"k11\"\nlocal_password = \"pw\"\n";

    fn reg() -> Registry {
        let text =
            format!("{PORCH}[[device]]\nname = \"garage\"\nmode_id = 12\napi_key = \"k12\"\n");
        Registry::from_config(&Config::parse(&text, Path::new(".")).unwrap())
    }

    #[test]
    fn authenticates_both_ways() {
        let r = reg();
        assert_eq!(r.authenticate("11", b"k11"), Some(DeviceId(0)));
        assert_eq!(r.authenticate("porch", b"pw"), Some(DeviceId(0)));
        assert_eq!(r.authenticate("porch", b"k11"), None);
        assert_eq!(r.authenticate("12", b"k11"), None);
        assert_eq!(r.authenticate("garage", b""), None, "no local password set");
        assert_eq!(r.authenticate("99", b"k11"), None);
    }

    #[test]
    fn reconcile_keeps_unchanged_slots_and_never_reuses_one() {
        let r = reg();
        let text = format!(
            "{PORCH}{}",
            r#"[[device]]
name = "garage"
mode_id = 12
api_key = "new key"
[[device]]
name = "shed"
mode_id = 13
api_key = "k13"
"#
        );
        let cfg = Config::parse(&text, Path::new(".")).unwrap();
        let (n, ch) = r.reconcile(&cfg);
        // porch unchanged keeps 0; garage changed: slot 1 retired, new slot 2; shed new: 3.
        assert_eq!(ch.retired, vec![DeviceId(1)]);
        assert_eq!(ch.added, vec![DeviceId(2), DeviceId(3)]);
        assert_eq!(n.lookup("porch").unwrap().id, DeviceId(0));
        assert_eq!(n.lookup("garage").unwrap().id, DeviceId(2));
        assert_eq!(n.lookup("12").unwrap().id, DeviceId(2));
        assert_eq!(n.lookup("shed").unwrap().id, DeviceId(3));
        assert!(!n.is_live(DeviceId(1)) && n.is_live(DeviceId(2)));
        assert_eq!(n.get(DeviceId(1)).mode_id, ModeId(12), "retired slot kept");
        assert_eq!(
            n.get(DeviceId(1)).api_key,
            Secret::new(""),
            "without its key"
        );
        assert_eq!(n.len(), 4);
        assert_eq!(n.live_count(), 3);
        assert_eq!(
            n.iter().map(|d| d.id).collect::<Vec<_>>(),
            vec![DeviceId(0), DeviceId(2), DeviceId(3)],
            "iter skips retired slots"
        );
        assert_eq!(
            n.authenticate("12", b"k12"),
            None,
            "old key no longer logs in"
        );
        assert_eq!(n.authenticate("12", b"new key"), Some(DeviceId(2)));

        // Removing a device retires it; reconciling the same config again changes nothing.
        let only_shed = "[[device]]\nname = \"shed\"\nmode_id = 13\napi_key = \"k13\"\n";
        let (m, ch) = n.reconcile(&Config::parse(only_shed, Path::new(".")).unwrap());
        assert_eq!(ch.retired, vec![DeviceId(0), DeviceId(2)]);
        assert!(ch.added.is_empty());
        assert_eq!(m.live_count(), 1);
        assert_eq!(m.lookup("shed").unwrap().id, DeviceId(3));
        assert_eq!(m.authenticate("porch", b"pw"), None);
        let (_, ch) = n.reconcile(&cfg);
        assert!(ch.is_empty(), "{ch:?}");
    }

    #[test]
    fn topics_belong_to_their_device_only() {
        let r = reg();
        assert!(r.owns_topic(DeviceId(0), "/devices/11/event"));
        assert!(r.owns_topic(DeviceId(0), "/devices/porch/command"));
        assert!(r.owns_topic(DeviceId(0), "/devices/porch/#"));
        assert!(!r.owns_topic(DeviceId(0), "/devices/12/event"));
        assert!(!r.owns_topic(DeviceId(0), "/devices/+/event"));
        assert!(!r.owns_topic(DeviceId(0), "/devices/#"));
        assert!(!r.owns_topic(DeviceId(0), "#"));
        assert_eq!(
            r.parse_topic("/devices/garage/event"),
            Some((Some(DeviceId(1)), "garage", TopicKind::Event))
        );
    }
}
