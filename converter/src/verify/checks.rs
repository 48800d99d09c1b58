//! The list of checks a verification fills: each rule passes, warns or fails with a
//! detail; member names in details are escaped and cut.

use crate::acceptance::{Check, Offenders, Status};
use crate::text::{printable, NAME_SHOWN};

/// Collects checks; a rule with offending examples fails (or warns).
#[derive(Default)]
pub(super) struct Checks(pub(super) Vec<Check>);

impl Checks {
    pub(super) fn add(&mut self, rule: &str, status: Status, detail: impl Into<String>) {
        self.0.push(Check::plain(rule, status, detail));
    }
    pub(super) fn pass(&mut self, rule: &str, detail: impl Into<String>) {
        self.add(rule, Status::Pass, detail);
    }
    pub(super) fn fail(&mut self, rule: &str, detail: impl Into<String>) {
        self.add(rule, Status::Fail, detail);
    }
    pub(super) fn warn(&mut self, rule: &str, detail: impl Into<String>) {
        self.add(rule, Status::Warn, detail);
    }
    /// Pass when `bad` is empty, else `status` listing a few examples.
    pub(super) fn rule(&mut self, rule: &str, bad: &Offenders, status: Status) {
        match bad.problem() {
            None => self.pass(rule, ""),
            Some(detail) => self.add(rule, status, detail),
        }
    }
}

pub(super) fn lossy(b: &[u8]) -> String {
    printable(b, NAME_SHOWN)
}
