//! The serial line protocol: parsing what sensors send and encoding what the hub writes back.
//!
//! Pure functions over byte slices and strings, specified in `docs/serial-protocol.md`: the full
//! JSON form and the compact `E`/`K` form upstream, `OK`/`ERR` acknowledgements and the `C`/`K`
//! (or JSON) lines downstream, the optional `*XX` CRC-8 suffix, and the escaping and typing rules
//! of the compact form. Every function returns an error value for any input and never panics.
//! This module must not do I/O, know about ports, devices or the outbox, or keep state: it turns
//! one line into one value and back.

use crate::config::LineFormat;
use crate::local::DownKind;
use serde::{Deserialize, Deserializer};
use serde_json::value::RawValue;
use serde_json::Value;

/// What is wrong with a line (the `reason` label of the counter and of `ERR <n> <reason>`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LineFault {
    /// Not UTF-8.
    BadUtf8,
    /// A `*XX` suffix that does not match the line.
    BadChecksum,
    /// No `*XX` suffix on a port that requires one.
    MissingChecksum,
    /// Not a well-formed JSON or compact line.
    Parse,
}

impl LineFault {
    pub fn label(self) -> &'static str {
        match self {
            LineFault::BadUtf8 => "bad_utf8",
            LineFault::BadChecksum => "bad_checksum",
            LineFault::MissingChecksum => "missing_checksum",
            LineFault::Parse => "parse_error",
        }
    }
}

/// A line that could not be read, with its ack number when one could still be found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LineError {
    pub fault: LineFault,
    pub detail: String,
    pub ack: Option<u32>,
}

impl LineError {
    fn parse(detail: impl Into<String>) -> LineError {
        LineError {
            fault: LineFault::Parse,
            detail: detail.into(),
            ack: None,
        }
    }
}

/// One upstream message, its payload parts already in JSON text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Up {
    /// `data` is JSON text (an object when well-formed; the router checks it).
    Event {
        event_type: String,
        data: String,
    },
    /// `value` is JSON text.
    KvSet {
        key: String,
        value: String,
    },
    KvDelete {
        key: String,
    },
}

impl Up {
    /// The payload the router takes: MODE's event object or the local kv object.
    pub fn router_payload(&self) -> String {
        match self {
            Up::Event { event_type, data } => {
                format!(
                    r#"{{"eventType":{},"eventData":{}}}"#,
                    json_str(event_type),
                    data
                )
            }
            Up::KvSet { key, value } => {
                format!(
                    r#"{{"action":"set","key":{},"value":{}}}"#,
                    json_str(key),
                    value
                )
            }
            Up::KvDelete { key } => format!(r#"{{"action":"delete","key":{}}}"#, json_str(key)),
        }
    }

    pub fn is_kv(&self) -> bool {
        !matches!(self, Up::Event { .. })
    }
}

/// A parsed upstream line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpLine {
    /// The device the line names (a local name or a decimal MODE ID), if it names one.
    pub dev: Option<String>,
    pub msg: Up,
    /// `#<n>` or `"id": n`: the sensor wants `OK <n>` / `ERR <n> <reason>`.
    pub ack: Option<u32>,
    /// The line carried a valid `*XX`.
    pub checksummed: bool,
}

// ---------------------------------------------------------------------------------------------
// CRC-8

const fn crc8_table() -> [u8; 256] {
    let mut t = [0u8; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u8;
        let mut b = 0;
        while b < 8 {
            c = if c & 0x80 != 0 {
                (c << 1) ^ 0x07
            } else {
                c << 1
            };
            b += 1;
        }
        t[i] = c;
        i += 1;
    }
    t
}

static CRC8: [u8; 256] = crc8_table();

/// CRC-8 with polynomial 0x07, initial value 0x00, no reflection, no final XOR
/// (CRC-8/SMBUS; `crc8(b"123456789") == 0xF4`).
pub fn crc8(data: &[u8]) -> u8 {
    data.iter().fold(0u8, |c, &b| CRC8[(c ^ b) as usize])
}

fn hex_val(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'A'..=b'F' => Some(b - b'A' + 10),
        b'a'..=b'f' => Some(b - b'a' + 10),
        _ => None,
    }
}

const HEX: &[u8; 16] = b"0123456789ABCDEF";

/// Appends `*XX` (the CRC-8 of everything before it, uppercase hex) to `line`.
pub fn push_checksum(line: &mut Vec<u8>) {
    let c = crc8(line);
    line.push(b'*');
    line.push(HEX[(c >> 4) as usize]);
    line.push(HEX[(c & 15) as usize]);
}

/// `line` with its `*XX` suffix, as a string.
pub fn with_checksum(line: &str) -> String {
    let mut v = line.as_bytes().to_vec();
    push_checksum(&mut v);
    // Only ASCII was appended to valid UTF-8.
    String::from_utf8(v).unwrap_or_default()
}

/// Splits a trailing `*XX` off: `(body, Some(xx))`, or `(line, None)` without one. An escaped
/// `\*` (an odd number of backslashes before it) is text, not a checksum.
fn split_checksum(line: &[u8]) -> (&[u8], Option<u8>) {
    if let [body @ .., b'*', h, l] = line {
        let backslashes = body.iter().rev().take_while(|b| **b == b'\\').count();
        if backslashes % 2 == 0 {
            if let (Some(h), Some(l)) = (hex_val(*h), hex_val(*l)) {
                return (body, Some(h << 4 | l));
            }
        }
    }
    (line, None)
}

fn is_blank(b: u8) -> bool {
    b == b' ' || b == b'\t'
}

fn trim_bytes(mut b: &[u8]) -> &[u8] {
    while let [first, rest @ ..] = b {
        if is_blank(*first) {
            b = rest;
        } else {
            break;
        }
    }
    while let [rest @ .., last] = b {
        if is_blank(*last) {
            b = rest;
        } else {
            break;
        }
    }
    b
}

/// Best-effort ack number of an unreadable line (bad checksum, bad UTF-8, parse error), so the
/// sensor can be told `ERR <n>`: the compact `#<n>` last token, or a JSON `"id": <n>`.
pub fn peek_ack(line: &[u8]) -> Option<u32> {
    let body = trim_bytes(split_checksum(strip_cr(line)).0);
    if body.first() == Some(&b'{') {
        let pos = body.windows(4).position(|w| w == b"\"id\"")?;
        let rest = trim_bytes(&body[pos + 4..]);
        let rest = trim_bytes(rest.strip_prefix(b":")?);
        let digits: &[u8] = &rest[..rest.iter().take_while(|b| b.is_ascii_digit()).count()];
        return parse_u32(digits);
    }
    let start = body.iter().rposition(|&b| is_blank(b)).map_or(0, |i| i + 1);
    ack_token(&body[start..]).and_then(|r| r.ok())
}

fn parse_u32(digits: &[u8]) -> Option<u32> {
    if digits.is_empty() || digits.len() > 10 {
        return None;
    }
    std::str::from_utf8(digits).ok()?.parse().ok()
}

/// `Some(Ok(n))` for `#<n>`, `Some(Err)` for `#<digits>` out of range, `None` for other tokens.
fn ack_token(tok: &[u8]) -> Option<Result<u32, ()>> {
    let digits = tok.strip_prefix(b"#")?;
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(parse_u32(digits).ok_or(()))
}

fn strip_cr(line: &[u8]) -> &[u8] {
    line.strip_suffix(b"\r").unwrap_or(line)
}

// ---------------------------------------------------------------------------------------------
// Upstream parsing

/// Parses one line (without its `\n`; a trailing `\r` is ignored). `Ok(None)` for a blank line.
pub fn parse_up(line: &[u8], require_checksum: bool) -> Result<Option<UpLine>, LineError> {
    let line = strip_cr(line);
    let (body, sum) = split_checksum(line);
    match sum {
        Some(sum) if crc8(body) != sum => {
            return Err(LineError {
                fault: LineFault::BadChecksum,
                detail: format!("line says *{sum:02X}, its CRC-8 is {:02X}", crc8(body)),
                ack: peek_ack(body),
            })
        }
        None if require_checksum => {
            return Err(LineError {
                fault: LineFault::MissingChecksum,
                detail: "this port requires a *XX checksum at the end of each line".into(),
                ack: peek_ack(body),
            })
        }
        _ => {}
    }
    let text = std::str::from_utf8(body).map_err(|e| LineError {
        fault: LineFault::BadUtf8,
        detail: format!("not UTF-8 (at byte {})", e.valid_up_to()),
        ack: peek_ack(body),
    })?;
    let text = text.trim_matches([' ', '\t']);
    if text.is_empty() {
        return Ok(None);
    }
    let parsed = if text.starts_with('{') {
        parse_json(text)
    } else {
        parse_compact(text)
    };
    match parsed {
        Ok((dev, msg, ack)) => Ok(Some(UpLine {
            dev,
            msg,
            ack,
            checksummed: sum.is_some(),
        })),
        Err(mut e) => {
            if e.ack.is_none() {
                e.ack = peek_ack(body);
            }
            Err(e)
        }
    }
}

type Parts = (Option<String>, Up, Option<u32>);

fn some_raw<'de, D: Deserializer<'de>>(d: D) -> Result<Option<&'de RawValue>, D::Error> {
    <&RawValue>::deserialize(d).map(Some)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonUp<'a> {
    #[serde(default, borrow, deserialize_with = "some_raw")]
    dev: Option<&'a RawValue>,
    #[serde(default, alias = "eventType")]
    event: Option<String>,
    #[serde(default, borrow, alias = "eventData", deserialize_with = "some_raw")]
    data: Option<&'a RawValue>,
    #[serde(default, alias = "action")]
    kv: Option<String>,
    #[serde(default)]
    key: Option<String>,
    #[serde(default, borrow, deserialize_with = "some_raw")]
    value: Option<&'a RawValue>,
    #[serde(default)]
    id: Option<u64>,
}

fn parse_json(text: &str) -> Result<Parts, LineError> {
    let j: JsonUp =
        serde_json::from_str(text).map_err(|e| LineError::parse(format!("JSON: {e}")))?;
    let ack = match j.id {
        None => None,
        Some(n) => Some(
            u32::try_from(n)
                .map_err(|_| LineError::parse(format!("\"id\" {n} is over {}", u32::MAX)))?,
        ),
    };
    let with_ack = |mut e: LineError| {
        e.ack = ack;
        e
    };
    let dev = match j.dev {
        None => None,
        Some(raw) => match serde_json::from_str::<Value>(raw.get()) {
            Ok(Value::String(s)) => Some(s),
            Ok(Value::Number(n)) if n.is_u64() => Some(n.to_string()),
            _ => {
                return Err(with_ack(LineError::parse(
                    "\"dev\" must be a device name or a MODE device ID",
                )))
            }
        },
    };
    let msg = match (j.event, j.kv) {
        (Some(_), Some(_)) => {
            return Err(with_ack(LineError::parse(
                "a line is an event or a kv change, not both",
            )))
        }
        (None, None) => {
            return Err(with_ack(LineError::parse(
                "a line needs \"event\" (an event) or \"kv\" (a kv change)",
            )))
        }
        (Some(event_type), None) => {
            if j.key.is_some() || j.value.is_some() {
                return Err(with_ack(LineError::parse(
                    "\"key\" and \"value\" belong to kv lines, not events",
                )));
            }
            Up::Event {
                event_type,
                data: j
                    .data
                    .map_or_else(|| "{}".to_string(), |d| d.get().to_string()),
            }
        }
        (None, Some(action)) => {
            if j.data.is_some() {
                return Err(with_ack(LineError::parse(
                    "\"data\" belongs to event lines",
                )));
            }
            let key = j
                .key
                .ok_or_else(|| with_ack(LineError::parse("a kv line needs \"key\"")))?;
            match (action.as_str(), j.value) {
                ("set", Some(v)) => Up::KvSet {
                    key,
                    value: v.get().to_string(),
                },
                ("set", None) => {
                    return Err(with_ack(LineError::parse("\"kv\":\"set\" needs \"value\"")))
                }
                ("delete", None) => Up::KvDelete { key },
                ("delete", Some(_)) => {
                    return Err(with_ack(LineError::parse(
                        "\"kv\":\"delete\" takes no \"value\"",
                    )))
                }
                (other, _) => {
                    return Err(with_ack(LineError::parse(format!(
                        "kv action {other:?} is not \"set\" or \"delete\""
                    ))))
                }
            }
        }
    };
    Ok((dev, msg, ack))
}

/// Splits a compact line into raw tokens at unescaped blanks (escapes are kept).
fn tokens(text: &str) -> Result<Vec<&str>, LineError> {
    let b = text.as_bytes();
    let mut out = Vec::new();
    let mut start = None;
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'\\' => {
                if i + 1 >= b.len() {
                    return Err(LineError::parse("the line ends with a lone '\\'"));
                }
                start.get_or_insert(i);
                i += 2;
                continue;
            }
            c if is_blank(c) => {
                if let Some(s) = start.take() {
                    out.push(&text[s..i]);
                }
            }
            _ => {
                start.get_or_insert(i);
            }
        }
        i += 1;
    }
    if let Some(s) = start {
        out.push(&text[s..]);
    }
    Ok(out)
}

/// Resolves the escapes of a raw token.
pub fn unescape(raw: &str) -> Result<String, String> {
    let mut out = String::with_capacity(raw.len());
    let mut it = raw.chars();
    while let Some(c) = it.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        let e = it.next().ok_or("a lone '\\' at the end of a token")?;
        out.push(match e {
            's' => ' ',
            't' => '\t',
            'n' => '\n',
            'r' => '\r',
            '\\' | '=' | '#' | '*' | '"' => e,
            'x' => {
                let h = it.next().and_then(|c| c.to_digit(16));
                let l = it.next().and_then(|c| c.to_digit(16));
                match (h, l) {
                    (Some(h), Some(l)) if h < 8 => char::from((h * 16 + l) as u8),
                    _ => return Err("\\x needs two hex digits 00-7F".into()),
                }
            }
            other => return Err(format!("unknown escape '\\{other}'")),
        });
    }
    Ok(out)
}

/// Byte index of the first unescaped `target` in a raw token.
fn find_unescaped(raw: &str, target: u8) -> Option<usize> {
    let b = raw.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' {
            i += 2;
            continue;
        }
        if b[i] == target {
            return Some(i);
        }
        i += 1;
    }
    None
}

/// Whether `s` is a JSON number (`-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?`).
pub fn is_json_number(s: &str) -> bool {
    let b = s.as_bytes();
    let mut i = 0;
    let digits = |i: &mut usize| {
        let s = *i;
        while *i < b.len() && b[*i].is_ascii_digit() {
            *i += 1;
        }
        *i - s
    };
    if b.get(i) == Some(&b'-') {
        i += 1;
    }
    match b.get(i) {
        Some(b'0') => i += 1,
        Some(b'1'..=b'9') => {
            digits(&mut i);
        }
        _ => return false,
    }
    if b.get(i) == Some(&b'.') {
        i += 1;
        if digits(&mut i) == 0 {
            return false;
        }
    }
    if matches!(b.get(i), Some(b'e' | b'E')) {
        i += 1;
        if matches!(b.get(i), Some(b'+' | b'-')) {
            i += 1;
        }
        if digits(&mut i) == 0 {
            return false;
        }
    }
    i == b.len()
}

/// The JSON text of a compact value token (typing rules in the protocol doc).
fn compact_value(raw: &str) -> Result<String, String> {
    match raw {
        "true" | "false" | "null" => return Ok(raw.to_string()),
        _ => {}
    }
    if is_json_number(raw) {
        return match serde_json::from_str::<serde_json::Number>(raw) {
            Ok(_) => Ok(raw.to_string()),
            Err(_) => Err(format!("number {raw} is out of range")),
        };
    }
    if let Some(inner) = raw.strip_prefix('"') {
        return match find_unescaped(inner, b'"') {
            Some(i) if i + 1 == inner.len() => Ok(json_str(&unescape(&inner[..i])?)),
            Some(_) => Err("text after the closing '\"' (write \\\" for a quote)".into()),
            None => Err("a value opened with '\"' is not closed".into()),
        };
    }
    if raw.starts_with('{') || raw.starts_with('[') {
        let text = unescape(raw)?;
        return match serde_json::from_str::<&RawValue>(&text) {
            Ok(v) => Ok(v.get().to_string()),
            Err(e) => Err(format!("value is not JSON: {e}")),
        };
    }
    Ok(json_str(&unescape(raw)?))
}

fn parse_compact(text: &str) -> Result<Parts, LineError> {
    let mut toks = tokens(text)?;
    let kind = match toks.first() {
        Some(&"E") => 'E',
        Some(&"K") => 'K',
        _ => {
            return Err(LineError::parse(
                "a line starts with '{' (JSON), 'E ' (event) or 'K ' (kv)",
            ))
        }
    };
    toks.remove(0);
    let mut ack = None;
    if let Some(last) = toks.last() {
        match ack_token(last.as_bytes()) {
            Some(Ok(n)) => {
                ack = Some(n);
                toks.pop();
            }
            Some(Err(())) => {
                return Err(LineError::parse(format!("ack {last} is over {}", u32::MAX)))
            }
            None => {}
        }
    }
    let err = |detail: String| LineError {
        fault: LineFault::Parse,
        detail,
        ack,
    };
    let word = |raw: &str| unescape(raw).map_err(err);
    if kind == 'E' {
        let bare = toks
            .iter()
            .take_while(|t| find_unescaped(t, b'=').is_none())
            .count();
        let (dev, event_type) = match bare {
            1 => (None, word(toks[0])?),
            2 => (Some(word(toks[0])?), word(toks[1])?),
            0 => {
                return Err(err(
                    "an event line needs an event type: E [dev] type [name=value...]".into(),
                ))
            }
            _ => {
                return Err(err(format!(
                    "unexpected word {:?}: E [dev] type [name=value...] (escape spaces as \\s)",
                    toks[2]
                )))
            }
        };
        let mut data = String::from("{");
        let mut names: Vec<String> = Vec::new();
        for t in &toks[bare..] {
            let Some(eq) = find_unescaped(t, b'=') else {
                return Err(err(format!("{t:?} is not name=value")));
            };
            let name = word(&t[..eq])?;
            if name.is_empty() {
                return Err(err(format!("{t:?} has no name before '='")));
            }
            if names.contains(&name) {
                return Err(err(format!("field {name:?} is given twice")));
            }
            let value = compact_value(&t[eq + 1..]).map_err(|e| err(format!("{name}: {e}")))?;
            if names.is_empty() {
                data.push_str(&json_str(&name));
            } else {
                data.push(',');
                data.push_str(&json_str(&name));
            }
            data.push(':');
            data.push_str(&value);
            names.push(name);
        }
        data.push('}');
        return Ok((dev, Up::Event { event_type, data }, ack));
    }
    let (dev, rest) = match toks.first() {
        Some(&"set") | Some(&"delete") => (None, &toks[..]),
        Some(d) => (Some(word(d)?), &toks[1..]),
        None => {
            return Err(err(
                "a kv line is K [dev] set key value, or K [dev] delete key".into(),
            ))
        }
    };
    let msg = match rest {
        ["set", key, value] => Up::KvSet {
            key: word(key)?,
            value: compact_value(value).map_err(|e| err(format!("value: {e}")))?,
        },
        ["delete", key] => Up::KvDelete { key: word(key)? },
        _ => {
            return Err(err(
                "a kv line is K [dev] set key value, or K [dev] delete key".into(),
            ))
        }
    };
    Ok((dev, msg, ack))
}

// ---------------------------------------------------------------------------------------------
// Encoding

/// A JSON string literal.
pub fn json_str(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into())
}

/// Where a compact word goes; decides which characters need escaping.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Ctx {
    /// A bare word (device, event type, key, action, field name): `=` is escaped too.
    Word,
    /// An unquoted value.
    Value,
    /// Inside `"..."`: `"` is escaped too.
    Quoted,
}

fn escape_into(s: &str, ctx: Ctx, out: &mut String) {
    for (i, c) in s.chars().enumerate() {
        match c {
            ' ' => out.push_str("\\s"),
            '\t' => out.push_str("\\t"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\\' => out.push_str("\\\\"),
            '*' => out.push_str("\\*"),
            '=' if ctx == Ctx::Word => out.push_str("\\="),
            '"' if ctx == Ctx::Quoted => out.push_str("\\\""),
            '#' if i == 0 => out.push_str("\\#"),
            c if c.is_ascii_control() => {
                out.push_str("\\x");
                out.push(char::from(HEX[(c as usize >> 4) & 15]));
                out.push(char::from(HEX[c as usize & 15]));
            }
            c => out.push(c),
        }
    }
}

/// A compact bare word (device name, event type, kv key, command action, field name).
pub fn compact_word(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    escape_into(s, Ctx::Word, &mut out);
    out
}

/// A JSON value written as a compact value token.
pub fn compact_value_of(v: &Value) -> String {
    let mut out = String::new();
    match v {
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) => out.push_str(&n.to_string()),
        Value::String(s) => {
            let quote = s.is_empty()
                || matches!(s.as_str(), "true" | "false" | "null")
                || is_json_number(s)
                || s.starts_with(['"', '{', '[']);
            if quote {
                out.push('"');
                escape_into(s, Ctx::Quoted, &mut out);
                out.push('"');
            } else {
                escape_into(s, Ctx::Value, &mut out);
            }
        }
        Value::Array(_) | Value::Object(_) => {
            escape_into(&v.to_string(), Ctx::Value, &mut out);
        }
    }
    out
}

/// Encodes an upstream compact event line (for firmware authors' tests, docs and tools).
pub fn encode_event_compact(
    dev: Option<&str>,
    event_type: &str,
    data: &serde_json::Map<String, Value>,
    ack: Option<u32>,
) -> String {
    let mut s = String::from("E");
    if let Some(d) = dev {
        s.push(' ');
        s.push_str(&compact_word(d));
    }
    s.push(' ');
    s.push_str(&compact_word(event_type));
    for (k, v) in data {
        s.push(' ');
        s.push_str(&compact_word(k));
        s.push('=');
        s.push_str(&compact_value_of(v));
    }
    push_ack(&mut s, ack);
    s
}

/// Encodes an upstream compact kv line: `value` `Some` for a set, `None` for a delete.
pub fn encode_kv_compact(
    dev: Option<&str>,
    key: &str,
    value: Option<&Value>,
    ack: Option<u32>,
) -> String {
    let mut s = String::from("K");
    if let Some(d) = dev {
        s.push(' ');
        s.push_str(&compact_word(d));
    }
    match value {
        Some(v) => {
            s.push_str(" set ");
            s.push_str(&compact_word(key));
            s.push(' ');
            s.push_str(&compact_value_of(v));
        }
        None => {
            s.push_str(" delete ");
            s.push_str(&compact_word(key));
        }
    }
    push_ack(&mut s, ack);
    s
}

fn push_ack(s: &mut String, ack: Option<u32>) {
    if let Some(n) = ack {
        s.push_str(" #");
        s.push_str(&n.to_string());
    }
}

/// Encodes an upstream JSON event line.
pub fn encode_event_json(
    dev: Option<&str>,
    event_type: &str,
    data: &Value,
    ack: Option<u32>,
) -> String {
    let mut m = serde_json::Map::new();
    if let Some(d) = dev {
        m.insert("dev".into(), Value::String(d.into()));
    }
    m.insert("event".into(), Value::String(event_type.into()));
    m.insert("data".into(), data.clone());
    if let Some(n) = ack {
        m.insert("id".into(), n.into());
    }
    Value::Object(m).to_string()
}

/// Encodes an upstream JSON kv line: `value` `Some` for a set, `None` for a delete.
pub fn encode_kv_json(
    dev: Option<&str>,
    key: &str,
    value: Option<&Value>,
    ack: Option<u32>,
) -> String {
    let mut m = serde_json::Map::new();
    if let Some(d) = dev {
        m.insert("dev".into(), Value::String(d.into()));
    }
    m.insert(
        "kv".into(),
        Value::String(if value.is_some() { "set" } else { "delete" }.into()),
    );
    m.insert("key".into(), Value::String(key.into()));
    if let Some(v) = value {
        m.insert("value".into(), v.clone());
    }
    if let Some(n) = ack {
        m.insert("id".into(), n.into());
    }
    Value::Object(m).to_string()
}

/// Appends `OK <n>` or `ERR <n> <reason>` and its newline.
pub fn encode_ack(n: u32, err: Option<&str>, checksum: bool, out: &mut Vec<u8>) {
    let start = out.len();
    match err {
        None => out.extend_from_slice(format!("OK {n}").as_bytes()),
        Some(reason) => out.extend_from_slice(format!("ERR {n} {reason}").as_bytes()),
    }
    finish_line(out, start, checksum);
}

fn finish_line(out: &mut Vec<u8>, start: usize, checksum: bool) {
    if checksum {
        let c = crc8(&out[start..]);
        out.push(b'*');
        out.push(HEX[(c >> 4) as usize]);
        out.push(HEX[(c & 15) as usize]);
    }
    out.push(b'\n');
}

#[derive(Deserialize)]
struct CommandIn<'a> {
    action: String,
    #[serde(default, borrow)]
    parameters: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct KvItemIn<'a> {
    key: String,
    #[serde(default, borrow, deserialize_with = "some_raw")]
    value: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct KvIn<'a> {
    action: String,
    #[serde(default)]
    rev: Option<u64>,
    #[serde(default)]
    key: Option<String>,
    #[serde(default, borrow, deserialize_with = "some_raw")]
    value: Option<&'a RawValue>,
    #[serde(default, borrow)]
    items: Option<Vec<KvItemIn<'a>>>,
}

const NULL: &str = "null";

fn raw_or_null(v: Option<&RawValue>) -> &str {
    v.map_or(NULL, RawValue::get)
}

/// A JSON value (raw text from MODE) as a compact value token. Numbers keep their exact text:
/// the hub never re-rounds a sensor's or an app's numbers.
fn compact_raw(raw: &str) -> Result<String, String> {
    let raw = raw.trim();
    match raw.as_bytes().first() {
        Some(b'"') => {
            let s: String = serde_json::from_str(raw).map_err(|e| e.to_string())?;
            Ok(compact_value_of(&Value::String(s)))
        }
        Some(b'{' | b'[') => {
            serde_json::from_str::<&RawValue>(raw).map_err(|e| e.to_string())?;
            let mut out = String::with_capacity(raw.len());
            escape_into(raw, Ctx::Value, &mut out);
            Ok(out)
        }
        _ if raw == "true" || raw == "false" || raw == "null" || is_json_number(raw) => {
            Ok(raw.to_string())
        }
        _ => Err(format!("{raw:?} is not a JSON value")),
    }
}

/// Encodes what MODE sent a device (its JSON, unchanged by the hub) as line(s) for the port,
/// appending them to `out`; returns how many lines. A payload that is not the JSON MODE sends
/// is an error, and nothing is appended.
pub fn encode_down(
    dev: &str,
    kind: DownKind,
    payload: &[u8],
    format: LineFormat,
    checksum: bool,
    out: &mut Vec<u8>,
) -> Result<usize, String> {
    let mut lines: Vec<String> = Vec::new();
    match kind {
        DownKind::Command => {
            let c: CommandIn = serde_json::from_slice(payload)
                .map_err(|e| format!("command is not MODE's JSON: {e}"))?;
            let params = c.parameters.map_or("{}", RawValue::get);
            match format {
                LineFormat::Json => lines.push(format!(
                    r#"{{"dev":{},"command":{},"parameters":{}}}"#,
                    json_str(dev),
                    json_str(&c.action),
                    if params == NULL { "{}" } else { params }
                )),
                LineFormat::Compact => {
                    let mut s = format!("C {} {}", compact_word(dev), compact_word(&c.action));
                    let m: std::collections::BTreeMap<String, &RawValue> =
                        serde_json::from_str(params)
                            .map_err(|_| "command parameters are not an object".to_string())?;
                    for (k, v) in &m {
                        s.push(' ');
                        s.push_str(&compact_word(k));
                        s.push('=');
                        s.push_str(&compact_raw(v.get())?);
                    }
                    lines.push(s);
                }
            }
        }
        DownKind::Kv => {
            let kv: KvIn = serde_json::from_slice(payload)
                .map_err(|e| format!("kv message is not MODE's JSON: {e}"))?;
            let rev = kv.rev.unwrap_or(0);
            let key = || kv.key.as_deref().ok_or("kv message without \"key\"");
            match (kv.action.as_str(), format) {
                ("set", LineFormat::Json) => lines.push(format!(
                    r#"{{"dev":{},"kv":"set","key":{},"value":{},"rev":{rev}}}"#,
                    json_str(dev),
                    json_str(key()?),
                    raw_or_null(kv.value)
                )),
                ("set", LineFormat::Compact) => lines.push(format!(
                    "K {} set {} {} {rev}",
                    compact_word(dev),
                    compact_word(key()?),
                    compact_raw(raw_or_null(kv.value))?
                )),
                ("delete", LineFormat::Json) => lines.push(format!(
                    r#"{{"dev":{},"kv":"delete","key":{},"rev":{rev}}}"#,
                    json_str(dev),
                    json_str(key()?)
                )),
                ("delete", LineFormat::Compact) => lines.push(format!(
                    "K {} delete {} {rev}",
                    compact_word(dev),
                    compact_word(key()?)
                )),
                ("reload", LineFormat::Json) => {
                    let mut s = format!(
                        r#"{{"dev":{},"kv":"reload","rev":{rev},"items":["#,
                        json_str(dev)
                    );
                    for (i, it) in kv.items.iter().flatten().enumerate() {
                        if i > 0 {
                            s.push(',');
                        }
                        s.push_str(&format!(
                            r#"{{"key":{},"value":{}}}"#,
                            json_str(&it.key),
                            raw_or_null(it.value)
                        ));
                    }
                    s.push_str("]}");
                    lines.push(s);
                }
                ("reload", LineFormat::Compact) => {
                    let items = kv.items.as_deref().unwrap_or_default();
                    lines.push(format!(
                        "K {} reload {rev} {}",
                        compact_word(dev),
                        items.len()
                    ));
                    for it in items {
                        lines.push(format!(
                            "K {} item {} {}",
                            compact_word(dev),
                            compact_word(&it.key),
                            compact_raw(raw_or_null(it.value))?
                        ));
                    }
                }
                (other, _) => {
                    return Err(format!("kv action {other:?} is not reload, set or delete"))
                }
            }
        }
    }
    for l in &lines {
        let start = out.len();
        out.extend_from_slice(l.as_bytes());
        finish_line(out, start, checksum);
    }
    Ok(lines.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn up(line: &str) -> UpLine {
        parse_up(line.as_bytes(), false)
            .unwrap_or_else(|e| panic!("{line}: {e:?}"))
            .expect("not blank")
    }

    fn data(l: &UpLine) -> Value {
        match &l.msg {
            Up::Event { data, .. } => serde_json::from_str(data).unwrap(),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn crc8_check_value_and_doc_example() {
        assert_eq!(crc8(b"123456789"), 0xF4);
        assert_eq!(crc8(b""), 0);
        assert_eq!(
            with_checksum("E opened door=1 #7"),
            format!("E opened door=1 #7*{:02X}", crc8(b"E opened door=1 #7"))
        );
    }

    #[test]
    fn compact_event_typing() {
        let l = up(
            r#"E garage-door opened door=1 temp=21.5 ok=true x=null name=front\sdoor ver="1.0" big=12345678901234567890 neg=-0.5e-3 s= arr=[1,2] obj={"a":1} #42"#,
        );
        assert_eq!(l.dev.as_deref(), Some("garage-door"));
        assert_eq!(l.ack, Some(42));
        let Up::Event {
            event_type,
            data: raw,
        } = &l.msg
        else {
            panic!()
        };
        assert_eq!(event_type, "opened");
        assert!(raw.contains(r#""big":12345678901234567890"#), "{raw}");
        assert_eq!(
            data(&l),
            json!({"door":1,"temp":21.5,"ok":true,"x":null,"name":"front door","ver":"1.0",
                   "big":12345678901234567890u64,"neg":-0.5e-3,"s":"","arr":[1,2],"obj":{"a":1}})
        );
        let l = up("E opened");
        assert_eq!(l.dev, None);
        assert_eq!(data(&l), json!({}));
        // Not JSON numbers: strings.
        let l = up("E t a=007 b=+5 c=.5 d=1. e=0x1F f=NaN g=#1");
        assert_eq!(
            data(&l),
            json!({"a":"007","b":"+5","c":".5","d":"1.","e":"0x1F","f":"NaN","g":"#1"})
        );
    }

    #[test]
    fn compact_kv_forms() {
        let l = up("K set k 42");
        assert_eq!(
            (l.dev, l.msg),
            (
                None,
                Up::KvSet {
                    key: "k".into(),
                    value: "42".into()
                }
            )
        );
        let l = up("K dev1 set k hello\\sworld #3");
        assert_eq!(l.dev.as_deref(), Some("dev1"));
        assert_eq!(
            l.msg,
            Up::KvSet {
                key: "k".into(),
                value: "\"hello world\"".into()
            }
        );
        assert_eq!(l.ack, Some(3));
        let l = up("K 1234 delete k");
        assert_eq!(
            (l.dev.as_deref(), &l.msg),
            (Some("1234"), &Up::KvDelete { key: "k".into() })
        );
        assert_eq!(l.msg.router_payload(), r#"{"action":"delete","key":"k"}"#);
    }

    /// The worked examples of docs/serial-protocol.md.
    #[test]
    fn doc_examples() {
        let cases = [
            (
                "E garage-door opened door=1 temp=21.5",
                Some("garage-door"),
                "opened",
                json!({"door":1,"temp":21.5}),
            ),
            ("E opened door=1 #7", None, "opened", json!({"door":1})),
            (
                r#"E status ok=true note=front\sdoor fw="1.10" id=007"#,
                None,
                "status",
                json!({"ok":true,"note":"front door","fw":"1.10","id":"007"}),
            ),
            ("E 1234 boot", Some("1234"), "boot", json!({})),
            (
                r#"E weather wind=[3,4.5] gps={"lat":59.3,"lon":18.1}"#,
                None,
                "weather",
                json!({"wind":[3,4.5],"gps":{"lat":59.3,"lon":18.1}}),
            ),
        ];
        for (line, dev, ty, want) in cases {
            let l = up(line);
            assert_eq!(l.dev.as_deref(), dev, "{line}");
            assert!(
                matches!(&l.msg, Up::Event { event_type, .. } if event_type == ty),
                "{line}"
            );
            assert_eq!(data(&l), want, "{line}");
        }
        assert_eq!(
            up("K set mode eco").msg,
            Up::KvSet {
                key: "mode".into(),
                value: "\"eco\"".into()
            }
        );
        assert_eq!(with_checksum("E opened door=1 #7"), "E opened door=1 #7*2E");
        assert_eq!(
            with_checksum(r#"{"event":"opened","data":{"door":1},"id":7}"#),
            r#"{"event":"opened","data":{"door":1},"id":7}*B1"#
        );
        let mut out = Vec::new();
        encode_ack(7, None, true, &mut out);
        encode_ack(8, Some("bad_checksum"), true, &mut out);
        assert_eq!(out, b"OK 7*08\nERR 8 bad_checksum*12\n");
    }

    #[test]
    fn json_forms() {
        let l = up(r#"{"dev":"garage-door","event":"opened","data":{"door":1},"id":9}"#);
        assert_eq!(l.dev.as_deref(), Some("garage-door"));
        assert_eq!(l.ack, Some(9));
        assert_eq!(
            l.msg.router_payload(),
            r#"{"eventType":"opened","eventData":{"door":1}}"#
        );
        let l = up(r#"{"eventType":"t","eventData":{}}"#);
        assert_eq!(l.dev, None);
        let l = up(r#"{"dev":1234,"kv":"set","key":"k","value":null}"#);
        assert_eq!(l.dev.as_deref(), Some("1234"));
        assert_eq!(
            l.msg,
            Up::KvSet {
                key: "k".into(),
                value: "null".into()
            }
        );
        let l = up(r#"{"action":"delete","key":"k"}"#);
        assert_eq!(l.msg, Up::KvDelete { key: "k".into() });
    }

    #[test]
    fn an_escaped_star_before_two_hex_digits_is_text() {
        let l = parse_up(br"K delete \*a0", false).unwrap().unwrap();
        assert!(!l.checksummed);
        assert_eq!(l.msg, Up::KvDelete { key: "*a0".into() });
        // An escaped backslash before the star leaves the star a checksum mark.
        let line = with_checksum(r"K delete k\\");
        let l = parse_up(line.as_bytes(), true).unwrap().unwrap();
        assert!(l.checksummed);
        assert_eq!(l.msg, Up::KvDelete { key: "k\\".into() });
    }

    #[test]
    fn checksums() {
        let line = with_checksum("E opened door=1 #7");
        let l = parse_up(line.as_bytes(), true).unwrap().unwrap();
        assert!(l.checksummed);
        assert_eq!(l.ack, Some(7));
        let lower = line.to_lowercase().replace("e opened", "E opened");
        assert!(parse_up(lower.as_bytes(), true).is_ok());
        let bad = line.replace("door=1", "door=2");
        let e = parse_up(bad.as_bytes(), false).unwrap_err();
        assert_eq!((e.fault, e.ack), (LineFault::BadChecksum, Some(7)));
        let e = parse_up(b"E opened #8", true).unwrap_err();
        assert_eq!((e.fault, e.ack), (LineFault::MissingChecksum, Some(8)));
        let j = with_checksum(r#"{"event":"x","id":5}"#);
        assert_eq!(parse_up(j.as_bytes(), true).unwrap().unwrap().ack, Some(5));
        let e = parse_up(j.replace('x', "y").as_bytes(), true).unwrap_err();
        assert_eq!((e.fault, e.ack), (LineFault::BadChecksum, Some(5)));
    }

    #[test]
    fn garbage_is_an_error_with_ack_when_readable() {
        for g in [
            &b"\xff\xfe E x #3"[..],
            b"hello",
            b"E",
            b"K",
            b"E a b c",
            b"{",
            b"E t x=\"a",
            b"E t =1",
            b"E t a=1 a=2",
            b"K set k",
            b"E t\\",
        ] {
            let r = parse_up(g, false);
            assert!(r.is_err(), "{:?}: {r:?}", String::from_utf8_lossy(g));
        }
        assert_eq!(parse_up(b"\xff #3", false).unwrap_err().ack, Some(3));
        assert_eq!(parse_up(b"E a b c #4", false).unwrap_err().ack, Some(4));
        assert_eq!(
            parse_up(br#"{"event":"x","bogus":1,"id":6}"#, false)
                .unwrap_err()
                .ack,
            Some(6)
        );
        assert_eq!(
            parse_up(b"E x #99999999999", false).unwrap_err().fault,
            LineFault::Parse
        );
        assert_eq!(parse_up(b"  \r", false), Ok(None));
        assert_eq!(
            parse_up(b"", true).unwrap_err().fault,
            LineFault::MissingChecksum
        );
    }

    #[test]
    fn down_lines() {
        let mut out = Vec::new();
        let n = encode_down(
            "garage-door",
            DownKind::Command,
            br#"{"action":"blink","parameters":{"times":3}}"#,
            LineFormat::Json,
            false,
            &mut out,
        )
        .unwrap();
        assert_eq!(n, 1);
        assert_eq!(
            out,
            b"{\"dev\":\"garage-door\",\"command\":\"blink\",\"parameters\":{\"times\":3}}\n"
        );
        out.clear();
        encode_down(
            "garage-door",
            DownKind::Command,
            br#"{"action":"say","parameters":{"times":3,"msg":"hi there","v":"2"}}"#,
            LineFormat::Compact,
            false,
            &mut out,
        )
        .unwrap();
        assert_eq!(
            String::from_utf8_lossy(&out),
            "C garage-door say msg=hi\\sthere times=3 v=\"2\"\n"
        );
        out.clear();
        let n = encode_down("g", DownKind::Kv, br#"{"action":"reload","rev":5,"numItems":2,"items":[{"key":"a","value":1,"modificationTime":"x"},{"key":"b","value":"s"}]}"#, LineFormat::Compact, false, &mut out).unwrap();
        assert_eq!(n, 3);
        assert_eq!(
            String::from_utf8_lossy(&out),
            "K g reload 5 2\nK g item a 1\nK g item b s\n"
        );
        out.clear();
        encode_down(
            "g",
            DownKind::Kv,
            br#"{"action":"reload","rev":5,"items":[{"key":"a","value":1}]}"#,
            LineFormat::Json,
            false,
            &mut out,
        )
        .unwrap();
        assert_eq!(
            String::from_utf8_lossy(&out),
            "{\"dev\":\"g\",\"kv\":\"reload\",\"rev\":5,\"items\":[{\"key\":\"a\",\"value\":1}]}\n"
        );
        out.clear();
        encode_down(
            "g",
            DownKind::Kv,
            br#"{"action":"set","rev":6,"key":"k","value":{"x":[1]}}"#,
            LineFormat::Json,
            true,
            &mut out,
        )
        .unwrap();
        let line = String::from_utf8_lossy(&out).to_string();
        assert_eq!(
            line,
            format!(
                "{}\n",
                with_checksum(r#"{"dev":"g","kv":"set","key":"k","value":{"x":[1]},"rev":6}"#)
            )
        );
        out.clear();
        encode_down(
            "g",
            DownKind::Kv,
            br#"{"action":"delete","rev":7,"key":"k"}"#,
            LineFormat::Compact,
            false,
            &mut out,
        )
        .unwrap();
        assert_eq!(out, b"K g delete k 7\n");
        assert!(encode_down(
            "g",
            DownKind::Kv,
            b"nope",
            LineFormat::Json,
            false,
            &mut out
        )
        .is_err());
        assert!(encode_down(
            "g",
            DownKind::Command,
            br#"{"action":"x","parameters":[1]}"#,
            LineFormat::Compact,
            false,
            &mut out
        )
        .is_err());
        out.clear();
        encode_ack(7, None, false, &mut out);
        encode_ack(8, Some("bad_checksum"), true, &mut out);
        assert_eq!(
            String::from_utf8_lossy(&out),
            format!("OK 7\n{}\n", with_checksum("ERR 8 bad_checksum"))
        );
    }
}
