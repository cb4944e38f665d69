//! The admin API and `/metrics`, behind `Authorization: Bearer <[server] admin_token>`
//! (compared in constant time). Without a configured token both are off (403 with
//! a JSON reason), never open.

use super::{method_not_allowed, AppState, HttpError};
use crate::model::{Customer, Event};
use crate::store::Store;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};
use std::sync::Arc;
use subtle::ConstantTimeEq;

/// The `/api` routes.
pub fn router() -> Router<Arc<AppState>> {
    Router::new()
        .route(
            "/api/customers/{id}",
            get(customer).fallback(method_not_allowed),
        )
        .route(
            "/api/customers/{id}/events",
            post(add_events).fallback(method_not_allowed),
        )
        .route("/api/funnel", get(funnel).fallback(method_not_allowed))
        .route("/api/nurture", post(nurture).fallback(method_not_allowed))
        .route("/api/outbox", get(outbox).fallback(method_not_allowed))
}

#[derive(Debug, serde::Deserialize)]
struct OutboxQuery {
    state: Option<String>,
    limit: Option<usize>,
}

/// `GET /api/outbox[?state=pending&limit=N]`: counts per state and the entries
/// (oldest key first, at most `limit`, default 1000).
async fn outbox(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    axum::extract::Query(q): axum::extract::Query<OutboxQuery>,
) -> Result<impl IntoResponse, HttpError> {
    authorize(&state, &headers)?;
    let st = state.clone();
    let v = tokio::task::spawn_blocking(move || -> Result<Value, HttpError> {
        let now = st.clock.now().timestamp();
        let counts = crate::outbox::counts(st.store.as_ref(), now)
            .map_err(|e| HttpError::Internal(e.to_string()))?;
        let limit = q.limit.unwrap_or(1000);
        let mut entries = Vec::new();
        crate::store::OutboxStore::outbox_scan(st.store.as_ref(), &mut |e| {
            let shown = e.display_state(now);
            if q.state
                .as_deref()
                .is_none_or(|s| s == shown || s == e.state.as_str())
            {
                entries.push(e);
            }
            entries.len() < limit
        })?;
        Ok(json!({"counts": counts, "entries": entries}))
    })
    .await
    .map_err(|e| HttpError::Internal(e.to_string()))??;
    Ok(Json(v))
}

/// Checks the bearer token.
fn authorize(state: &AppState, headers: &HeaderMap) -> Result<(), HttpError> {
    let Some(token) = &state.admin_token else {
        return Err(HttpError::AdminDisabled);
    };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .ok_or(HttpError::Unauthorized)?;
    if bool::from(given.trim().as_bytes().ct_eq(token.as_bytes())) {
        Ok(())
    } else {
        Err(HttpError::Unauthorized)
    }
}

/// `GET /metrics`: Prometheus text.
pub async fn metrics(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
) -> Result<impl IntoResponse, HttpError> {
    authorize(&state, &headers)?;
    let text = state
        .metrics
        .as_ref()
        .map(|h| h.render())
        .unwrap_or_default();
    Ok((
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    ))
}

/// `GET /api/customers/{id}`: what `explain --json` prints.
async fn customer(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<impl IntoResponse, HttpError> {
    authorize(&state, &headers)?;
    let st = state.clone();
    let x = tokio::task::spawn_blocking(move || {
        let loaded = st.loaded.load_full();
        crate::explain::explain(
            st.store.as_ref(),
            &loaded.traced,
            &loaded.config,
            &id,
            st.clock.now(),
        )
        .map(|x| x.ok_or(id))
    })
    .await
    .map_err(|e| HttpError::Internal(e.to_string()))??;
    match x {
        Ok(x) => Ok(Json(x)),
        Err(id) => Err(HttpError::NotFound(format!(
            "no customer {id:?} in the store"
        ))),
    }
}

/// `GET /api/funnel`: customers per phase per journey, every configured phase listed.
async fn funnel(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
) -> Result<impl IntoResponse, HttpError> {
    authorize(&state, &headers)?;
    let st = state.clone();
    let funnel = tokio::task::spawn_blocking(move || st.store.funnel())
        .await
        .map_err(|e| HttpError::Internal(e.to_string()))??;
    let loaded = state.loaded.load();
    let mut out = serde_json::Map::new();
    for j in &loaded.config.journeys {
        let mut m = serde_json::Map::new();
        for p in &j.phases {
            let n = funnel
                .get(&j.name)
                .and_then(|c| c.get(p))
                .copied()
                .unwrap_or(0);
            m.insert(p.clone(), n.into());
        }
        out.insert(j.name.clone(), m.into());
    }
    Ok(Json(Value::Object(out)))
}

/// The body of `POST /api/customers/{id}/events`: one event, or events and
/// attributes.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct EventsBody {
    kind: Option<String>,
    at: Option<String>,
    data: Option<Value>,
    #[serde(default)]
    events: Vec<EventIn>,
    #[serde(default)]
    attributes: serde_json::Map<String, Value>,
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct EventIn {
    kind: String,
    at: Option<String>,
    data: Option<Value>,
}

/// `POST /api/customers/{id}/events`: ingest events (and attributes) from any
/// system; the customer is re-evaluated at once and the answer lists the changes.
async fn add_events(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<impl IntoResponse, HttpError> {
    authorize(&state, &headers)?;
    let body: EventsBody = serde_json::from_slice(&body)
        .map_err(|e| HttpError::MalformedJson(format!("invalid body: {e}")))?;
    crate::store::validate_id(&id).map_err(|e| HttpError::BadRequest(e.to_string()))?;
    let now = crate::time::format(state.clock.now());
    let mut events = body.events;
    if let Some(kind) = body.kind {
        events.push(EventIn {
            kind,
            at: body.at,
            data: body.data,
        });
    }
    if events.is_empty() && body.attributes.is_empty() {
        return Err(HttpError::BadRequest(
            "give an event (kind, at, data), or events and/or attributes".into(),
        ));
    }
    let mut c = Customer::new(id);
    for (k, v) in body.attributes {
        if crate::model::RESERVED_ATTRIBUTES.contains(&k.as_str()) {
            return Err(HttpError::BadRequest(format!(
                "attribute {k:?} is reserved"
            )));
        }
        c.attributes.insert(k, v);
    }
    for e in events {
        let at = match e.at {
            None => now.clone(),
            Some(t) => crate::time::parse(&t)
                .map(crate::time::format)
                .ok_or_else(|| HttpError::BadRequest(format!("{t:?} is not an RFC 3339 time")))?,
        };
        let data = e.data.unwrap_or_else(|| json!({}));
        if !data.is_object() {
            return Err(HttpError::BadRequest("event data must be an object".into()));
        }
        c.events.push(Event {
            kind: e.kind,
            at,
            data,
        });
    }
    let id = c.id.clone();
    let st = state.clone();
    let transitions = tokio::task::spawn_blocking(move || st.apply_and_evaluate(c))
        .await
        .map_err(|e| HttpError::Internal(e.to_string()))??;
    state.commit.durable().await.map_err(HttpError::Internal)?;
    Ok(Json(json!({"id": id, "transitions": transitions})))
}

/// `POST /api/nurture`: starts a sweep in the background (409 while one runs).
async fn nurture(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
) -> Result<impl IntoResponse, HttpError> {
    authorize(&state, &headers)?;
    if state.nurture_lock.try_lock().is_err() {
        return Err(HttpError::Conflict(
            "a nurture run is already running".into(),
        ));
    }
    let st = state.clone();
    tokio::spawn(async move {
        match st.nurture().await {
            Some(Ok(s)) => tracing::info!(
                evaluated = s.evaluated,
                transitions = s.transition_count(),
                errors = s.errors,
                "nurture run (admin API) finished"
            ),
            Some(Err(e)) => tracing::error!(error = %e, "nurture run (admin API) failed"),
            None => {}
        }
    });
    Ok((StatusCode::ACCEPTED, Json(json!({"status": "started"}))))
}
