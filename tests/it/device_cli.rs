//! `modehub device ...` as an installer uses it: the binary edits a commented config in place
//! (round trip), refuses bad edits without writing anything, and a running hub picks up an
//! added device through the SIGHUP the command sends.

use crate::common::*;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_modehub");

/// Runs `modehub device ARGS --config CONFIG` with `stdin` piped in.
fn device(config: &Path, args: &[&str], stdin: &str) -> Output {
    let mut child = Command::new(BIN)
        .arg("device")
        .args(args)
        .arg("--config")
        .arg(config)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start modehub device");
    // A command that refuses its arguments exits without reading stdin: the pipe is then
    // closed under us (EPIPE), which is not this helper's failure (it was a flake under load).
    match child.stdin.take().unwrap().write_all(stdin.as_bytes()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {}
        r => r.unwrap(),
    }
    child.wait_with_output().unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

const COMMENTED: &str = r#"# The hub of the blue house.   (a comment that must survive)
[hub]
data_dir = "DATA"   # outbox here
log = "info"

[local.mqtt]
listen = "127.0.0.1:0"

[cloud]
api_url = "http://127.0.0.1:9"      # emulator
mqtt_url = "mqtt://127.0.0.1:9"

# The porch sensor.
[[device]]
name = "dev0"
mode_id = 100
home_id = 42
api_key = "v1.key-0-7919"   # inline on purpose
local_password = "pw0"

# Serial ports would go here.
"#;

fn write_config(dir: &Path, text: &str) -> PathBuf {
    let path = dir.join("config.toml");
    std::fs::write(
        &path,
        text.replace("DATA", &dir.join("data").display().to_string()),
    )
    .unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
    path
}

#[test]
fn add_list_set_password_remove_round_trip_keeps_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), COMMENTED);
    let before = std::fs::read_to_string(&cfg).unwrap();

    let o = device(
        &cfg,
        &[
            "add",
            "dev1",
            "--mode-id",
            "101",
            "--home-id",
            "43",
            "--no-reload",
        ],
        "v1.key-1-15838\n",
    );
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        !text(&o).contains("v1.key-1"),
        "the key was echoed: {}",
        text(&o)
    );
    let after = std::fs::read_to_string(&cfg).unwrap();
    assert!(
        after.starts_with(&before[..before.find("# Serial ports").unwrap()]),
        "the existing text changed:\n{after}"
    );
    assert!(
        after.contains("# inline on purpose") && after.contains("# Serial ports would go here.")
    );
    assert!(after.contains("name = \"dev1\"") && after.contains("mode_id = 101"));
    assert!(!after.contains("v1.key-1"), "the key went into the config");
    let key = dir.path().join("keys/dev1");
    assert_eq!(std::fs::read_to_string(&key).unwrap(), "v1.key-1-15838");
    assert_eq!(
        std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert_eq!(
        std::fs::metadata(&cfg).unwrap().permissions().mode() & 0o777,
        0o640,
        "the config's mode changed"
    );
    // The result is what check-config accepts.
    let check = Command::new(BIN)
        .args(["check-config", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(check.status.success(), "{}", text(&check));

    let list = device(&cfg, &["list"], "");
    let l = text(&list);
    assert!(list.status.success(), "{l}");
    assert!(
        l.contains("dev0") && l.contains("dev1") && l.contains("101"),
        "{l}"
    );
    assert!(!l.contains("v1.key"), "list shows a key: {l}");

    let o = device(
        &cfg,
        &["set-password", "dev1", "--no-reload"],
        "s3cret-pw\n",
    );
    assert!(o.status.success(), "{}", text(&o));
    assert!(std::fs::read_to_string(&cfg)
        .unwrap()
        .contains("local_password = \"s3cret-pw\""));
    let o = device(
        &cfg,
        &["set-password", "dev1", "--clear", "--no-reload"],
        "",
    );
    assert!(o.status.success(), "{}", text(&o));

    let o = device(&cfg, &["remove", "dev1", "--no-reload"], "");
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(
        std::fs::read_to_string(&cfg).unwrap(),
        before,
        "add + remove is not a round trip"
    );
    assert!(!key.exists(), "the key file of a removed device stayed");
}

#[test]
fn a_bad_edit_is_refused_and_nothing_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), COMMENTED);
    let before = std::fs::read(&cfg).unwrap();
    let mtime = std::fs::metadata(&cfg).unwrap().modified().unwrap();
    let unchanged = |what: &str| {
        assert_eq!(
            std::fs::read(&cfg).unwrap(),
            before,
            "{what}: config changed"
        );
        assert_eq!(
            std::fs::metadata(&cfg).unwrap().modified().unwrap(),
            mtime,
            "{what}: config rewritten"
        );
        assert!(
            !dir.path().join("keys/dev1").exists(),
            "{what}: a key file was left behind"
        );
        let strays: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with(".modehub-"))
            .collect();
        assert!(strays.is_empty(), "{what}: temp files left: {strays:?}");
    };

    // MODE id already used by dev0: check-config's rule, reported with its fix.
    let o = device(
        &cfg,
        &["add", "dev1", "--mode-id", "100", "--no-reload"],
        "v1.k\n",
    );
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("already used"), "{}", text(&o));
    assert!(text(&o).contains("nothing was written"), "{}", text(&o));
    unchanged("duplicate mode_id");

    // The name is taken.
    let o = device(
        &cfg,
        &["add", "dev0", "--mode-id", "105", "--no-reload"],
        "v1.k\n",
    );
    assert_eq!(o.status.code(), Some(2));
    assert!(text(&o).contains("already configured"), "{}", text(&o));
    unchanged("duplicate name");

    for bad in ["../evil", "a/b", "123", ""] {
        let o = device(
            &cfg,
            &["add", bad, "--mode-id", "106", "--no-reload"],
            "v1.k\n",
        );
        assert_eq!(o.status.code(), Some(2), "{bad}: {}", text(&o));
        unchanged(bad);
        assert!(!dir.path().join("evil").exists());
    }

    let o = device(
        &cfg,
        &["add", "dev1", "--mode-id", "107", "--no-reload"],
        "",
    );
    assert_eq!(o.status.code(), Some(2), "no key: {}", text(&o));
    assert!(text(&o).contains("no API key"), "{}", text(&o));
    unchanged("no key");

    let o = device(&cfg, &["remove", "dev9", "--no-reload"], "");
    assert_eq!(o.status.code(), Some(2));
    assert!(
        text(&o).contains("dev0"),
        "names the configured devices: {}",
        text(&o)
    );
    unchanged("unknown device");

    let o = device(&cfg, &["set-password", "dev0", "--no-reload"], "\n");
    assert_eq!(o.status.code(), Some(2));
    unchanged("empty password");
}

/// The hub binary, killed (and its log printed on failure) when dropped.
struct HubProc {
    child: Child,
    log: PathBuf,
}

impl HubProc {
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for HubProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("--- hub log ---\n{}", self.log());
        }
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn status(ops: &str) -> Option<modehub::ops::StatusReport> {
    modehub::ops::status::fetch(ops).ok().map(|(r, _)| r)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_hub_picks_up_an_added_device() {
    let emu = emulator(2).await;
    let dir = tempfile::tempdir().unwrap();
    let local = free_port();
    let ops = format!("127.0.0.1:{}", free_port());
    let text = format!(
        "# two devices in the emulator, one configured\n{}[ops]\nlisten = \"{ops}\"\n",
        hub_config_text(&emu, &dir.path().join("data"), 1, "")
            .replace("127.0.0.1:0", &format!("127.0.0.1:{local}"))
    );
    let cfg = write_config(dir.path(), &text);
    let log = dir.path().join("hub.log");
    let hub = HubProc {
        child: Command::new(BIN)
            .args(["run", "--config"])
            .arg(&cfg)
            .env_remove("NOTIFY_SOCKET")
            .env_remove("RUST_LOG")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
        log,
    };
    let up = |name: &str| {
        status(&ops).is_some_and(|r| {
            r.devices
                .iter()
                .any(|d| d.name == name && d.upstream == "up")
        })
    };
    wait_until("dev0 up", || up("dev0")).await;

    let o = tokio::task::spawn_blocking({
        let cfg = cfg.clone();
        move || {
            device(
                &cfg,
                &[
                    "add",
                    "dev1",
                    "--mode-id",
                    "101",
                    "--home-id",
                    "43",
                    "--local-password",
                ],
                &format!("{}\npw1\n", device_key(1)),
            )
        }
    })
    .await
    .unwrap();
    assert!(o.status.success(), "{}", text_of(&o));
    assert!(
        text_of(&o).contains(&format!("running hub (pid {})", hub.child.id())),
        "did not signal the hub: {}",
        text_of(&o)
    );
    wait_until("dev1 up after the reload", || up("dev1")).await;

    // The new device's sensor logs in with its local password and its event reaches MODE.
    let addr = format!("127.0.0.1:{local}").parse().unwrap();
    let mut s = Sensor::connect(addr, "dev1", "pw1").await;
    s.publish_all("/devices/dev1/event", vec![event_json(7)])
        .await;
    let evs = emu
        .handle()
        .wait_for_events(device_id(1), 1, Duration::from_secs(20))
        .await;
    assert_eq!(ns(&evs), vec![7], "hub log:\n{}", hub.log());
}

fn text_of(o: &Output) -> String {
    text(o)
}
