//! Problem reporting: what is wrong with a config file, where (file:line from toml's spans), and
//! how to fix it. Unknown keys get a "did you mean" hint; the keys a table may hold come from the
//! model's own serde field lists, so there is no second list to keep in step. It must not judge
//! values (see `validate`).

use super::model::{
    CloudConfig, Config, DeviceConfig, HubConfig, LocalConfig, LocalMqttConfig, OpsConfig,
    SerialConfig,
};
use serde::de::{self, Deserialize, Visitor};
use std::path::{Path, PathBuf};
use toml::de::{DeTable, DeValue};
use toml::Spanned;

/// One thing wrong with a config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Key path, e.g. `device[2].mode_id` (empty for the whole file).
    pub key: String,
    /// 1-based line in the file, when it could be found.
    pub line: Option<usize>,
    pub what: String,
    pub fix: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}. Check the path given with --config.")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}", render_problems(.path, .problems))]
    Invalid {
        path: PathBuf,
        problems: Vec<Problem>,
    },
}

fn render_problems(path: &Path, problems: &[Problem]) -> String {
    let mut out = format!(
        "{} has {} problem{}:",
        path.display(),
        problems.len(),
        if problems.len() == 1 { "" } else { "s" }
    );
    for p in problems {
        out.push_str("\n  ");
        out.push_str(&path.display().to_string());
        if let Some(line) = p.line {
            out.push_str(&format!(":{line}"));
        }
        if !p.key.is_empty() {
            out.push_str(&format!(": {}", p.key));
        }
        out.push_str(&format!(": {}\n      fix: {}", p.what, p.fix));
    }
    out
}

/// The field names serde accepts for `T` (renames applied, skipped fields left out), read from
/// its derived `Deserialize` by a deserializer that only records what it is asked for.
fn fields_of<'de, T: Deserialize<'de>>() -> &'static [&'static str] {
    struct Probe<'a>(&'a mut &'static [&'static str]);
    #[derive(Debug)]
    struct Stop;
    impl std::fmt::Display for Stop {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("field probe")
        }
    }
    impl std::error::Error for Stop {}
    impl de::Error for Stop {
        fn custom<M: std::fmt::Display>(_: M) -> Self {
            Stop
        }
    }
    impl<'de> de::Deserializer<'de> for Probe<'_> {
        type Error = Stop;
        fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Stop> {
            Err(Stop)
        }
        fn deserialize_struct<V: Visitor<'de>>(
            self,
            _: &'static str,
            fields: &'static [&'static str],
            _: V,
        ) -> Result<V::Value, Stop> {
            *self.0 = fields;
            Err(Stop)
        }
        serde::forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
            option unit unit_struct newtype_struct seq tuple tuple_struct map enum identifier
            ignored_any
        }
    }
    let mut fields: &'static [&'static str] = &[];
    let _ = T::deserialize(Probe(&mut fields));
    fields
}

/// The keys each table may hold (`device`, `serial`: each element of those arrays).
fn known_keys(table: &str) -> Option<&'static [&'static str]> {
    Some(match table {
        "" => fields_of::<Config>(),
        "hub" => fields_of::<HubConfig>(),
        "local" => fields_of::<LocalConfig>(),
        "local.mqtt" => fields_of::<LocalMqttConfig>(),
        "cloud" => fields_of::<CloudConfig>(),
        "ops" => fields_of::<OpsConfig>(),
        "device" => fields_of::<DeviceConfig>(),
        "serial" => fields_of::<SerialConfig>(),
        _ => return None,
    })
}

pub(super) fn did_you_mean(word: &str, candidates: &[&str]) -> Option<String> {
    candidates
        .iter()
        .map(|c| (strsim::jaro_winkler(word, c), *c))
        .filter(|(score, _)| *score > 0.8)
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, c)| c.to_string())
}

pub(super) fn display_path(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

/// 1-based line of byte offset `at` in `src`.
pub(super) fn line_at(src: &str, at: usize) -> usize {
    src[..at.min(src.len())].matches('\n').count() + 1
}

/// Finds where keys are in the file, from toml's spans.
pub(super) struct Locator<'a> {
    src: &'a str,
    doc: Spanned<DeTable<'a>>,
}

fn entry<'t, 'a>(t: &'t DeTable<'a>, key: &str) -> Option<(usize, &'t Spanned<DeValue<'a>>)> {
    t.iter()
        .find(|(k, _)| k.get_ref().as_ref() == key)
        .map(|(k, v)| (k.span().start, v))
}

impl<'a> Locator<'a> {
    /// Parses `src` (a syntax error is reported as a problem with its line).
    pub(super) fn new(src: &'a str) -> Result<Locator<'a>, Problem> {
        let doc = DeTable::parse(src).map_err(|e| Problem {
            key: String::new(),
            line: e.span().map(|s| line_at(src, s.start)),
            what: format!("not valid TOML: {}", e.message()),
            fix: "fix the syntax at that line (strings need quotes, tables need [brackets])".into(),
        })?;
        Ok(Locator { src, doc })
    }

    /// The table at `path` (`local.mqtt`, `device[1]`), with the offset of its start.
    fn table(&self, path: &str) -> Option<(usize, &DeTable<'a>)> {
        let mut at = self.doc.span().start;
        let mut t = self.doc.get_ref();
        if path.is_empty() {
            return Some((at, t));
        }
        for seg in path.split('.') {
            let (name, index) = match seg.split_once('[') {
                Some((n, rest)) => (n, rest.trim_end_matches(']').parse::<usize>().ok()),
                None => (seg, None),
            };
            let (key_at, v) = entry(t, name)?;
            at = key_at;
            let v = match (v.get_ref(), index) {
                (DeValue::Array(items), Some(i)) => {
                    let item = items.get(i)?;
                    at = item.span().start;
                    item.get_ref()
                }
                (other, None) => other,
                _ => return None,
            };
            match v {
                DeValue::Table(inner) => t = inner,
                _ => return None,
            }
        }
        Some((at, t))
    }

    /// Line of `key` in table `table` (`device[1]` style); of the table itself if `key` is empty.
    pub(super) fn line(&self, table: &str, key: &str) -> Option<usize> {
        let (at, t) = self.table(table)?;
        if key.is_empty() {
            return Some(line_at(self.src, at));
        }
        entry(t, key).map(|(k, _)| line_at(self.src, k))
    }

    /// Every key that no table of the model accepts, with a hint.
    pub(super) fn unknown_keys(&self, out: &mut Vec<Problem>) {
        self.walk(self.doc.get_ref(), "", "", out);
    }

    /// `schema`: the table's path in the model (`device`); `shown`: where it is (`device[1]`).
    fn walk(&self, table: &DeTable<'a>, schema: &str, shown: &str, out: &mut Vec<Problem>) {
        let Some(known) = known_keys(schema) else {
            return;
        };
        for (k, v) in table {
            let k_str: &str = k.get_ref().as_ref();
            if !known.contains(&k_str) {
                let fix = match did_you_mean(k_str, known) {
                    Some(s) => format!("did you mean `{s}`? Known keys here: {}", known.join(", ")),
                    None => format!("remove it; known keys here: {}", known.join(", ")),
                };
                out.push(Problem {
                    line: Some(line_at(self.src, k.span().start)),
                    key: display_path(shown, k_str),
                    what: format!("unknown key `{k_str}`"),
                    fix,
                });
                continue;
            }
            let child_schema = display_path(schema, k_str);
            let child_shown = display_path(shown, k_str);
            match v.get_ref() {
                DeValue::Table(t) => self.walk(t, &child_schema, &child_shown, out),
                DeValue::Array(items) => {
                    for (i, item) in items.iter().enumerate() {
                        if let DeValue::Table(t) = item.get_ref() {
                            self.walk(t, &child_schema, &format!("{child_shown}[{i}]"), out);
                        }
                    }
                }
                _ => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn field_lists_come_from_the_model() {
        assert!(known_keys("").unwrap().contains(&"device"));
        assert!(known_keys("serial").unwrap().contains(&"downlink_format"));
        assert!(known_keys("local.mqtt").unwrap().contains(&"listen"));
        assert!(!known_keys("cloud").unwrap().is_empty());
    }
}
