//! MODE's home resource as the project key sees it: `GET /homes/{id}` with
//! `Authorization: ModeCloud <project key>` answers `{id, projectId, name, creationTime,
//! deactivated}` (see `mode-api.md` §4; a missing `deactivated` means false). Also the one place
//! that knows which refusals hint at a deactivated home (by status: MODE names no reason). This module decides nothing: the
//! home watcher (`crate::homes`) does.

use crate::config::Secret;

/// Why a home could not be read.
#[derive(Debug, thiserror::Error)]
pub enum HomeError {
    /// MODE could not be reached or did not answer in time (state unknown).
    #[error("cannot reach MODE: {0}")]
    Transport(String),
    /// MODE answered with an error (bad project key, no such home, outage...).
    #[error("MODE answered {status} {reason}")]
    Status { status: u16, reason: String },
}

impl HomeError {
    /// The project key itself is refused (retrying will not help until the key is fixed).
    pub fn is_auth(&self) -> bool {
        matches!(
            self,
            HomeError::Status {
                status: 401 | 403,
                ..
            }
        )
    }
}

/// Reads whether home `home_id` is deactivated.
pub async fn home_deactivated(
    api_url: &str,
    project_key: &Secret,
    home_id: u64,
) -> Result<bool, HomeError> {
    #[derive(serde::Deserialize)]
    struct Home {
        #[serde(default)]
        deactivated: Option<bool>,
    }
    let base = api_url.trim_end_matches('/');
    let resp = super::rest::http_client()
        .get(format!("{base}/homes/{home_id}"))
        .header(
            "Authorization",
            format!("ModeCloud {}", project_key.expose()),
        )
        .send()
        .await
        .map_err(|e| HomeError::Transport(e.without_url().to_string()))?;
    let status = resp.status();
    let body = resp
        .bytes()
        .await
        .map_err(|e| HomeError::Transport(e.without_url().to_string()))?;
    if !status.is_success() {
        return Err(HomeError::Status {
            status: status.as_u16(),
            reason: super::rest::reason_of(status, &body),
        });
    }
    let home: Home = serde_json::from_slice(&body).map_err(|e| HomeError::Status {
        status: status.as_u16(),
        reason: format!("not a home object: {e}"),
    })?;
    Ok(home.deactivated.unwrap_or(false))
}

/// Whether a refusal of a device's message may mean its home is deactivated. MODE documents
/// no status or reason for that (`mode-api.md` §9), so this decides by HTTP status first: a
/// 403, or a 4xx the hub has no other meaning for (404, 409, 410, 423, ...), is worth asking
/// the home watcher; a malformed or oversized request, a missing key (401), a timeout, a rate
/// limit or a server error is not. Reasons come second and only MODE's own count
/// (`RATE_LIMIT_EXCEEDED`); any other reason is unknown and changes nothing.
pub fn hints_deactivation(status: u16, reason: &str) -> bool {
    if reason == "RATE_LIMIT_EXCEEDED" {
        return false;
    }
    match status {
        400 | 401 | 405 | 408 | 411 | 413 | 414 | 415 | 422 | 429 => false,
        402..=499 => true,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deactivation_hints() {
        assert!(hints_deactivation(403, "HOME_DEACTIVATED"));
        assert!(hints_deactivation(403, "PERMISSION_DENIED"));
        assert!(hints_deactivation(403, "Forbidden"));
        assert!(hints_deactivation(409, "SOMETHING_NEW"));
        // The status decides, whatever name the emulator (or MODE) gives it.
        assert!(!hints_deactivation(400, "INVALID_INPUT"));
        assert!(!hints_deactivation(400, "HOME_DEACTIVATED"));
        assert!(!hints_deactivation(413, "Payload Too Large"));
        assert!(!hints_deactivation(429, "RATE_LIMIT_EXCEEDED"));
        assert!(!hints_deactivation(503, "SERVICE_UNAVAILABLE"));
        assert!(!hints_deactivation(409, "RATE_LIMIT_EXCEEDED"));
    }
}
