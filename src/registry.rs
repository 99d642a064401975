//! The device table: who each local device is locally and in MODE.
//!
//! Maps a local name or a MODE device ID to a [`DeviceId`] (an index into the table), checks
//! local credentials, and answers "is this topic one of this device's own topics". It holds
//! secrets but never prints them. It must not know about sockets, SQL or MODE's wire format.

use crate::config::{Config, Secret};
use std::collections::HashMap;

/// Index of a device in the registry (stable for the life of one `Registry`).
pub type DeviceId = usize;

#[derive(Debug, Clone)]
pub struct Device {
    pub id: DeviceId,
    pub name: String,
    pub mode_id: u64,
    pub home_id: Option<u64>,
    pub api_key: Secret,
    pub local_password: Option<Secret>,
    /// `mode_id` as text, for topic matching without allocating.
    pub mode_id_str: String,
}

/// What a topic under `/devices/{x}/...` is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TopicKind {
    Event,
    Kv,
    Command,
    /// Any other sub-topic of the device's own namespace.
    Other,
}

#[derive(Debug)]
pub struct Registry {
    devices: Vec<Device>,
    by_name: HashMap<String, DeviceId>,
    by_mode_id: HashMap<u64, DeviceId>,
}

impl Registry {
    pub fn from_config(cfg: &Config) -> Registry {
        let devices: Vec<Device> = cfg
            .devices
            .iter()
            .enumerate()
            .map(|(id, d)| Device {
                id,
                name: d.name.clone(),
                mode_id: d.mode_id,
                home_id: d.home_id,
                api_key: d.key().clone(),
                local_password: d.local_password.clone(),
                mode_id_str: d.mode_id.to_string(),
            })
            .collect();
        let by_name = devices.iter().map(|d| (d.name.clone(), d.id)).collect();
        let by_mode_id = devices.iter().map(|d| (d.mode_id, d.id)).collect();
        Registry {
            devices,
            by_name,
            by_mode_id,
        }
    }

    pub fn len(&self) -> usize {
        self.devices.len()
    }

    pub fn is_empty(&self) -> bool {
        self.devices.is_empty()
    }

    pub fn get(&self, id: DeviceId) -> &Device {
        &self.devices[id]
    }

    pub fn iter(&self) -> impl Iterator<Item = &Device> {
        self.devices.iter()
    }

    pub fn by_mode_id(&self, mode_id: u64) -> Option<&Device> {
        self.by_mode_id.get(&mode_id).map(|&i| &self.devices[i])
    }

    /// A device named by its local name or its decimal MODE ID.
    pub fn lookup(&self, name_or_id: &str) -> Option<&Device> {
        if let Some(&i) = self.by_name.get(name_or_id) {
            return Some(&self.devices[i]);
        }
        name_or_id
            .parse::<u64>()
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn reg() -> Registry {
        let cfg = Config::parse(
            r#"
[[device]]
name = "porch"
mode_id = 11
api_key = "k11"
local_password = "pw"
[[device]]
name = "garage"
mode_id = 12
api_key = "k12"
"#,
            Path::new("."),
        )
        .unwrap();
        Registry::from_config(&cfg)
    }

    #[test]
    fn authenticates_both_ways() {
        let r = reg();
        assert_eq!(r.authenticate("11", b"k11"), Some(0));
        assert_eq!(r.authenticate("porch", b"pw"), Some(0));
        assert_eq!(r.authenticate("porch", b"k11"), None);
        assert_eq!(r.authenticate("12", b"k11"), None);
        assert_eq!(r.authenticate("garage", b""), None, "no local password set");
        assert_eq!(r.authenticate("99", b"k11"), None);
    }

    #[test]
    fn topics_belong_to_their_device_only() {
        let r = reg();
        assert!(r.owns_topic(0, "/devices/11/event"));
        assert!(r.owns_topic(0, "/devices/porch/command"));
        assert!(r.owns_topic(0, "/devices/porch/#"));
        assert!(!r.owns_topic(0, "/devices/12/event"));
        assert!(!r.owns_topic(0, "/devices/+/event"));
        assert!(!r.owns_topic(0, "/devices/#"));
        assert!(!r.owns_topic(0, "#"));
        assert_eq!(
            r.parse_topic("/devices/garage/event"),
            Some((Some(1), "garage", TopicKind::Event))
        );
    }
}
