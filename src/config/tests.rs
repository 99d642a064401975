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
    assert_eq!(c.devices[0].mode_id, 1234);
    assert_eq!(c.cloud.api_url, "https://api.tinkermode.com");
    assert_eq!(c.hub.max_payload_bytes, 65536);
    assert_eq!(
        c.cloud.mqtt_endpoint().unwrap(),
        MqttEndpoint {
            host: "127.0.0.1".into(),
            port: 1884,
            tls: false
        }
    );
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
