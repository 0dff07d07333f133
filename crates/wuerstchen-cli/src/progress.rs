//! Progress on the terminal for the long commands (`generate`, `bench`); `--quiet`
//! turns it off.

use indicatif::{ProgressBar, ProgressStyle};
use wuerstchen::pipeline::{Progress, Stage};

/// One progress bar per denoising stage, with it/s; each is done at its stage's last
/// step.
pub struct StageBars {
    quiet: bool,
    current: Option<(Stage, ProgressBar)>,
}

impl StageBars {
    pub fn new(quiet: bool) -> Self {
        Self {
            quiet,
            current: None,
        }
    }

    pub fn update(&mut self, p: Progress) {
        if self.quiet {
            return;
        }
        if self.current.as_ref().map(|(s, _)| *s) != Some(p.stage) {
            self.finish();
            let bar = ProgressBar::new(p.total as u64);
            let label = match p.stage {
                Stage::Prior => "prior  ",
                Stage::Decoder => "decoder",
            };
            bar.set_style(
                ProgressStyle::with_template(&format!(
                    "{label} {{bar:30}} {{pos}}/{{len}} [{{elapsed}}, {{per_sec}}]"
                ))
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
            );
            self.current = Some((p.stage, bar));
        }
        if let Some((_, bar)) = &self.current {
            bar.set_position(p.step as u64);
        }
        // done at its last step: its time and it/s stay the stage's own, not the
        // loading of the next stage's model
        if p.step >= p.total {
            self.finish();
        }
    }

    fn finish(&mut self) {
        if let Some((_, bar)) = self.current.take() {
            bar.finish();
            // indicatif leaves the cursor on the finished bar's line, where the next
            // bar would draw over it (or the next message run on from it)
            if !bar.is_hidden() {
                eprintln!();
            }
        }
    }
}
