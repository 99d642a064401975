//! `modehub device list | add | remove | set-password`: edits the `[[device]]` tables of a
//! config file in place for an installer who would rather not hand-edit TOML.
//!
//! The file is edited with `toml_edit`, so comments, order and layout stay as they were; the
//! result is validated with [`Config::parse`] (the same checks as `check-config`) *before*
//! anything is written, and written atomically (temp file in the same directory, fsync,
//! rename) with the original file's mode and owner. API keys never go on the command line
//! (where `ps` shows them): they are read from a prompt without echo, stdin, or a file, and
//! written to `keys/NAME` next to the config, mode 0600, owned like the `keys/` directory.
//! After a change a running hub is asked to reload (SIGHUP to each `modehub run` process using
//! this config, found in /proc; under systemd that is the unit's main process).
//!
//! It must not: print a secret, leave a half-written config or an orphan key file behind after
//! a refused edit, or touch anything but the config, the device's key file and the hub's PID.

use crate::config::{Config, ConfigError};
use clap::{Args, Subcommand};
use std::io::{BufRead, IsTerminal, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use toml_edit::{value, ArrayOfTables, DocumentMut, Item, Table};

/// `modehub device ...`
#[derive(Args, Debug)]
pub struct DeviceArgs {
    /// Config file to edit.
    #[arg(long, short, global = true, default_value = "/etc/modehub/config.toml")]
    pub config: PathBuf,
    /// Do not ask a running hub to reload after the change.
    #[arg(long, global = true)]
    pub no_reload: bool,
    #[command(subcommand)]
    pub cmd: DeviceCmd,
}

#[derive(Subcommand, Debug)]
pub enum DeviceCmd {
    /// List the configured devices (never their keys).
    List,
    /// Add a device. The API key is read from a prompt (no echo), stdin, or --api-key-from, and
    /// stored in keys/NAME next to the config (mode 0600).
    Add {
        /// Local name (sensors may log in with it): letters, digits, '-', '_', '.'.
        name: String,
        /// The device's MODE device ID.
        #[arg(long)]
        mode_id: crate::local::ModeId,
        /// The MODE home the device belongs to.
        #[arg(long)]
        home_id: Option<u64>,
        /// Read the API key from this file instead of stdin.
        #[arg(long, value_name = "FILE")]
        api_key_from: Option<PathBuf>,
        /// Also read a local password (a second line on stdin, or a second prompt), so the
        /// sensor may log in with its name.
        #[arg(long)]
        local_password: bool,
    },
    /// Remove a device (and its keys/NAME file). Its backlog stays in the outbox.
    Remove { name: String },
    /// Set (or with --clear remove) a device's local password, read from a prompt or stdin.
    SetPassword {
        name: String,
        /// Remove the local password: the sensor then logs in with MODE id + API key only.
        #[arg(long)]
        clear: bool,
    },
}

/// Why a device command did nothing (or not everything).
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("cannot read {path}: {source}. Check the path given with --config (and run as root or the hub's user).")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not valid TOML: {msg}. Fix it by hand first (modehub check-config --config {path}).", path = .path.display())]
    Parse { path: PathBuf, msg: String },
    #[error("{0}")]
    Usage(String),
    #[error("the edit was refused and nothing was written:\n{0}")]
    Invalid(String),
    #[error("cannot write {path}: {source}. Nothing was changed.", path = .path.display())]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// What `run` did, for the caller to print.
#[derive(Debug, Default)]
pub struct Outcome {
    pub lines: Vec<String>,
}

/// Runs a device command; the secrets come from `input` (stdin in the CLI).
pub fn run(args: &DeviceArgs, input: &mut dyn BufRead) -> Result<Outcome, DeviceError> {
    let path = &args.config;
    let text = std::fs::read_to_string(path).map_err(|source| DeviceError::Read {
        path: path.clone(),
        source,
    })?;
    let mut doc: DocumentMut =
        text.parse()
            .map_err(|e: toml_edit::TomlError| DeviceError::Parse {
                path: path.clone(),
                msg: e.message().to_string(),
            })?;
    let base = path.parent().unwrap_or(Path::new(".")).to_path_buf();
    let mut out = Outcome::default();
    match &args.cmd {
        DeviceCmd::List => {
            out.lines = list(&doc);
            return Ok(out);
        }
        DeviceCmd::Add {
            name,
            mode_id,
            home_id,
            api_key_from,
            local_password,
        } => {
            if find(&doc, name).is_some() {
                return Err(DeviceError::Usage(format!(
                    "a device named `{name}` is already configured; remove it first (modehub device remove {name}) or pick another name"
                )));
            }
            if !valid_name(name) {
                return Err(DeviceError::Usage(format!(
                    "`{}` is not a valid device name: use 1-64 letters, digits, '-', '_' or '.', not only digits",
                    printable(name)
                )));
            }
            let key =
                match api_key_from {
                    Some(f) => first_line(&std::fs::read_to_string(f).map_err(|source| {
                        DeviceError::Read {
                            path: f.clone(),
                            source,
                        }
                    })?),
                    None => read_secret(
                        input,
                        &format!("API key of {name} (from the MODE console): "),
                    )?,
                };
            if key.is_empty() {
                return Err(DeviceError::Usage(
                    "no API key given: paste the device's API key at the prompt, pipe it on stdin, or use --api-key-from FILE".into(),
                ));
            }
            let password = if *local_password {
                let p = read_secret(input, &format!("local password for {name}: "))?;
                if p.is_empty() {
                    return Err(DeviceError::Usage("the local password is empty".into()));
                }
                Some(p)
            } else {
                None
            };
            let key_path = base.join("keys").join(name);
            let mut t = Table::new();
            t["name"] = value(name.as_str());
            t["mode_id"] = value(mode_id.get() as i64);
            if let Some(h) = home_id {
                t["home_id"] = value(*h as i64);
            }
            t["api_key_file"] = value(key_path.display().to_string());
            if let Some(p) = &password {
                t["local_password"] = value(p.as_str());
            }
            devices_mut(&mut doc)?.push(t);
            // The key file must exist for the validation to read it: write it, and take it
            // away again if the edit is refused.
            let key_guard = KeyFile::write(&key_path, &key)?;
            validate(path, &doc)?;
            save(path, &doc)?;
            key_guard.keep();
            out.lines.push(format!(
                "added {name} (MODE id {mode_id}); API key in {} (0600)",
                key_path.display()
            ));
        }
        DeviceCmd::Remove { name } => {
            let Some(i) = find(&doc, name) else {
                return Err(not_found(&doc, name));
            };
            let key_file = devices(&doc)
                .and_then(|a| a.get(i))
                .and_then(|t| t.get("api_key_file"))
                .and_then(|v| v.as_str())
                .map(|p| base.join(p));
            devices_mut(&mut doc)?.remove(i);
            let last = devices(&doc).is_none_or(|a| a.is_empty());
            validate_with(path, &doc, true).map_err(|e| match e {
                DeviceError::Invalid(m) if m.contains("serial") => DeviceError::Invalid(format!(
                    "{m}\n(`{name}` is listed in a [[serial]] port's devices: remove it there first)"
                )),
                e => e,
            })?;
            save(path, &doc)?;
            out.lines.push(format!(
                "removed {name}; what it had queued stays in the outbox and is sent if it is added again"
            ));
            // Delete the key only if it is the one `device add` wrote.
            if let Some(k) = key_file.filter(|k| *k == base.join("keys").join(name)) {
                if std::fs::remove_file(&k).is_ok() {
                    out.lines.push(format!("deleted {}", k.display()));
                }
            }
            if last {
                // A running hub would refuse a config without devices and keep the old one.
                out.lines.push(
                    "no device is left: the hub cannot run without one. Stop it (sudo systemctl stop modehub) or add a device (modehub device add)".into(),
                );
                return Ok(out);
            }
        }
        DeviceCmd::SetPassword { name, clear } => {
            let Some(i) = find(&doc, name) else {
                return Err(not_found(&doc, name));
            };
            let password = if *clear {
                None
            } else {
                let p = read_secret(input, &format!("new local password for {name}: "))?;
                if p.is_empty() {
                    return Err(DeviceError::Usage(
                        "the password is empty; use --clear to remove it".into(),
                    ));
                }
                Some(p)
            };
            let t = devices_mut(&mut doc)?
                .get_mut(i)
                .ok_or_else(|| not_found_plain(name))?;
            match &password {
                Some(p) => t["local_password"] = value(p.as_str()),
                None => {
                    t.remove("local_password");
                }
            }
            validate(path, &doc)?;
            save(path, &doc)?;
            out.lines.push(if password.is_some() {
                format!("local password of {name} set")
            } else {
                format!("local password of {name} removed")
            });
        }
    }
    if !args.no_reload {
        out.lines.push(reload_running_hubs(path));
    }
    Ok(out)
}

fn devices(doc: &DocumentMut) -> Option<&ArrayOfTables> {
    doc.get("device").and_then(Item::as_array_of_tables)
}

fn devices_mut(doc: &mut DocumentMut) -> Result<&mut ArrayOfTables, DeviceError> {
    if doc.get("device").is_none() {
        doc.insert("device", Item::ArrayOfTables(ArrayOfTables::new()));
    }
    doc.get_mut("device")
        .and_then(Item::as_array_of_tables_mut)
        .ok_or_else(|| {
            DeviceError::Usage(
                "`device` in this config is not a list of [[device]] tables; fix it by hand".into(),
            )
        })
}

fn find(doc: &DocumentMut, name: &str) -> Option<usize> {
    devices(doc)?
        .iter()
        .position(|t| t.get("name").and_then(|v| v.as_str()) == Some(name))
}

fn names(doc: &DocumentMut) -> Vec<String> {
    devices(doc)
        .map(|a| {
            a.iter()
                .filter_map(|t| t.get("name").and_then(|v| v.as_str()).map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

fn not_found_plain(name: &str) -> DeviceError {
    DeviceError::Usage(format!("no device named `{}`", printable(name)))
}

fn not_found(doc: &DocumentMut, name: &str) -> DeviceError {
    let known = names(doc);
    let hint = known
        .iter()
        .max_by(|a, b| strsim::jaro_winkler(a, name).total_cmp(&strsim::jaro_winkler(b, name)))
        .filter(|k| strsim::jaro_winkler(k, name) > 0.8)
        .map(|k| format!(" (did you mean `{k}`?)"))
        .unwrap_or_default();
    DeviceError::Usage(format!(
        "no device named `{}`{hint}; configured: {}",
        printable(name),
        if known.is_empty() {
            "none".to_string()
        } else {
            known.join(", ")
        }
    ))
}

/// One line per device: name, MODE id, home, where its key is, how it logs in locally.
fn list(doc: &DocumentMut) -> Vec<String> {
    let Some(a) = devices(doc) else {
        return vec![
            "no devices configured (add one: modehub device add NAME --mode-id ID)".into(),
        ];
    };
    let mut lines = vec![format!(
        "{:<24} {:<10} {:<8} {:<6} {}",
        "NAME", "MODE ID", "HOME", "LOCAL", "API KEY"
    )];
    for t in a.iter() {
        let s = |k: &str| t.get(k).and_then(|v| v.as_str()).map(String::from);
        let n = |k: &str| {
            t.get(k)
                .and_then(|v| v.as_integer())
                .map(|i| i.to_string())
                .unwrap_or_else(|| "-".into())
        };
        let key = match (s("api_key_file"), t.contains_key("api_key")) {
            (Some(f), _) => f,
            (None, true) => "(inline in the config)".into(),
            (None, false) => "(none)".into(),
        };
        lines.push(format!(
            "{:<24} {:<10} {:<8} {:<6} {}",
            printable(&s("name").unwrap_or_else(|| "?".into())),
            n("mode_id"),
            n("home_id"),
            if t.contains_key("local_password") {
                "name"
            } else {
                "id"
            },
            printable(&key)
        ));
    }
    lines
}

fn validate(path: &Path, doc: &DocumentMut) -> Result<(), DeviceError> {
    validate_with(path, doc, false)
}

/// [`validate`]; `allow_no_device`: a config without devices is fine (removing the last one).
fn validate_with(path: &Path, doc: &DocumentMut, allow_no_device: bool) -> Result<(), DeviceError> {
    let base = path.parent().unwrap_or(Path::new("."));
    let result = Config::parse(&doc.to_string(), base)
        .map(drop)
        .or_else(|mut problems| {
            if allow_no_device {
                problems.retain(|p| !(p.key == "device" && p.what.contains("no [[device]]")));
            }
            if problems.is_empty() {
                Ok(())
            } else {
                Err(problems)
            }
        });
    result.map_err(|problems| {
        DeviceError::Invalid(
            ConfigError::Invalid {
                path: path.to_path_buf(),
                problems,
            }
            .to_string(),
        )
    })
}

/// Writes `doc` over `path` atomically, keeping the file's mode and (as root) its owner.
fn save(path: &Path, doc: &DocumentMut) -> Result<(), DeviceError> {
    let err = |source| DeviceError::Write {
        path: path.to_path_buf(),
        source,
    };
    let meta = std::fs::metadata(path).map_err(err)?;
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut tmp = tempfile::Builder::new()
        .prefix(".modehub-config-")
        .tempfile_in(dir)
        .map_err(err)?;
    tmp.write_all(doc.to_string().as_bytes()).map_err(err)?;
    let f = tmp.as_file();
    f.set_permissions(std::fs::Permissions::from_mode(meta.mode() & 0o7777))
        .map_err(err)?;
    if nix::unistd::geteuid().is_root() {
        std::os::unix::fs::fchown(f, Some(meta.uid()), Some(meta.gid())).map_err(err)?;
    }
    f.sync_all().map_err(err)?;
    tmp.persist(path).map_err(|e| err(e.error))?;
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// A key file written by `device add`; removed again (or its old content restored) on drop
/// unless [`KeyFile::keep`] was called.
struct KeyFile {
    path: PathBuf,
    previous: Option<Vec<u8>>,
    keep: bool,
}

impl KeyFile {
    fn write(path: &Path, key: &str) -> Result<KeyFile, DeviceError> {
        let err = |source| DeviceError::Write {
            path: path.to_path_buf(),
            source,
        };
        let dir = path.parent().unwrap_or(Path::new("."));
        if !dir.exists() {
            std::fs::DirBuilder::new()
                .mode(0o700)
                .create(dir)
                .map_err(err)?;
            // Installed layout: keys/ belongs to the hub's user.
            if nix::unistd::geteuid().is_root() {
                if let Ok(Some(u)) = nix::unistd::User::from_name("modehub") {
                    let _ = nix::unistd::chown(dir, Some(u.uid), Some(u.gid));
                }
            }
        }
        let previous = std::fs::read(path).ok();
        let owner = std::fs::metadata(dir).map_err(err)?;
        let mut tmp = tempfile::Builder::new()
            .prefix(".modehub-key-")
            .tempfile_in(dir)
            .map_err(err)?;
        tmp.as_file()
            .set_permissions(std::fs::Permissions::from_mode(0o600))
            .map_err(err)?;
        tmp.write_all(key.as_bytes()).map_err(err)?;
        if nix::unistd::geteuid().is_root() {
            std::os::unix::fs::fchown(tmp.as_file(), Some(owner.uid()), Some(owner.gid()))
                .map_err(err)?;
        }
        tmp.as_file().sync_all().map_err(err)?;
        tmp.persist(path).map_err(|e| err(e.error))?;
        Ok(KeyFile {
            path: path.to_path_buf(),
            previous,
            keep: false,
        })
    }

    fn keep(mut self) {
        self.keep = true;
    }
}

impl Drop for KeyFile {
    fn drop(&mut self) {
        if self.keep {
            return;
        }
        match &self.previous {
            None => {
                let _ = std::fs::remove_file(&self.path);
            }
            Some(old) => {
                let _ = std::fs::write(&self.path, old);
            }
        }
    }
}

fn first_line(s: &str) -> String {
    s.lines().next().unwrap_or("").trim().to_string()
}

/// Reads one secret line: from a prompt without echo when stdin is a terminal, else a line of
/// `input`.
fn read_secret(input: &mut dyn BufRead, prompt: &str) -> Result<String, DeviceError> {
    let stdin = std::io::stdin();
    let tty = stdin.is_terminal();
    let saved = if tty {
        eprint!("{prompt}");
        let _ = std::io::stderr().flush();
        use nix::sys::termios::{tcgetattr, tcsetattr, LocalFlags, SetArg};
        tcgetattr(&stdin).ok().inspect(|t| {
            let mut quiet = t.clone();
            quiet.local_flags.remove(LocalFlags::ECHO);
            let _ = tcsetattr(&stdin, SetArg::TCSANOW, &quiet);
        })
    } else {
        None
    };
    let mut line = String::new();
    let read = input.read_line(&mut line);
    if let Some(t) = saved {
        let _ = nix::sys::termios::tcsetattr(&stdin, nix::sys::termios::SetArg::TCSANOW, &t);
        eprintln!();
    }
    read.map_err(|e| DeviceError::Usage(format!("cannot read from stdin: {e}")))?;
    Ok(line.trim().to_string())
}

/// The `modehub run` processes whose `--config` is `config` (by canonical path).
pub fn running_hubs(config: &Path) -> Vec<i32> {
    let Ok(want) = std::fs::canonicalize(config) else {
        return Vec::new();
    };
    let me = std::process::id() as i32;
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut pids = Vec::new();
    for e in rd.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        if pid == me {
            continue;
        }
        let Ok(raw) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let args: Vec<String> = raw
            .split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        let is_modehub = args
            .first()
            .and_then(|a| Path::new(a).file_name())
            .is_some_and(|n| n == "modehub");
        if !is_modehub || args.get(1).map(String::as_str) != Some("run") {
            continue;
        }
        let mut cfg = PathBuf::from("/etc/modehub/config.toml");
        let mut it = args.iter().skip(2);
        while let Some(a) = it.next() {
            if a == "--config" || a == "-c" {
                if let Some(v) = it.next() {
                    cfg = PathBuf::from(v);
                }
            } else if let Some(v) = a.strip_prefix("--config=") {
                cfg = PathBuf::from(v);
            }
        }
        if cfg.is_relative() {
            match std::fs::read_link(format!("/proc/{pid}/cwd")) {
                Ok(cwd) => cfg = cwd.join(cfg),
                Err(_) => continue,
            }
        }
        if std::fs::canonicalize(&cfg).is_ok_and(|c| c == want) {
            pids.push(pid);
        }
    }
    pids
}

/// SIGHUPs each running hub of `config`; says what happened.
fn reload_running_hubs(config: &Path) -> String {
    let pids = running_hubs(config);
    if pids.is_empty() {
        return "no running hub uses this config; start it with: sudo systemctl enable --now modehub"
            .into();
    }
    let mut done = Vec::new();
    for pid in pids {
        match nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGHUP,
        ) {
            Ok(()) => done.push(format!("asked the running hub (pid {pid}) to reload")),
            Err(e) => done.push(format!(
                "cannot signal the running hub (pid {pid}): {e}; run: sudo systemctl reload modehub"
            )),
        }
    }
    done.push("check the result with: modehub status".into());
    done.join("\n")
}

/// The config's device-name rule (checked again by [`Config::parse`]); checked first here
/// because the name becomes a file name under keys/.
fn valid_name(n: &str) -> bool {
    (1..=64).contains(&n.len())
        && n.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
        && !n.bytes().all(|b| b.is_ascii_digit())
        && n != "."
        && n != ".."
}

/// A name or path from the file, safe to print (control characters escaped, length capped).
fn printable(s: &str) -> String {
    let e: String = s.chars().flat_map(char::escape_default).collect();
    if e.chars().count() > 80 {
        e.chars().take(80).collect::<String>() + "..."
    } else {
        e
    }
}
