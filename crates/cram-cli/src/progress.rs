//! Progress bars for sweeps: one over cells, one over a cell's steps.

use cram_eval::results::Cell;
use cram_eval::sweep::SweepEvent;
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};

#[derive(Default)]
pub struct SweepBars {
    bars: MultiProgress,
    cells: Option<ProgressBar>,
    steps: Option<ProgressBar>,
}

impl SweepBars {
    pub fn on_event(&mut self, event: &SweepEvent) {
        match event {
            SweepEvent::Planned { total, done } => {
                let bar = self.bars.add(ProgressBar::new(*total as u64));
                bar.set_style(style("cells {bar:30} {pos}/{len} [{elapsed} elapsed, ~{eta} left] {msg}"));
                bar.set_position(*done as u64);
                self.cells = Some(bar);
            }
            SweepEvent::UnitStarted { cells, steps } => {
                let labels: Vec<String> = cells.iter().map(|cell| label(cell)).collect();
                let together = if labels.len() > 1 { "together: " } else { "" };
                self.started(format!("{together}{}", labels.join(", ")), *steps);
            }
            SweepEvent::Step { step, loss } => {
                if let Some(bar) = &self.steps {
                    bar.inc(1);
                    bar.set_message(format!("loss {loss:.4}"));
                    // Unattended logs get a line now and then instead of a bar.
                    if self.bars.is_hidden() && (step + 1) % 50 == 0 {
                        let total = bar.length().unwrap_or(0);
                        eprintln!("  step {}/{total}, loss {loss:.4}, {:.0}s", step + 1, bar.elapsed().as_secs_f64());
                    }
                }
            }
            SweepEvent::CellFinished { result } => {
                if let Some(bar) = self.steps.take() {
                    bar.finish_and_clear();
                }
                if let Some(cells) = &self.cells {
                    cells.inc(1);
                    self.say(format!(
                        "{}: {}/{} facts, {} entries for {} tokens, {:.0}s",
                        label(&result.cell),
                        result.facts_correct,
                        result.facts_total,
                        result.n_virtual,
                        result.n_tokens,
                        result.seconds
                    ));
                }
            }
        }
    }

    /// Shows what runs now, with a bar over its steps if it optimizes.
    fn started(&mut self, label: String, steps: Option<usize>) {
        if let Some(cells) = &self.cells {
            cells.set_message(label);
        }
        if let Some(steps) = steps {
            let bar = self.bars.add(ProgressBar::new(steps as u64));
            bar.set_style(style("steps {bar:30} {pos}/{len} [{per_sec}, ~{eta} left] {msg}"));
            self.steps = Some(bar);
        }
    }

    /// A line above the bars, or on stderr when they are hidden (no terminal),
    /// so logs of unattended runs still show each finished cell.
    fn say(&self, line: String) {
        if self.bars.is_hidden() {
            eprintln!("{line}");
        } else {
            let _ = self.bars.println(line);
        }
    }

    pub fn finish(&self) {
        if let Some(cells) = &self.cells {
            cells.finish();
        }
    }
}

/// `case method ratio`, as the bars and logs name a cell.
fn label(cell: &Cell) -> String {
    format!("{} {} {}", cell.case, cell.method, cell.ratio.map_or(String::new(), |r| format!("{r}x")))
}

fn style(template: &str) -> ProgressStyle {
    ProgressStyle::with_template(template).unwrap_or_else(|_| ProgressStyle::default_bar())
}
