//! The source layout's rules, checked on the source text: within each crate, no module
//! imports (through `crate::` paths) a module that imports it back, directly or through
//! others; the binary's `main.rs` stays a thin parser and dispatcher; no file of the
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

/// The top-level module a file of the crate belongs to (`server` for `server.rs`,
/// `handlers` for `handlers/sql.rs`); `None` for the crate root.
fn module_of(src: &Path, file: &Path) -> Option<String> {
    let relative = file.strip_prefix(src).ok()?;
    let first = relative.components().next()?.as_os_str().to_str()?;
    let name = first.strip_suffix(".rs").unwrap_or(first);
    (!matches!(name, "lib" | "main")).then(|| name.to_owned())
}

/// The top-level modules a piece of source names through `crate::` paths, including
/// `use crate::{a, b::c}` groups.
fn imports(text: &str) -> BTreeSet<String> {
    let mut named = BTreeSet::new();
    for (at, _) in text.match_indices("crate::") {
        if text[..at].ends_with(|c: char| c.is_alphanumeric() || c == '_') {
            continue; // `dronedelivery::crate::` cannot happen, `mycrate::` can.
        }
        let rest = &text[at + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let end = group.find('}').unwrap_or(group.len());
            for item in group[..end].split(',') {
                let head: String = item
                    .trim()
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect();
                if !head.is_empty() {
                    named.insert(head);
                }
            }
        } else {
            let head: String = rest
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            if !head.is_empty() {
                named.insert(head);
            }
        }
    }
    named
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

#[test]
fn no_module_imports_a_module_that_imports_it_back() -> Result<()> {
    let mut circles = Vec::new();
    for krate in CRATES {
        let src = root().join(krate);
        let files = sources(&src)?;
        let modules: BTreeSet<String> = files.iter().filter_map(|f| module_of(&src, f)).collect();
        let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for file in &files {
            let Some(module) = module_of(&src, file) else {
                continue;
            };
            let text = std::fs::read_to_string(file)?;
            // Tests may reach anywhere in their crate; comments import nothing.
            let code: String = text
                .split("#[cfg(test)]")
                .next()
                .unwrap_or_default()
                .lines()
                .map(|line| line.split("//").next().unwrap_or_default())
                .collect::<Vec<_>>()
                .join("\n");
            for named in imports(&code) {
                if named != module && modules.contains(&named) {
                    edges.entry(module.clone()).or_default().insert(named);
                }
            }
        }
        if let Some(found) = cycle(&edges) {
            circles.push(format!("{krate}: {}", found.join(" -> ")));
        }
    }
    assert!(circles.is_empty(), "import circles: {circles:#?}");
    Ok(())
}

#[test]
fn the_checker_sees_import_circles() {
    assert_eq!(
        imports("use crate::a::X;\nuse crate::{b, c::D};\nlet x = crate::e::f();"),
        ["a", "b", "c", "e"].map(String::from).into()
    );
    let edges: BTreeMap<String, BTreeSet<String>> = [
        ("a", vec!["b"]),
        ("b", vec!["c"]),
        ("c", vec!["a"]),
        ("d", vec!["a"]),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.into_iter().map(String::from).collect()))
    .collect();
    assert_eq!(
        cycle(&edges),
        Some(["a", "b", "c", "a"].map(String::from).to_vec())
    );
    let mut acyclic = edges;
    acyclic.remove("c");
    assert_eq!(cycle(&acyclic), None);
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
