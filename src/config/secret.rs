//! Secrets: the [`Secret`] wrapper, whose `Debug`/`Display` never show the value, and reading a
//! secret from a private key file. It must not log or return a secret's value in an error.

use serde::Deserialize;
use std::fmt;
use std::path::Path;

/// A secret string (API key, password). Never printed.
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }
    /// The secret itself: call only where it is sent or compared, never to log it.
    pub fn expose(&self) -> &str {
        &self.0
    }
    /// Constant-time comparison, so a local client cannot guess a password byte by byte: the
    /// time depends only on the candidate's length, so neither the secret's bytes nor its
    /// length leak.
    pub fn matches(&self, candidate: &[u8]) -> bool {
        let a = self.0.as_bytes();
        let mut diff = u8::from(a.len() != candidate.len());
        if a.is_empty() {
            return candidate.is_empty();
        }
        for (i, c) in candidate.iter().enumerate() {
            diff |= c ^ a[i % a.len()];
        }
        diff == 0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

#[cfg(unix)]
fn group_or_world_readable(meta: &std::fs::Metadata) -> bool {
    use std::os::unix::fs::PermissionsExt;
    meta.permissions().mode() & 0o077 != 0
}

#[cfg(not(unix))]
fn group_or_world_readable(_meta: &std::fs::Metadata) -> bool {
    false
}

/// Reads a secret from a file: one line, must not be readable by group or others.
pub fn read_secret_file(path: &Path) -> Result<Secret, (String, String)> {
    let meta = std::fs::metadata(path).map_err(|e| {
        (
            format!("cannot read key file {}: {e}", path.display()),
            "check the path, and that the hub's user may read it".to_string(),
        )
    })?;
    if group_or_world_readable(&meta) {
        return Err((
            format!(
                "key file {} is readable by other users (a device API key must stay secret)",
                path.display()
            ),
            format!("run `chmod 600 {}`", path.display()),
        ));
    }
    let text = std::fs::read_to_string(path).map_err(|e| {
        (
            format!("cannot read key file {}: {e}", path.display()),
            "check that the hub's user owns the file".to_string(),
        )
    })?;
    let key = text.trim();
    if key.is_empty() {
        return Err((
            format!("key file {} is empty", path.display()),
            "put the device API key from the MODE console in it".to_string(),
        ));
    }
    Ok(Secret::new(key))
}
