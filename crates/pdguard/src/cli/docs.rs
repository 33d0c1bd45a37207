//! `pdguard completions SHELL` and `pdguard man`: shell completions and manual pages made from
//! the same definitions as the parser and `--help`, so they cannot drift from them.

use std::io::Write as _;
use std::path::Path;

use clap::ValueEnum;

use super::{usage, CliError};

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
            let mut buf = Vec::new();
            clap_mangen::Man::new(cmd)
                .render(&mut buf)
                .map_err(|source| CliError::Io {
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
            clap_mangen::generate_to(cmd, d).map_err(|source| CliError::Io {
                what: format!("cannot write the manual pages into {}", d.display()),
                source,
            })?;
            out!("wrote the manual pages into {}", d.display());
            Ok(())
        }
    }
}
