//! Progress display: a bar with ETA on a terminal, plain lines otherwise (CI logs). Jobs report
//! `finelens_pipeline::Event`s; this only draws them.

use std::io::IsTerminal;
use std::time::Instant;

use finelens_pipeline::Event;
use finelens_tune::Progress;
use indicatif::{ProgressBar, ProgressStyle};

pub struct Reporter {
    bar: Option<ProgressBar>,
    tty: bool,
    /// The current stage, its size and when it began, for the plain lines of a log.
    stage: (String, usize, Instant),
}

impl Reporter {
    pub fn new() -> Self {
        Self {
            bar: None,
            tty: std::io::stderr().is_terminal(),
            stage: (String::new(), 0, Instant::now()),
        }
    }

    fn bar(&mut self, len: usize, template: &str) -> &ProgressBar {
        self.bar.get_or_insert_with(|| {
            let b = ProgressBar::new(len as u64);
            b.set_style(
                ProgressStyle::with_template(template)
                    .expect("valid template")
                    .progress_chars("=> "),
            );
            b
        })
    }

    fn line(&self, text: &str) {
        match &self.bar {
            Some(b) => b.println(text),
            None => eprintln!("{text}"),
        }
    }

    /// Draw one job event.
    pub fn event(&mut self, e: Event) {
        match e {
            Event::Stage { name, total, unit } => {
                self.finish();
                self.stage = (name.to_owned(), total, Instant::now());
                if self.tty {
                    let template =
                        format!("{name} [{{bar:30}}] {{pos}}/{{len}} {unit}, ETA {{eta}}");
                    self.bar(total, &template);
                }
            }
            Event::Advance { done, item } => match &self.bar {
                Some(b) => b.set_position(done as u64),
                None => {
                    let (name, total, began) = &self.stage;
                    // The stage's pace so far, for what is left of it.
                    let per_step = began.elapsed().as_secs_f64() / done.max(1) as f64;
                    let left = per_step * total.saturating_sub(done) as f64;
                    eprintln!("{name} {done}/{total}: {item} (about {left:.0} s left)");
                }
            },
            Event::StageEnd => self.finish(),
            Event::Warning(w) => self.line(&w),
            Event::Info(text) => match &self.bar {
                Some(b) => b.println(text),
                None => println!("{text}"),
            },
            Event::Train(p) => self.train(p),
        }
    }

    /// Draw training progress.
    pub fn train(&mut self, p: Progress) {
        match p {
            Progress::Step {
                epoch,
                step,
                steps,
                loss,
            } if self.tty => {
                let bar = self.bar(
                    steps,
                    "epoch {prefix} [{bar:30}] {pos}/{len} batches, {msg}, ETA {eta}",
                );
                bar.set_prefix(format!("{}", epoch + 1));
                bar.set_position(step as u64 + 1);
                bar.set_message(format!("loss {loss:.4}"));
            }
            Progress::Step { .. } => {}
            Progress::Epoch(r, _) => {
                self.finish();
                eprintln!("{r}");
            }
        }
    }

    pub fn finish(&mut self) {
        if let Some(b) = self.bar.take() {
            b.finish_and_clear();
        }
    }
}

/// Run one job with its progress drawn; the bar is cleared whatever the outcome.
pub fn run<T>(
    job: impl FnOnce(finelens_pipeline::Progress) -> finelens_pipeline::Result<T>,
) -> anyhow::Result<T> {
    let mut bar = Reporter::new();
    let r = job(&mut |e| bar.event(e));
    bar.finish();
    Ok(r?)
}
