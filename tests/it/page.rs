//! The status page in a real headless browser (Debian's `chromium`): it loads, shows two
//! devices of a hub running against the emulator, and changes when one goes offline. Writes
//! the screenshot used by the README to `target/status-page.png` (copy it to docs/ by hand:
//! `cp target/status-page.png docs/`).
//!
//! Without chromium the test says so and passes, unless `MODEHUB_REQUIRE_CHROMIUM=1` (CI).

use crate::common::*;
use modehub::config::Config;
use modehub::Hub;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

fn chromium() -> Option<PathBuf> {
    ["chromium", "chromium-browser", "google-chrome"]
        .iter()
        .map(|n| Path::new("/usr/bin").join(n))
        .find(|p| p.exists())
}

/// Chromium's arguments for a headless run with its own throwaway profile.
fn headless(profile: &Path) -> Vec<String> {
    vec![
        "--headless".into(),
        "--no-sandbox".into(),
        "--disable-gpu".into(),
        "--disable-dev-shm-usage".into(),
        "--no-first-run".into(),
        "--hide-scrollbars".into(),
        format!("--user-data-dir={}", profile.display()),
        // Let the page's script fetch and render before the DOM is dumped.
        "--virtual-time-budget=4000".into(),
    ]
}

/// The DOM after the page's script ran.
async fn dump_dom(chrome: &Path, url: &str) -> String {
    let (chrome, url) = (chrome.to_path_buf(), url.to_string());
    tokio::task::spawn_blocking(move || {
        let profile = tempfile::tempdir().unwrap();
        let out = Command::new(&chrome)
            .args(headless(profile.path()))
            .arg("--dump-dom")
            .arg(&url)
            .output()
            .expect("run chromium");
        assert!(
            out.status.success(),
            "chromium failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    })
    .await
    .unwrap()
}

/// The opening tag of the device card of `name` in a dumped DOM.
fn card<'a>(dom: &'a str, name: &str) -> Option<&'a str> {
    let at = dom.find(&format!("data-name=\"{name}\""))?;
    let start = dom[..at].rfind('<')?;
    let end = at + dom[at..].find('>')?;
    Some(&dom[start..=end])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_shows_two_devices_and_one_going_offline() {
    let Some(chrome) = chromium() else {
        assert!(
            std::env::var("MODEHUB_REQUIRE_CHROMIUM").is_err(),
            "chromium is not installed (apt install chromium)"
        );
        eprintln!("SKIPPED: chromium is not installed (apt install chromium)");
        return;
    };
    let emu = emulator(2).await;
    let dir = tempfile::tempdir().unwrap();
    // With the project key, so the homes show as active.
    let pk = dir.path().join("project.key");
    std::fs::write(&pk, "v1.project").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&pk, std::fs::Permissions::from_mode(0o600)).unwrap();
    let text = hub_config_text(
        &emu,
        dir.path(),
        2,
        &format!("project_key_file = \"{}\"\n", pk.display()),
    ) + "[ops]\nlisten = \"127.0.0.1:0\"\n";
    let cfg = Config::parse(&text, dir.path()).unwrap();
    let mut hub = Hub::start(cfg.clone()).await.unwrap();
    let ctx = hub.ops_context(&cfg);
    let ops = hub.start_ops_server(ctx, &cfg).await.unwrap().unwrap();
    let url = format!("http://{ops}/");

    // Both sensors online, both sending.
    let mut s0 = Sensor::connect(hub.local_addr(), "dev0", "pw0").await;
    let mut s1 = Sensor::connect(hub.local_addr(), "dev1", "pw1").await;
    s0.publish_all("/devices/dev0/event", (0..5).map(event_json).collect())
        .await;
    s1.publish_all("/devices/dev1/event", (0..3).map(event_json).collect())
        .await;
    wait_events(&emu.handle(), device_id(1), 3).await;

    let mut dom = String::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while tokio::time::Instant::now() < deadline {
        dom = dump_dom(&chrome, &url).await;
        let both = ["dev0", "dev1"].iter().all(|n| {
            card(&dom, n).is_some_and(|c| {
                c.contains("data-local=\"yes\"") && c.contains("data-upstream=\"up\"")
            })
        });
        let homes = dom.matches("data-state=\"active\"").count() == 2;
        if both && homes {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for n in ["dev0", "dev1"] {
        let c = card(&dom, n).unwrap_or_else(|| panic!("no card for {n} in:\n{dom}"));
        assert!(c.contains("data-local=\"yes\""), "{n} not online: {c}");
        assert!(c.contains("data-upstream=\"up\""), "{n} not up: {c}");
    }
    assert!(
        dom.contains("data-loaded=\"yes\""),
        "the script did not render"
    );
    assert!(
        dom.contains("5 in the hour"),
        "dev0's chart total is missing:\n{dom}"
    );
    assert!(dom.contains("connected to MODE"));
    assert_eq!(
        dom.matches("data-state=\"active\"").count(),
        2,
        "homes:\n{dom}"
    );

    // The README's screenshot, taken while both are online.
    let shot = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/status-page.png");
    {
        let (chrome, url, shot) = (chrome.clone(), url.clone(), shot.clone());
        tokio::task::spawn_blocking(move || {
            let profile = tempfile::tempdir().unwrap();
            let out = Command::new(&chrome)
                .args(headless(profile.path()))
                .arg("--window-size=1000,620")
                .arg(format!("--screenshot={}", shot.display()))
                .arg(&url)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
        })
        .await
        .unwrap();
    }
    assert!(std::fs::metadata(&shot).unwrap().len() > 1000);

    // dev1's sensor goes away: the page says so, dev0 stays online.
    s1.client.disconnect().await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        dom = dump_dom(&chrome, &url).await;
        if card(&dom, "dev1").is_some_and(|c| c.contains("data-local=\"no\"")) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "dev1 still online on the page:\n{dom}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(card(&dom, "dev0").unwrap().contains("data-local=\"yes\""));
    assert!(dom.contains("offline"));
    drop(s0);
    hub.shutdown().await;
}

/// A non-loopback address of this machine (the one it would route outwards from), if any.
fn lan_ip() -> Option<std::net::IpAddr> {
    let s = std::net::UdpSocket::bind("0.0.0.0:0").ok()?;
    s.connect("10.255.255.255:9").ok()?; // no packet is sent
    let ip = s.local_addr().ok()?.ip();
    (!ip.is_loopback() && !ip.is_unspecified()).then_some(ip)
}

/// GET `/status.json` from `addr`, optionally with Basic credentials; the status code.
fn get_status(addr: std::net::SocketAddr, basic: Option<&str>) -> u16 {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let auth = basic
        .map(|b| format!("Authorization: Basic {b}\r\n"))
        .unwrap_or_default();
    write!(
        s,
        "GET /status.json HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{auth}\r\n"
    )
    .unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn off_loopback_the_ops_endpoint_needs_its_password() {
    let emu = emulator(1).await;
    let dir = tempfile::tempdir().unwrap();
    let base = hub_config_text(&emu, dir.path(), 1, "");

    // Listening on the LAN without a password is a config error.
    let e = Config::parse(
        &format!("{base}[ops]\nlisten = \"0.0.0.0:9464\"\n"),
        dir.path(),
    )
    .unwrap_err();
    assert!(
        e.iter()
            .any(|p| p.key == "ops.listen" && p.fix.contains("password_file")),
        "{e:?}"
    );

    let pw = dir.path().join("ops.password");
    std::fs::write(&pw, "open sesame").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&pw, std::fs::Permissions::from_mode(0o600)).unwrap();
    let cfg = Config::parse(
        &format!(
            "{base}[ops]\nlisten = \"0.0.0.0:0\"\npassword_file = \"{}\"\n",
            pw.display()
        ),
        dir.path(),
    )
    .unwrap();
    assert!(
        !format!("{cfg:?}").contains("open sesame"),
        "password in Debug"
    );
    let mut hub = Hub::start(cfg.clone()).await.unwrap();
    let ctx = hub.ops_context(&cfg);
    let port = hub
        .start_ops_server(ctx, &cfg)
        .await
        .unwrap()
        .unwrap()
        .port();

    let results = tokio::task::spawn_blocking(move || {
        let local = get_status(([127, 0, 0, 1], port).into(), None);
        let lan = lan_ip().map(|ip| {
            let addr = std::net::SocketAddr::new(ip, port);
            (
                get_status(addr, None),
                // "modehub:wrong", "anyone:open sesame"
                get_status(addr, Some("bW9kZWh1Yjp3cm9uZw==")),
                get_status(addr, Some("YW55b25lOm9wZW4gc2VzYW1l")),
            )
        });
        (local, lan)
    })
    .await
    .unwrap();
    assert_eq!(results.0, 200, "loopback needs no password");
    match results.1 {
        Some((none, wrong, right)) => {
            assert_eq!(none, 401, "no credentials");
            assert_eq!(wrong, 401, "wrong password");
            assert_eq!(right, 200, "right password, any user");
        }
        None => eprintln!("no non-loopback address here: LAN half skipped"),
    }
    hub.shutdown().await;
}
