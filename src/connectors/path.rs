//! Paths into vendor JSON, as definitions write them: dotted (`paging.next.after`,
//! `tags.0.name`) or, for keys that contain a dot themselves, a JSON Pointer
//! (`/odata.nextLink`). An empty path (or `.`) is the whole document.
//! Paths are split once when a definition loads, so resolving one per record is cheap.

use serde_json::Value;

/// A parsed path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JsonPath {
    segments: Vec<String>,
    text: String,
}

impl JsonPath {
    /// Parses a path; an error says what is wrong with it.
    pub fn parse(text: &str) -> Result<JsonPath, String> {
        let t = text.trim();
        let segments: Vec<String> = if t.is_empty() || t == "." {
            Vec::new()
        } else if let Some(pointer) = t.strip_prefix('/') {
            pointer
                .split('/')
                .map(|s| s.replace("~1", "/").replace("~0", "~"))
                .collect()
        } else {
            t.split('.').map(str::to_string).collect()
        };
        if segments.iter().any(String::is_empty) {
            return Err(format!("path {text:?} has an empty segment"));
        }
        Ok(JsonPath {
            segments,
            text: t.to_string(),
        })
    }

    /// The path as written.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// Whether this path is the whole document.
    pub fn is_root(&self) -> bool {
        self.segments.is_empty()
    }

    /// The value at this path; a numeric segment also indexes arrays.
    pub fn get<'a>(&self, mut v: &'a Value) -> Option<&'a Value> {
        for s in &self.segments {
            v = match v {
                Value::Object(m) => m.get(s.as_str())?,
                Value::Array(a) => a.get(s.parse::<usize>().ok()?)?,
                _ => return None,
            };
        }
        Some(v)
    }

    /// Takes the value at this path out of `v` (leaving null behind).
    pub fn take(&self, mut v: &mut Value) -> Option<Value> {
        for s in &self.segments {
            v = match v {
                Value::Object(m) => m.get_mut(s.as_str())?,
                Value::Array(a) => a.get_mut(s.parse::<usize>().ok()?)?,
                _ => return None,
            };
        }
        Some(v.take())
    }
}

/// A scalar as a string (ids and cursors arrive as strings or numbers); `None` for
/// null, empty strings, arrays and objects.
pub fn scalar_string(v: &Value) -> Option<String> {
    match v {
        Value::String(s) if !s.trim().is_empty() => Some(s.trim().to_string()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn dotted_and_pointer_paths() {
        let v = json!({"paging": {"next": {"after": "152"}}, "odata.nextLink": "u", "tags": [{"name": "VIP"}]});
        assert_eq!(
            JsonPath::parse("paging.next.after").unwrap().get(&v),
            Some(&json!("152"))
        );
        assert_eq!(
            JsonPath::parse("/odata.nextLink").unwrap().get(&v),
            Some(&json!("u"))
        );
        assert_eq!(
            JsonPath::parse("tags.0.name").unwrap().get(&v),
            Some(&json!("VIP"))
        );
        assert_eq!(JsonPath::parse("missing.x").unwrap().get(&v), None);
        assert_eq!(JsonPath::parse("").unwrap().get(&v), Some(&v));
        assert!(JsonPath::parse("a..b").is_err());
    }

    #[test]
    fn ids_become_strings_without_losing_digits() {
        let v: Value = serde_json::from_str(r#"{"id": 706405506930370084}"#).unwrap();
        assert_eq!(scalar_string(&v["id"]).unwrap(), "706405506930370084");
        assert_eq!(scalar_string(&json!(" ")), None);
    }
}
