//! Training progress: a bar with ETA on a terminal, one plain line per epoch otherwise (CI logs).

use std::io::IsTerminal;

use finelens_tune::Progress;
use indicatif::{ProgressBar, ProgressStyle};

pub struct Reporter {
    bar: Option<ProgressBar>,
}

impl Reporter {
    pub fn new() -> Self {
        Self { bar: None }
    }

    pub fn report(&mut self, p: Progress) {
        let tty = std::io::stderr().is_terminal();
        match p {
            Progress::Step {
                epoch,
                step,
                steps,
                loss,
            } if tty => {
                let bar = self.bar.get_or_insert_with(|| {
                    let b = ProgressBar::new(steps as u64);
                    b.set_style(
                        ProgressStyle::with_template(
                            "epoch {prefix} [{bar:30}] {pos}/{len} batches, {msg}, ETA {eta}",
                        )
                        .expect("valid template")
                        .progress_chars("=> "),
                    );
                    b
                });
                bar.set_prefix(format!("{}", epoch + 1));
                bar.set_position(step as u64 + 1);
                bar.set_message(format!("loss {loss:.4}"));
            }
            Progress::Step { .. } => {}
            Progress::Epoch(r, _) => {
                if let Some(b) = self.bar.take() {
                    b.finish_and_clear();
                }
                eprintln!(
                    "epoch {:>3}  train loss {:.4} acc {:.2}%  val loss {:.4} acc {:.2}%  lr {:.2e}  {:.1} s ({:.0} img/s)",
                    r.epoch + 1,
                    r.train_loss,
                    100.0 * r.train_accuracy,
                    r.val.loss,
                    100.0 * r.val.accuracy,
                    r.lr_end,
                    r.seconds,
                    r.images_per_second
                );
            }
        }
    }

    pub fn finish(&mut self) {
        if let Some(b) = self.bar.take() {
            b.finish_and_clear();
        }
    }
}
