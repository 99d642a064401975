//! `modehub status`: asks the running hub's ops endpoint for `/status.json` and prints a table
//! (or the JSON with `--json`).
//!
//! The HTTP GET is written by hand on a std `TcpStream` (one request to loopback, answered with
//! a `Content-Length` body by axum), so the CLI needs no HTTP client library.

use super::StatusReport;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::path::Path;
use std::time::Duration;

/// Where `modehub status` looks when neither `--ops` nor a readable config says otherwise.
pub const DEFAULT_OPS: &str = "127.0.0.1:9464";

/// The ops address from a config file's `[ops] listen` (only that key is read, so a config
/// whose key files this user may not read still works). `Ok(None)` if it says "off".
pub fn ops_addr_from_config(path: &Path) -> Result<Option<String>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        format!(
            "cannot read {}: {e}. Pass --ops ADDR (the hub's [ops] listen address) instead",
            path.display()
        )
    })?;
    let table: toml::Table = toml::from_str(&text).map_err(|e| {
        format!(
            "{} is not valid TOML ({}); run `modehub check-config --config {}`",
            path.display(),
            e.message(),
            path.display()
        )
    })?;
    let listen = table
        .get("ops")
        .and_then(|o| o.get("listen"))
        .and_then(|l| l.as_str())
        .unwrap_or(DEFAULT_OPS);
    Ok(if listen == "off" {
        None
    } else {
        Some(listen.to_string())
    })
}

/// GETs `path` from `addr`; returns the status code and body.
pub fn http_get(addr: &str, path: &str, timeout: Duration) -> Result<(u16, String), String> {
    let sock: SocketAddr = addr
        .to_socket_addrs()
        .map_err(|e| format!("`{addr}` is not an address ({e}); use e.g. 127.0.0.1:9464"))?
        .next()
        .ok_or_else(|| format!("`{addr}` resolves to no address"))?;
    let sock = super::connectable(sock);
    let mut s = TcpStream::connect_timeout(&sock, timeout).map_err(|e| {
        format!(
            "cannot reach the hub's ops endpoint at {sock}: {e}. Is modehub running (systemctl status modehub)? Is [ops] listen set to this address?"
        )
    })?;
    let _ = s.set_read_timeout(Some(timeout));
    let _ = s.set_write_timeout(Some(timeout));
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {sock}\r\nConnection: close\r\nAccept: */*\r\n\r\n"
    )
    .map_err(|e| format!("cannot send the request to {sock}: {e}"))?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)
        .map_err(|e| format!("no complete answer from {sock}: {e}"))?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("{sock} did not answer with HTTP"))?;
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("{sock} did not answer with HTTP"))?;
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        return Err(format!(
            "{sock} answered in chunks; is it a modehub ops endpoint?"
        ));
    }
    Ok((code, body.to_string()))
}

/// Fetches and parses `/status.json`.
pub fn fetch(addr: &str) -> Result<(StatusReport, String), String> {
    let (code, body) = http_get(addr, "/status.json", Duration::from_secs(10))?;
    if code != 200 {
        return Err(format!(
            "{addr}/status.json answered {code}: {}",
            body.trim()
        ));
    }
    let report = serde_json::from_str(&body)
        .map_err(|e| format!("{addr}/status.json is not a modehub status ({e})"))?;
    Ok((report, body))
}

/// "42s", "5m 02s", "3h 07m", "2d 04h".
pub fn human_duration(secs: u64) -> String {
    match secs {
        s if s < 60 => format!("{s}s"),
        s if s < 3600 => format!("{}m {:02}s", s / 60, s % 60),
        s if s < 86400 => format!("{}h {:02}m", s / 3600, (s % 3600) / 60),
        s => format!("{}d {:02}h", s / 86400, (s % 86400) / 3600),
    }
}

/// "812 B", "1.4 MB".
pub fn human_bytes(b: u64) -> String {
    const U: [&str; 4] = ["KB", "MB", "GB", "TB"];
    if b < 1000 {
        return format!("{b} B");
    }
    let mut v = b as f64 / 1000.0;
    let mut i = 0;
    while v >= 1000.0 && i < U.len() - 1 {
        v /= 1000.0;
        i += 1;
    }
    format!("{v:.1} {}", U[i])
}

/// The table a person reads.
pub fn render_table(r: &StatusReport) -> String {
    let mut out = format!(
        "modehub {}  up {}  data {} ({})  local MQTT {}\nhealth: {}\n\n",
        r.version,
        human_duration(r.uptime_secs),
        r.data_dir,
        human_bytes(r.data_dir_bytes),
        r.local_mqtt,
        r.health.summary()
    );
    let header = [
        "DEVICE",
        "MODE ID",
        "TRANSPORT",
        "LOCAL",
        "UPSTREAM",
        "HOME",
        "QUEUED",
        "OLDEST",
        "LAST ERROR",
    ];
    let rows: Vec<[String; 9]> = r
        .devices
        .iter()
        .map(|d| {
            [
                d.name.clone(),
                d.mode_id.to_string(),
                d.transport.clone(),
                match d.local_connections {
                    0 => "no".to_string(),
                    1 => "yes".to_string(),
                    n => format!("yes ({n})"),
                },
                d.upstream.clone(),
                match d.home_id {
                    Some(h) => format!("{h} {}", d.home_state),
                    None => "-".to_string(),
                },
                d.queued.to_string(),
                d.oldest_pending_secs
                    .map(human_duration)
                    .unwrap_or_else(|| "-".into()),
                match (&d.last_error, d.last_error_secs_ago) {
                    // The same as the UPSTREAM column: just say since when.
                    (Some(e), Some(ago))
                        if e.ends_with(d.upstream.split_once(": ").map_or("\0", |x| x.1)) =>
                    {
                        format!("{} ago (see UPSTREAM)", human_duration(ago))
                    }
                    (Some(e), Some(ago)) => format!("{} ago: {e}", human_duration(ago)),
                    (Some(e), None) => e.clone(),
                    _ => "-".into(),
                },
            ]
        })
        .collect();
    let mut widths = header.map(str::len);
    for row in &rows {
        for (w, c) in widths.iter_mut().zip(row) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: &[&str]| {
        let mut s = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                s.push_str(c);
            } else {
                s.push_str(&format!("{c:<w$}  ", w = widths[i]));
            }
        }
        s.trim_end().to_string() + "\n"
    };
    out.push_str(&line(&header));
    for row in &rows {
        let cells: Vec<&str> = row.iter().map(String::as_str).collect();
        out.push_str(&line(&cells));
    }
    for d in r.devices.iter() {
        if let Some(p) = &d.kv_problem {
            out.push_str(&format!("kv degraded on {}: {p}\n", d.name));
        }
    }
    let queued: u64 = r.devices.iter().map(|d| d.queued).sum();
    out.push_str(&format!(
        "\n{} devices, {} upstream up, {} connected locally, {} queued\n",
        r.devices.len(),
        r.devices.iter().filter(|d| d.upstream == "up").count(),
        r.devices.iter().filter(|d| d.local_connections > 0).count(),
        queued
    ));
    out
}
