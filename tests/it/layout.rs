//! The module layout's rules, checked on the source: imports between the crate's top-level
//! modules run one way (no cycle, counting the crate root with `Hub` as a module of its own), and
//! no source file grows past ~800 lines except the listed parsers-with-tests. A failure names the
//! cycle or the file.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Files allowed over the size limit: pure parsers with their tests, and files whose owner is
/// splitting them.
const LONG_FILES_ALLOWED: &[&str] = &[
    "serial/line.rs",
    // The emulator's split is its own change (issue 11).
    "emulator/mod.rs",
    "emulator/state.rs",
    "emulator/http.rs",
];
const MAX_LINES: usize = 850;

fn src_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The top-level module a file belongs to (`crate` for lib.rs), `None` for the binary's main.rs.
fn module_of(rel: &Path) -> Option<String> {
    let first = rel.components().next()?.as_os_str().to_str()?.to_string();
    match first.as_str() {
        "lib.rs" => Some("crate".into()),
        "main.rs" => None,
        f => Some(f.trim_end_matches(".rs").to_string()),
    }
}

/// The source without comments (doc links name modules without importing them).
fn code_of(text: &str) -> String {
    text.lines()
        .filter(|l| !l.trim_start().starts_with("//"))
        .map(|l| match l.find(" // ") {
            Some(i) if !l[..i].contains('"') => &l[..i],
            _ => l,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Names used right after `prefix` (`crate::name`, or `crate::{a, b::c}`).
fn names_after(code: &str, prefix: &str) -> Vec<String> {
    let mut out = Vec::new();
    let bytes = code.as_bytes();
    let mut from = 0;
    while let Some(i) = code[from..].find(prefix) {
        let start = from + i;
        from = start + prefix.len();
        if start > 0 && (bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_') {
            continue;
        }
        let rest = &code[from..];
        if let Some(group) = rest.strip_prefix('{') {
            let end = group.find('}').unwrap_or(group.len());
            for part in group[..end].split(',') {
                let name: String = part
                    .trim()
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect();
                if !name.is_empty() {
                    out.push(name);
                }
            }
        } else {
            let name: String = rest
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            if !name.is_empty() {
                out.push(name);
            }
        }
    }
    out
}

fn import_graph() -> BTreeMap<String, BTreeSet<String>> {
    let src = src_dir();
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let modules: BTreeSet<String> = files
        .iter()
        .filter_map(|f| module_of(f.strip_prefix(&src).unwrap()))
        .filter(|m| m != "crate")
        .collect();
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for f in &files {
        let Some(from) = module_of(f.strip_prefix(&src).unwrap()) else {
            continue;
        };
        let code = code_of(&std::fs::read_to_string(f).unwrap());
        let mut names = names_after(&code, "crate::");
        if from == "crate" {
            // The root names its modules without `crate::` (`mod x;` lines are not uses).
            let uses: String = code
                .lines()
                .filter(|l| !l.trim_start().starts_with("mod ") && !l.contains(" mod "))
                .collect::<Vec<_>>()
                .join("\n");
            for m in &modules {
                if !names_after(&uses, &format!("{m}::")).is_empty() {
                    names.push(m.clone());
                }
            }
        }
        let edges = graph.entry(from.clone()).or_default();
        for n in names {
            let to = if modules.contains(&n) {
                n
            } else {
                "crate".into()
            };
            if to != from {
                edges.insert(to);
            }
        }
    }
    graph
}

/// Strongly connected components with more than one module (Tarjan).
fn cycles(g: &BTreeMap<String, BTreeSet<String>>) -> Vec<Vec<String>> {
    struct T<'a> {
        g: &'a BTreeMap<String, BTreeSet<String>>,
        index: BTreeMap<&'a str, usize>,
        low: BTreeMap<&'a str, usize>,
        stack: Vec<&'a str>,
        on: BTreeSet<&'a str>,
        out: Vec<Vec<String>>,
    }
    impl<'a> T<'a> {
        fn visit(&mut self, v: &'a str) {
            let i = self.index.len();
            self.index.insert(v, i);
            self.low.insert(v, i);
            self.stack.push(v);
            self.on.insert(v);
            for w in self.g.get(v).into_iter().flatten() {
                let w = w.as_str();
                if !self.index.contains_key(w) {
                    self.visit(w);
                    let lw = self.low[w];
                    let lv = self.low.get_mut(v).unwrap();
                    *lv = (*lv).min(lw);
                } else if self.on.contains(w) {
                    let iw = self.index[w];
                    let lv = self.low.get_mut(v).unwrap();
                    *lv = (*lv).min(iw);
                }
            }
            if self.low[v] == self.index[v] {
                let mut comp = Vec::new();
                while let Some(w) = self.stack.pop() {
                    self.on.remove(w);
                    comp.push(w.to_string());
                    if w == v {
                        break;
                    }
                }
                if comp.len() > 1 {
                    comp.sort();
                    self.out.push(comp);
                }
            }
        }
    }
    let mut t = T {
        g,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on: BTreeSet::new(),
        out: Vec::new(),
    };
    for v in g.keys() {
        if !t.index.contains_key(v.as_str()) {
            t.visit(v);
        }
    }
    t.out
}

#[test]
fn imports_between_modules_run_one_way() {
    let g = import_graph();
    assert!(g.contains_key("outbox") && g.contains_key("crate"), "{g:?}");
    let found = cycles(&g);
    let mut detail = String::new();
    for comp in &found {
        detail.push_str(&format!("\ncycle among {comp:?}:"));
        for m in comp {
            let inside: Vec<_> = g[m].iter().filter(|t| comp.contains(t)).collect();
            detail.push_str(&format!("\n  {m} -> {inside:?}"));
        }
    }
    assert!(found.is_empty(), "import cycles between modules:{detail}");
}

#[test]
fn the_cycle_finder_finds_cycles() {
    let mut g: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    g.entry("a".into()).or_default().insert("b".into());
    g.entry("b".into()).or_default().insert("c".into());
    g.entry("c".into()).or_default().insert("a".into());
    g.entry("d".into()).or_default().insert("a".into());
    assert_eq!(cycles(&g), vec![vec!["a", "b", "c"]]);
    assert_eq!(names_after("use crate::{x::Y, z};", "crate::"), ["x", "z"]);
}

#[test]
fn no_source_file_is_too_long() {
    let src = src_dir();
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut long = Vec::new();
    for f in files {
        let rel = f
            .strip_prefix(&src)
            .unwrap()
            .to_string_lossy()
            .replace('\\', "/");
        let lines = std::fs::read_to_string(&f).unwrap().lines().count();
        if lines > MAX_LINES && !LONG_FILES_ALLOWED.contains(&rel.as_str()) {
            long.push(format!("src/{rel}: {lines} lines"));
        }
    }
    assert!(
        long.is_empty(),
        "split these along their seams (one concern per file): {long:?}"
    );
}
