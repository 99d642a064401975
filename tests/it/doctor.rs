//! `modehub doctor` against the emulator: a good setup passes, and each failure (bad config,
//! data dir, clock, MODE offline, DNS, TLS, a refused key, a deactivated home, a refused
//! project key, a missing serial port, a taken local port) is reported with a fix.

use crate::common::*;
use modehub::doctor::{self, Options, Report, Status};
use std::path::{Path, PathBuf};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn opts() -> Options {
    Options {
        clock_synced: Some(true),
        service_user: Some(String::new()),
    }
}

/// A config for `dev0`, `dev1` against `emu` with the project key, local port `port`;
/// `edit` changes the text before it is written.
fn setup(
    emu: &modehub::emulator::Emulator,
    dir: &Path,
    port: u16,
    edit: impl Fn(String) -> String,
) -> PathBuf {
    std::fs::create_dir_all(dir.join("data")).unwrap();
    let pk = dir.join("project.key");
    std::fs::write(&pk, "v1.project").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&pk, std::fs::Permissions::from_mode(0o600)).unwrap();
    let text = hub_config_text(
        emu,
        &dir.join("data"),
        2,
        &format!("project_key_file = \"{}\"\n", pk.display()),
    )
    .replace("127.0.0.1:0", &format!("127.0.0.1:{port}"))
        + &format!("[ops]\nlisten = \"127.0.0.1:{}\"\n", free_port());
    let path = dir.join("config.toml");
    std::fs::write(&path, edit(text)).unwrap();
    path
}

fn status(r: &Report, id: &str) -> Status {
    r.get(id)
        .unwrap_or_else(|| panic!("no check {id}:\n{}", r.render()))
        .status
}

/// The check failed (or warned) and says how to fix it, with `words` in its detail.
fn bad(r: &Report, id: &str, want: Status, words: &str) {
    let c = r
        .get(id)
        .unwrap_or_else(|| panic!("no check {id}:\n{}", r.render()));
    assert_eq!(c.status, want, "{id}:\n{}", r.render());
    assert!(
        c.detail.contains(words),
        "{id} does not say `{words}`:\n{}",
        r.render()
    );
    assert!(
        c.fix.as_deref().is_some_and(|f| !f.is_empty()),
        "{id} has no fix"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_good_setup_passes_every_check() {
    let emu = emulator(2).await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = setup(&emu, dir.path(), free_port(), |t| t);
    let r = doctor::run(&cfg, &opts()).await;
    assert!(r.ok, "{}", r.render());
    for id in [
        "config",
        "data-dir",
        "clock",
        "mode-rest",
        "mode-mqtt",
        "device-key:dev0",
        "device-key:dev1",
        "home:42",
        "home:43",
        "local-port",
    ] {
        assert_eq!(status(&r, id), Status::Ok, "{id}:\n{}", r.render());
    }
    // Logins only: nothing was sent as a device.
    assert_eq!(emu.handle().stats().events_accepted, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_injected_failure_is_reported_with_a_fix() {
    let emu = emulator(2).await;
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let run = |edit: &dyn Fn(String) -> String| {
        let cfg = setup(&emu, dir.path(), port, edit);
        async move { doctor::run(&cfg, &opts()).await }
    };

    // A config that does not validate: only that, the rest is skipped.
    let r = run(&|t| t.replace("mode_id = 101", "mode_id = 100")).await;
    assert!(!r.ok);
    bad(&r, "config", Status::Fail, "already used");
    assert!(r.get("mode-mqtt").is_none());

    // The data dir is a file.
    let file = dir.path().join("not-a-dir");
    std::fs::write(&file, "x").unwrap();
    let r = run(&|t| {
        t.replace(
            &format!("data_dir = \"{}\"", dir.path().join("data").display()),
            &format!("data_dir = \"{}\"", file.display()),
        )
    })
    .await;
    bad(&r, "data-dir", Status::Fail, "not a directory");

    // The clock is not synchronised.
    let cfg = setup(&emu, dir.path(), port, |t| t);
    let r = doctor::run(
        &cfg,
        &Options {
            clock_synced: Some(false),
            ..opts()
        },
    )
    .await;
    bad(&r, "clock", Status::Warn, "not synchronised");
    assert!(r.ok, "a clock warning is not a failure:\n{}", r.render());

    // MODE offline: MQTT refuses connections; the device logins are skipped.
    emu.handle().set_offline(true);
    let r = run(&|t| t).await;
    emu.handle().set_offline(false);
    bad(&r, "mode-mqtt", Status::Fail, "TCP");
    assert_eq!(status(&r, "device-key:dev0"), Status::Skip);

    // DNS: a name that does not resolve.
    let r = run(&|t| {
        t.replace(
            &format!("mqtt://{}", emu.mqtt_addr()),
            "mqtt://no-such-host.invalid:8883",
        )
    })
    .await;
    bad(&r, "mode-mqtt", Status::Fail, "DNS");

    // TLS: https to a port that speaks plain HTTP.
    let r = run(&|t| {
        t.replace(
            &format!("http://{}", emu.http_addr()),
            &format!("https://{}", emu.http_addr()),
        )
    })
    .await;
    bad(&r, "mode-rest", Status::Fail, "TLS");

    // A device key MODE does not know.
    let r = run(&|t| t.replace(&device_key(1), "v1.wrong-key")).await;
    bad(&r, "device-key:dev1", Status::Fail, "refused");
    assert_eq!(status(&r, "device-key:dev0"), Status::Ok);

    // A deactivated home.
    assert!(emu.handle().set_home_deactivated(43, true));
    let r = run(&|t| t).await;
    emu.handle().set_home_deactivated(43, false);
    bad(&r, "home:43", Status::Fail, "deactivated");
    assert_eq!(status(&r, "home:42"), Status::Ok);

    // A project key MODE refuses.
    std::fs::write(dir.path().join("other.key"), "v1.not-a-project-key").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(
        dir.path().join("other.key"),
        std::fs::Permissions::from_mode(0o600),
    )
    .unwrap();
    let r = run(&|t| t.replace("project.key", "other.key")).await;
    bad(&r, "project-key", Status::Fail, "refused");

    // A serial port that is not there, and one (a pty) that is.
    let pty = nix::pty::openpty(None, None).unwrap();
    let pty_path = nix::unistd::ttyname(&pty.slave).unwrap();
    let r = run(&|t| {
        format!(
            "{t}[[serial]]\nport = \"/dev/ttyUSB-not-here\"\ndevices = [\"dev0\"]\n[[serial]]\nport = \"{}\"\ndevices = [\"dev1\"]\n",
            pty_path.display()
        )
    })
    .await;
    bad(
        &r,
        "serial:/dev/ttyUSB-not-here",
        Status::Fail,
        "not present",
    );
    assert_eq!(
        status(&r, &format!("serial:{}", pty_path.display())),
        Status::Ok
    );

    // The local port is taken by another program.
    let taken = std::net::TcpListener::bind(("127.0.0.1", port)).unwrap();
    let r = run(&|t| t).await;
    bad(&r, "local-port", Status::Fail, "taken");
    drop(taken);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_local_port_held_by_this_hub_is_fine() {
    let emu = emulator(2).await;
    let dir = tempfile::tempdir().unwrap();
    let path = setup(&emu, dir.path(), free_port(), |t| t);
    let cfg = modehub::config::Config::load(&path).unwrap();
    let mut hub = modehub::Hub::start(cfg.clone()).await.unwrap();
    let ctx = hub.ops_context(&cfg);
    hub.start_ops_server(ctx, &cfg).await.unwrap();
    let r = doctor::run(&path, &opts()).await;
    let c = r.get("local-port").unwrap();
    assert_eq!(c.status, Status::Ok, "{}", r.render());
    assert!(c.detail.contains("held by this hub"), "{}", r.render());
    hub.shutdown().await;
}

#[test]
fn the_cli_prints_json_and_fails_on_a_bad_config() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("config.toml");
    std::fs::write(&cfg, "[hub]\n").unwrap();
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_modehub"))
        .args(["doctor", "--json", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["ok"], false);
    assert_eq!(v["checks"][0]["id"], "config");
    assert_eq!(v["checks"][0]["status"], "fail");
    assert!(v["checks"][0]["fix"]
        .as_str()
        .unwrap()
        .contains("device add"));
}
