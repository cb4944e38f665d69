//! Small helpers shared by the fakes: timestamp formats, query strings and paths,
//! response builders, deterministic ids and the HMAC used by webhook signatures.

use axum::body::Body;
use axum::http::{HeaderName, HeaderValue, StatusCode};
use axum::response::Response;
use base64::Engine as _;
use chrono::{DateTime, FixedOffset, NaiveDate, NaiveDateTime, SecondsFormat, TimeZone, Utc};
use hmac::{Hmac, Mac};
use serde_json::Value;
use sha2::Sha256;

// ---------------------------------------------------------------------------------------
// Time

/// `2024-03-05T08:00:00.000Z` (HubSpot).
pub(crate) fn iso_millis_z(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// `2024-03-05T08:00:00+00:00` (Mailchimp, Klaviyo).
pub(crate) fn iso_utc_offset(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Secs, false)
}

/// The time in a fixed offset, `2024-03-05T03:00:00-05:00` (Shopify's shop time zone).
pub(crate) fn iso_in_offset(t: DateTime<Utc>, offset: FixedOffset) -> String {
    t.with_timezone(&offset)
        .to_rfc3339_opts(SecondsFormat::Secs, false)
}

/// `2024-03-05T08:00:00`, no zone (WooCommerce `*_gmt`, SuperOffice).
pub(crate) fn naive(t: DateTime<Utc>) -> String {
    t.format("%Y-%m-%dT%H:%M:%S").to_string()
}

/// Parses an ISO 8601 time: RFC 3339 with `Z` or an offset, a zone-less date-time
/// (read as UTC) or a bare date (midnight UTC). A `+` that a client forgot to
/// percent-encode arrives as a space and is *not* repaired: the real servers would
/// not repair it either.
pub(crate) fn parse_iso(s: &str) -> Option<DateTime<Utc>> {
    let s = s.trim();
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Some(t.with_timezone(&Utc));
    }
    if let Ok(t) = NaiveDateTime::parse_from_str(s, "%Y-%m-%dT%H:%M:%S%.f") {
        return Some(t.and_utc());
    }
    if let Ok(d) = NaiveDate::parse_from_str(s, "%Y-%m-%d") {
        return d.and_hms_opt(0, 0, 0).map(|t| t.and_utc());
    }
    None
}

/// Epoch milliseconds in a string (HubSpot date filters), or else ISO 8601.
pub(crate) fn parse_epoch_ms_or_iso(s: &str) -> Option<DateTime<Utc>> {
    let t = s.trim();
    if !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit()) {
        return Utc.timestamp_millis_opt(t.parse().ok()?).single();
    }
    parse_iso(t)
}

/// Truncates to whole milliseconds, the finest precision any vendor shows.
pub(crate) fn trunc_millis(t: DateTime<Utc>) -> DateTime<Utc> {
    Utc.timestamp_millis_opt(t.timestamp_millis())
        .single()
        .unwrap_or(t)
}

// ---------------------------------------------------------------------------------------
// Query strings and paths

/// A decoded query string, in order; a name may repeat.
#[derive(Debug, Clone, Default)]
pub(crate) struct Query(pub Vec<(String, String)>);

impl Query {
    pub(crate) fn parse(raw: &str) -> Self {
        Self(
            url::form_urlencoded::parse(raw.as_bytes())
                .into_owned()
                .collect(),
        )
    }

    /// The first value of `name`.
    pub(crate) fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    pub(crate) fn has(&self, name: &str) -> bool {
        self.0.iter().any(|(k, _)| k == name)
    }

    /// `name` parsed as a number: `Ok(None)` when absent, `Err(raw)` when not a number.
    pub(crate) fn number<T: std::str::FromStr>(&self, name: &str) -> Result<Option<T>, String> {
        match self.get(name) {
            None => Ok(None),
            Some(v) => v.trim().parse().map(Some).map_err(|_| v.to_string()),
        }
    }

    /// The pairs with `name` replaced by `value` (appended when absent) and `drop` removed.
    pub(crate) fn with(&self, name: &str, value: &str, drop: &[&str]) -> Vec<(String, String)> {
        let mut out: Vec<(String, String)> = Vec::with_capacity(self.0.len() + 1);
        let mut replaced = false;
        for (k, v) in &self.0 {
            if drop.contains(&k.as_str()) {
                continue;
            }
            if k == name {
                if !replaced {
                    out.push((k.clone(), value.to_string()));
                    replaced = true;
                }
            } else {
                out.push((k.clone(), v.clone()));
            }
        }
        if !replaced {
            out.push((name.to_string(), value.to_string()));
        }
        out
    }
}

/// `base + path + ?query`, with the pairs form-encoded (`[` becomes `%5B`).
pub(crate) fn url_with(base: &str, path: &str, pairs: &[(String, String)]) -> String {
    if pairs.is_empty() {
        return format!("{base}{path}");
    }
    let q = url::form_urlencoded::Serializer::new(String::new())
        .extend_pairs(pairs)
        .finish();
    format!("{base}{path}?{q}")
}

/// The non-empty segments of a path, percent-decoded.
pub(crate) fn segments(path: &str) -> Vec<String> {
    path.split('/')
        .filter(|s| !s.is_empty())
        .map(percent_decode)
        .collect()
}

/// Decodes `%XX` escapes; `+` stays a plus (paths are not form-encoded).
pub(crate) fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            let hex = |c: u8| (c as char).to_digit(16);
            if let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2])) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

// ---------------------------------------------------------------------------------------
// Responses

/// A response with a status, a content type and a body.
pub(crate) fn respond(status: u16, content_type: &str, body: impl Into<Body>) -> Response {
    let mut r = Response::new(body.into());
    *r.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    if !content_type.is_empty() {
        set_header(&mut r, "content-type", content_type);
    }
    r
}

/// `application/json` with the value serialized.
pub(crate) fn json(status: u16, v: &Value) -> Response {
    respond(status, "application/json; charset=utf-8", v.to_string())
}

/// An empty body.
pub(crate) fn empty(status: u16) -> Response {
    respond(status, "", Body::empty())
}

/// Sets (replaces) a header; invalid names or values are skipped.
pub(crate) fn set_header(r: &mut Response, name: &str, value: &str) {
    if let (Ok(n), Ok(v)) = (HeaderName::try_from(name), HeaderValue::try_from(value)) {
        r.headers_mut().insert(n, v);
    }
}

/// Adds a header, keeping earlier values of the same name.
pub(crate) fn append_header(r: &mut Response, name: &str, value: &str) {
    if let (Ok(n), Ok(v)) = (HeaderName::try_from(name), HeaderValue::try_from(value)) {
        r.headers_mut().append(n, v);
    }
}

// ---------------------------------------------------------------------------------------
// Ids, hashes, signatures

/// splitmix64: a tiny deterministic mixer for fake ids and generated data.
pub(crate) fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = x;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A deterministic UUID-shaped string (v4 layout) derived from `seed`.
pub(crate) fn fake_uuid(seed: u64) -> String {
    let a = mix(seed);
    let b = mix(a ^ 0x5555);
    format!(
        "{:08x}-{:04x}-4{:03x}-{:04x}-{:012x}",
        (a >> 32) as u32,
        (a >> 16) & 0xffff,
        a & 0x0fff,
        0x8000 | ((b >> 48) & 0x3fff),
        b & 0xffff_ffff_ffff
    )
}

/// Lowercase hex MD5.
pub(crate) fn md5_hex(data: &[u8]) -> String {
    use md5::Digest;
    hex(&md5::Md5::digest(data))
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

/// `base64(HMAC-SHA256(key = secret, msg = body))`: the Shopify and WooCommerce scheme.
pub(crate) fn hmac_sha256_base64(body: &[u8], secret: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes any key length");
    mac.update(body);
    base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
}

pub(crate) fn b64url(data: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(data)
}

pub(crate) fn b64url_decode(s: &str) -> Option<Vec<u8>> {
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(s.trim())
        .ok()
}

/// The user and password of an `Authorization: Basic ...` header.
pub(crate) fn basic_credentials(authorization: Option<&str>) -> Option<(String, String)> {
    let v = authorization?.trim();
    let (scheme, rest) = v.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let raw = base64::engine::general_purpose::STANDARD
        .decode(rest.trim())
        .ok()?;
    let text = String::from_utf8(raw).ok()?;
    let (u, p) = text.split_once(':')?;
    Some((u.to_string(), p.to_string()))
}

/// The token of an `Authorization: Bearer ...` header.
pub(crate) fn bearer(authorization: Option<&str>) -> Option<&str> {
    let v = authorization?.trim();
    let (scheme, rest) = v.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
}

/// Applies Mailchimp-style `fields` / `exclude_fields` (comma-separated dot paths) to a
/// JSON value; arrays are walked element by element.
pub(crate) fn project_fields(v: &Value, fields: Option<&str>, exclude: Option<&str>) -> Value {
    let split = |s: &str| -> Vec<Vec<String>> {
        s.split(',')
            .map(str::trim)
            .filter(|p| !p.is_empty())
            .map(|p| p.split('.').map(str::to_string).collect())
            .collect()
    };
    let mut out = match fields {
        Some(f) if !f.trim().is_empty() => keep_paths(v, &split(f)),
        _ => v.clone(),
    };
    if let Some(e) = exclude {
        drop_paths(&mut out, &split(e));
    }
    out
}

fn keep_paths(v: &Value, paths: &[Vec<String>]) -> Value {
    match v {
        Value::Array(a) => Value::Array(a.iter().map(|x| keep_paths(x, paths)).collect()),
        Value::Object(m) => {
            let mut out = serde_json::Map::new();
            for (k, val) in m {
                let sub: Vec<Vec<String>> = paths
                    .iter()
                    .filter(|p| p.first() == Some(k))
                    .map(|p| p[1..].to_vec())
                    .collect();
                if sub.is_empty() {
                    continue;
                }
                if sub.iter().any(Vec::is_empty) {
                    out.insert(k.clone(), val.clone());
                } else {
                    out.insert(k.clone(), keep_paths(val, &sub));
                }
            }
            Value::Object(out)
        }
        other => other.clone(),
    }
}

fn drop_paths(v: &mut Value, paths: &[Vec<String>]) {
    match v {
        Value::Array(a) => a.iter_mut().for_each(|x| drop_paths(x, paths)),
        Value::Object(m) => {
            for p in paths {
                match p.len() {
                    0 => {}
                    1 => {
                        m.remove(&p[0]);
                    }
                    _ => {
                        if let Some(child) = m.get_mut(&p[0]) {
                            drop_paths(child, &[p[1..].to_vec()]);
                        }
                    }
                }
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percent_decoding_keeps_plus_and_bad_escapes() {
        assert_eq!(percent_decode("ann%40example.com"), "ann@example.com");
        assert_eq!(percent_decode("a+b%2"), "a+b%2");
        assert_eq!(percent_decode("%"), "%");
    }

    #[test]
    fn times_parse_in_every_vendor_form() {
        let t = parse_iso("2024-03-01T12:00:00+00:00").unwrap();
        assert_eq!(parse_iso("2024-03-01T12:00:00Z"), Some(t));
        assert_eq!(parse_iso("2024-03-01T07:00:00-05:00"), Some(t));
        assert_eq!(parse_iso("2024-03-01T12:00:00"), Some(t));
        assert_eq!(
            parse_epoch_ms_or_iso(&t.timestamp_millis().to_string()),
            Some(t)
        );
        assert_eq!(parse_iso("2024-03-01T12:00:00 00:00"), None);
        assert_eq!(iso_millis_z(t), "2024-03-01T12:00:00.000Z");
        assert_eq!(iso_utc_offset(t), "2024-03-01T12:00:00+00:00");
        assert_eq!(
            iso_in_offset(t, FixedOffset::west_opt(5 * 3600).unwrap()),
            "2024-03-01T07:00:00-05:00"
        );
    }

    #[test]
    fn fields_projection() {
        let v = serde_json::json!({"members":[{"a":1,"b":{"c":2,"d":3}}],"total_items":1,"x":0});
        let p = project_fields(&v, Some("members.b.c,total_items"), None);
        assert_eq!(
            p,
            serde_json::json!({"members":[{"b":{"c":2}}],"total_items":1})
        );
        let e = project_fields(&v, None, Some("members.b,x"));
        assert_eq!(e, serde_json::json!({"members":[{"a":1}],"total_items":1}));
    }
}
