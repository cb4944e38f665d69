//! The minijinja side of definitions: the environment request templates live in,
//! and the filters vendors need (`md5` for Mailchimp's subscriber hash, `urlencode`
//! for path segments, `string_values` for HubSpot's all-strings properties).

use md5::{Digest, Md5};
use minijinja::{AutoEscape, Environment, Error, UndefinedBehavior, Value};

/// Adds klantreis's filters to an environment.
pub fn add_filters(env: &mut Environment<'_>) {
    env.add_filter("md5", |s: String| -> String {
        format!("{:x}", Md5::digest(s.as_bytes()))
    });
    env.add_filter("urlencode", |s: String| -> String { percent_encode(&s) });
    env.add_filter("string_values", string_values);
}

/// The environment of a definition's request templates. Undefined variables are
/// errors when printed (a typo must not silently send an empty token) but may be
/// tested with `{% if cursor %}`; nothing is HTML-escaped, since bodies are JSON.
pub fn request_env() -> Environment<'static> {
    let mut env = Environment::new();
    env.set_undefined_behavior(UndefinedBehavior::SemiStrict);
    env.set_auto_escape_callback(|_| AutoEscape::None);
    env.set_keep_trailing_newline(false);
    add_filters(&mut env);
    env
}

/// Percent-encodes everything but RFC 3986's unreserved characters, so the result
/// is safe in a path segment as well as in a query value.
pub fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A map with every value as a string (`true` → `"true"`, `3` → `"3"`, none → `""`).
fn string_values(v: Value) -> Result<Value, Error> {
    let mut out: Vec<(Value, Value)> = Vec::new();
    for k in v.try_iter()? {
        let item = v.get_item(&k)?;
        let s = if item.is_none() || item.is_undefined() {
            Value::from("")
        } else if let Some(s) = item.as_str() {
            Value::from(s)
        } else if item.kind() == minijinja::value::ValueKind::Bool {
            Value::from(if item.is_true() { "true" } else { "false" })
        } else {
            Value::from(item.to_string())
        };
        out.push((k, s));
    }
    Ok(Value::from_iter(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters() {
        let env = request_env();
        let r = |src: &str, ctx: serde_json::Value| env.render_str(src, ctx).unwrap();
        // API-NOTES B2's test vector.
        assert_eq!(
            r(
                "{{ e | lower | md5 }}",
                serde_json::json!({"e": "Urist.McVankab@freddiesjokes.com"})
            ),
            "62eeb292278cc15f5817cb78f7790b08"
        );
        assert_eq!(
            r("{{ s | urlencode }}", serde_json::json!({"s": "a b/c@d"})),
            "a%20b%2Fc%40d"
        );
        assert_eq!(
            r(
                "{{ p | string_values | tojson }}",
                serde_json::json!({"p": {"n": 3, "b": true, "s": "x"}})
            ),
            r#"{"b":"true","n":"3","s":"x"}"#
        );
        assert!(env
            .render_str("{{ missing }}", serde_json::json!({}))
            .is_err());
        assert_eq!(
            r("{% if missing %}x{% endif %}y", serde_json::json!({})),
            "y"
        );
    }
}
