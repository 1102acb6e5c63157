//! smudge.sys: build, sign and verify (placeholder until the Windows issue lands).

use anyhow::Result;

/// Builds and signs smudge.sys.
pub fn build() -> Result<()> {
    crate::step("windows driver: not built yet");
    Ok(())
}

/// Builds, signs and verifies smudge.sys.
pub fn build_and_verify() -> Result<()> {
    build()
}
