//! The TOML configuration: its model, defaults, and validation.
//!
//! `Config::load` reads a file, rejects unknown keys with a "did you mean" hint, checks every
//! value it can check without touching the network (ids, names, URLs, key files and their
//! permissions), and returns either a ready-to-use `Config` or *every* problem found, each with
//! its location and a fix. Secrets are wrapped in [`Secret`], whose `Debug`/`Display` never show
//! the value. This module must not start anything or keep state: it only describes the hub.
//!
//! Files: `model` (the structs and their defaults), `secret` (secrets and key files),
//! `problems` (problem reports with file:line locations and "did you mean" hints, from toml's
//! spans and serde's own field lists), `validate` (the checks on values).

mod model;
mod problems;
mod secret;
#[cfg(test)]
mod tests;
mod validate;

pub use model::*;
pub use problems::{ConfigError, Problem};
pub use secret::{read_secret_file, Secret};

use problems::Locator;
use std::path::{Path, PathBuf};

impl Config {
    /// Reads and validates a config file. See the module doc.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let src = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Config::parse(&src, path.parent().unwrap_or(Path::new("."))).map_err(|problems| {
            ConfigError::Invalid {
                path: path.to_path_buf(),
                problems,
            }
        })
    }

    /// Parses and validates config text; relative key-file paths are resolved against `base`.
    pub fn parse(src: &str, base: &Path) -> Result<Config, Vec<Problem>> {
        let loc = Locator::new(src).map_err(|p| vec![p])?;
        let mut problems = Vec::new();
        loc.unknown_keys(&mut problems);
        if !problems.is_empty() {
            return Err(problems);
        }
        let mut cfg: Config = toml::from_str(src).map_err(|e| {
            vec![Problem {
                key: String::new(),
                line: e.span().map(|s| problems::line_at(src, s.start)),
                what: e.message().to_string(),
                fix: "give the value the type shown in config/modehub.example.toml".into(),
            }]
        })?;
        cfg.validate(&loc, base, &mut problems);
        cfg.validate_serial(&loc, &mut problems);
        if problems.is_empty() {
            Ok(cfg)
        } else {
            Err(problems)
        }
    }

    /// The serial port (index into `serial`) a device speaks on, if any.
    pub fn serial_port_of(&self, name: &str) -> Option<usize> {
        self.serial
            .iter()
            .position(|s| s.devices.iter().any(|d| d == name))
    }

    /// The database file.
    pub fn db_path(&self) -> PathBuf {
        self.hub.data_dir.join("hub.db")
    }
}
