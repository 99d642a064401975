//! The ops endpoint's password (`[ops] password_file`): clients on this machine (loopback) get
//! in as before, so `modehub status` and local scrapers keep working; anyone else must send
//! HTTP Basic credentials with that password (any user name) or gets `401`.
//!
//! The comparison is constant-time; a failed attempt waits a moment before its answer so that
//! guessing from the LAN is slow. Nothing here logs or echoes what a client sent.

use crate::config::Secret;
use axum::extract::{ConnectInfo, Request};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use std::net::SocketAddr;
use std::time::Duration;

/// The address of the client of one ops connection (axum's `ConnectInfo`, filled by `http`).
#[derive(Debug, Clone, Copy)]
pub struct Peer(pub SocketAddr);

/// How long a refused request waits before its `401`.
const FAILURE_DELAY: Duration = Duration::from_millis(500);

/// Middleware: lets loopback peers and holders of `password` through.
pub async fn require_password(password: Secret, req: Request, next: Next) -> Response {
    let local = req
        .extensions()
        .get::<ConnectInfo<Peer>>()
        .is_some_and(|c| c.0 .0.ip().is_loopback() || is_mapped_loopback(&c.0 .0));
    if local || presented(&req).is_some_and(|p| password.matches(&p)) {
        return next.run(req).await;
    }
    tokio::time::sleep(FAILURE_DELAY).await;
    (
        StatusCode::UNAUTHORIZED,
        [(
            header::WWW_AUTHENTICATE,
            "Basic realm=\"modehub\", charset=\"UTF-8\"",
        )],
        "modehub: this page needs the password from [ops] password_file\n",
    )
        .into_response()
}

fn is_mapped_loopback(a: &SocketAddr) -> bool {
    match a {
        SocketAddr::V6(v6) => v6.ip().to_ipv4_mapped().is_some_and(|v4| v4.is_loopback()),
        SocketAddr::V4(_) => false,
    }
}

/// The password of a `Basic` `Authorization` header (user name ignored).
fn presented(req: &Request) -> Option<Vec<u8>> {
    let value = req.headers().get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, b64) = value.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") || b64.len() > 1024 {
        return None;
    }
    let decoded = base64_decode(b64.trim())?;
    let colon = decoded.iter().position(|b| *b == b':')?;
    Some(decoded[colon + 1..].to_vec())
}

/// Standard base64 (with or without padding); `None` for anything else.
fn base64_decode(s: &str) -> Option<Vec<u8>> {
    let val = |c: u8| -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    };
    let bytes = s.trim_end_matches('=').as_bytes();
    let mut out = Vec::with_capacity(bytes.len() * 3 / 4);
    for chunk in bytes.chunks(4) {
        let mut n = 0u32;
        for (i, c) in chunk.iter().enumerate() {
            n |= val(*c)? << (18 - 6 * i);
        }
        match chunk.len() {
            4 => out.extend_from_slice(&[(n >> 16) as u8, (n >> 8) as u8, n as u8]),
            3 => out.extend_from_slice(&[(n >> 16) as u8, (n >> 8) as u8]),
            2 => out.push((n >> 16) as u8),
            _ => return None,
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::base64_decode;

    #[test]
    fn decodes_standard_base64() {
        assert_eq!(base64_decode("bW9kZWh1Yjpwdw==").unwrap(), b"modehub:pw");
        assert_eq!(base64_decode("bW9kZWh1Yjpwdw").unwrap(), b"modehub:pw");
        assert_eq!(base64_decode("YQ==").unwrap(), b"a");
        assert!(base64_decode("b$==").is_none());
        assert!(base64_decode("Y").is_none());
    }
}
