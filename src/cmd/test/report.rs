//! The end of a `wick test` run: golden files written, counts, and a JUnit XML report.

use super::schedule::Ran;
use super::{Case, Outcome};
use crate::error::{Error, Result};
use std::path::Path;

pub struct Counts {
    pub passed: usize,
    pub failed: usize,
    pub skipped: usize,
}

fn counts(outcomes: &[Outcome]) -> Counts {
    let passed = outcomes.iter().filter(|o| o.passed).count();
    let skipped = outcomes.iter().filter(|o| o.skipped).count();
    Counts {
        passed,
        skipped,
        failed: outcomes.len() - passed - skipped,
    }
}

/// Print the closing lines: golden files that changed, interruption, `N passed, N failed`.
pub fn summary(cases: &[Case], outcomes: &[Outcome], ran: &Ran) -> Counts {
    for (name, status) in &ran.blessed {
        if status != "unchanged" {
            crate::outln!("golden {name}: {status}");
        }
    }
    let c = counts(outcomes);
    if ran.interrupted {
        crate::outln!(
            "interrupted: {} of {} cases ran",
            outcomes.len(),
            cases.len()
        );
    }
    if c.skipped > 0 {
        crate::outln!(
            "{} passed, {} failed, {} skipped",
            c.passed,
            c.failed,
            c.skipped
        );
    } else {
        crate::outln!("{} passed, {} failed", c.passed, c.failed);
    }
    c
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

pub fn write_junit(path: &Path, cases: &[Case], outcomes: &[Outcome]) -> Result<()> {
    let c = counts(outcomes);
    let total: f64 = outcomes.iter().map(|o| o.seconds).sum();
    let mut xml = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<testsuites>\n<testsuite name=\"wick\" tests=\"{}\" failures=\"{}\" skipped=\"{}\" time=\"{total:.3}\">\n",
        outcomes.len(),
        c.failed,
        c.skipped
    );
    for o in outcomes {
        let case = &cases[o.case];
        xml += &format!(
            "  <testcase classname=\"{}\" name=\"{}\" time=\"{:.3}\"",
            xml_escape(&case.file.display().to_string()),
            xml_escape(&case.name),
            o.seconds
        );
        if o.passed {
            xml += "/>\n";
        } else if o.skipped {
            xml += &format!(
                "><skipped message=\"{}\"/></testcase>\n",
                xml_escape(&o.reason)
            );
        } else {
            let at = o
                .checkpoint
                .as_ref()
                .map(|p| format!("\ncheckpoint: {}", p.display()))
                .unwrap_or_default();
            xml += &format!(
                "><failure message=\"{}\">{}{}</failure></testcase>\n",
                xml_escape(&o.reason),
                xml_escape(&o.reason),
                xml_escape(&at)
            );
        }
    }
    xml += "</testsuite>\n</testsuites>\n";
    std::fs::write(path, xml)
        .map_err(|e| Error::usage(format!("cannot write {}: {e}", path.display())))
}
