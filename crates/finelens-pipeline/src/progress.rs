//! What a running job reports. The CLI draws a bar on a terminal and writes lines in a log; a
//! test collects the events.

/// One progress report.
pub enum Event<'a> {
    /// A stage begins: `total` units (`unit`: "images", "epochs") to go.
    Stage {
        name: &'a str,
        total: usize,
        unit: &'a str,
    },
    /// `done` of the current stage's units are finished; `item` names the last one.
    Advance { done: usize, item: &'a str },
    /// The current stage is over.
    StageEnd,
    /// Something the user should see that is not an error (a skipped file).
    Warning(String),
    /// A line of the job's account of itself (what it loaded, what it found).
    Info(String),
    /// Batches and epochs of a training run, as `finelens-tune` reports them.
    Train(finelens_tune::Progress<'a>),
}

/// The callback every job takes.
pub type Progress<'a> = &'a mut dyn FnMut(Event);

/// A callback that ignores everything (for tests and quiet callers).
pub fn quiet(_: Event) {}
