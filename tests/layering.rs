//! The module floors of DESIGN.md, checked: every `crate::` path in `src/` names a module on a
//! lower floor, and only `device` (and `train`, which is CPU-only by design) name a backend.

use std::collections::BTreeSet;
use std::path::Path;

/// Floor of every top-level module of the library (DESIGN.md's table).
const FLOORS: &[(&str, u32)] = &[
    ("error", 1),
    ("bench", 1),
    ("coords", 2),
    ("tensor", 3),
    ("kmap", 4),
    ("voxel", 4),
    ("voxel_prune", 5),
    ("plan", 5),
    ("reference", 5),
    ("sparse_weights", 5),
    ("io", 5),
    ("metrics", 6),
    ("cpu", 7),
    ("gpu", 7),
    ("device", 8),
    ("nn", 9),
    ("pipeline", 10),
    ("train", 11),
    ("viz", 11),
    ("prune", 12),
];

/// Modules allowed to name a backend (`cpu`, `gpu`) directly.
const BACKEND_USERS: &[&str] = &["device", "train"];

fn floor(module: &str) -> Option<u32> {
    FLOORS.iter().find(|(m, _)| *m == module).map(|&(_, f)| f)
}

/// `crate::NAME` occurrences in a source text (doc links included: they are arrows too).
fn crate_paths(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find("crate::") {
        let tail = &rest[i + "crate::".len()..];
        let name: String = tail.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
        // `sparseconv_crate::x` or `some_crate::x` are not ours.
        let before = rest[..i].chars().next_back();
        if !name.is_empty() && !before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_') {
            out.insert(name);
        }
        rest = tail;
    }
    out
}

fn rust_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("src/ is readable") {
        let path = entry.expect("directory entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

#[test]
fn every_module_imports_only_from_lower_floors() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    files.sort();
    let mut violations = Vec::new();
    let mut seen_modules = BTreeSet::new();
    for file in &files {
        let rel = file.strip_prefix(&src).expect("under src/");
        let first = rel.components().next().expect("non-empty path").as_os_str().to_string_lossy().to_string();
        let module = first.trim_end_matches(".rs").to_string();
        if module == "lib" || module == "main" || module == "cli" {
            continue; // the crate root re-exports; the CLI (main.rs, cli/) sits on top of everything
        }
        let Some(own) = floor(&module) else {
            violations
                .push(format!("{}: module `{module}` has no floor in DESIGN.md / tests/layering.rs", rel.display()));
            continue;
        };
        seen_modules.insert(module.clone());
        let text = std::fs::read_to_string(file).expect("source is readable");
        for target in crate_paths(&text) {
            if target == module {
                continue;
            }
            match floor(&target) {
                None => violations.push(format!(
                    "{}: `crate::{target}` is not a module (name the module, not a root re-export)",
                    rel.display()
                )),
                Some(f) if f >= own => violations
                    .push(format!("{}: `{module}` (floor {own}) imports `{target}` (floor {f})", rel.display())),
                Some(_) if (target == "cpu" || target == "gpu") && !BACKEND_USERS.contains(&module.as_str()) => {
                    violations.push(format!(
                        "{}: `{module}` names the backend `{target}`; go through `device`",
                        rel.display()
                    ))
                }
                Some(_) => {}
            }
        }
    }
    assert!(violations.is_empty(), "layering broken:\n{}", violations.join("\n"));
    // The table must not go stale either: every listed module exists.
    for (m, _) in FLOORS {
        assert!(seen_modules.contains(*m), "DESIGN.md lists `{m}`, which src/ no longer has");
    }
}

#[test]
fn the_scanner_sees_paths_and_ignores_other_crates() {
    let found = crate_paths("use crate::kmap::KernelMap;\n/// [`crate::device::Engine`]\nuse other_crate::x;");
    assert_eq!(found.into_iter().collect::<Vec<_>>(), ["device", "kmap"]);
}
