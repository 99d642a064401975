//! The config's unit tests.

use super::*;

const GOOD: &str = r#"
[hub]
data_dir = "/tmp/x"

[local.mqtt]
listen = "127.0.0.1:1883"

[cloud]
mqtt_url = "mqtt://127.0.0.1:1884"

[[device]]
name = "porch-temp"
mode_id = 1234
home_id = 42
api_key = "v1.secret-key"
local_password = "s3cret"
"#;

#[test]
fn parses_good_config_with_defaults() {
    let c = Config::parse(GOOD, Path::new(".")).unwrap();
    assert_eq!(c.devices[0].mode_id, crate::local::ModeId(1234));
    assert_eq!(c.cloud.api_url, "https://api.tinkermode.com");
    assert_eq!(c.hub.max_payload_bytes, 65536);
    assert_eq!(
        c.cloud.mqtt_endpoint().unwrap(),
        MqttEndpoint {
            host: "127.0.0.1".into(),
            port: 1884,
            tls: false,
            ws_path: None,
        }
    );
}

#[test]
fn mqtt_over_websocket_urls() {
    let e = MqttEndpoint::parse("wss://mqtt.tinkermode.com:443").unwrap();
    assert_eq!(
        (e.host.as_str(), e.port, e.tls, e.ws_path.as_deref()),
        ("mqtt.tinkermode.com", 443, true, Some("/"))
    );
    let e = MqttEndpoint::parse("ws://127.0.0.1:8080/mqtt").unwrap();
    assert_eq!(
        (e.port, e.tls, e.ws_path.as_deref()),
        (8080, false, Some("/mqtt"))
    );
    assert_eq!(MqttEndpoint::parse("wss://h").unwrap().port, 443);
    assert!(MqttEndpoint::parse("http://h").is_err());
}

#[test]
fn secrets_never_in_debug() {
    let c = Config::parse(GOOD, Path::new(".")).unwrap();
    let dbg = format!("{c:?}");
    assert!(!dbg.contains("v1.secret-key"), "{dbg}");
    assert!(!dbg.contains("s3cret"), "{dbg}");
}

#[test]
fn unknown_keys_get_did_you_mean_with_lines() {
    let src = GOOD
        .replace("listen =", "lisen =")
        .replace("home_id", "homeid");
    let problems = Config::parse(&src, Path::new(".")).unwrap_err();
    assert_eq!(problems.len(), 2, "{problems:?}");
    let lisen = problems
        .iter()
        .find(|p| p.key == "local.mqtt.lisen")
        .unwrap();
    assert!(lisen.fix.contains("did you mean `listen`"));
    assert_eq!(lisen.line, Some(6));
    let homeid = problems
        .iter()
        .find(|p| p.key == "device[0].homeid")
        .unwrap();
    assert!(homeid.fix.contains("`home_id`"));
    assert_eq!(homeid.line, Some(14));
}

#[test]
fn reports_every_semantic_problem() {
    let src = r#"
[cloud]
mqtt_url = "http://x"
[[device]]
name = "a"
mode_id = 1
[[device]]
name = "a"
mode_id = 1
api_key = "k"
"#;
    let problems = Config::parse(src, Path::new(".")).unwrap_err();
    let keys: Vec<_> = problems.iter().map(|p| p.key.as_str()).collect();
    assert!(keys.contains(&"cloud.mqtt_url"), "{keys:?}");
    assert!(keys.contains(&"device[0].api_key"), "{keys:?}");
    assert!(keys.contains(&"device[1].name"), "{keys:?}");
    assert!(keys.contains(&"device[1].mode_id"), "{keys:?}");
    let dev1 = problems.iter().find(|p| p.key == "device[1].name").unwrap();
    assert_eq!(dev1.line, Some(8));
}

#[cfg(unix)]
#[test]
fn key_file_must_be_private() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("k");
    std::fs::write(&key, "v1.filekey\n").unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let src = "[[device]]\nname = \"a\"\nmode_id = 1\napi_key_file = \"k\"\n";
    let problems = Config::parse(src, dir.path()).unwrap_err();
    assert!(problems[0].fix.contains("chmod 600"), "{problems:?}");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let c = Config::parse(src, dir.path()).unwrap();
    assert_eq!(c.devices[0].key().expose(), "v1.filekey");
}

#[test]
fn bad_toml_is_reported_with_line() {
    let problems = Config::parse("[hub]\ndata_dir = /x\n", Path::new(".")).unwrap_err();
    assert_eq!(problems[0].line, Some(2));
}

/// The project key lives in a file; a changed key in the same file must count as a change
/// (its `Debug` is `***` either way).
#[cfg(unix)]
#[test]
fn a_changed_project_key_in_the_same_file_needs_a_restart() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("project.key");
    let src = format!("{GOOD}\n[cloud]\nproject_key_file = \"project.key\"\n")
        .replace("[cloud]\nmqtt_url = \"mqtt://127.0.0.1:1884\"\n", "");
    let src = src.replace(
        "[cloud]\nproject_key_file",
        "[cloud]\nmqtt_url = \"mqtt://127.0.0.1:1884\"\nproject_key_file",
    );
    let load = |k: &str| {
        std::fs::write(&key, k).unwrap();
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
        Config::parse(&src, dir.path()).unwrap()
    };
    let old = load("v1.project-key-one\n");
    let same = load("v1.project-key-one\n");
    let new = load("v1.project-key-two\n");
    assert!(old.restart_needed(&same).is_empty());
    let changed = old.restart_needed(&new);
    assert_eq!(changed.len(), 1, "{changed:?}");
    assert!(changed[0].contains("[cloud]"), "{changed:?}");
    assert!(
        !changed[0].contains("project-key"),
        "no secret in the words: {changed:?}"
    );
}

#[test]
fn a_secret_of_the_wrong_type_is_not_echoed() {
    for (key, value) in [("local_password", "918273645"), ("api_key", "918273645.5")] {
        let src = GOOD
            .replace("local_password = \"s3cret\"\n", "")
            .replace("api_key = \"v1.secret-key\"\n", "")
            .replace("[[device]]\n", &format!("[[device]]\n{key} = {value}\n"));
        let problems = Config::parse(&src, Path::new(".")).unwrap_err();
        let text = format!("{problems:?}");
        assert!(!text.contains("918273645"), "{key}: {text}");
        assert!(text.contains(key), "{key}: {text}");
        assert!(problems[0].line.is_some(), "{text}");
    }
    // Other keys still say what was wrong with the value.
    let problems = Config::parse(
        &GOOD.replace("mode_id = 1234", "mode_id = \"x1\""),
        Path::new("."),
    )
    .unwrap_err();
    assert!(format!("{problems:?}").contains("x1"), "{problems:?}");
}

#[test]
fn a_short_local_password_is_refused_where_the_lan_can_try_it() {
    let lan = GOOD.replace("127.0.0.1:1883", "0.0.0.0:1883");
    for weak in ["x", "pw0", "1234567"] {
        let src = lan.replace("\"s3cret\"", &format!("\"{weak}\""));
        let problems = Config::parse(&src, Path::new(".")).unwrap_err();
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert_eq!(problems[0].key, "device[0].local_password");
        assert!(problems[0].what.contains("shorter than 8"), "{problems:?}");
        assert!(
            !format!("{problems:?}").contains(&format!("\"{weak}\"")),
            "{problems:?}"
        );
    }
    let name = lan.replace("\"s3cret\"", "\"porch-temp\"");
    assert!(Config::parse(&name, Path::new(".")).is_err());
    let strong = lan.replace("\"s3cret\"", "\"Zq8-vT3n-kP\"");
    assert!(Config::parse(&strong, Path::new(".")).is_ok());
    // Blank is refused everywhere; on a loopback-only listener short ones are accepted (only
    // local processes can try them).
    assert!(Config::parse(&GOOD.replace("\"s3cret\"", "\"\""), Path::new(".")).is_err());
    assert!(Config::parse(&GOOD.replace("\"s3cret\"", "\"pw0\""), Path::new(".")).is_ok());
}

#[cfg(unix)]
#[test]
fn a_world_readable_config_with_inline_secrets_gets_a_warning() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.toml");
    std::fs::write(&path, GOOD).unwrap();
    let cfg = Config::load(&path).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    let w = cfg.file_warnings(&path);
    assert_eq!(w.len(), 1, "{w:?}");
    assert!(
        w[0].contains("chmod 640") && w[0].contains("porch-temp"),
        "{w:?}"
    );
    assert!(
        !w[0].contains("secret-key") && !w[0].contains("s3cret"),
        "{w:?}"
    );
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
    assert!(cfg.file_warnings(&path).is_empty());
}

#[test]
fn secret_matches_only_equal_and_hides_its_length() {
    let s = Secret::new("secret");
    assert!(s.matches(b"secret"));
    assert!(!s.matches(b"secreT"));
    assert!(!s.matches(b"secret1"));
    assert!(!s.matches(b"secre"));
    assert!(!s.matches(b""));
    // A candidate that repeats the secret is not equal to it.
    assert!(!Secret::new("ab").matches(b"abab"));
    assert!(!Secret::new("").matches(b"x"));
    assert!(Secret::new("").matches(b""));
}
