//! The command line as clap sees it, and usage errors in the project's one style: one
//! `pdguard: …` line on stderr (and `{"error", "exit_code"}` on stdout with `--json`), exit 2.
//! `--help` and `--version` print as clap prints them, exit 0.

use std::ffi::OsString;
use std::process::ExitCode;

use clap::error::ErrorKind;
use clap::{CommandFactory, FromArgMatches};

use super::{Cli, Command};

/// The exit code of a usage error.
pub const USAGE_EXIT: u8 = 2;

/// Commands that take neither `--quiet` nor `--json`: they have no progress bar and no
/// result object (the daemon's messages go to stderr). The global flags are hidden from
/// their help and refused there.
const NO_OUTPUT_FLAGS: &[&str] = &["serve", "completions", "man"];

/// The whole command tree, as parsed, documented, completed and rendered as a man page.
pub fn command() -> clap::Command {
    let mut cmd = Cli::command().after_help(super::docs::after_help());
    // A global flag is copied into every subcommand that has no argument of its id yet:
    // give these commands a hidden copy first, so that help and completions leave it out
    // (`parse_from` refuses it there).
    let hidden: Vec<clap::Arg> = cmd
        .get_arguments()
        .filter(|a| a.get_id() == "quiet" || a.get_id() == "json")
        .map(|a| a.clone().hide(true))
        .collect();
    for name in NO_OUTPUT_FLAGS {
        cmd = cmd.mut_subcommand(*name, |s| s.args(hidden.iter().cloned()));
    }
    cmd
}

/// Parse the process's arguments. A usage error is printed here, as one line.
pub fn parse() -> Result<Cli, ExitCode> {
    parse_from(std::env::args_os().collect())
}

fn parse_from(raw: Vec<OsString>) -> Result<Cli, ExitCode> {
    let json = wants_json(&raw);
    let mut cmd = command();
    let parsed = cmd
        .try_get_matches_from_mut(raw.iter())
        .and_then(|m| Cli::from_arg_matches(&m));
    let cli = match parsed {
        Ok(cli) => cli,
        Err(e) if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) => {
            e.exit()
        }
        Err(e) => return Err(fail(&one_line(&e, &cmd, &raw), json)),
    };
    let name = command_name(&cli.command);
    if NO_OUTPUT_FLAGS.contains(&name) {
        for (set, flag) in [(cli.json, "--json"), (cli.quiet, "--quiet")] {
            if set {
                let why = if name == "serve" {
                    "the daemon prints no result and draws no progress bar; its messages go to stderr (PDGUARD_LOG sets how many)"
                } else {
                    "it prints its text and nothing else"
                };
                return Err(fail(
                    &format!("{flag} does nothing for `pdguard {name}`: {why}; drop {flag}"),
                    json,
                ));
            }
        }
    }
    Ok(cli)
}

fn command_name(c: &Command) -> &'static str {
    match c {
        Command::Serve(_) => "serve",
        Command::Completions { .. } => "completions",
        Command::Man { .. } => "man",
        _ => "",
    }
}

/// `--json` anywhere before a `--`.
fn wants_json(raw: &[OsString]) -> bool {
    raw.iter()
        .skip(1)
        .take_while(|a| *a != "--")
        .any(|a| a == "--json")
}

/// Print the error as the binary prints every error, and give the exit code.
fn fail(line: &str, json: bool) -> ExitCode {
    eprintln!("pdguard: {line}");
    if json {
        let v = serde_json::json!({ "error": line, "exit_code": USAGE_EXIT });
        out!("{v}");
    }
    ExitCode::from(USAGE_EXIT)
}

/// The subcommands named on the command line, e.g. `pdguard disk create`, and the deepest.
fn path<'c>(cmd: &'c clap::Command, raw: &[OsString]) -> (String, &'c clap::Command) {
    let mut cur = cmd;
    let mut path = vec![cmd.get_name().to_string()];
    for a in raw.iter().skip(1).take_while(|a| *a != "--") {
        let Some(a) = a.to_str() else { continue };
        if a.starts_with('-') {
            continue;
        }
        if let Some(sc) = cur.find_subcommand(a) {
            path.push(sc.get_name().to_string());
            cur = sc;
        }
    }
    (path.join(" "), cur)
}

/// clap's error, which spans several lines, as one line that names the fix.
pub fn one_line(e: &clap::Error, cmd: &clap::Command, raw: &[OsString]) -> String {
    let (path, cur) = path(cmd, raw);
    if matches!(
        e.kind(),
        ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand | ErrorKind::MissingSubcommand
    ) {
        let names: Vec<&str> = cur
            .get_subcommands()
            .filter(|s| !s.is_hide_set() && s.get_name() != "help")
            .map(|s| s.get_name())
            .collect();
        return format!(
            "`{path}` needs a command: {}; see `{path} --help`",
            names.join(", ")
        );
    }
    let text = e.render().to_string();
    let mut parts: Vec<String> = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with("Usage:") || line.starts_with("For more information") {
            break;
        }
        if line.is_empty() {
            continue;
        }
        let line = line.strip_prefix("error: ").unwrap_or(line);
        match line.strip_prefix("tip: ") {
            Some(tip) => parts.push(format!("({tip})")),
            None => parts.push(line.to_string()),
        }
    }
    let msg = parts.join(" ");
    let msg = msg.trim_end_matches(['.', ' ']);
    format!("{msg}; see `{path} --help`")
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn words(s: &str) -> Vec<OsString> {
        s.split_whitespace().map(OsString::from).collect()
    }

    fn error_of(args: &str) -> String {
        let raw = words(args);
        let mut cmd = command();
        let e = cmd.try_get_matches_from_mut(raw.iter()).unwrap_err();
        one_line(&e, &cmd, &raw)
    }

    /// Every argument and subcommand of the whole tree, hidden ones aside, says what it is.
    /// A flag added without a doc comment fails here.
    #[test]
    fn every_argument_and_command_is_described() {
        fn walk(c: &clap::Command, path: &str, missing: &mut Vec<String>, seen: &mut usize) {
            for a in c.get_arguments().filter(|a| !a.is_hide_set()) {
                *seen += 1;
                let described = a
                    .get_help()
                    .or(a.get_long_help())
                    .is_some_and(|h| !h.to_string().trim().is_empty());
                if !described {
                    missing.push(format!("{path}: argument {}", a.get_id()));
                }
                for v in a.get_possible_values().iter().filter(|v| !v.is_hide_set()) {
                    if v.get_help().is_none() {
                        missing.push(format!("{path}: value {} of {}", v.get_name(), a.get_id()));
                    }
                }
            }
            for s in c.get_subcommands().filter(|s| !s.is_hide_set()) {
                *seen += 1;
                let p = format!("{path} {}", s.get_name());
                let about = s.get_about().map(|h| h.to_string()).unwrap_or_default();
                if about.trim().is_empty() {
                    missing.push(format!("{p}: no description"));
                }
                walk(s, &p, missing, seen);
            }
        }
        let (mut missing, mut seen) = (Vec::new(), 0);
        let mut cmd = command();
        // As parsed: with the global flags copied into every subcommand, and --help.
        cmd.build();
        walk(&cmd, "pdguard", &mut missing, &mut seen);
        assert!(seen > 150, "walked only {seen} arguments and commands");
        assert!(missing.is_empty(), "not described:\n{}", missing.join("\n"));
    }

    #[test]
    fn the_walk_sees_an_undescribed_argument() {
        // The check above must be able to fail: an argument without help is found.
        let c = clap::Command::new("x").arg(clap::Arg::new("bare").long("bare"));
        let undescribed = c
            .get_arguments()
            .filter(|a| a.get_help().is_none() && a.get_long_help().is_none())
            .count();
        assert_eq!(undescribed, 1);
    }

    #[test]
    fn errors_are_one_line_naming_the_command() {
        let e = error_of("pdguard disk create d1");
        assert!(!e.contains('\n'), "{e}");
        assert!(e.contains("--size"), "{e}");
        assert!(e.ends_with("see `pdguard disk create --help`"), "{e}");
        let e = error_of("pdguard image seal x --memory abc");
        assert!(e.contains("\"abc\" is not a size"), "{e}");
        assert!(e.ends_with("see `pdguard image seal --help`"), "{e}");
        let e = error_of("pdguard disk");
        assert!(e.contains("needs a command: create, ls"), "{e}");
        let e = error_of("pdguard frobnicate");
        assert!(e.contains("unrecognized subcommand 'frobnicate'"), "{e}");
        assert!(!e.contains('\n'), "{e}");
    }

    #[test]
    fn serve_refuses_output_flags() {
        assert!(parse_from(words("pdguard serve --json")).is_err());
        assert!(parse_from(words("pdguard serve --quiet")).is_err());
        assert!(parse_from(words("pdguard completions bash --json")).is_err());
        assert!(parse_from(words("pdguard serve --grace 1s")).is_ok());
        assert!(parse_from(words("pdguard image verify x --json --quiet")).is_ok());
    }
}
