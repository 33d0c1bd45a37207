//! `pdguard completions SHELL` and `pdguard man`: shell completions and manual pages made from
//! the same definitions as the parser and `--help`, so they cannot drift from them.

use std::io::Write as _;
use std::path::Path;

use clap::ValueEnum;

use super::{usage, CliError};

/// The environment variables pdguard reads, for `pdguard --help` and the man page.
pub const ENVIRONMENT: &[(&str, &str)] = &[
    (
        "PDGUARD_STATE_DIR",
        "state directory of serve and the clients, after --state-dir (default /var/lib/pdguard)",
    ),
    (
        "PDGUARD_KEY_FILE",
        "master key file, after --key-file (default /etc/pdguard/master.key; serve: then STATE/master.key)",
    ),
    (
        "PDGUARD_API_TOKEN_FILE",
        "the clients' TCP API token file, after --api-token-file (default STATE/api-token)",
    ),
    (
        "PDGUARD_LOG",
        "what is logged on stderr, e.g. info or pdguard=debug (default warn,pdguard_engine::service=info: warnings, and disks turning dangling, jobs started, resumed or retried)",
    ),
];

/// The exit codes of every command.
pub const EXIT_CODES: &[(&str, &str)] = &[
    ("0", "done"),
    (
        "1",
        "error: the one-line message names the thing, the cause and the fix",
    ),
    (
        "2",
        "usage error (a bad flag or value, a missing --yes); nothing was changed",
    ),
    (
        "3",
        "verification failed: a digest does not match its seal record",
    ),
    (
        "124",
        "disk wait: the timeout passed before the disk reached the state",
    ),
];

/// The end of `pdguard --help`: the environment and the exit codes.
pub fn after_help() -> String {
    let mut s = String::from("Environment:\n");
    for (name, text) in ENVIRONMENT {
        s.push_str(&format!("  {name:<24}{text}\n"));
    }
    s.push_str("\nExit codes:\n");
    for (code, text) in EXIT_CODES {
        s.push_str(&format!("  {code:<5}{text}\n"));
    }
    s.push_str(
        "\nRun `pdguard COMMAND --help` for each command's flags, `pdguard man` for the manual page.",
    );
    s
}

/// Text for roff: backslashes and hyphens escaped (no text of ours starts a line with a dot
/// or an apostrophe).
fn roff_text(s: &str) -> String {
    s.replace('\\', "\\e").replace('-', "\\-")
}

/// The ENVIRONMENT and EXIT STATUS sections of pdguard(1).
fn roff_sections() -> String {
    let mut s = String::from(".SH ENVIRONMENT\n");
    for (name, text) in ENVIRONMENT {
        s.push_str(&format!(".TP\n\\fB{name}\\fR\n{}\n", roff_text(text)));
    }
    s.push_str(".SH \"EXIT STATUS\"\n");
    for (code, text) in EXIT_CODES {
        s.push_str(&format!(".TP\n\\fB{code}\\fR\n{}\n", roff_text(text)));
    }
    s
}

/// pdguard(1): clap_mangen's sections, with the environment and the exit codes as sections
/// of their own rather than as preformatted help text.
fn top_page(cmd: clap::Command) -> Result<Vec<u8>, std::io::Error> {
    let man = clap_mangen::Man::new(cmd.after_help(None::<&'static str>));
    let mut buf = Vec::new();
    man.render_title(&mut buf)?;
    man.render_name_section(&mut buf)?;
    man.render_synopsis_section(&mut buf)?;
    man.render_description_section(&mut buf)?;
    man.render_options_section(&mut buf)?;
    man.render_subcommands_section(&mut buf)?;
    buf.extend_from_slice(roff_sections().as_bytes());
    man.render_version_section(&mut buf)?;
    Ok(buf)
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Shell {
    /// Bash: `pdguard completions bash > /etc/bash_completion.d/pdguard`.
    Bash,
    /// Zsh: `pdguard completions zsh > "${fpath[1]}/_pdguard"`.
    Zsh,
    /// Fish: `pdguard completions fish > ~/.config/fish/completions/pdguard.fish`.
    Fish,
}

fn write_stdout(bytes: &[u8]) -> Result<(), CliError> {
    let mut out = std::io::stdout().lock();
    match out.write_all(bytes).and_then(|()| out.flush()) {
        // `pdguard man | head`: a closed pipe is not an error.
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        r => r.map_err(|source| CliError::Io {
            what: "cannot write to stdout".into(),
            source,
        }),
    }
}

pub fn completions(shell: Shell) -> Result<(), CliError> {
    let mut cmd = usage::command();
    let mut buf = Vec::new();
    let shell = match shell {
        Shell::Bash => clap_complete::Shell::Bash,
        Shell::Zsh => clap_complete::Shell::Zsh,
        Shell::Fish => clap_complete::Shell::Fish,
    };
    clap_complete::generate(shell, &mut cmd, "pdguard", &mut buf);
    write_stdout(&buf)
}

/// The page of `pdguard` (roff) on stdout, or with `dir`, one page per command there
/// (`pdguard.1`, `pdguard-disk-create.1`, …).
pub fn man(dir: Option<&Path>) -> Result<(), CliError> {
    let cmd = usage::command();
    match dir {
        None => {
            let buf = top_page(cmd).map_err(|source| CliError::Io {
                what: "cannot render the manual page".into(),
                source,
            })?;
            write_stdout(&buf)
        }
        Some(d) => {
            if !d.is_dir() {
                return Err(CliError::Input(format!(
                    "--dir {} is not a directory; create it (mkdir -p {}) or pick another",
                    d.display(),
                    d.display()
                )));
            }
            let io = |source| CliError::Io {
                what: format!("cannot write the manual pages into {}", d.display()),
                source,
            };
            clap_mangen::generate_to(cmd.clone(), d).map_err(io)?;
            let top = top_page(cmd).map_err(io)?;
            std::fs::write(d.join("pdguard.1"), top).map_err(io)?;
            out!("wrote the manual pages into {}", d.display());
            Ok(())
        }
    }
}

#[cfg(test)]
mod log_tests {
    #[test]
    fn the_help_quotes_the_default_log_filter() {
        let (_, text) = super::ENVIRONMENT
            .iter()
            .find(|(k, _)| *k == "PDGUARD_LOG")
            .copied()
            .unwrap_or_default();
        assert!(
            text.contains(&format!("(default {}:", super::super::DEFAULT_LOG)),
            "{text}"
        );
    }
}
