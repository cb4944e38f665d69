//! A configured instance (`[connectors.NAME]` in config.toml) bound to its
//! definition: params expanded from the environment, URLs and auth headers
//! rendered, the HTTP client built. Building does no I/O, so `klantreis check`
//! builds every instance to find missing variables and bad values.

use super::definition::{Auth, Definition, KeyType, Kind, LookupError, Registry};
use super::http::{Http, HttpSettings, Outgoing};
use super::secret::{env_vars_in, Secret};
use super::ConnectorError;
use crate::clock::SharedClock;
use crate::config::{expand_env, ConnectorInstanceConfig};
use reqwest::header::{HeaderName, HeaderValue};
use serde_json::{Map, Value};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use url::Url;

/// How records from different sources are recognised as the same person.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Join {
    /// The lower-cased, trimmed email address (the default).
    Email,
    /// Another mapped attribute; such customers get the id `<attribute>:<value>`.
    Attribute(String),
    /// Never join: every record is its own customer `<instance>:<source id>`.
    None,
}

/// A param's value once expanded.
#[derive(Clone)]
pub(crate) enum ParamValue {
    Plain(String),
    Secret(Secret),
}

impl ParamValue {
    fn expose(&self) -> &str {
        match self {
            ParamValue::Plain(s) => s,
            ParamValue::Secret(s) => s.expose(),
        }
    }
}

/// A file source's settings.
#[derive(Debug, Clone)]
pub(crate) struct FileSource {
    pub path: PathBuf,
    pub format: crate::import::Format,
}

pub(crate) struct Inner {
    pub name: String,
    pub def: Arc<Definition>,
    pub params: BTreeMap<String, ParamValue>,
    pub base_url: Option<Url>,
    pub http: Option<Http>,
    pub page_size: u64,
    pub join: Join,
    pub prefix: String,
    pub pull: bool,
    pub overlap_secs: Option<u64>,
    pub clock: SharedClock,
    pub file: Option<FileSource>,
}

/// A connector instance, ready to sync and to send. Cheap to clone.
#[derive(Clone)]
pub struct Connector(pub(crate) Arc<Inner>);

impl std::fmt::Debug for Connector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connector")
            .field("name", &self.0.name)
            .field("type", &self.0.def.name)
            .field("base_url", &self.0.base_url.as_ref().map(Url::as_str))
            .finish_non_exhaustive()
    }
}

/// A problem with an instance, at a place in config.toml.
pub(crate) type Problem = ((usize, usize), String);

/// Problems with an instance's keys that need only its definition: unknown keys,
/// wrongly typed values, required params that are missing.
pub(crate) fn key_problems(inst: &ConnectorInstanceConfig, def: &Definition) -> Vec<Problem> {
    let mut out = Vec::new();
    let engine = def.engine_keys();
    for (k, s) in &inst.settings {
        let at = (s.line, s.column);
        if let Some((_, ty)) = engine.iter().find(|(e, _)| e == k) {
            let ok = match ty {
                KeyType::Str => s.value.is_str(),
                KeyType::Number => s
                    .value
                    .as_float()
                    .map_or(s.value.as_integer().is_some(), |f| f >= 0.0),
                KeyType::Int => s.value.as_integer().is_some_and(|i| i >= 0),
                KeyType::Bool => s.value.is_bool(),
            };
            if !ok {
                let want = match ty {
                    KeyType::Str => "a string",
                    KeyType::Number => "a number (0 or more)",
                    KeyType::Int => "a whole number (0 or more)",
                    KeyType::Bool => "true or false",
                };
                out.push((at, format!("`{k}` must be {want}")));
            }
        } else if def.params.contains_key(k) {
            if !matches!(
                s.value,
                toml::Value::String(_)
                    | toml::Value::Integer(_)
                    | toml::Value::Float(_)
                    | toml::Value::Boolean(_)
            ) {
                out.push((
                    at,
                    format!("`{k}` must be a string (use \"${{VAR}}\" for credentials)"),
                ));
            }
        } else {
            let mut known: Vec<&str> = def.params.keys().map(String::as_str).collect();
            known.extend(engine.iter().map(|(e, _)| *e));
            out.push((
                at,
                format!(
                    "unknown key `{k}` for a {} connector (known: type, {})",
                    def.name,
                    known.join(", ")
                ),
            ));
        }
    }
    for (name, p) in &def.params {
        if p.required && !inst.settings.contains_key(name) {
            let help = if p.help.is_empty() {
                String::new()
            } else {
                format!(": {}", p.help)
            };
            out.push((
                inst.at,
                format!("connector {:?} needs `{name}`{help}", inst.name),
            ));
        }
    }
    if def.kind == Kind::Http && def.base_url.is_none() && !inst.settings.contains_key("base_url") {
        out.push((
            inst.at,
            format!(
                "connector {:?} needs `base_url` ({} has no fixed address)",
                inst.name, def.name
            ),
        ));
    }
    out
}

/// Looks up an instance's definition, as a problem at its `type` when that fails.
pub(crate) fn definition_for(
    inst: &ConnectorInstanceConfig,
    registry: &Registry,
) -> Result<Arc<Definition>, Problem> {
    registry.get(&inst.kind).map_err(|e| match e {
        LookupError::Unknown { known } => (
            inst.kind_at,
            format!(
                "unknown connector type {:?}: there is no {}/{}.toml and no built-in definition of that name (known: {})",
                inst.kind,
                registry.dir().display(),
                inst.kind,
                known.join(", ")
            ),
        ),
        LookupError::Invalid(ds) => (
            inst.kind_at,
            format!(
                "definition {:?} has problems (run `klantreis check`): {}",
                inst.kind,
                ds.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ")
            ),
        ),
    })
}

fn setting_str(v: &toml::Value) -> String {
    match v {
        toml::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

impl Connector {
    /// Builds an instance. Every problem found is in the error.
    pub fn build(
        inst: &ConnectorInstanceConfig,
        registry: &Registry,
        base_dir: &Path,
        clock: SharedClock,
    ) -> Result<Connector, ConnectorError> {
        Self::try_build(inst, registry, base_dir, clock).map_err(|problems| {
            ConnectorError::Config {
                instance: inst.name.clone(),
                problems: problems.into_iter().map(|(_, m)| m).collect(),
            }
        })
    }

    pub(crate) fn try_build(
        inst: &ConnectorInstanceConfig,
        registry: &Registry,
        base_dir: &Path,
        clock: SharedClock,
    ) -> Result<Connector, Vec<Problem>> {
        let def = definition_for(inst, registry).map_err(|p| vec![p])?;
        let mut problems = key_problems(inst, &def);
        if !problems.is_empty() {
            return Err(problems);
        }
        let get = |k: &str| inst.settings.get(k).map(|s| &s.value);
        let int = |k: &str, default: u64| {
            get(k)
                .and_then(toml::Value::as_integer)
                .map_or(default, |i| i as u64)
        };

        // Params: instance value or default, `${VAR}`s expanded. The error names the
        // variable, never a value.
        let mut params = BTreeMap::new();
        let mut credential = Vec::new();
        for (name, p) in &def.params {
            let (raw, at) = match inst.settings.get(name) {
                Some(s) => (setting_str(&s.value), (s.line, s.column)),
                None => match &p.default {
                    Some(d) => (d.clone(), inst.at),
                    None => continue,
                },
            };
            let value = match expand_env(&raw) {
                Ok(v) => v,
                Err(e) => {
                    problems.push((at, format!("`{name}`: {e}")));
                    continue;
                }
            };
            if p.secret {
                let vars = env_vars_in(&raw);
                credential.push(if vars.is_empty() {
                    format!("`{name}` (written in config.toml)")
                } else {
                    format!(
                        "`{name}` (from {})",
                        vars.iter()
                            .map(|v| format!("${{{v}}}"))
                            .collect::<Vec<_>>()
                            .join(", ")
                    )
                });
                if value.trim().is_empty() && p.required {
                    problems.push((at, format!("`{name}` is empty")));
                }
                params.insert(name.clone(), ParamValue::Secret(Secret::new(value)));
            } else {
                params.insert(name.clone(), ParamValue::Plain(value));
            }
        }
        // Nothing below is meaningful without the params (a missing variable would
        // show up again as an undefined template value).
        if !problems.is_empty() {
            return Err(problems);
        }
        let page_size = match (int("page_size", 0), def.pull.as_ref()) {
            (0, Some(p)) => p.page_size,
            (0, None) => 1000,
            (n, Some(p)) if p.max_page_size.is_some_and(|m| n > m) => {
                let s = &inst.settings["page_size"];
                problems.push((
                    (s.line, s.column),
                    format!(
                        "page_size {n} is above {}'s maximum of {}",
                        def.name,
                        p.max_page_size.unwrap_or(0)
                    ),
                ));
                n
            }
            (n, _) => n,
        };
        let join = match get("join").and_then(toml::Value::as_str) {
            None | Some("email") => Join::Email,
            Some("none") => Join::None,
            Some(a)
                if !a.is_empty() && a.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') =>
            {
                Join::Attribute(a.to_string())
            }
            Some(a) => {
                let s = &inst.settings["join"];
                problems.push((
                    (s.line, s.column),
                    format!("join {a:?} must be \"email\", \"none\" or an attribute name"),
                ));
                Join::Email
            }
        };
        let prefix = get("prefix")
            .and_then(toml::Value::as_str)
            .unwrap_or(&def.name)
            .to_string();
        if prefix.is_empty()
            || !prefix
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_')
        {
            let at = inst
                .settings
                .get("prefix")
                .map_or(inst.at, |s| (s.line, s.column));
            problems.push((
                at,
                format!("prefix {prefix:?} must be letters, digits and '_'"),
            ));
        }
        let pull = get("pull")
            .and_then(toml::Value::as_bool)
            .unwrap_or(def.pull.is_some() || def.kind == Kind::File);
        if pull
            && def.kind == Kind::Http
            && def.pull.is_none()
            && inst.settings.contains_key("pull")
        {
            let s = &inst.settings["pull"];
            problems.push((
                (s.line, s.column),
                format!("{} has no [pull] section; it only sends", def.name),
            ));
        }

        let mut file = None;
        let mut base_url = None;
        let mut http = None;
        if def.kind == Kind::File {
            if let Some(p) = params.get("path") {
                let path = base_dir.join(p.expose());
                let format = match params
                    .get("format")
                    .map(|f| f.expose().to_ascii_lowercase())
                {
                    Some(f) if f == "csv" => crate::import::Format::Csv,
                    Some(f) if f == "jsonl" || f == "json" => crate::import::Format::Jsonl,
                    Some(f) if f.is_empty() || f == "auto" => {
                        crate::import::Format::from_path(p.expose())
                    }
                    None => crate::import::Format::from_path(p.expose()),
                    Some(f) => {
                        problems
                            .push((inst.at, format!("format {f:?} must be jsonl, csv or auto")));
                        crate::import::Format::Jsonl
                    }
                };
                file = Some(FileSource { path, format });
            }
        } else {
            let ctx = param_context(&params);
            let ctx_v = minijinja::Value::from_serialize(&ctx);
            let render = |t: &str, what: &str, problems: &mut Vec<Problem>| -> Option<String> {
                match def.render(t, &ctx_v) {
                    Ok(s) => Some(s),
                    Err(e) => {
                        problems.push((inst.at, format!("{what}: {e}")));
                        None
                    }
                }
            };
            let base = match inst.settings.get("base_url") {
                Some(s) => match expand_env(&setting_str(&s.value)) {
                    Ok(v) => Some((v, (s.line, s.column))),
                    Err(e) => {
                        problems.push(((s.line, s.column), format!("`base_url`: {e}")));
                        None
                    }
                },
                None => def.base_url.as_ref().and_then(|t| match def.render(t, &ctx_v) {
                    Ok(v) => Some((v, inst.at)),
                    Err(e) => {
                        problems.push((
                            inst.at,
                            format!(
                                "cannot make the base URL from the params ({e}); set `base_url`, or the params {} needs",
                                def.name
                            ),
                        ));
                        None
                    }
                }),
            };
            if let Some((b, at)) = base {
                match Url::parse(b.trim()) {
                    Ok(u) if matches!(u.scheme(), "http" | "https") && u.host().is_some() => {
                        base_url = Some(u)
                    }
                    _ => problems.push((at, format!("base_url {b:?} is not an http(s) URL"))),
                }
            }
            let mut fixed: Vec<(HeaderName, HeaderValue)> = Vec::new();
            let mut header = |name: &str, value: String, problems: &mut Vec<Problem>| match (
                HeaderName::from_bytes(name.as_bytes()),
                HeaderValue::from_str(value.trim()),
            ) {
                (Ok(n), Ok(mut v)) => {
                    v.set_sensitive(true);
                    fixed.push((n, v));
                }
                _ => problems.push((
                    inst.at,
                    format!("header {name}: the value is not a valid header value"),
                )),
            };
            match &def.auth {
                Auth::None => {}
                Auth::Bearer { token } => {
                    if let Some(t) = render(token, "auth.token", &mut problems) {
                        header(
                            "authorization",
                            format!("Bearer {}", t.trim()),
                            &mut problems,
                        );
                    }
                }
                Auth::Basic { username, password } => {
                    if let (Some(u), Some(p)) = (
                        render(username, "auth.username", &mut problems),
                        render(password, "auth.password", &mut problems),
                    ) {
                        use base64::Engine;
                        let enc = base64::engine::general_purpose::STANDARD.encode(format!(
                            "{}:{}",
                            u.trim(),
                            p.trim()
                        ));
                        header("authorization", format!("Basic {enc}"), &mut problems);
                    }
                }
                Auth::Header { name, value } => {
                    if let Some(v) = render(value, "auth.value", &mut problems) {
                        header(name, v, &mut problems);
                    }
                }
            }
            for (name, t) in &def.headers {
                if let Some(v) = render(t, &format!("headers.{name}"), &mut problems) {
                    header(name, v, &mut problems);
                }
            }
            let settings = HttpSettings {
                timeout: Duration::from_secs(int("timeout_secs", 30).max(1)),
                max_retries: int("max_retries", 5) as u32,
                retry_base: Duration::from_millis(int("retry_base_ms", 500)),
                retry_max: Duration::from_millis(int("retry_max_ms", 30_000)),
                rate_per_sec: get("rate_per_sec")
                    .and_then(|v| v.as_float().or_else(|| v.as_integer().map(|i| i as f64)))
                    .or(def.rate_per_sec)
                    .unwrap_or(0.0),
                max_concurrency: get("max_concurrency")
                    .and_then(toml::Value::as_integer)
                    .map(|i| i.max(1) as usize)
                    .or(def.max_concurrency)
                    .unwrap_or(4),
            };
            let credential = if credential.is_empty() {
                "the connector's credentials".to_string()
            } else {
                credential.join(" and ")
            };
            match Http::new(
                &inst.name,
                &def.name,
                fixed,
                settings,
                def.rate_limit.clone(),
                credential,
                clock.clone(),
            ) {
                Ok(h) => http = Some(h),
                Err(e) => problems.push((inst.at, e)),
            }
        }
        if !problems.is_empty() {
            return Err(problems);
        }
        Ok(Connector(Arc::new(Inner {
            name: inst.name.clone(),
            def,
            params,
            base_url,
            http,
            page_size,
            join,
            prefix,
            pull,
            overlap_secs: get("overlap_secs")
                .and_then(toml::Value::as_integer)
                .map(|i| i as u64),
            clock,
            file,
        })))
    }

    /// The instance name (`crm`).
    pub fn name(&self) -> &str {
        &self.0.name
    }

    /// The definition's name (`hubspot`).
    pub fn kind(&self) -> &str {
        &self.0.def.name
    }

    /// The definition.
    pub fn definition(&self) -> &Definition {
        &self.0.def
    }

    /// Whether `sync` (and `nurture`) pull from this instance.
    pub fn pulls(&self) -> bool {
        self.0.pull && (self.0.def.pull.is_some() || self.0.def.kind == Kind::File)
    }

    /// The attribute that keeps this source's own id (`hubspot_id`).
    pub fn id_attribute(&self) -> String {
        format!("{}_id", self.0.prefix)
    }

    /// The attribute that keeps this source's own tags (`mailchimp_tags`).
    pub fn tags_attribute(&self) -> String {
        format!("{}_tags", self.0.prefix)
    }

    /// Requests made and retried so far by this instance.
    pub fn request_counts(&self) -> (u64, u64) {
        self.0.http.as_ref().map_or((0, 0), |h| {
            (
                h.requests.load(std::sync::atomic::Ordering::Relaxed),
                h.retried.load(std::sync::atomic::Ordering::Relaxed),
            )
        })
    }

    /// The template context every request starts from: the params.
    pub(crate) fn base_context(&self) -> Map<String, Value> {
        param_context(&self.0.params)
    }

    /// Renders a template of the definition, naming the instance in errors.
    pub(crate) fn render(
        &self,
        template: &str,
        ctx: &minijinja::Value,
    ) -> Result<String, ConnectorError> {
        self.0
            .def
            .render(template, ctx)
            .map_err(|message| ConnectorError::Template {
                instance: self.0.name.clone(),
                message: format!("{template}: {message}"),
            })
    }

    /// The URL of a path (relative to the base URL, or absolute) with query pairs;
    /// pairs whose value rendered empty are left out.
    pub(crate) fn url(
        &self,
        path: &str,
        query: &[(String, String)],
    ) -> Result<Url, ConnectorError> {
        let bad = |message: String| ConnectorError::Template {
            instance: self.0.name.clone(),
            message,
        };
        let mut url = if path.starts_with("http://") || path.starts_with("https://") {
            let u = Url::parse(path).map_err(|e| bad(format!("{path:?} is not a URL: {e}")))?;
            self.same_origin(u)
        } else {
            let base = self
                .0
                .base_url
                .as_ref()
                .ok_or_else(|| bad("this connector has no base_url".into()))?;
            let joined = format!("{}{}", base.as_str().trim_end_matches('/'), path);
            Url::parse(&joined).map_err(|e| bad(format!("{joined:?} is not a URL: {e}")))?
        };
        let pairs: Vec<&(String, String)> = query.iter().filter(|(_, v)| !v.is_empty()).collect();
        if !pairs.is_empty() {
            let mut qp = url.query_pairs_mut();
            for (k, v) in pairs {
                qp.append_pair(k, v);
            }
        }
        Ok(url)
    }

    /// Next-page URLs must go to the server the credentials are for: a URL on
    /// another origin is moved onto the base URL's scheme, host and port (APIs
    /// behind proxies build links from their internal host name).
    fn same_origin(&self, mut u: Url) -> Url {
        let Some(base) = &self.0.base_url else {
            return u;
        };
        if u.origin() != base.origin() {
            tracing::debug!(instance = %self.0.name, "a next-page link points at another host; using the base URL's host");
            let _ = u.set_scheme(base.scheme());
            let _ = u.set_host(base.host_str());
            let _ = u.set_port(base.port());
        }
        u
    }

    /// Renders headers of a request shape.
    pub(crate) fn render_headers(
        &self,
        headers: &[(String, String)],
        ctx: &minijinja::Value,
    ) -> Result<Vec<(HeaderName, HeaderValue)>, ConnectorError> {
        let mut out = Vec::new();
        for (name, t) in headers {
            let v = self.render(t, ctx)?;
            if v.trim().is_empty() {
                continue;
            }
            let value = HeaderValue::from_str(v.trim()).map_err(|_| ConnectorError::Template {
                instance: self.0.name.clone(),
                message: format!("header {name}: not a valid header value"),
            })?;
            let name =
                HeaderName::from_bytes(name.as_bytes()).map_err(|_| ConnectorError::Template {
                    instance: self.0.name.clone(),
                    message: format!("{name:?} is not a header name"),
                })?;
            out.push((name, value));
        }
        Ok(out)
    }

    pub(crate) fn http(&self) -> Result<&Http, ConnectorError> {
        self.0.http.as_ref().ok_or_else(|| ConnectorError::Config {
            instance: self.0.name.clone(),
            problems: vec![format!(
                "{} connectors make no HTTP requests",
                self.0.def.name
            )],
        })
    }

    pub(crate) async fn execute(
        &self,
        req: &Outgoing,
    ) -> Result<super::http::HttpResponse, ConnectorError> {
        self.http()?.execute(req).await
    }
}

fn param_context(params: &BTreeMap<String, ParamValue>) -> Map<String, Value> {
    params
        .iter()
        .map(|(k, v)| (k.clone(), Value::String(v.expose().to_string())))
        .collect()
}
