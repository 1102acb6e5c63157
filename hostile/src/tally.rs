//! The verdicts: one line per case (`ok <name>: <detail>` or `FAIL <name>: ...`) and the totals.

use crate::sys::errno_name;

/// Cases passed and failed so far.
#[derive(Default)]
pub struct Tally {
    /// Cases that behaved as required.
    pub passed: u32,
    /// Cases that did not.
    pub failed: u32,
}

impl Tally {
    /// A case whose request must fail with `want` (0: must succeed).
    pub fn errno(&mut self, name: &str, got: Result<(), i32>, want: i32) {
        let got = got.err().unwrap_or(0);
        if got == want {
            self.pass(name, &errno_name(got));
        } else {
            self.fail(
                name,
                &format!("expected {}, got {}", errno_name(want), errno_name(got)),
            );
        }
    }

    /// A case judged by the caller.
    pub fn check(&mut self, name: &str, ok: bool, detail: &str) {
        if ok {
            self.pass(name, detail);
        } else {
            self.fail(name, detail);
        }
    }

    /// A passed case.
    pub fn pass(&mut self, name: &str, detail: &str) {
        self.passed += 1;
        println!("ok {name}: {detail}");
    }

    /// A failed case.
    pub fn fail(&mut self, name: &str, detail: &str) {
        self.failed += 1;
        println!("FAIL {name}: {detail}");
    }
}
