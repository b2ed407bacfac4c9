//! The container image's build context: the build stage of the Dockerfile is reproduced
//! without Docker. Exactly the files its `COPY` lines name (less what `.dockerignore` leaves
//! out) are copied into an empty folder, the stage's `cargo build` runs there with `--locked`
//! and the commit from its `ARG`, and the binary checks `config.example.toml` as the image's
//! build does. A file the build reads but the Dockerfile forgets to copy fails this test.
//!
//! `#[ignore]`d by default (it compiles the crate once more); `.ci/run` runs it:
//! `cargo test --test docker -- --ignored`.

use std::path::{Path, PathBuf};
use std::process::Command;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// The build stage's instructions: from the first `FROM` up to the next, continuation lines
/// joined.
fn build_stage(dockerfile: &str) -> Vec<String> {
    let mut joined = Vec::new();
    let mut current = String::new();
    for line in dockerfile.lines() {
        let line = line.trim();
        if current.is_empty() && (line.is_empty() || line.starts_with('#')) {
            continue;
        }
        match line.strip_suffix('\\') {
            Some(part) => {
                current.push_str(part);
                current.push(' ');
            }
            None => {
                current.push_str(line);
                joined.push(std::mem::take(&mut current));
            }
        }
    }
    let mut stage = Vec::new();
    let mut froms = 0;
    for instruction in joined {
        if instruction.starts_with("FROM ") {
            froms += 1;
            if froms > 1 {
                break;
            }
        }
        stage.push(instruction);
    }
    stage
}

/// A `.dockerignore` line matched against a path relative to the context: `dir/`, a name
/// with `*` wildcards, matched against every component.
fn ignored(patterns: &[String], relative: &Path) -> bool {
    fn glob(pattern: &str, text: &str) -> bool {
        match pattern.split_once('*') {
            None => pattern == text,
            Some((head, tail)) => {
                text.starts_with(head)
                    && (0..=text.len() - head.len()).any(|skip| {
                        text.is_char_boundary(head.len() + skip)
                            && glob(tail, &text[head.len() + skip..])
                    })
            }
        }
    }
    patterns.iter().any(|p| {
        let p = p.trim_start_matches('/').trim_end_matches('/');
        relative
            .components()
            .any(|c| glob(p, &c.as_os_str().to_string_lossy()))
            || relative.to_string_lossy() == p
    })
}

fn copy_into(from: &Path, to: &Path, relative: &Path, patterns: &[String]) {
    if ignored(patterns, relative) {
        return;
    }
    if from.is_dir() {
        std::fs::create_dir_all(to).unwrap();
        for entry in std::fs::read_dir(from).unwrap() {
            let entry = entry.unwrap();
            copy_into(
                &entry.path(),
                &to.join(entry.file_name()),
                &relative.join(entry.file_name()),
                patterns,
            );
        }
    } else {
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::fs::copy(from, to).unwrap_or_else(|e| panic!("COPY {}: {e}", from.display()));
    }
}

#[test]
#[ignore = "builds the crate again from a copy of the image's build context; .ci/run runs it"]
fn the_image_builds_from_exactly_what_the_dockerfile_copies() {
    let root = Path::new(ROOT);
    let dockerfile = std::fs::read_to_string(root.join("Dockerfile")).unwrap();
    let patterns: Vec<String> = std::fs::read_to_string(root.join(".dockerignore"))
        .unwrap_or_default()
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_string)
        .collect();
    let context = tempfile::tempdir().unwrap();
    let mut workdir = context.path().to_path_buf();
    let mut commit = None;
    let mut cargo: Option<Vec<String>> = None;
    for instruction in build_stage(&dockerfile) {
        let (verb, rest) = instruction.split_once(' ').unwrap_or((&instruction, ""));
        match verb {
            "WORKDIR" => workdir = context.path().join(rest.trim().trim_start_matches('/')),
            "ARG" => {
                if let Some(default) = rest.trim().strip_prefix("TOKENGATE_COMMIT=") {
                    commit = Some(default.to_string());
                }
            }
            "COPY" => {
                let words: Vec<&str> = rest.split_whitespace().collect();
                assert!(
                    !words.iter().any(|w| w.starts_with("--from")),
                    "the build stage copies from another stage: {instruction}"
                );
                let (dest, sources) = words.split_last().expect("COPY SRC... DEST");
                let dest = workdir.join(dest);
                for source in sources {
                    let from = root.join(source);
                    assert!(from.exists(), "COPY {source}: not in the repository");
                    let to: PathBuf = if sources.len() > 1 || dest.to_string_lossy().ends_with('/')
                    {
                        dest.join(Path::new(source).file_name().unwrap())
                    } else {
                        dest.clone()
                    };
                    copy_into(&from, &to, Path::new(source), &patterns);
                }
            }
            "RUN" => {
                if let Some(at) = rest.find("cargo build") {
                    let args = rest[at + "cargo build".len()..]
                        .split("&&")
                        .next()
                        .unwrap()
                        .split_whitespace()
                        .map(str::to_string)
                        .collect();
                    cargo = Some(args);
                }
            }
            _ => {}
        }
    }
    let args = cargo.expect("the build stage runs cargo build");
    assert!(args.iter().any(|a| a == "--locked"), "{args:?}");
    assert!(
        commit.is_some(),
        "the build stage takes TOKENGATE_COMMIT as an ARG (.git is not in the context)"
    );
    // The profile does not change which files the build reads: a debug build (sharing this
    // checkout's compiled dependencies) proves the context as well as a release build would.
    let args: Vec<&String> = args.iter().filter(|a| *a != "--release").collect();
    let target = Path::new(ROOT).join("target").join("docker-context");
    let out = Command::new(env!("CARGO"))
        .arg("build")
        .args(&args)
        .current_dir(&workdir)
        .env("CARGO_TARGET_DIR", &target)
        .env("TOKENGATE_COMMIT", commit.unwrap())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "cargo build in the image's build context failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let binary = target.join("debug").join("tokengate");
    let check = Command::new(&binary)
        .args(["check", "--config", "config.example.toml"])
        .current_dir(&workdir)
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "the image's check of config.example.toml failed:\n{}",
        String::from_utf8_lossy(&check.stderr)
    );
    let version = Command::new(&binary).arg("--version").output().unwrap();
    assert!(version.status.success());
}

#[test]
fn the_build_stage_is_read_as_docker_reads_it() {
    let stage = build_stage(
        "# c\nFROM a AS build\nWORKDIR /src\nCOPY x \\\n  y ./\nRUN one \\\n two\nFROM b\nCOPY --from=build /o /o\n",
    );
    assert_eq!(
        stage,
        [
            "FROM a AS build",
            "WORKDIR /src",
            "COPY x  y ./",
            "RUN one  two"
        ]
    );
    let patterns = vec!["target/".to_string(), "*.db-*".to_string()];
    assert!(ignored(&patterns, Path::new("target/debug")));
    assert!(ignored(&patterns, Path::new("src/x.db-wal")));
    assert!(!ignored(&patterns, Path::new("src/lib.rs")));
}
