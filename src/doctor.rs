//! `modehub doctor`: the installer's checklist. Each check says ok, warn or FAIL, and every
//! warning and failure comes with a fix in words.
//!
//! Checks, in order: the config is valid; the data directory is writable and has free space;
//! the clock is synchronised; MODE's REST and MQTT endpoints are reachable (DNS, TCP, TLS with
//! the system's CA roots); each device's API key is accepted (one short login per device, no
//! data sent); the project key can read each home and whether it is deactivated; each serial
//! port is present and openable (and, as root, by the service user); the local MQTT port is
//! free or held by this hub.
//!
//! It only reads and probes: it must not change files, send data as a device, or print a
//! secret. It does not need the hub to run, and does not disturb a running one (a busy serial
//! port or a local port held by the hub counts as fine).

use crate::config::{Config, Transport};
use crate::mode::{self, SessionConfig};
use serde::Serialize;
use std::net::SocketAddr;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// How long one network step (DNS, TCP, TLS) may take.
const STEP_TIMEOUT: Duration = Duration::from_secs(8);
/// How long one device login may take.
const LOGIN_TIMEOUT: Duration = Duration::from_secs(25);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Ok,
    Warn,
    Fail,
    Skip,
}

/// One line of the checklist.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    /// Stable identifier for scripts, e.g. `config`, `mode-mqtt`, `device-key:porch-temp`.
    pub id: String,
    pub status: Status,
    pub detail: String,
    /// What to do about a warning or failure.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

impl Check {
    fn ok(id: impl Into<String>, detail: impl Into<String>) -> Check {
        Check {
            id: id.into(),
            status: Status::Ok,
            detail: detail.into(),
            fix: None,
        }
    }
    fn bad(
        status: Status,
        id: impl Into<String>,
        detail: impl Into<String>,
        fix: impl Into<String>,
    ) -> Check {
        Check {
            id: id.into(),
            status,
            detail: detail.into(),
            fix: Some(fix.into()),
        }
    }
    fn fail(id: impl Into<String>, detail: impl Into<String>, fix: impl Into<String>) -> Check {
        Check::bad(Status::Fail, id, detail, fix)
    }
    fn warn(id: impl Into<String>, detail: impl Into<String>, fix: impl Into<String>) -> Check {
        Check::bad(Status::Warn, id, detail, fix)
    }
    fn skip(id: impl Into<String>, detail: impl Into<String>) -> Check {
        Check {
            id: id.into(),
            status: Status::Skip,
            detail: detail.into(),
            fix: None,
        }
    }
}

/// The whole checklist.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub config: String,
    pub ok: bool,
    pub checks: Vec<Check>,
}

impl Report {
    /// The check with this id.
    pub fn get(&self, id: &str) -> Option<&Check> {
        self.checks.iter().find(|c| c.id == id)
    }

    /// The checklist a person reads.
    pub fn render(&self) -> String {
        let mut out = format!("modehub doctor: {}\n", self.config);
        for c in &self.checks {
            let tag = match c.status {
                Status::Ok => "[ok]  ",
                Status::Warn => "[warn]",
                Status::Fail => "[FAIL]",
                Status::Skip => "[skip]",
            };
            out.push_str(&format!("{tag} {}: {}\n", c.id, c.detail));
            if let Some(f) = &c.fix {
                out.push_str(&format!("       fix: {f}\n"));
            }
        }
        let n = |s: Status| self.checks.iter().filter(|c| c.status == s).count();
        out.push_str(&format!(
            "\n{} ok, {} warnings, {} failures, {} skipped\n",
            n(Status::Ok),
            n(Status::Warn),
            n(Status::Fail),
            n(Status::Skip)
        ));
        out
    }
}

/// Knobs for tests; the CLI uses the defaults.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Take the clock as synchronised (`Some(true)`) or not, instead of asking the kernel.
    pub clock_synced: Option<bool>,
    /// The user the service runs as, for the permission checks done as root (default
    /// `modehub`; `Some("")`: skip those checks).
    pub service_user: Option<String>,
}

/// Runs every check against the config at `path`.
pub async fn run(path: &Path, opts: &Options) -> Report {
    let mut checks = Vec::new();
    let cfg = match Config::load(path) {
        Ok(c) => {
            checks.push(Check::ok(
                "config",
                format!("valid, {} device(s)", c.devices.len()),
            ));
            c
        }
        Err(e) => {
            checks.push(Check::fail(
                "config",
                e.to_string(),
                format!(
                    "fix the problems above (modehub check-config --config {} lists them), or add a device with: modehub device add",
                    path.display()
                ),
            ));
            checks.push(Check::skip(
                "other checks",
                "skipped: they need a valid config",
            ));
            return finish(path, checks);
        }
    };
    let user = service_user(opts);
    checks.push(data_dir(&cfg, user.as_ref()));
    checks.push(clock(&cfg, opts));
    let rest = endpoint_check("mode-rest", &cfg.cloud.api_url).await;
    let mqtt = endpoint_check("mode-mqtt", &cfg.cloud.mqtt_url).await;
    let reachable = match cfg.cloud.transport {
        Transport::Mqtt => mqtt.status == Status::Ok,
        Transport::Rest => rest.status == Status::Ok,
    };
    let rest_ok = rest.status == Status::Ok;
    checks.push(rest);
    checks.push(mqtt);
    checks.extend(device_keys(&cfg, reachable).await);
    checks.extend(homes(&cfg, rest_ok).await);
    checks.extend(serial_ports(&cfg, user.as_ref()));
    // It may ask a running hub's ops endpoint (a blocking client): off the async workers.
    let local = tokio::task::spawn_blocking(move || local_port(&cfg))
        .await
        .unwrap_or_else(|e| {
            Check::fail("local-port", format!("check crashed: {e}"), "report a bug")
        });
    checks.push(local);
    finish(path, checks)
}

fn finish(path: &Path, checks: Vec<Check>) -> Report {
    Report {
        config: path.display().to_string(),
        ok: checks.iter().all(|c| c.status != Status::Fail),
        checks,
    }
}

/// The service user's ids, when doctor runs as root and that user exists.
struct ServiceUser {
    name: String,
    uid: u32,
    gids: Vec<u32>,
}

fn service_user(opts: &Options) -> Option<ServiceUser> {
    if !nix::unistd::geteuid().is_root() {
        return None;
    }
    let name = opts
        .service_user
        .clone()
        .unwrap_or_else(|| "modehub".into());
    if name.is_empty() {
        return None;
    }
    let u = nix::unistd::User::from_name(&name).ok()??;
    let mut gids = vec![u.gid.as_raw()];
    // The unit adds dialout (SupplementaryGroups=dialout); /etc/group memberships count too.
    if let Ok(Some(g)) = nix::unistd::Group::from_name("dialout") {
        gids.push(g.gid.as_raw());
    }
    if let Ok(groups) = std::fs::read_to_string("/etc/group") {
        for l in groups.lines() {
            let f: Vec<&str> = l.split(':').collect();
            if f.len() == 4 && f[3].split(',').any(|m| m == name) {
                if let Ok(g) = f[2].parse() {
                    gids.push(g);
                }
            }
        }
    }
    Some(ServiceUser {
        name,
        uid: u.uid.as_raw(),
        gids,
    })
}

/// Whether `user` may read and write a file with this metadata (by its mode bits).
fn user_may_rw(user: &ServiceUser, m: &std::fs::Metadata) -> bool {
    let mode = m.mode();
    if m.uid() == user.uid {
        mode & 0o600 == 0o600
    } else if user.gids.contains(&m.gid()) {
        mode & 0o060 == 0o060
    } else {
        mode & 0o006 == 0o006
    }
}

fn data_dir(cfg: &Config, user: Option<&ServiceUser>) -> Check {
    let dir = &cfg.hub.data_dir;
    let id = "data-dir";
    let meta = match std::fs::metadata(dir) {
        Ok(m) if m.is_dir() => m,
        Ok(_) => {
            return Check::fail(
                id,
                format!("{} is not a directory", dir.display()),
                "point [hub] data_dir at a directory (the package uses /var/lib/modehub)",
            )
        }
        Err(e) => {
            return Check::fail(
                id,
                format!("{}: {e}", dir.display()),
                format!(
                "create it for the hub's user: sudo install -d -m 0700 -o modehub -g modehub {}",
                dir.display()
            ),
            )
        }
    };
    if let Err(e) = tempfile::tempfile_in(dir) {
        return Check::fail(
            id,
            format!("cannot write in {}: {e}", dir.display()),
            format!(
                "give the hub's user write access: sudo chown modehub:modehub {}",
                dir.display()
            ),
        );
    }
    if let Some(u) = user {
        if !user_may_rw(u, &meta) || meta.mode() & 0o100 == 0 && meta.uid() == u.uid {
            return Check::fail(
                id,
                format!(
                    "{} (owner uid {}, mode {:o}) is not writable by the service user {}",
                    dir.display(),
                    meta.uid(),
                    meta.mode() & 0o7777,
                    u.name
                ),
                format!("sudo chown -R {0}:{0} {1}", u.name, dir.display()),
            );
        }
    }
    // The casts matter on 32-bit ARM (armhf), where these are u32.
    #[allow(clippy::unnecessary_cast)]
    let free = match nix::sys::statvfs::statvfs(dir) {
        Ok(s) => s.blocks_available() as u64 * s.fragment_size() as u64,
        Err(e) => {
            return Check::warn(
                id,
                format!("writable, but free space unknown ({e})"),
                "check the disk with: df -h",
            )
        }
    };
    let min = cfg.hub.min_free_disk;
    let mb = |b: u64| format!("{} MB", b / 1_000_000);
    if free < min {
        Check::fail(
            id,
            format!(
                "only {} free under {}, below [hub] min_free_disk = {}: new messages are refused",
                mb(free),
                dir.display(),
                mb(min)
            ),
            "free space on that disk (journalctl --vacuum-size=50M, apt clean), or use a bigger SD card",
        )
    } else if free < min.saturating_mul(4) {
        Check::warn(
            id,
            format!(
                "writable; {} free, close to min_free_disk ({})",
                mb(free),
                mb(min)
            ),
            "free space on that disk soon (journalctl --vacuum-size=50M, apt clean)",
        )
    } else {
        Check::ok(id, format!("{} writable, {} free", dir.display(), mb(free)))
    }
}

fn clock(cfg: &Config, opts: &Options) -> Check {
    let synced = opts
        .clock_synced
        .unwrap_or_else(crate::clock::kernel_clock_synced);
    if synced {
        Check::ok("clock", "synchronised (NTP)")
    } else if cfg.hub.trust_clock {
        Check::ok("clock", "not synchronised, but [hub] trust_clock = true")
    } else {
        Check::warn(
            "clock",
            "the kernel says the clock is not synchronised: capture times are kept against the boot clock and repaired later",
            "enable time sync: sudo timedatectl set-ntp true (systemd-timesyncd or chrony), and allow outgoing NTP (UDP 123); with an RTC board set [hub] trust_clock = true",
        )
    }
}

/// DNS, TCP and (for https / mqtts) TLS with the system roots, to the endpoint at `url`.
async fn endpoint_check(id: &str, url: &str) -> Check {
    let parsed = match url::Url::parse(url) {
        Ok(u) => u,
        Err(e) => return Check::fail(id, format!("`{url}` is not a URL ({e})"), "fix [cloud]"),
    };
    let tls = matches!(parsed.scheme(), "https" | "mqtts" | "ssl" | "wss");
    let Some(host) = parsed
        .host_str()
        .map(|h| h.trim_matches(['[', ']']).to_string())
    else {
        return Check::fail(id, format!("`{url}` has no host"), "fix [cloud]");
    };
    let port = parsed
        .port_or_known_default()
        .unwrap_or(if parsed.scheme() == "mqtts" {
            8883
        } else {
            1883
        });
    let what = format!("{host}:{port}");
    let addrs: Vec<SocketAddr> = match tokio::time::timeout(
        STEP_TIMEOUT,
        tokio::net::lookup_host(what.clone()),
    )
    .await
    {
        Ok(Ok(a)) => a.collect(),
        Ok(Err(e)) => return Check::fail(
            id,
            format!("DNS: cannot resolve {host}: {e}"),
            "check the network and DNS (resolvectl status; ping 1.1.1.1), and the host in [cloud]",
        ),
        Err(_) => {
            return Check::fail(
                id,
                format!("DNS: no answer for {host} within {STEP_TIMEOUT:?}"),
                "check the DNS server (resolvectl status)",
            )
        }
    };
    let Some(first) = addrs.first().copied() else {
        return Check::fail(id, format!("DNS: {host} has no address"), "check DNS");
    };
    let tcp = match tokio::time::timeout(STEP_TIMEOUT, tokio::net::TcpStream::connect(first)).await
    {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            return Check::fail(
                id,
                format!("TCP: cannot connect to {what} ({first}): {e}"),
                format!("check that outgoing TCP to port {port} is allowed (firewall, router) and the URL in [cloud]"),
            )
        }
        Err(_) => {
            return Check::fail(
                id,
                format!("TCP: no answer from {what} ({first}) within {STEP_TIMEOUT:?}"),
                format!("a firewall may drop outgoing TCP to port {port}"),
            )
        }
    };
    if !tls {
        return Check::ok(id, format!("{what}: DNS and TCP ok (no TLS: {url})"));
    }
    match tls_handshake(tcp, &host).await {
        Ok(()) => Check::ok(id, format!("{what}: DNS, TCP and TLS ok")),
        Err(e) => Check::fail(
            id,
            format!("TLS to {what}: {e}"),
            "install or update the CA certificates (sudo apt install ca-certificates), check the clock, and that no proxy intercepts TLS",
        ),
    }
}

async fn tls_handshake(tcp: tokio::net::TcpStream, host: &str) -> Result<(), String> {
    use rumqttc::tokio_rustls::{rustls, TlsConnector};
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_native_certs::load_native_certs().certs {
        let _ = roots.add(cert);
    }
    if roots.is_empty() {
        return Err("no CA certificates found on this system".into());
    }
    let config = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let name = rustls::pki_types::ServerName::try_from(host.to_string())
        .map_err(|e| format!("`{host}` is not a TLS server name ({e})"))?;
    let connector = TlsConnector::from(std::sync::Arc::new(config));
    match tokio::time::timeout(STEP_TIMEOUT, connector.connect(name, tcp)).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("no handshake within {STEP_TIMEOUT:?}")),
    }
}

async fn device_keys(cfg: &Config, reachable: bool) -> Vec<Check> {
    let id = |name: &str| format!("device-key:{name}");
    if !reachable {
        return cfg
            .devices
            .iter()
            .map(|d| Check::skip(id(&d.name), "skipped: MODE is not reachable (see above)"))
            .collect();
    }
    let endpoint = match cfg.cloud.mqtt_endpoint() {
        Ok(e) => e,
        Err(e) => {
            return vec![Check::fail(
                "device-keys",
                format!("cloud.mqtt_url: {e}"),
                "fix [cloud] mqtt_url",
            )]
        }
    };
    let session = SessionConfig {
        transport: cfg.cloud.transport,
        mqtt: endpoint,
        api_url: cfg.cloud.api_url.clone(),
        keepalive: cfg.cloud.keepalive(),
        inflight: 1,
        max_packet: cfg.hub.max_payload_bytes + 4096,
        max_downlink_packet: cfg.cloud.max_downlink_packet_bytes,
        stamping: mode::Stamping {
            seq_field: String::new(),
            captured_at_field: String::new(),
        },
    };
    // A few logins at a time: MODE should not see a burst from one hub.
    let sem = std::sync::Arc::new(tokio::sync::Semaphore::new(4));
    let mut tasks = Vec::new();
    for d in &cfg.devices {
        let (session, sem) = (session.clone(), sem.clone());
        let (name, mode_id, key) = (d.name.clone(), d.mode_id, d.api_key.clone());
        tasks.push(tokio::spawn(async move {
            let _permit = sem.acquire().await;
            let Some(key) = key else {
                return Check::fail(id(&name), "no API key", "set api_key_file");
            };
            match tokio::time::timeout(LOGIN_TIMEOUT, mode::Session::connect(&session, mode_id, &key, &Default::default()))
                .await
            {
                Ok(Ok(s)) => {
                    s.close().await;
                    Check::ok(id(&name), format!("MODE accepted the login of device {mode_id}"))
                }
                Ok(Err(e)) if e.is_auth() => Check::fail(
                    id(&name),
                    format!("MODE refused device {mode_id}: {e}"),
                    format!("check mode_id and the API key in the MODE console; replace the key with: modehub device remove {name} && modehub device add {name} --mode-id {mode_id}"),
                ),
                Ok(Err(e)) => Check::fail(
                    id(&name),
                    format!("login of device {mode_id} failed: {e}"),
                    "check the network and [cloud] settings",
                ),
                Err(_) => Check::fail(
                    id(&name),
                    format!("no answer to the login of device {mode_id} within {LOGIN_TIMEOUT:?}"),
                    "check the network and [cloud] settings",
                ),
            }
        }));
    }
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap_or_else(|e| {
            Check::fail("device-key", format!("check crashed: {e}"), "report a bug")
        }));
    }
    out
}

async fn homes(cfg: &Config, rest_ok: bool) -> Vec<Check> {
    let mut homes: Vec<u64> = cfg.devices.iter().filter_map(|d| d.home_id).collect();
    homes.sort_unstable();
    homes.dedup();
    let Some(key) = &cfg.cloud.project_key else {
        return vec![Check::warn(
            "project-key",
            "no [cloud] project_key_file: the hub cannot see whether a home is deactivated (MODE then drops its devices' events silently)",
            "create a project API key with read permission in the MODE console, store it in /etc/modehub/project.key (0600, owner modehub) and set project_key_file",
        )];
    };
    if !rest_ok {
        return vec![Check::skip(
            "project-key",
            "skipped: MODE's REST API is not reachable (see above)",
        )];
    }
    if homes.is_empty() {
        return vec![Check::ok(
            "project-key",
            "set; no device names a home_id, so there is nothing to watch",
        )];
    }
    let mut out = Vec::new();
    for h in homes {
        let id = format!("home:{h}");
        match crate::mode::homes::home_deactivated(&cfg.cloud.api_url, key, h).await {
            Ok(false) => out.push(Check::ok(id, "active (read with the project key)")),
            Ok(true) => out.push(Check::fail(
                id,
                "deactivated: MODE drops what its devices send; the hub holds their data until it is active again",
                "reactivate the home in the MODE console (or fix home_id in the config)",
            )),
            Err(e) if e.is_auth() => {
                out.push(Check::fail(
                    "project-key",
                    format!("MODE refused the project key: {e}"),
                    "check project_key_file: a project API key of this project with read permission",
                ));
                break;
            }
            Err(e) => out.push(Check::fail(
                id,
                format!("cannot read home {h}: {e}"),
                "check home_id (MODE answers 404 for a home this project does not have)",
            )),
        }
    }
    out
}

fn serial_ports(cfg: &Config, user: Option<&ServiceUser>) -> Vec<Check> {
    cfg.serial
        .iter()
        .map(|s| serial_port(&s.port, user))
        .collect()
}

fn serial_port(port: &PathBuf, user: Option<&ServiceUser>) -> Check {
    let id = format!("serial:{}", port.display());
    let meta =
        match std::fs::metadata(port) {
            Ok(m) => m,
            Err(e) => return Check::fail(
                id,
                format!("not present: {e}"),
                "plug the adapter in and check the path (ls -l /dev/serial/by-id/; dmesg | tail)",
            ),
        };
    if let Some(u) = user {
        if !user_may_rw(u, &meta) {
            return Check::fail(
                id,
                format!(
                    "present, but the service user {} may not open it (owner uid {}, group {}, mode {:o})",
                    u.name,
                    meta.uid(),
                    meta.gid(),
                    meta.mode() & 0o777
                ),
                format!("add {} to the port's group: sudo usermod -aG dialout {}", u.name, u.name),
            );
        }
    }
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOCTTY | libc::O_NONBLOCK)
        .open(port)
    {
        Ok(_) => Check::ok(id, "present and openable"),
        Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
            Check::ok(id, "present; in use (by the running hub?)")
        }
        Err(e) => Check::fail(
            id,
            format!("present, but cannot be opened: {e}"),
            "check the permissions (ls -l) and that no other program (ModemManager, a console getty) holds it",
        ),
    }
}

fn local_port(cfg: &Config) -> Check {
    let id = "local-port";
    let addr = cfg.local.mqtt.listen;
    match std::net::TcpListener::bind(addr) {
        Ok(_) => return Check::ok(id, format!("{addr} is free for the local broker")),
        Err(e) if e.kind() != std::io::ErrorKind::AddrInUse => {
            return Check::fail(
                id,
                format!("cannot listen on {addr}: {e}"),
                "use an address of this machine in [local.mqtt] listen, e.g. 0.0.0.0:1883",
            )
        }
        Err(_) => {}
    }
    // Taken: by this hub (its ops endpoint says so), or by someone else?
    if let Some(ops) = cfg.ops.listen_addr() {
        if let Ok((r, _)) = crate::ops::status::fetch(&ops.to_string()) {
            if r.local_mqtt.parse::<SocketAddr>().ok().map(|a| a.port()) == Some(addr.port()) {
                return Check::ok(
                    id,
                    format!(
                        "{addr} is held by this hub (running, {} devices)",
                        r.devices.len()
                    ),
                );
            }
        }
    }
    let holder = port_holder(addr.port());
    let mosquitto = holder.as_deref().is_some_and(|h| h.contains("mosquitto"));
    Check::fail(
        id,
        format!(
            "{addr} is taken by {}",
            holder.unwrap_or_else(|| "another program".into())
        ),
        if mosquitto {
            "a Mosquitto broker holds the port: stop it (sudo systemctl disable --now mosquitto), or give the hub another port ([local.mqtt] listen = \"0.0.0.0:1884\") and point the sensors there".to_string()
        } else {
            "stop that program (sudo ss -ltnp shows it) or set another port in [local.mqtt] listen"
                .to_string()
        },
    )
}

/// "mosquitto (pid 123)" for the process listening on TCP `port`, via ss(8) when available.
fn port_holder(port: u16) -> Option<String> {
    let out = std::process::Command::new("ss")
        .args(["-Hltnp", &format!("sport = :{port}")])
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let users = text.split("users:((\"").nth(1)?;
    let (name, rest) = users.split_once('"')?;
    let pid = rest
        .split("pid=")
        .nth(1)
        .and_then(|p| p.split(|c: char| !c.is_ascii_digit()).next())
        .unwrap_or("?");
    Some(format!("{name} (pid {pid})"))
}
