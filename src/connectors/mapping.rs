//! Record → customer mapping (`[pull.map]` in a definition).
//!
//! Each mapped value is a path into the vendor record (`"properties.email"`) or a
//! table `{ path = "...", type = "number" }` / `{ expr = "status == 'subscribed'" }`.
//! Paths cover nearly everything and cost almost nothing per record; minijinja
//! expressions are the escape hatch for the rest (consent flags, tag lists), so a
//! vendor quirk is a line in a TOML file rather than a recompile.

use super::path::{scalar_string, JsonPath};
use crate::diag::Diagnostic;
use crate::model::RESERVED_ATTRIBUTES;
use chrono::{DateTime, NaiveDateTime, Utc};
use serde::Deserialize;
use serde_json::{Map, Value};
use std::collections::BTreeMap;
use toml::Spanned;

/// `[pull.map]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawMap {
    id: Spanned<toml::Value>,
    email: Option<Spanned<toml::Value>>,
    updated: Option<Spanned<String>>,
    #[serde(default)]
    attributes: BTreeMap<String, Spanned<toml::Value>>,
    #[serde(default)]
    consent: BTreeMap<String, Spanned<toml::Value>>,
    tags: Option<Spanned<toml::Value>>,
    skip: Option<Spanned<String>>,
}

/// How a value is converted after it is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ValueType {
    /// As the vendor sends it.
    Any,
    String,
    Number,
    Integer,
    Bool,
    /// A timestamp, stored as RFC 3339 UTC like every klantreis time.
    Time,
}

/// Where a value comes from.
#[derive(Debug, Clone)]
pub enum Source {
    Path(JsonPath),
    /// A minijinja expression over the record.
    Expr(String),
}

/// One mapped value.
#[derive(Debug, Clone)]
pub struct Field {
    pub source: Source,
    pub ty: ValueType,
    /// Split a string into a list on this separator (HubSpot's `a;b` multi-checkboxes).
    pub split: Option<String>,
}

/// A compiled `[pull.map]`.
#[derive(Debug, Clone)]
pub struct Mapping {
    pub id: Field,
    pub email: Option<Field>,
    /// When the record last changed (the incremental-sync watermark).
    pub updated: Option<JsonPath>,
    /// Target attribute → field, in name order.
    pub attributes: Vec<(String, Field)>,
    /// `consent_<channel>` attribute → field.
    pub consent: Vec<(String, Field)>,
    pub tags: Option<Field>,
    /// Records for which this expression is true are left out (not an error).
    pub skip: Option<String>,
}

/// A record mapped, before identity is resolved.
#[derive(Debug, Clone, PartialEq)]
pub struct Mapped {
    pub source_id: String,
    /// Trimmed and lower-cased.
    pub email: Option<String>,
    pub attributes: Map<String, Value>,
    pub tags: Option<Vec<String>>,
}

/// Reports definition problems at their place in the definition file.
pub(crate) struct Problems<'a> {
    pub file: &'a str,
    pub text: &'a str,
    pub list: Vec<Diagnostic>,
}

impl Problems<'_> {
    pub fn at(&mut self, offset: usize, message: impl Into<String>) {
        self.list
            .push(Diagnostic::at_offset(self.file, self.text, offset, message));
    }
}

/// The environment expressions over records are evaluated in: missing keys are
/// simply undefined, because vendor records leave out empty fields all the time.
pub fn expression_env() -> minijinja::Environment<'static> {
    let mut env = minijinja::Environment::new();
    env.set_undefined_behavior(minijinja::UndefinedBehavior::Chainable);
    super::template::add_filters(&mut env);
    env
}

impl Mapping {
    pub(crate) fn parse(raw: &RawMap, p: &mut Problems<'_>) -> Option<Mapping> {
        let before = p.list.len();
        let env = expression_env();
        let id = field(&raw.id, "id", &env, p);
        let email = raw.email.as_ref().and_then(|f| field(f, "email", &env, p));
        let updated = raw
            .updated
            .as_ref()
            .and_then(|u| match JsonPath::parse(u.get_ref()) {
                Ok(path) => Some(path),
                Err(e) => {
                    p.at(u.span().start, format!("updated: {e}"));
                    None
                }
            });
        let mut attributes = Vec::new();
        for (name, f) in &raw.attributes {
            if RESERVED_ATTRIBUTES.contains(&name.as_str()) || name == "email" || name == "tags" {
                p.at(
                    f.span().start,
                    format!("attribute {name:?} is set by the engine (id, email, tags) or reserved for rules; map it under another name"),
                );
                continue;
            }
            if let Some(field) = field(f, name, &env, p) {
                attributes.push((name.clone(), field));
            }
        }
        let mut consent = Vec::new();
        for (channel, f) in &raw.consent {
            if let Some(field) = field(f, channel, &env, p) {
                consent.push((format!("consent_{channel}"), field));
            }
        }
        let tags = raw.tags.as_ref().and_then(|f| field(f, "tags", &env, p));
        let skip = raw
            .skip
            .as_ref()
            .and_then(|s| match env.compile_expression(s.get_ref()) {
                Ok(_) => Some(s.get_ref().clone()),
                Err(e) => {
                    p.at(s.span().start, format!("skip: bad expression: {e}"));
                    None
                }
            });
        if p.list.len() > before {
            return None;
        }
        Some(Mapping {
            id: id?,
            email,
            updated,
            attributes,
            consent,
            tags,
            skip,
        })
    }

    /// Every expression source, so a [`Mapper`] can compile them once per sync.
    fn expressions(&self) -> Vec<&str> {
        let fields = std::iter::once(&self.id)
            .chain(self.email.iter())
            .chain(self.attributes.iter().map(|(_, f)| f))
            .chain(self.consent.iter().map(|(_, f)| f))
            .chain(self.tags.iter());
        let mut out: Vec<&str> = fields
            .filter_map(|f| match &f.source {
                Source::Expr(e) => Some(e.as_str()),
                Source::Path(_) => None,
            })
            .collect();
        if let Some(s) = &self.skip {
            out.push(s.as_str());
        }
        out
    }
}

fn field(
    v: &Spanned<toml::Value>,
    what: &str,
    env: &minijinja::Environment<'_>,
    p: &mut Problems<'_>,
) -> Option<Field> {
    let at = v.span().start;
    let path = |s: &str, p: &mut Problems<'_>| match JsonPath::parse(s) {
        Ok(path) => Some(Source::Path(path)),
        Err(e) => {
            p.at(at, format!("{what}: {e}"));
            None
        }
    };
    match v.get_ref() {
        toml::Value::String(s) => Some(Field {
            source: path(s, p)?,
            ty: ValueType::Any,
            split: None,
        }),
        toml::Value::Table(t) => {
            let mut source = None;
            let mut ty = ValueType::Any;
            let mut split = None;
            let mut bad = false;
            for (k, val) in t {
                match (k.as_str(), val) {
                    ("path", toml::Value::String(s)) => {
                        source = path(s, p);
                        bad |= source.is_none();
                    }
                    ("expr", toml::Value::String(s)) => match env.compile_expression(s) {
                        Ok(_) => source = Some(Source::Expr(s.clone())),
                        Err(e) => {
                            bad = true;
                            p.at(at, format!("{what}: bad expression {s:?}: {e}"));
                        }
                    },
                    ("type", toml::Value::String(s)) => {
                        ty = match s.as_str() {
                            "string" => ValueType::String,
                            "number" => ValueType::Number,
                            "integer" => ValueType::Integer,
                            "bool" => ValueType::Bool,
                            "time" => ValueType::Time,
                            "any" => ValueType::Any,
                            other => {
                                bad = true;
                                p.at(
                                    at,
                                    format!("{what}: unknown type {other:?} (string, number, integer, bool, time, any)"),
                                );
                                ValueType::Any
                            }
                        }
                    }
                    ("split", toml::Value::String(s)) if !s.is_empty() => split = Some(s.clone()),
                    _ => {
                        bad = true;
                        p.at(
                            at,
                            format!("{what}: unknown or mistyped key {k:?} (a field is {{ path | expr, type, split }})"),
                        );
                    }
                }
            }
            if source.is_none() && !bad {
                p.at(at, format!("{what}: give a `path` or an `expr`"));
            }
            if bad {
                return None;
            }
            Some(Field {
                source: source?,
                ty,
                split,
            })
        }
        _ => {
            p.at(
                at,
                format!("{what}: expected a path string or a table {{ path | expr, type, split }}"),
            );
            None
        }
    }
}

/// A mapping with its expressions compiled, for one sync. Borrowing the environment
/// is why this is per sync rather than stored in the definition.
pub struct Mapper<'env> {
    mapping: &'env Mapping,
    exprs: Vec<(&'env str, minijinja::Expression<'env, 'env>)>,
}

impl<'env> Mapper<'env> {
    pub fn new(
        mapping: &'env Mapping,
        env: &'env minijinja::Environment<'static>,
    ) -> Result<Self, String> {
        let exprs = mapping
            .expressions()
            .into_iter()
            .map(|src| {
                env.compile_expression(src)
                    .map(|e| (src, e))
                    .map_err(|e| e.to_string())
            })
            .collect::<Result<_, _>>()?;
        Ok(Mapper { mapping, exprs })
    }

    pub fn mapping(&self) -> &Mapping {
        self.mapping
    }

    fn eval(&self, src: &str, ctx: &minijinja::Value) -> Result<Value, String> {
        let (_, expr) = self
            .exprs
            .iter()
            .find(|(s, _)| *s == src)
            .expect("every expression is compiled in Mapper::new");
        let v = expr
            .eval(ctx)
            .map_err(|e| format!("expression {src:?}: {e}"))?;
        if v.is_undefined() || v.is_none() {
            return Ok(Value::Null);
        }
        serde_json::to_value(&v).map_err(|e| format!("expression {src:?}: {e}"))
    }

    fn read(
        &self,
        f: &Field,
        record: &Value,
        ctx: &mut Option<minijinja::Value>,
    ) -> Result<Value, String> {
        let raw = match &f.source {
            Source::Path(p) => p.get(record).cloned().unwrap_or(Value::Null),
            Source::Expr(e) => {
                let c = ctx.get_or_insert_with(|| minijinja::Value::from_serialize(record));
                self.eval(e, c)?
            }
        };
        convert(raw, f)
    }

    /// Maps one record. `Ok(None)` means the `skip` expression left it out.
    pub fn map(&self, record: &Value) -> Result<Option<Mapped>, String> {
        let m = self.mapping;
        let mut ctx: Option<minijinja::Value> = None;
        if let Some(skip) = &m.skip {
            let c = ctx.get_or_insert_with(|| minijinja::Value::from_serialize(record));
            if truthy(&self.eval(skip, c)?) {
                return Ok(None);
            }
        }
        let source_id = match self.read(&m.id, record, &mut ctx)? {
            Value::Null => return Err("the record has no id".into()),
            v => scalar_string(&v)
                .ok_or_else(|| format!("the record's id is not a string or number: {v}"))?,
        };
        if source_id.chars().any(char::is_control) {
            return Err("the record's id contains control characters".into());
        }
        let email = match &m.email {
            None => None,
            Some(f) => match self.read(f, record, &mut ctx)? {
                Value::Null => None,
                Value::String(s) if s.trim().is_empty() => None,
                Value::String(s) => {
                    let e = crate::store::normalize_email(&s);
                    if !e.contains('@') || e.chars().any(|c| c.is_whitespace() || c.is_control()) {
                        return Err(format!("email {s:?} is not an address"));
                    }
                    Some(e)
                }
                v => return Err(format!("email is not a string: {v}")),
            },
        };
        let mut attributes = Map::new();
        for (name, f) in m.attributes.iter().chain(m.consent.iter()) {
            let v = self
                .read(f, record, &mut ctx)
                .map_err(|e| format!("{name}: {e}"))?;
            // A value the source leaves empty is not written: a sync never deletes
            // what another source (or an import) put there.
            if !v.is_null() {
                attributes.insert(name.clone(), v);
            }
        }
        let tags = match &m.tags {
            None => None,
            Some(f) => Some(tag_list(
                self.read(f, record, &mut ctx)
                    .map_err(|e| format!("tags: {e}"))?,
            )?),
        };
        Ok(Some(Mapped {
            source_id,
            email,
            attributes,
            tags,
        }))
    }
}

fn truthy(v: &Value) -> bool {
    match v {
        Value::Null => false,
        Value::Bool(b) => *b,
        Value::Number(n) => n.as_f64() != Some(0.0),
        Value::String(s) => !s.is_empty(),
        Value::Array(a) => !a.is_empty(),
        Value::Object(o) => !o.is_empty(),
    }
}

fn tag_list(v: Value) -> Result<Vec<String>, String> {
    let mut tags: Vec<String> = match v {
        Value::Null => Vec::new(),
        Value::Array(a) => a.into_iter().filter_map(|t| scalar_string(&t)).collect(),
        Value::String(s) => s
            .split(',')
            .map(|t| t.trim().to_string())
            .filter(|t| !t.is_empty())
            .collect(),
        other => {
            return Err(format!(
                "tags must be a list or a comma-separated string, not {other}"
            ))
        }
    };
    tags.sort();
    tags.dedup();
    Ok(tags)
}

/// Applies a field's `split` and `type` to a raw value.
fn convert(v: Value, f: &Field) -> Result<Value, String> {
    let v = match (&f.split, v) {
        (Some(sep), Value::String(s)) => Value::Array(
            s.split(sep.as_str())
                .map(str::trim)
                .filter(|t| !t.is_empty())
                .map(|t| Value::String(t.to_string()))
                .collect(),
        ),
        (_, v) => v,
    };
    if v.is_null() {
        return Ok(v);
    }
    if let Value::Array(items) = v {
        if f.ty == ValueType::Any {
            return Ok(Value::Array(items));
        }
        return items
            .into_iter()
            .map(|i| convert_scalar(i, f.ty))
            .collect::<Result<Vec<_>, _>>()
            .map(Value::Array);
    }
    convert_scalar(v, f.ty)
}

fn convert_scalar(v: Value, ty: ValueType) -> Result<Value, String> {
    // Vendors send numbers and dates as strings (HubSpot sends every property as one),
    // and an empty string means "no value".
    if let Value::String(s) = &v {
        if s.trim().is_empty() && ty != ValueType::String {
            return Ok(Value::Null);
        }
    }
    match ty {
        ValueType::Any => Ok(v),
        ValueType::String => Ok(match v {
            Value::String(_) => v,
            Value::Number(n) => Value::String(n.to_string()),
            Value::Bool(b) => Value::String(b.to_string()),
            other => Value::String(other.to_string()),
        }),
        ValueType::Number | ValueType::Integer => {
            let n = match &v {
                Value::Number(_) => v.clone(),
                Value::String(s) => {
                    let t = s.trim();
                    if let Ok(i) = t.parse::<i64>() {
                        Value::from(i)
                    } else {
                        match t.parse::<f64>() {
                            Ok(f) if f.is_finite() => Value::from(f),
                            _ => return Err(format!("{s:?} is not a number")),
                        }
                    }
                }
                other => return Err(format!("{other} is not a number")),
            };
            if ty == ValueType::Integer {
                match (n.as_i64(), n.as_f64()) {
                    (Some(i), _) => Ok(Value::from(i)),
                    (None, Some(f)) if f.fract() == 0.0 && f.abs() < 9.0e15 => {
                        Ok(Value::from(f as i64))
                    }
                    _ => Err(format!("{v} is not a whole number")),
                }
            } else {
                Ok(n)
            }
        }
        ValueType::Bool => match &v {
            Value::Bool(_) => Ok(v),
            Value::String(s) => match s.trim().to_ascii_lowercase().as_str() {
                "true" | "yes" | "1" => Ok(Value::Bool(true)),
                "false" | "no" | "0" => Ok(Value::Bool(false)),
                _ => Err(format!("{s:?} is not a boolean")),
            },
            Value::Number(n) => Ok(Value::Bool(n.as_f64() != Some(0.0))),
            other => Err(format!("{other} is not a boolean")),
        },
        ValueType::Time => parse_time(&v)
            .map(|t| Value::String(crate::time::format(t)))
            .ok_or_else(|| format!("{v} is not a time")),
    }
}

/// A vendor timestamp: RFC 3339 with any offset, a zone-less ISO time (WooCommerce's
/// `*_gmt` fields, read as UTC), or epoch milliseconds (HubSpot date properties).
pub fn parse_time(v: &Value) -> Option<DateTime<Utc>> {
    match v {
        Value::String(s) => {
            let s = s.trim();
            if let Some(t) = crate::time::parse(s) {
                return Some(t);
            }
            if let Ok(t) = NaiveDateTime::parse_from_str(s, "%Y-%m-%dT%H:%M:%S%.f") {
                return Some(t.and_utc());
            }
            if let Ok(t) = NaiveDateTime::parse_from_str(s, "%Y-%m-%d %H:%M:%S%.f") {
                return Some(t.and_utc());
            }
            if s.len() >= 12 && s.bytes().all(|b| b.is_ascii_digit()) {
                return DateTime::from_timestamp_millis(s.parse().ok()?);
            }
            None
        }
        Value::Number(n) => {
            let i = n.as_i64()?;
            // Ten digits are seconds; thirteen are milliseconds.
            if i.abs() >= 100_000_000_000 {
                DateTime::from_timestamp_millis(i)
            } else {
                DateTime::from_timestamp(i, 0)
            }
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn mapping(text: &str) -> Mapping {
        let raw: RawMap = toml::from_str(text).unwrap();
        let mut p = Problems {
            file: "t.toml",
            text,
            list: Vec::new(),
        };
        let m = Mapping::parse(&raw, &mut p);
        assert!(p.list.is_empty(), "{:?}", p.list);
        m.unwrap()
    }

    #[test]
    fn maps_paths_types_consent_and_tags() {
        let m = mapping(
            r#"
            id = "id"
            email = "email_address"
            updated = "last_changed"
            skip = "status == 'archived'"
            tags = { expr = "tags | map(attribute='name') | list" }
            [attributes]
            first_name = "merge_fields.FNAME"
            rating = { path = "member_rating", type = "integer" }
            spent = { path = "stats.spent", type = "number" }
            since = { path = "timestamp_opt", type = "time" }
            interests = { path = "interests", split = ";" }
            [consent]
            email = { expr = "status == 'subscribed'" }
            "#,
        );
        let env = expression_env();
        let mapper = Mapper::new(&m, &env).unwrap();
        let rec = json!({"id": "62ee", "email_address": " Urist@Freddie.com ", "status": "subscribed",
            "merge_fields": {"FNAME": "Urist"}, "member_rating": "2", "stats": {"spent": "12.50"},
            "timestamp_opt": "2024-01-02T10:00:00+01:00", "interests": "a; b;",
            "tags": [{"id": 1, "name": "VIP"}, {"id": 2, "name": "A"}], "last_changed": "2024-03-01T12:00:00+00:00"});
        let got = mapper.map(&rec).unwrap().unwrap();
        assert_eq!(got.source_id, "62ee");
        assert_eq!(got.email.as_deref(), Some("urist@freddie.com"));
        assert_eq!(got.tags, Some(vec!["A".to_string(), "VIP".to_string()]));
        assert_eq!(
            Value::Object(got.attributes),
            json!({"first_name": "Urist", "rating": 2, "spent": 12.5, "since": "2024-01-02T09:00:00Z",
                   "interests": ["a", "b"], "consent_email": true})
        );
        assert_eq!(
            mapper
                .map(&json!({"id": "x", "status": "archived"}))
                .unwrap(),
            None
        );
        assert!(mapper
            .map(&json!({"email_address": "a@b.c"}))
            .unwrap_err()
            .contains("no id"));
        assert!(mapper
            .map(&json!({"id": "1", "email_address": "not-an-address"}))
            .unwrap_err()
            .contains("not an address"));
        assert!(mapper
            .map(&json!({"id": "1", "member_rating": "many"}))
            .unwrap_err()
            .contains("rating"));
    }

    #[test]
    fn bad_definitions_are_reported_with_positions() {
        let text = "id = \"id\"\n[attributes]\nphase = \"x\"\nn = { expr = \"a ==\" }\nm = { path = \"a\", type = \"float\" }\n";
        let raw: RawMap = toml::from_str(text).unwrap();
        let mut p = Problems {
            file: "t.toml",
            text,
            list: Vec::new(),
        };
        assert!(Mapping::parse(&raw, &mut p).is_none());
        let all: Vec<String> = p.list.iter().map(|d| d.to_string()).collect();
        assert!(
            all.iter()
                .any(|d| d.starts_with("t.toml:3:") && d.contains("reserved")),
            "{all:?}"
        );
        assert!(
            all.iter()
                .any(|d| d.starts_with("t.toml:4:") && d.contains("bad expression")),
            "{all:?}"
        );
        assert!(
            all.iter()
                .any(|d| d.starts_with("t.toml:5:") && d.contains("float")),
            "{all:?}"
        );
    }

    #[test]
    fn vendor_times() {
        let utc = |s: &str| crate::time::parse(s).unwrap();
        assert_eq!(
            parse_time(&json!("2024-03-05T08:00:00.000Z")),
            Some(utc("2024-03-05T08:00:00Z"))
        );
        assert_eq!(
            parse_time(&json!("2017-03-22T19:28:08")),
            Some(utc("2017-03-22T19:28:08Z"))
        );
        assert_eq!(
            parse_time(&json!("1709251200000")),
            Some(utc("2024-03-01T00:00:00Z"))
        );
        assert_eq!(
            parse_time(&json!(1709251200)),
            Some(utc("2024-03-01T00:00:00Z"))
        );
        assert_eq!(parse_time(&json!("soon")), None);
    }
}
