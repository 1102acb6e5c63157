//! A minimal JSON value with ordered object keys, written by hand (one line per event).

use std::fmt;

/// A JSON value.
#[derive(Clone, Debug, PartialEq)]
pub enum Json {
    /// null.
    Null,
    /// true / false.
    Bool(bool),
    /// An unsigned integer.
    U(u64),
    /// A string.
    S(String),
    /// An array.
    A(Vec<Json>),
    /// An object, keys in insertion order.
    O(Vec<(String, Json)>),
}

impl Json {
    /// An empty object.
    pub fn object() -> Json {
        Json::O(Vec::new())
    }

    /// Adds `key: value` to an object (no-op on other values).
    pub fn with(mut self, key: &str, value: impl Into<Json>) -> Json {
        if let Json::O(fields) = &mut self {
            fields.push((key.to_string(), value.into()));
        }
        self
    }

    /// An array of unsigned integers.
    pub fn numbers(v: &[u64]) -> Json {
        Json::A(v.iter().map(|&x| Json::U(x)).collect())
    }
}

impl From<bool> for Json {
    fn from(v: bool) -> Json {
        Json::Bool(v)
    }
}
impl From<u64> for Json {
    fn from(v: u64) -> Json {
        Json::U(v)
    }
}
impl From<u32> for Json {
    fn from(v: u32) -> Json {
        Json::U(v.into())
    }
}
impl From<&str> for Json {
    fn from(v: &str) -> Json {
        Json::S(v.to_string())
    }
}
impl From<String> for Json {
    fn from(v: String) -> Json {
        Json::S(v)
    }
}
impl<T: Into<Json>> From<Option<T>> for Json {
    fn from(v: Option<T>) -> Json {
        v.map_or(Json::Null, Into::into)
    }
}

fn write_str(f: &mut fmt::Formatter<'_>, s: &str) -> fmt::Result {
    f.write_str("\"")?;
    for c in s.chars() {
        match c {
            '"' => f.write_str("\\\"")?,
            '\\' => f.write_str("\\\\")?,
            '\n' => f.write_str("\\n")?,
            '\r' => f.write_str("\\r")?,
            '\t' => f.write_str("\\t")?,
            // RFC 8259 section 7: control characters must be escaped.
            c if (c as u32) < 0x20 => write!(f, "\\u{:04x}", c as u32)?,
            c => write!(f, "{c}")?,
        }
    }
    f.write_str("\"")
}

impl fmt::Display for Json {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Json::Null => f.write_str("null"),
            Json::Bool(b) => write!(f, "{b}"),
            Json::U(n) => write!(f, "{n}"),
            Json::S(s) => write_str(f, s),
            Json::A(items) => {
                f.write_str("[")?;
                for (i, v) in items.iter().enumerate() {
                    if i > 0 {
                        f.write_str(",")?;
                    }
                    write!(f, "{v}")?;
                }
                f.write_str("]")
            }
            Json::O(fields) => {
                f.write_str("{")?;
                for (i, (k, v)) in fields.iter().enumerate() {
                    if i > 0 {
                        f.write_str(",")?;
                    }
                    write_str(f, k)?;
                    write!(f, ":{v}")?;
                }
                f.write_str("}")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_parses_as_the_same_value() {
        let v = Json::object()
            .with("event", "checkpoint")
            .with("seq", 1u64)
            .with("dirty_gfns", Json::numbers(&[0x400, 0x1fff, u64::MAX]))
            .with("message", "quote \" backslash \\ newline \n bell \u{7} é")
            .with("gpa", Option::<u64>::None)
            .with("ok", true);
        let text = v.to_string();
        assert!(!text.contains('\n'), "one line: {text}");
        let parsed: serde_json::Value = serde_json::from_str(&text).expect("valid JSON");
        assert_eq!(parsed["event"], "checkpoint");
        assert_eq!(parsed["seq"], 1);
        assert_eq!(
            parsed["dirty_gfns"],
            serde_json::json!([1024, 8191, u64::MAX])
        );
        assert_eq!(
            parsed["message"],
            "quote \" backslash \\ newline \n bell \u{7} é"
        );
        assert!(parsed["gpa"].is_null());
        assert_eq!(parsed["ok"], true);
        // Keys keep their order (the brief's line starts with "event").
        assert!(
            text.starts_with("{\"event\":\"checkpoint\",\"seq\":1,"),
            "{text}"
        );
    }
}
