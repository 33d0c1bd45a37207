//! A progress bar on stderr, drawn only when stderr is a terminal and `--quiet` is off.

use std::io::IsTerminal;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use pdguard_engine::jobs::Progress;

use super::testhook::PauseAt;

pub struct Bar {
    bar: Option<ProgressBar>,
    pause: Option<PauseAt>,
}

impl Bar {
    pub fn new(quiet: bool) -> Self {
        let show = !quiet && std::io::stderr().is_terminal();
        Self {
            pause: PauseAt::from_env(),
            bar: show.then(|| {
                let b = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stderr());
                let style = ProgressStyle::with_template(
                    "{msg:>8} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> ");
                b.set_style(style);
                b
            }),
        }
    }

    pub fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}

impl Progress for Bar {
    fn pass(&self, name: &'static str, total_bytes: u64) {
        if let Some(p) = &self.pause {
            p.pass(name);
        }
        if let Some(b) = &self.bar {
            b.set_message(name);
            b.set_length(total_bytes);
            b.set_position(0);
        }
    }

    fn advance(&self, bytes: u64) {
        if let Some(b) = &self.bar {
            b.inc(bytes);
        }
        if let Some(p) = &self.pause {
            p.advance(bytes);
        }
    }
}
