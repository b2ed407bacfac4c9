//! The code's shape (docs/ARCHITECTURE.md): the top-level modules of `src/` (a file or folder
//! directly under it) depend on each other one way only. This reads every `crate::` path in
//! `src/` (tests excluded), builds the module graph and fails on any circle, naming it; it also
//! checks that `config` stays data, importing no runtime step.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

const SRC: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/src");

/// Modules `config` must not import: building a runtime object is each step's own job.
const NOT_IN_CONFIG: &[&str] = &[
    "tls",
    "upstream",
    "validate",
    "jwt_validator",
    "rewrite",
    "store",
    "proxy",
    "server",
    "cache",
    "telemetry",
    "endpoints",
    "gate",
];

fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).expect("read src") {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            out.extend(files_under(&path));
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
    out
}

/// The top-level module a file of `src/` belongs to (`None` for lib.rs and main.rs).
fn module_of(file: &Path) -> Option<String> {
    let relative = file.strip_prefix(SRC).ok()?;
    let first = relative.components().next()?.as_os_str().to_string_lossy();
    let name = first.trim_end_matches(".rs").to_string();
    (name != "lib" && name != "main").then_some(name)
}

/// The code of a file without its unit tests (`#[cfg(test)] mod tests`, last by convention).
fn without_tests(text: &str) -> &str {
    text.find("#[cfg(test)]\nmod tests")
        .map_or(text, |at| &text[..at])
}

/// The first path segment of every `crate::` path in `code`, `use crate::{a, b::c}` included.
fn crate_references(code: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    let ident = |s: &str| -> String {
        s.chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect()
    };
    let mut rest = code;
    while let Some(at) = rest.find("crate::") {
        let after = &rest[at + "crate::".len()..];
        if let Some(group) = after.strip_prefix('{') {
            // Items at the group's top level, up to its closing brace.
            let mut depth = 1;
            let mut item_start = true;
            for (i, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' => {
                        depth -= 1;
                        if depth == 0 {
                            break;
                        }
                    }
                    ',' if depth == 1 => item_start = true,
                    c if item_start && !c.is_whitespace() => {
                        item_start = false;
                        let name = ident(&group[i..]);
                        if !name.is_empty() {
                            found.insert(name);
                        }
                    }
                    _ => {}
                }
            }
        } else {
            let name = ident(after);
            if !name.is_empty() {
                found.insert(name);
            }
        }
        rest = after;
    }
    found
}

/// module → the other top-level modules it refers to.
fn graph() -> BTreeMap<String, BTreeSet<String>> {
    let files = files_under(Path::new(SRC));
    let modules: BTreeSet<String> = files.iter().filter_map(|f| module_of(f)).collect();
    let mut graph: BTreeMap<String, BTreeSet<String>> = modules
        .iter()
        .map(|m| (m.clone(), BTreeSet::new()))
        .collect();
    for file in &files {
        let Some(module) = module_of(file) else {
            continue;
        };
        let text = std::fs::read_to_string(file).expect("read a source file");
        for used in crate_references(without_tests(&text)) {
            if used != module && modules.contains(&used) {
                graph.get_mut(&module).expect("a module").insert(used);
            }
        }
    }
    graph
}

/// The strongly connected components with more than one module (Tarjan).
fn circles(graph: &BTreeMap<String, BTreeSet<String>>) -> Vec<Vec<String>> {
    struct State<'g> {
        graph: &'g BTreeMap<String, BTreeSet<String>>,
        index: BTreeMap<&'g str, usize>,
        low: BTreeMap<&'g str, usize>,
        stack: Vec<&'g str>,
        on_stack: BTreeSet<&'g str>,
        found: Vec<Vec<String>>,
    }
    fn visit<'g>(s: &mut State<'g>, v: &'g str) {
        let i = s.index.len();
        s.index.insert(v, i);
        s.low.insert(v, i);
        s.stack.push(v);
        s.on_stack.insert(v);
        for w in &s.graph[v] {
            let w = w.as_str();
            if !s.index.contains_key(w) {
                visit(s, w);
                let low = s.low[v].min(s.low[w]);
                s.low.insert(v, low);
            } else if s.on_stack.contains(w) {
                let low = s.low[v].min(s.index[w]);
                s.low.insert(v, low);
            }
        }
        if s.low[v] == s.index[v] {
            let mut component = Vec::new();
            while let Some(w) = s.stack.pop() {
                s.on_stack.remove(w);
                component.push(w.to_string());
                if w == v {
                    break;
                }
            }
            if component.len() > 1 {
                component.sort();
                s.found.push(component);
            }
        }
    }
    let mut state = State {
        graph,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on_stack: BTreeSet::new(),
        found: Vec::new(),
    };
    for v in graph.keys() {
        if !state.index.contains_key(v.as_str()) {
            visit(&mut state, v);
        }
    }
    state.found
}

fn describe(graph: &BTreeMap<String, BTreeSet<String>>) -> String {
    graph
        .iter()
        .map(|(m, deps)| {
            format!(
                "{m} -> {}",
                deps.iter().cloned().collect::<Vec<_>>().join(" ")
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn top_level_modules_depend_one_way() {
    let graph = graph();
    assert!(graph.len() > 20, "the modules of src/: {graph:?}");
    // `cargo test --test architecture -- --nocapture` prints the graph.
    println!("{}", describe(&graph));
    let found = circles(&graph);
    assert!(
        found.is_empty(),
        "import circles between top-level modules of src/: {found:?}\n{}",
        describe(&graph)
    );
}

#[test]
fn config_is_data() {
    let graph = graph();
    let imported: Vec<&String> = graph["config"]
        .iter()
        .filter(|m| NOT_IN_CONFIG.contains(&m.as_str()))
        .collect();
    assert!(
        imported.is_empty(),
        "config imports runtime steps {imported:?}"
    );
}

#[test]
fn the_reader_sees_paths_groups_and_circles() {
    let code =
        "use crate::a::X;\nuse crate::{b, c::{D, E}, d::f as g};\nlet x = crate::e::run();\n";
    let found: Vec<String> = crate_references(code).into_iter().collect();
    assert_eq!(found, ["a", "b", "c", "d", "e"]);
    let mut graph = BTreeMap::new();
    for (m, deps) in [
        ("a", vec!["b"]),
        ("b", vec!["c"]),
        ("c", vec!["a"]),
        ("d", vec!["a"]),
    ] {
        graph.insert(
            m.to_string(),
            deps.into_iter()
                .map(str::to_string)
                .collect::<BTreeSet<_>>(),
        );
    }
    assert_eq!(circles(&graph), vec![vec!["a", "b", "c"]]);
    graph.get_mut("c").unwrap().clear();
    assert!(circles(&graph).is_empty());
}
