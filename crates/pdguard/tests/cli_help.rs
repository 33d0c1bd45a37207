//! The help stands alone: every page of `pdguard … --help`, walked through the real binary,
//! describes each of its arguments; values and defaults are listed; flags that do nothing
//! are not offered; completions and the man page come from the same definitions.
#![allow(clippy::unwrap_used)]

mod common;

use std::process::Command;

use common::{code, pdguard, s, stderr};

fn stdout(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// `pdguard ARGS --help`, exit 0.
fn help(path: &[&str]) -> String {
    let mut args = path.to_vec();
    args.push("--help");
    let o = pdguard(&args);
    assert_eq!(code(&o), 0, "{args:?}: {}", stderr(&o));
    stdout(&o)
}

/// The entries of a help page's `Options:` and `Arguments:` sections that have no text,
/// and the names in its `Commands:` section.
fn undescribed_and_commands(page: &str) -> (Vec<String>, Vec<String>) {
    let lines: Vec<&str> = page.lines().collect();
    let (mut bare, mut commands) = (Vec::new(), Vec::new());
    let mut section = "";
    for (i, line) in lines.iter().enumerate() {
        if !line.starts_with(' ') && line.ends_with(':') {
            section = line;
            continue;
        }
        let indent = line.len() - line.trim_start().len();
        let text = line.trim();
        if text.is_empty() || indent > 6 {
            continue;
        }
        match section {
            "Commands:" => {
                let name = text.split_whitespace().next().unwrap();
                let described = text
                    .split_once("  ")
                    .is_some_and(|(_, d)| !d.trim().is_empty());
                if !described {
                    bare.push(format!("command {name}"));
                }
                if name != "help" {
                    commands.push(name.to_string());
                }
            }
            "Options:" | "Arguments:" if text.starts_with(['-', '<', '[']) => {
                // Short form: "--size <SIZE>  text"; long form: the text on the next lines,
                // indented further.
                let same_line = text
                    .split_once("  ")
                    .is_some_and(|(_, d)| !d.trim().is_empty());
                let next = lines.get(i + 1).copied().unwrap_or("");
                let next_indent = next.len() - next.trim_start().len();
                let next_line = !next.trim().is_empty() && next_indent > indent + 2;
                if !same_line && !next_line {
                    bare.push(text.to_string());
                }
            }
            _ => {}
        }
    }
    (bare, commands)
}

#[test]
fn every_help_page_describes_every_argument_and_command() {
    let mut todo: Vec<Vec<String>> = vec![vec![]];
    let mut pages = 0;
    let mut problems = Vec::new();
    while let Some(path) = todo.pop() {
        let args: Vec<&str> = path.iter().map(String::as_str).collect();
        for page in [help(&args), {
            let mut a = args.clone();
            a.push("-h");
            stdout(&pdguard(&a))
        }] {
            pages += 1;
            let (bare, commands) = undescribed_and_commands(&page);
            for b in bare {
                problems.push(format!("pdguard {}: {b}", args.join(" ")));
            }
            for bad in ["DESIGN.md", "../shared", "§"] {
                if page.contains(bad) {
                    problems.push(format!(
                        "pdguard {}: names {bad}, not in the repository",
                        args.join(" ")
                    ));
                }
            }
            if page.contains("Commands:") && page.contains("-h, --help") {
                for c in commands {
                    let mut p = path.clone();
                    p.push(c);
                    if !todo.contains(&p) && p.len() <= 2 {
                        todo.push(p);
                    }
                }
            }
        }
        todo.dedup();
    }
    // pdguard, image (5), disk (6), container (3) and the other top commands, twice each.
    assert!(pages >= 2 * 24, "walked only {pages} help pages");
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn the_walk_finds_an_undescribed_option() {
    // The parser above must be able to fail: both help layouts, with one bare entry each.
    let long = "Options:\n      --size <SIZE>\n          The size\n\n      --bare <X>\n\n  -h, --help\n          Print help\n";
    assert_eq!(undescribed_and_commands(long).0, vec!["--bare <X>"]);
    let short =
        "Arguments:\n  <NAME>  A name\n  <OTHER>\n\nOptions:\n      --size <SIZE>  The size\n";
    assert_eq!(undescribed_and_commands(short).0, vec!["<OTHER>"]);
}

#[test]
fn top_level_help_names_the_environment_and_the_exit_codes() {
    let h = help(&[]);
    for v in [
        "PDGUARD_STATE_DIR",
        "PDGUARD_KEY_FILE",
        "PDGUARD_API_TOKEN_FILE",
        "PDGUARD_LOG",
    ] {
        assert!(h.contains(v), "{v} missing from pdguard --help:\n{h}");
    }
    assert!(h.contains("Exit codes:"), "{h}");
    for code in ["  0 ", "  1 ", "  2 ", "  3 ", "  124 "] {
        assert!(h.contains(code), "exit code {code:?} missing:\n{h}");
    }
    for c in ["completions", "man"] {
        assert!(h.contains(c), "{c} missing:\n{h}");
    }
}

#[test]
fn values_and_defaults_are_listed() {
    let serve = help(&["serve"]);
    for want in [
        "window:",
        "direct:",
        "[default: window]",
        "secure:",
        "patent:",
        "[default: secure]",
        "read-only:",
        "refuse:",
        "[default: read-only]",
        "[default: 30s]",
    ] {
        assert!(
            serve.contains(want),
            "serve --help lacks {want:?}:\n{serve}"
        );
    }
    let seal = help(&["image", "seal"]);
    for want in [
        "feistel:",
        "patent:",
        "[default: secure]",
        "[default: window]",
        "[default: 512]",
        "[default: 256M]",
        "feistel in the secure profile",
    ] {
        assert!(
            seal.contains(want),
            "image seal --help lacks {want:?}:\n{seal}"
        );
    }
    // The offline finish of an instant reclaim is found from the unseal's help.
    let unseal = help(&["image", "unseal"]);
    for want in ["--instant", "phase migrating", "PATH.pdguard.evacuation"] {
        assert!(
            unseal.contains(want),
            "image unseal --help lacks {want:?}:\n{unseal}"
        );
    }
    let short = stdout(&pdguard(&["serve", "-h"]));
    assert!(
        short.contains("[possible values: window, direct]"),
        "{short}"
    );
}

#[test]
fn flags_that_do_nothing_are_not_offered() {
    let inspect = help(&["image", "inspect"]);
    assert!(!inspect.contains("--thin-dir"), "{inspect}");
    assert!(!inspect.contains("--key-file"), "{inspect}");
    for cmd in ["shred", "verify"] {
        let h = help(&["image", cmd]);
        assert!(!h.contains("--thin-dir"), "{cmd}: {h}");
        assert!(h.contains("--key-file"), "{cmd}: {h}");
    }
    for cmd in ["serve", "completions", "man"] {
        let h = help(&[cmd]);
        assert!(
            !h.contains("--quiet") && !h.contains("--json"),
            "{cmd}: {h}"
        );
    }
    // And refused, as usage errors.
    for args in [
        &["image", "inspect", "x.img", "--thin-dir", "/tmp"][..],
        &["image", "inspect", "x.img", "--key-file", "k"],
        &["image", "shred", "x.img", "--thin-dir", "/tmp"],
        &["serve", "--json"],
        &["serve", "--quiet"],
    ] {
        let o = pdguard(args);
        assert_eq!(code(&o), 2, "{args:?}: {}", stderr(&o));
        assert_eq!(stderr(&o).lines().count(), 1, "{args:?}: {}", stderr(&o));
    }
    let h = help(&["image", "seal"]);
    assert!(h.contains("--thin-dir") && h.contains("--key-file"), "{h}");
}

#[test]
fn bash_completions_pass_bash_n() {
    let o = pdguard(&["completions", "bash"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let script = stdout(&o);
    // Made from the same definitions: commands and flags of several levels are there.
    for want in [
        "_pdguard",
        "disk__subcmd__create",
        "--memory",
        "--sealed-io",
        "completions",
    ] {
        assert!(script.contains(want), "bash completions lack {want}");
    }
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("pdguard.bash");
    std::fs::write(&file, &script).unwrap();
    let n = Command::new("bash").arg("-n").arg(&file).output().unwrap();
    assert!(n.status.success(), "bash -n: {}", stderr(&n));
    // bash -n can fail: a broken script is caught.
    std::fs::write(&file, format!("{script}\nif then fi\n")).unwrap();
    let n = Command::new("bash").arg("-n").arg(&file).output().unwrap();
    assert!(!n.status.success());
}

#[test]
fn zsh_and_fish_completions_are_made() {
    for (shell, want) in [("zsh", "#compdef pdguard"), ("fish", "complete -c pdguard")] {
        let o = pdguard(&["completions", shell]);
        assert_eq!(code(&o), 0, "{}", stderr(&o));
        assert!(stdout(&o).contains(want), "{shell}");
        assert!(stdout(&o).contains("sealed-io"), "{shell}");
    }
    let o = pdguard(&["completions", "tcsh"]);
    assert_eq!(code(&o), 2);
}

/// Render roff with groff (Debian package groff-base, installed by scripts/test.sh),
/// warnings on: returns the text; fails on any warning.
fn groff(roff: &[u8]) -> String {
    use std::io::Write as _;
    let mut child = match Command::new("groff")
        .args(["-man", "-Tutf8", "-ww"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
    {
        Ok(c) => c,
        Err(e) => panic!("groff is needed to render the man page ({e}); apt-get install groff-base (scripts/test.sh does)"),
    };
    child.stdin.take().unwrap().write_all(roff).unwrap();
    let o = child.wait_with_output().unwrap();
    assert!(o.status.success(), "groff: {}", stderr(&o));
    assert!(o.stderr.is_empty(), "groff warns: {}", stderr(&o));
    // groff -Tutf8 marks bold and underline with overstrikes on a pipe; drop them.
    String::from_utf8_lossy(&o.stdout)
        .replace("\u{2010}", "-")
        .chars()
        .collect::<String>()
}

fn plain(s: &str) -> String {
    // Remove "X\bX" (bold) and "_\bX" (underline) overstrikes.
    let mut out = String::new();
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if chars.peek() == Some(&'\u{8}') {
            chars.next();
            continue;
        }
        out.push(c);
    }
    out
}

#[test]
fn the_man_page_renders() {
    let o = pdguard(&["man"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert!(o.stdout.starts_with(b".ie"), "{}", stdout(&o));
    let text = plain(&groff(&o.stdout));
    for want in [
        "NAME",
        "SYNOPSIS",
        "pdguard",
        "ENVIRONMENT",
        "PDGUARD_STATE_DIR",
        "PDGUARD_API_TOKEN_FILE",
        "EXIT STATUS",
        "disk wait: the timeout passed",
        "completions",
        "--json",
    ] {
        assert!(text.contains(want), "man page lacks {want}:\n{text}");
    }
    // One page per command, each rendering.
    let dir = tempfile::tempdir().unwrap();
    let o = pdguard(&["man", "--dir", s(dir.path())]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    for (page, want) in [
        ("pdguard.1", "PDGUARD_LOG"),
        ("pdguard-disk-create.1", "--size"),
        ("pdguard-image-seal.1", "--strategy"),
        ("pdguard-serve.1", "--sealed-io"),
    ] {
        let roff = std::fs::read(dir.path().join(page)).unwrap();
        let text = plain(&groff(&roff));
        assert!(text.contains(want), "{page} lacks {want}:\n{text}");
    }
    let pages = std::fs::read_dir(dir.path()).unwrap().count();
    assert!(pages >= 20, "only {pages} pages");
    let o = pdguard(&["man", "--dir", s(&dir.path().join("missing"))]);
    assert_eq!(code(&o), 1);
    assert!(stderr(&o).contains("mkdir -p"), "{}", stderr(&o));
}
