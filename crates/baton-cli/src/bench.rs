//! `baton bench`: flags → validated options → the bench library → output.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;

use anyhow::Context;
use baton_bench::{BenchConfig, BenchResult};

/// What to write besides the summary.
#[derive(Debug, Clone, Default)]
pub struct Outputs {
    pub json: Option<PathBuf>,
    pub report: Option<PathBuf>,
}

/// Prints progress on stderr: one line rewritten in place on a terminal,
/// otherwise a line each second.
pub fn progress_printer() -> impl FnMut(&baton_bench::Progress) {
    let tty = std::io::stderr().is_terminal();
    move |p| {
        let mut err = std::io::stderr().lock();
        if tty {
            let _ = write!(err, "\r\x1b[2K{p}");
            if p.phase == baton_bench::Phase::Done {
                let _ = writeln!(err);
            }
        } else {
            let _ = writeln!(err, "{p}");
        }
    }
}

/// Runs the bench and writes the outputs. Errors that mean "bad input or
/// unreachable target" are returned as [`baton_bench::BenchError`] for the
/// caller to map to exit status 2.
pub async fn run(config: BenchConfig, outputs: &Outputs) -> anyhow::Result<BenchResult> {
    let result = baton_bench::run(config, progress_printer()).await?;
    write_outputs(&result, outputs)?;
    Ok(result)
}

pub fn write_outputs(result: &BenchResult, outputs: &Outputs) -> anyhow::Result<()> {
    if let Some(path) = &outputs.json {
        result
            .write_json(path)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if let Some(dir) = &outputs.report {
        baton_bench::report::write_report(result, dir)
            .with_context(|| format!("writing the report to {}", dir.display()))?;
    }
    Ok(())
}
