//! The README and `docs/` stand alone in a clone: no link or path in them points outside the
//! repository, and every relative link points to a file (or a heading) that exists in it.

use std::collections::HashMap;
use std::path::{Component, Path, PathBuf};

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// `README.md` and every file under `docs/`, as paths relative to the repository root.
fn documents() -> Vec<PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        let entries = std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        for entry in entries {
            let path = entry.expect("a directory entry").path();
            if path.is_dir() {
                walk(&path, out);
            } else {
                out.push(path);
            }
        }
    }
    let mut files = vec![root().join("README.md")];
    walk(&root().join("docs"), &mut files);
    files.sort();
    files
        .into_iter()
        .map(|f| f.strip_prefix(root()).expect("under the root").to_owned())
        .collect()
}

fn is_markdown(path: &Path) -> bool {
    path.extension().is_some_and(|e| e == "md")
}

fn read(path: &Path) -> String {
    let full = root().join(path);
    std::fs::read_to_string(&full).unwrap_or_else(|e| panic!("{}: {e}", full.display()))
}

/// The text with code blanked out (fenced blocks, indented blocks, inline code spans), so that
/// what is left is prose whose `[text](target)` are links. Line breaks are kept.
fn prose(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut fence: Option<&str> = None;
    let mut previous_blank = true;
    let mut in_indented = false;
    for line in text.lines() {
        let trimmed = line.trim_start();
        if let Some(marker) = fence {
            if trimmed.starts_with(marker) {
                fence = None;
            }
            out.push('\n');
            continue;
        }
        if trimmed.starts_with("```") || trimmed.starts_with("~~~") {
            fence = Some(&trimmed[..3]);
            out.push('\n');
            continue;
        }
        let indented = line.starts_with("    ") || line.starts_with('\t');
        in_indented = indented && (previous_blank || in_indented);
        previous_blank = line.trim().is_empty();
        if in_indented {
            out.push('\n');
            continue;
        }
        out.push_str(&without_code_spans(line));
        out.push('\n');
    }
    out
}

/// A line with its backtick code spans replaced by spaces.
fn without_code_spans(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut rest = line;
    while let Some(start) = rest.find('`') {
        let ticks = rest[start..].bytes().take_while(|&b| b == b'`').count();
        let marker = &rest[start..start + ticks];
        let after = &rest[start + ticks..];
        match after.find(marker) {
            Some(end) => {
                out.push_str(&rest[..start]);
                out.push_str(&" ".repeat(ticks * 2 + end));
                rest = &after[end + ticks..];
            }
            None => break,
        }
    }
    out.push_str(rest);
    out
}

/// Every link target of some prose: inline links and images `[text](target "title")`,
/// reference definitions `[label]: target`, and HTML `href="…"` / `src="…"`.
fn link_targets(prose: &str) -> Vec<String> {
    let mut targets = Vec::new();
    let mut rest = prose;
    while let Some(at) = rest.find("](") {
        let after = &rest[at + 2..];
        let mut depth = 0usize;
        let mut end = after.len();
        for (i, c) in after.char_indices() {
            match c {
                '(' => depth += 1,
                ')' if depth == 0 => {
                    end = i;
                    break;
                }
                ')' => depth -= 1,
                '\n' => {
                    end = i;
                    break;
                }
                _ => {}
            }
        }
        let inside = after[..end].trim();
        let target = match inside.strip_prefix('<') {
            Some(angled) => angled.split('>').next().unwrap_or_default(),
            None => inside.split_whitespace().next().unwrap_or_default(),
        };
        targets.push(target.to_string());
        rest = &after[end..];
    }
    for line in prose.lines() {
        let trimmed = line.trim_start();
        if line.len() - trimmed.len() > 3 || !trimmed.starts_with('[') {
            continue;
        }
        if let Some((_, definition)) = trimmed.split_once("]:") {
            if let Some(target) = definition.split_whitespace().next() {
                targets.push(target.trim_matches(['<', '>']).to_string());
            }
        }
    }
    for attribute in ["href=\"", "src=\""] {
        for piece in prose.split(attribute).skip(1) {
            targets.push(piece.split('"').next().unwrap_or_default().to_string());
        }
    }
    targets
}

/// Whether a link target names a scheme (`https:`, `mailto:`): not a path in the repository.
fn has_scheme(target: &str) -> bool {
    match target.split_once(':') {
        Some((scheme, _)) => {
            scheme.len() > 1
                && scheme.starts_with(|c: char| c.is_ascii_alphabetic())
                && scheme
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
        }
        None => false,
    }
}

/// `path` relative to `dir`, both relative to the root, resolved lexically; `None` when it
/// climbs above the root.
fn resolve(dir: &Path, path: &str) -> Option<PathBuf> {
    let mut resolved = PathBuf::new();
    for component in dir.join(path).components() {
        match component {
            Component::Normal(part) => resolved.push(part),
            Component::CurDir => {}
            Component::ParentDir => {
                if !resolved.pop() {
                    return None;
                }
            }
            Component::RootDir | Component::Prefix(_) => return None,
        }
    }
    Some(resolved)
}

/// `%20` and the like decoded, as a browser does before asking for the file.
fn percent_decoded(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(byte)) => {
                out.push(byte);
                i += 3;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The path tokens of `text` (code included) that start with `../` and climb above the root
/// from `dir`: `../shared/x` in the README, `../../x` in `docs/`. A `..` inside a path
/// (`/public/../api`, a URL example) is not one.
fn escaping_paths(dir: &Path, text: &str) -> Vec<String> {
    let mut found = Vec::new();
    for (at, _) in text.match_indices("../") {
        let starts_token = text[..at].chars().next_back().is_none_or(|c| {
            c.is_whitespace() || matches!(c, '`' | '"' | '\'' | '(' | '<' | '[' | '=')
        });
        if !starts_token {
            continue;
        }
        let token: String = text[at..]
            .chars()
            .take_while(|c| !c.is_whitespace() && !matches!(c, '`' | '"' | '\'' | ')' | '>'))
            .collect();
        if resolve(dir, &token).is_none() {
            found.push(token);
        }
    }
    found
}

#[test]
fn nothing_points_outside_the_repository() {
    let mut problems = Vec::new();
    for doc in documents() {
        let Ok(text) = std::fs::read_to_string(root().join(&doc)) else {
            continue; // an image
        };
        let dir = doc.parent().unwrap_or(Path::new(""));
        if text.contains("../shared") {
            problems.push(format!("{}: mentions ../shared", doc.display()));
        }
        for token in escaping_paths(dir, &text) {
            problems.push(format!(
                "{}: {token} is outside the repository",
                doc.display()
            ));
        }
        if !is_markdown(&doc) {
            continue;
        }
        for target in link_targets(&prose(&text)) {
            if target.is_empty() || target.starts_with('#') {
                continue;
            }
            if has_scheme(&target) {
                if target.to_ascii_lowercase().starts_with("file:") {
                    problems.push(format!("{}: link to {target}", doc.display()));
                }
                continue;
            }
            if target.starts_with('/') || target.starts_with('\\') {
                problems.push(format!(
                    "{}: absolute link {target} (use a path relative to the file)",
                    doc.display()
                ));
                continue;
            }
            let path = target.split(['#', '?']).next().unwrap_or_default();
            if resolve(dir, &percent_decoded(path)).is_none() {
                problems.push(format!(
                    "{}: link {target} points outside the repository",
                    doc.display()
                ));
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn every_relative_link_points_to_a_file_that_exists() {
    let mut problems = Vec::new();
    let mut checked = 0;
    for doc in documents().into_iter().filter(|d| is_markdown(d)) {
        let dir = doc.parent().unwrap_or(Path::new(""));
        for target in link_targets(&prose(&read(&doc))) {
            if target.is_empty()
                || target.starts_with('#')
                || target.starts_with('/')
                || has_scheme(&target)
            {
                continue;
            }
            let path = target.split(['#', '?']).next().unwrap_or_default();
            if path.is_empty() {
                continue;
            }
            checked += 1;
            match resolve(dir, &percent_decoded(path)) {
                Some(file) if root().join(&file).exists() => {}
                Some(file) => problems.push(format!(
                    "{}: link {target}: {} does not exist",
                    doc.display(),
                    file.display()
                )),
                None => {} // reported by nothing_points_outside_the_repository
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    assert!(
        checked > 0,
        "no relative link found: is the link parser broken?"
    );
}

/// GitHub's anchor of each heading of a markdown text (`## Forward-auth decisions
/// (\`[verify]\`)` → `forward-auth-decisions-verify`; a repeated one gets `-1`, `-2`, …).
fn anchors(text: &str) -> Vec<String> {
    let mut seen: HashMap<String, usize> = HashMap::new();
    let mut anchors = Vec::new();
    let mut fence = false;
    for line in text.lines() {
        let trimmed = line.trim_start();
        if trimmed.starts_with("```") || trimmed.starts_with("~~~") {
            fence = !fence;
            continue;
        }
        let hashes = trimmed.bytes().take_while(|&b| b == b'#').count();
        if fence || line.starts_with("    ") || hashes == 0 || hashes > 6 {
            continue;
        }
        let Some(title) = trimmed[hashes..].strip_prefix(' ') else {
            continue;
        };
        let slug: String = title
            .trim()
            .trim_end_matches('#')
            .trim()
            .to_lowercase()
            .chars()
            .filter(|c| c.is_alphanumeric() || matches!(c, ' ' | '-' | '_'))
            .map(|c| if c == ' ' { '-' } else { c })
            .collect();
        let count = seen.entry(slug.clone()).or_insert(0);
        anchors.push(match *count {
            0 => slug,
            n => format!("{slug}-{n}"),
        });
        *count += 1;
    }
    anchors
}

#[test]
fn every_anchor_link_names_a_heading() {
    let mut problems = Vec::new();
    for doc in documents().into_iter().filter(|d| is_markdown(d)) {
        let dir = doc.parent().unwrap_or(Path::new(""));
        for target in link_targets(&prose(&read(&doc))) {
            let Some((path, anchor)) = target.split_once('#') else {
                continue;
            };
            if has_scheme(&target) || anchor.is_empty() {
                continue;
            }
            let file = if path.is_empty() {
                doc.clone()
            } else {
                match resolve(dir, &percent_decoded(path)) {
                    Some(file) if is_markdown(&file) && root().join(&file).is_file() => file,
                    _ => continue,
                }
            };
            if !anchors(&read(&file)).iter().any(|a| a == anchor) {
                problems.push(format!(
                    "{}: link {target}: no heading with that anchor in {}",
                    doc.display(),
                    file.display()
                ));
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn the_readme_links_to_the_reference() {
    let readme = read(Path::new("README.md"));
    assert!(
        link_targets(&prose(&readme))
            .iter()
            .any(|t| t == "docs/reference.md"),
        "README.md must link to docs/reference.md"
    );
    let reference = read(Path::new("docs/reference.md"));
    for word in ["SPEC.md", "SPEC §", "../shared"] {
        assert!(
            !reference.contains(word),
            "docs/reference.md is for users: it mentions {word:?}"
        );
    }
}

#[test]
fn the_checks_catch_what_they_are_for() {
    // The parsers themselves, on made-up text.
    let text = "See [spec](../shared/SPEC.md), ![shot](docs/a.png \"t\"), `[x](code/ok.md)`,\n\
                [ref]: ../../up.md\n\n    [indented](block.md)\n";
    assert_eq!(
        link_targets(&prose(text)),
        ["../shared/SPEC.md", "docs/a.png", "../../up.md"]
    );
    assert_eq!(resolve(Path::new(""), "../x"), None);
    assert_eq!(
        resolve(Path::new("docs"), "../README.md"),
        Some(PathBuf::from("README.md"))
    );
    assert_eq!(
        escaping_paths(
            Path::new(""),
            "run `../shared/x.sh`; /public/../api is fine"
        ),
        ["../shared/x.sh"]
    );
    assert!(escaping_paths(Path::new("docs"), "see ../README.md").is_empty());
    assert_eq!(
        escaping_paths(Path::new("docs"), "see ../../x"),
        ["../../x"]
    );
    assert_eq!(
        anchors("# A\n## Forward-auth decisions (`[verify]`)\n### A\n```\n# no\n```\n"),
        ["a", "forward-auth-decisions-verify", "a-1"]
    );
    assert!(has_scheme("https://x") && has_scheme("mailto:a@b") && !has_scheme("docs/a.md"));
}
