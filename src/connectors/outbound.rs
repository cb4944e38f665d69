//! Outbound requests: the named `[requests.NAME]` of a definition (update a HubSpot
//! property, tag a Mailchimp member, create a Shopify discount code, send a Brevo
//! email, call a webhook). The caller gives a JSON context; the request's path,
//! query, headers and body are minijinja templates over it plus the instance's
//! params and `now`. Actions call [`Connector::send`]; [`Connector::render_request`]
//! shows what would be sent, without credentials.

use super::http::{snippet, Outgoing};
use super::instance::Connector;
use super::ConnectorError;
use hmac::{Hmac, Mac};
use serde::Serialize;
use serde_json::Value;
use sha2::Sha256;

/// A request as it would be sent, without the credential headers.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct RenderedRequest {
    pub method: String,
    pub url: String,
    /// The request's own headers (not auth or the definition's fixed headers).
    pub headers: Vec<(String, String)>,
    pub body: Option<String>,
}

/// A successful answer.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Response {
    pub status: u16,
    /// The body as JSON; a non-JSON body as a string; an empty one as null.
    pub body: Value,
}

struct Prepared {
    outgoing: Outgoing,
    rendered: RenderedRequest,
}

impl Connector {
    /// The names of this connector's outbound requests.
    pub fn request_names(&self) -> Vec<&str> {
        self.0.def.requests.keys().map(String::as_str).collect()
    }

    fn prepare(&self, name: &str, context: &Value) -> Result<Prepared, ConnectorError> {
        let def = &self.0.def;
        let Some(req) = def.requests.get(name) else {
            return Err(ConnectorError::UnknownRequest {
                instance: self.name().to_string(),
                name: name.to_string(),
                known: self.request_names().join(", "),
            });
        };
        let mut ctx = self.base_context();
        ctx.insert("now".into(), crate::time::format(self.0.clock.now()).into());
        match context {
            Value::Object(m) => {
                for (k, v) in m {
                    ctx.insert(k.clone(), v.clone());
                }
            }
            Value::Null => {}
            _ => {
                return Err(ConnectorError::Template {
                    instance: self.name().to_string(),
                    message: format!("request {name}: the context must be a JSON object"),
                })
            }
        }
        let ctx = minijinja::Value::from_serialize(&ctx);
        let shape = &req.shape;
        let path = self.render(&shape.path, &ctx)?;
        let mut query = Vec::new();
        for (k, t) in &shape.query {
            query.push((k.clone(), self.render(t, &ctx)?));
        }
        let url = self.url(&path, &query)?;
        let headers = self.render_headers(&shape.headers, &ctx)?;
        let body = match &shape.body {
            None => None,
            Some(t) => {
                let b = self.render(t, &ctx)?;
                if shape.content_type.contains("json") {
                    if let Err(e) = serde_json::from_str::<Value>(&b) {
                        return Err(ConnectorError::Template {
                            instance: self.name().to_string(),
                            message: format!(
                                "request {name}: the rendered body is not valid JSON ({e})"
                            ),
                        });
                    }
                }
                Some(b)
            }
        };
        let mut all_headers = headers.clone();
        if let (Some(sig), Some(b)) = (&req.signature, &body) {
            let key = self.render(&sig.key, &ctx)?;
            // No key, no signature: an unsigned webhook is a choice of the instance.
            if !key.is_empty() {
                let mut mac = Hmac::<Sha256>::new_from_slice(key.as_bytes())
                    .expect("HMAC takes any key length");
                mac.update(b.as_bytes());
                let digest = mac.finalize().into_bytes();
                let value = if sig.base64 {
                    use base64::Engine;
                    base64::engine::general_purpose::STANDARD.encode(digest)
                } else {
                    digest.iter().map(|b| format!("{b:02x}")).collect()
                };
                let hn = reqwest::header::HeaderName::from_bytes(sig.header.as_bytes()).map_err(
                    |_| ConnectorError::Template {
                        instance: self.name().to_string(),
                        message: format!("{:?} is not a header name", sig.header),
                    },
                )?;
                let hv = reqwest::header::HeaderValue::from_str(&format!("{}{value}", sig.prefix))
                    .map_err(|_| ConnectorError::Template {
                        instance: self.name().to_string(),
                        message: "the signature prefix is not a valid header value".into(),
                    })?;
                all_headers.push((hn, hv));
            }
        }
        let rendered = RenderedRequest {
            method: shape.method.to_string(),
            url: url.to_string(),
            headers: all_headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_string()))
                .collect(),
            body: body.clone(),
        };
        Ok(Prepared {
            outgoing: Outgoing {
                method: shape.method.clone(),
                url,
                headers: all_headers,
                body: body.map(|b| (shape.content_type.clone(), b.into_bytes())),
                idempotent: req.idempotent,
            },
            rendered,
        })
    }

    /// Renders the named request with `context` without sending it.
    pub fn render_request(
        &self,
        name: &str,
        context: &Value,
    ) -> Result<RenderedRequest, ConnectorError> {
        Ok(self.prepare(name, context)?.rendered)
    }

    /// Sends the named request. A non-2xx answer (after retries) is an error, as is a
    /// 2xx whose `error_path` holds something (GraphQL `userErrors`).
    pub async fn send(&self, name: &str, context: &Value) -> Result<Response, ConnectorError> {
        let p = self.prepare(name, context)?;
        let what = p.outgoing.describe();
        let resp = self.execute(&p.outgoing).await?;
        let body = if resp.body.iter().all(u8::is_ascii_whitespace) {
            Value::Null
        } else {
            serde_json::from_slice(&resp.body)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&resp.body).into_owned()))
        };
        let req = &self.0.def.requests[name];
        for path in &req.error_paths {
            let failed = match path.get(&body) {
                None | Some(Value::Null) | Some(Value::Bool(false)) => false,
                Some(Value::Array(a)) => !a.is_empty(),
                Some(Value::Object(o)) => !o.is_empty(),
                Some(Value::String(s)) => !s.is_empty(),
                Some(_) => true,
            };
            if failed {
                return Err(ConnectorError::Status {
                    instance: self.name().to_string(),
                    request: what,
                    status: resp.status,
                    body: snippet(
                        path.get(&body)
                            .map(|v| v.to_string())
                            .unwrap_or_default()
                            .as_bytes(),
                    ),
                });
            }
        }
        tracing::info!(
            instance = self.name(),
            request = name,
            status = resp.status,
            "request sent"
        );
        Ok(Response {
            status: resp.status,
            body,
        })
    }
}

impl Connector {
    /// Whether an earlier attempt of the named request, made with `context` and
    /// tagged with `key`, already took effect, asked with the request's `lookup`
    /// (see [`super::definition::Request::lookup`]). `Ok(None)`: the request has no
    /// lookup, or the receiver does not know the key; `Ok(Some(found))`: the
    /// smallest JSON object in the answer that holds the key (Brevo: the sent
    /// email, with its `messageId`).
    pub async fn lookup(
        &self,
        name: &str,
        context: &Value,
        key: &str,
    ) -> Result<Option<Value>, ConnectorError> {
        let Some(lookup) = self.0.def.requests.get(name).and_then(|r| r.lookup.clone()) else {
            return Ok(None);
        };
        let answer = self.send(&lookup, context).await?;
        Ok(holder_of(&answer.body, key).cloned())
    }
}

/// The innermost object that holds `key` as a string value (at any depth below it).
fn holder_of<'a>(v: &'a Value, key: &str) -> Option<&'a Value> {
    match v {
        Value::Object(m) => m.values().find_map(|x| match x {
            Value::String(s) if s == key => Some(v),
            Value::Array(a) if a.iter().any(|i| i.as_str() == Some(key)) => Some(v),
            _ => holder_of(x, key),
        }),
        Value::Array(a) => a.iter().find_map(|x| holder_of(x, key)),
        _ => None,
    }
}

#[cfg(test)]
mod lookup_tests {
    use super::holder_of;
    use serde_json::json;

    #[test]
    fn finds_the_object_that_carries_the_key() {
        let v = json!({"count": 2, "transactionalEmails": [
            {"messageId": "<a@x>", "tags": ["review", "kr_1"]},
            {"messageId": "<b@x>", "tags": ["kr_2"]}]});
        assert_eq!(holder_of(&v, "kr_2").unwrap()["messageId"], "<b@x>");
        assert_eq!(holder_of(&v, "kr_1").unwrap()["messageId"], "<a@x>");
        assert!(holder_of(&v, "kr_3").is_none());
        assert!(holder_of(&json!({"x": "kr_30"}), "kr_3").is_none());
    }
}
