//! A fixed-size, NUL-terminated text buffer for the drivers' log lines (pr_err, DbgPrintEx),
//! formatted without allocation.

use core::ffi::CStr;
use core::fmt;

/// Capacity including the terminating NUL.
pub const CAPACITY: usize = 256;

/// Text written with `write!`; silently truncated at `CAPACITY - 1` bytes (on a char boundary).
pub struct MsgBuf {
    buf: [u8; CAPACITY],
    len: usize,
    /// Set once something did not fit (or a NUL came): later writes are dropped too.
    full: bool,
}

impl MsgBuf {
    /// An empty message.
    pub const fn new() -> MsgBuf {
        MsgBuf {
            buf: [0; CAPACITY],
            len: 0,
            full: false,
        }
    }

    /// The text.
    pub fn as_str(&self) -> &str {
        self.buf
            .get(..self.len)
            .and_then(|b| core::str::from_utf8(b).ok())
            .unwrap_or("")
    }

    /// The text with its NUL terminator.
    pub fn as_cstr(&self) -> &CStr {
        // The bytes after `len` are zero and `len < CAPACITY`, and `write_str` never stores a NUL
        // (it stops there), so the slice up to the first NUL is the whole text.
        CStr::from_bytes_until_nul(&self.buf).unwrap_or(c"")
    }
}

impl Default for MsgBuf {
    fn default() -> Self {
        MsgBuf::new()
    }
}

impl fmt::Write for MsgBuf {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for c in s.chars() {
            if self.full {
                return Ok(());
            }
            let mut tmp = [0u8; 4];
            let bytes = c.encode_utf8(&mut tmp).as_bytes();
            if c == '\0' || self.len + bytes.len() > CAPACITY - 1 {
                self.full = true;
                return Ok(());
            }
            if let Some(dst) = self.buf.get_mut(self.len..self.len + bytes.len()) {
                dst.copy_from_slice(bytes);
                self.len += bytes.len();
            }
        }
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    extern crate std;
    use super::*;
    use core::fmt::Write;

    #[test]
    fn formats_and_terminates() {
        let mut m = MsgBuf::new();
        write!(m, "cpu {} of {:#x}", 3, 255).unwrap();
        assert_eq!(m.as_cstr(), c"cpu 3 of 0xff");
        assert_eq!(m.as_str(), "cpu 3 of 0xff");
    }

    #[test]
    fn truncates_on_a_char_boundary() {
        let mut m = MsgBuf::new();
        write!(m, "{}", std::string::String::from("é").repeat(200)).unwrap(); // 400 bytes of 2-byte chars
        let text = m.as_cstr().to_str().unwrap();
        assert_eq!(text.len(), 254); // 127 chars; a 128th would need bytes 254..256, past the NUL
        assert!(text.chars().all(|c| c == 'é'));
    }

    #[test]
    fn stops_at_an_embedded_nul() {
        let mut m = MsgBuf::new();
        write!(m, "ab\0cd{}", 1).unwrap();
        assert_eq!(m.as_cstr(), c"ab");
    }
}
