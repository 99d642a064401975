//! What differs between the running config and a newly loaded one in ways only a restart
//! applies (SIGHUP applies devices, serial ports and the log filter). Compares values, secrets
//! included (never their `Debug` text, which hides them), and names what changed without ever
//! showing a secret.

use super::{CloudConfig, Config, HubConfig};

impl Config {
    /// What differs between `self` (running) and `new` that only a restart applies, in words.
    pub fn restart_needed(&self, new: &Config) -> Vec<String> {
        let old = self;
        let mut out = Vec::new();
        let hub = |c: &Config| HubConfig {
            log: String::new(),
            ..c.hub.clone()
        };
        if hub(old) != hub(new) {
            out.push("[hub] settings other than log".into());
        }
        if old.local != new.local {
            out.push("[local]".into());
        }
        let cloud = |c: &Config| CloudConfig {
            project_key: None,
            ..c.cloud.clone()
        };
        if cloud(old) != cloud(new) {
            out.push("[cloud]".into());
        } else if old.cloud.project_key != new.cloud.project_key {
            out.push("[cloud] project key (the contents of project_key_file)".into());
        }
        if old.ops != new.ops {
            out.push("[ops]".into());
        }
        out
    }
}
