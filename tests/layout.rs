//! The source layout's rules, checked on the source text: within each crate, no module
//! imports (through `crate::`, `super::` or `self::` paths, or the root's own items) a
//! module that imports it back, directly or through others; the binary's `main.rs` stays a thin parser and dispatcher; no file of the
//! ingestion tier grows past one screenful of concerns. It reads files only.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

const CRATES: [&str; 7] = [
    "src",
    "schemas/src",
    "bus/src",
    "ingest/src",
    "processors/src",
    "analytics/src",
    "loadgen/src",
];

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Every `.rs` file under `dir`, recursively.
fn sources(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut found = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir).with_context(|| format!("{}", dir.display()))? {
            let path = entry?.path();
            if path.is_dir() {
                pending.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                found.push(path);
            }
        }
    }
    found.sort();
    Ok(found)
}

/// The module a file of the crate is (`server` for `server.rs`, `handlers::sql` for
/// `handlers/sql.rs`, `handlers` for `handlers/mod.rs`); empty for the crate root.
fn module_of(src: &Path, file: &Path) -> String {
    let relative = file.strip_prefix(src).unwrap_or(file).with_extension("");
    let mut parts: Vec<String> = relative
        .components()
        .filter_map(|c| c.as_os_str().to_str().map(str::to_owned))
        .collect();
    if matches!(
        parts.last().map(String::as_str),
        Some("mod" | "lib" | "main")
    ) {
        parts.pop();
    }
    parts.join("::")
}

/// The code of a file without its tests and comments (`//` at a line's start or after
/// a space; `http://` in a string stays).
fn code_of(text: &str) -> String {
    text.split("#[cfg(test)]")
        .next()
        .unwrap_or_default()
        .lines()
        .map(|line| {
            if line.trim_start().starts_with("//") {
                ""
            } else {
                line.find(" //").map_or(line, |at| &line[..at])
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn is_ident(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

/// The paths a piece of code names, each as its segments, with `use` groups expanded
/// (`use crate::{a, b::{c, d}}` names `crate::a`, `crate::b::c`, `crate::b::d`). Only
/// paths that start with `crate`, `super` or `self`, or with `first` (the crate root's
/// own modules, since the root names them without a prefix).
fn paths(code: &str, first: &BTreeSet<String>) -> Vec<Vec<String>> {
    fn expand(prefix: &[String], text: &str, out: &mut Vec<Vec<String>>) {
        let mut path = prefix.to_vec();
        let mut rest = text.trim_start();
        loop {
            let word: String = rest.chars().take_while(|c| is_ident(*c)).collect();
            if word.is_empty() {
                break;
            }
            path.push(word.clone());
            rest = &rest[word.len()..];
            let Some(next) = rest.strip_prefix("::") else {
                break;
            };
            rest = next;
            if let Some(group) = rest.strip_prefix('{') {
                let mut depth = 1;
                let mut start = 0;
                for (at, c) in group.char_indices() {
                    match c {
                        '{' => depth += 1,
                        '}' | ',' if depth == 1 => {
                            expand(&path, &group[start..at], out);
                            start = at + 1;
                            if c == '}' {
                                break;
                            }
                        }
                        '}' => depth -= 1,
                        _ => {}
                    }
                }
                return;
            }
        }
        if path.len() > prefix.len() {
            out.push(path);
        }
    }
    let mut out = Vec::new();
    for (at, c) in code.char_indices() {
        if !is_ident(c) || code[..at].ends_with(|p: char| is_ident(p) || p == ':') {
            continue;
        }
        let word: String = code[at..].chars().take_while(|c| is_ident(*c)).collect();
        let known = matches!(word.as_str(), "crate" | "super" | "self") || first.contains(&word);
        if known && code[at + word.len()..].starts_with("::") {
            expand(&[], &code[at..], &mut out);
        }
    }
    out
}

/// The module a path names: the longest prefix that is a module of the crate, resolved
/// from `module` (for `super::` and `self::`); the root (`""`) for the root's own items.
fn target(module: &str, path: &[String], modules: &BTreeSet<String>) -> Option<String> {
    let mut base: Vec<&str> = if module.is_empty() {
        Vec::new()
    } else {
        module.split("::").collect()
    };
    let mut rest = path;
    match rest.first().map(String::as_str) {
        Some("crate") => {
            base.clear();
            rest = &rest[1..];
        }
        Some("self") => rest = &rest[1..],
        Some("super") => {
            while rest.first().map(String::as_str) == Some("super") {
                base.pop()?;
                rest = &rest[1..];
            }
        }
        // A module of the root named from the root itself.
        _ => base.clear(),
    }
    let mut found = base.join("::");
    let mut candidate = base.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
    for segment in rest {
        candidate.push(segment.clone());
        let name = candidate.join("::");
        if modules.contains(&name) {
            found = name;
        } else {
            break;
        }
    }
    Some(found)
}

/// A cycle in `edges`, if there is one, as the modules along it.
fn cycle(edges: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        node: &str,
        edges: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(at) = path.iter().position(|n| n == node) {
            let mut found = path[at..].to_vec();
            found.push(node.to_owned());
            return Some(found);
        }
        if done.contains(node) {
            return None;
        }
        path.push(node.to_owned());
        for next in edges.get(node).into_iter().flatten() {
            if let Some(found) = visit(next, edges, path, done) {
                return Some(found);
            }
        }
        path.pop();
        done.insert(node.to_owned());
        None
    }
    let mut done = BTreeSet::new();
    for node in edges.keys() {
        if let Some(found) = visit(node, edges, &mut Vec::new(), &mut done) {
            return Some(found);
        }
    }
    None
}

/// Which module imports which, in one crate: `module -> modules it names` (`mod x;`
/// declares, it does not import). The root's `pub use` of what it re-exports is not an
/// import; a module naming an item the root defines imports the root.
fn import_graph(files: &[(String, String)]) -> BTreeMap<String, BTreeSet<String>> {
    let modules: BTreeSet<String> = files.iter().map(|(m, _)| m.clone()).collect();
    let top: BTreeSet<String> = modules
        .iter()
        .filter(|m| !m.is_empty() && !m.contains("::"))
        .cloned()
        .collect();
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (module, code) in files {
        let code: String = if module.is_empty() {
            code.lines()
                .filter(|l| !l.trim_start().starts_with("pub use "))
                .collect::<Vec<_>>()
                .join("\n")
        } else {
            code.clone()
        };
        let first = if module.is_empty() {
            &top
        } else {
            &BTreeSet::new()
        };
        for path in paths(&code, first) {
            let Some(to) = target(module, &path, &modules) else {
                continue;
            };
            if to == *module {
                continue;
            }
            edges.entry(module.clone()).or_default().insert(to);
        }
    }
    edges
}

#[test]
fn no_module_imports_a_module_that_imports_it_back() -> Result<()> {
    let mut circles = Vec::new();
    for krate in CRATES {
        let src = root().join(krate);
        let mut files = Vec::new();
        for file in sources(&src)? {
            let text = std::fs::read_to_string(&file)?;
            files.push((module_of(&src, &file), code_of(&text)));
        }
        if let Some(found) = cycle(&import_graph(&files)) {
            let named: Vec<&str> = found
                .iter()
                .map(|m| if m.is_empty() { "(crate root)" } else { m })
                .collect();
            circles.push(format!("{krate}: {}", named.join(" -> ")));
        }
    }
    assert!(circles.is_empty(), "import circles: {circles:#?}");
    Ok(())
}

#[test]
fn the_checker_sees_import_circles() {
    let graph = |files: &[(&str, &str)]| {
        let files: Vec<(String, String)> = files
            .iter()
            .map(|(m, t)| ((*m).to_owned(), code_of(t)))
            .collect();
        cycle(&import_graph(&files))
    };
    // Directly, through a group, and through a third module.
    assert!(graph(&[("", ""), ("a", "use crate::b::X;"), ("b", "use crate::a;")]).is_some());
    assert!(
        graph(&[
            ("", ""),
            ("a", "use crate::{c::{self, Y}, b::X};"),
            ("b", "fn f() { crate::a::g() }"),
            ("c", ""),
        ])
        .is_some()
    );
    assert!(
        graph(&[
            ("", ""),
            ("a", "use crate::b;"),
            ("b", "use crate::c;"),
            ("c", "use crate::a::Z;"),
        ])
        .is_some()
    );
    // Between a folder's module and its child, through `super::`.
    assert!(
        graph(&[
            ("", ""),
            ("h", "mod d;\nfn f() { d::g() }\nuse self::d::G;"),
            ("h::d", "use super::helper;"),
        ])
        .is_some()
    );
    // Through the root's own items, not through its re-exports.
    assert!(
        graph(&[
            ("", "pub struct Args;\nfn run() { client::go() }"),
            ("client", "use crate::Args;"),
        ])
        .is_some()
    );
    assert!(
        graph(&[
            ("", "pub use client::go;\npub struct Args;"),
            ("client", "use crate::Args;"),
        ])
        .is_none()
    );
    // Comments and strings with `//` in them.
    assert!(
        graph(&[
            ("", ""),
            (
                "a",
                "// use crate::b;\nlet u = \"http://x\"; use crate::b::Y;"
            ),
            ("b", "use crate::a::X; // crate::c"),
        ])
        .is_some()
    );
    assert!(
        graph(&[
            ("", ""),
            ("a", "use crate::b::X;"),
            ("b", "use crate::c::Y;"),
            ("c", "")
        ])
        .is_none()
    );
}

fn lines(path: &Path) -> Result<usize> {
    Ok(std::fs::read_to_string(path)
        .with_context(|| format!("{}", path.display()))?
        .lines()
        .count())
}

#[test]
fn the_binary_only_parses_and_dispatches() -> Result<()> {
    let main = lines(&root().join("src/main.rs"))?;
    assert!(
        main < 150,
        "src/main.rs has {main} lines; commands go under src/commands/"
    );
    Ok(())
}

#[test]
fn no_file_of_the_ingestion_tier_is_over_600_lines() -> Result<()> {
    let src = root().join("ingest/src");
    let mut long = Vec::new();
    for file in sources(&src)? {
        let count = lines(&file)?;
        if count > 600 {
            long.push(format!("{}: {count}", file.display()));
        }
    }
    assert!(long.is_empty(), "split these by concern: {long:#?}");
    Ok(())
}

#[test]
fn every_flag_is_declared_once() -> Result<()> {
    // Every flag has its `DRONEDELIVERY_*` variable; a block shared by several commands
    // is flattened where needed, never declared again.
    let mut declared: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for krate in CRATES {
        for file in sources(&root().join(krate))? {
            let text = std::fs::read_to_string(&file)?;
            let code = text.split("#[cfg(test)]").next().unwrap_or_default();
            for (at, _) in code.match_indices("env = \"DRONEDELIVERY_") {
                let name: String = code[at + "env = \"".len()..]
                    .chars()
                    .take_while(|c| *c != '"')
                    .collect();
                declared
                    .entry(name)
                    .or_default()
                    .push(file.display().to_string());
            }
        }
    }
    assert!(declared.len() > 50, "found only {} flags", declared.len());
    let twice: Vec<_> = declared.iter().filter(|(_, at)| at.len() > 1).collect();
    assert!(twice.is_empty(), "declared more than once: {twice:#?}");
    Ok(())
}
