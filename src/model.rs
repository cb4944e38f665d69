//! The domain model: customers with free attributes and events, their phase per
//! journey, and the transitions between phases. Also the record encoding
//! (MessagePack) that stores use, so decoding can happen on worker threads.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::collections::{BTreeMap, HashSet};

/// Attribute names that the rule contract reserves; an import may not set them.
pub const RESERVED_ATTRIBUTES: &[&str] = &["id", "events", "phase", "phase_since"];

/// A customer: an id, free attributes (JSON values) and events.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Customer {
    pub id: String,
    pub attributes: Map<String, Value>,
    pub events: Vec<Event>,
}

/// Something that happened to a customer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub kind: String,
    /// RFC 3339 in UTC (`2026-11-01T10:00:00Z`), as [`crate::time::format`] writes it.
    pub at: String,
    /// Event details; always a JSON object.
    #[serde(default = "empty_object")]
    pub data: Value,
}

fn empty_object() -> Value {
    Value::Object(Map::new())
}

/// Errors decoding stored records.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("corrupt record: {0}")]
    Decode(String),
}

impl Customer {
    pub fn new(id: impl Into<String>) -> Self {
        Self {
            id: id.into(),
            ..Default::default()
        }
    }

    /// Merges `other` into `self`: its attributes win, and its events are appended
    /// unless an identical event (kind, time and data) is already there. Returns
    /// whether anything changed.
    pub fn merge(&mut self, other: Customer) -> bool {
        let mut changed = false;
        for (k, v) in other.attributes {
            if self.attributes.get(&k) != Some(&v) {
                self.attributes.insert(k, v);
                changed = true;
            }
        }
        if !other.events.is_empty() {
            let mut seen: HashSet<(String, String, String)> =
                self.events.iter().map(Event::identity).collect();
            for e in other.events {
                if seen.insert(e.identity()) {
                    self.events.push(e);
                    changed = true;
                }
            }
            if changed {
                self.sort_events();
            }
        }
        changed
    }

    /// Removes identical events from a freshly built customer and orders events by time.
    pub fn normalize(&mut self) {
        self.sort_events();
        // Identical events have the same time, so after sorting they are in one run of
        // equal times (usually of length one): compare within the run only.
        let mut out: Vec<Event> = Vec::with_capacity(self.events.len());
        let mut run_start = 0;
        for e in self.events.drain(..) {
            if out.last().is_none_or(|l| l.at != e.at) {
                run_start = out.len();
            }
            if out[run_start..]
                .iter()
                .any(|x| x.kind == e.kind && x.data == e.data)
            {
                continue;
            }
            out.push(e);
        }
        self.events = out;
    }

    fn sort_events(&mut self) {
        if self
            .events
            .is_sorted_by(|a, b| a.at.len() == b.at.len() && a.at <= b.at)
        {
            return;
        }
        // Stored times are all UTC in one format, except for sub-second precision, so
        // a parsed comparison is only needed when the strings differ in length.
        self.events.sort_by(|a, b| {
            if a.at.len() == b.at.len() {
                a.at.cmp(&b.at)
            } else {
                crate::time::parse(&a.at).cmp(&crate::time::parse(&b.at))
            }
        });
    }

    /// The record as stored: one MessagePack map `{id, <attributes>..., events}`.
    pub fn encode(&self) -> Vec<u8> {
        let mut buf = Vec::with_capacity(128 + self.events.len() * 64);
        let mut ser = rmp_serde::Serializer::new(&mut buf).with_struct_map();
        Flat(self)
            .serialize(&mut ser)
            .expect("serializing to a Vec cannot fail");
        buf
    }

    /// Decodes a stored record.
    pub fn decode(bytes: &[u8]) -> Result<Customer, CodecError> {
        let mut map: Map<String, Value> =
            rmp_serde::from_slice(bytes).map_err(|e| CodecError::Decode(e.to_string()))?;
        let id = match map.remove("id") {
            Some(Value::String(s)) => s,
            other => {
                return Err(CodecError::Decode(format!(
                    "record without a string id: {other:?}"
                )))
            }
        };
        let events = match map.remove("events") {
            Some(v) => serde_json::from_value(v).map_err(|e| CodecError::Decode(e.to_string()))?,
            None => Vec::new(),
        };
        Ok(Customer {
            id,
            attributes: map,
            events,
        })
    }

    /// The customer as JSON in the import format.
    pub fn to_json(&self) -> Value {
        let mut m = Map::new();
        m.insert("id".into(), Value::String(self.id.clone()));
        for (k, v) in &self.attributes {
            m.insert(k.clone(), v.clone());
        }
        m.insert(
            "events".into(),
            serde_json::to_value(&self.events).unwrap_or(Value::Array(Vec::new())),
        );
        Value::Object(m)
    }
}

impl Event {
    fn identity(&self) -> (String, String, String) {
        (self.kind.clone(), self.at.clone(), self.data.to_string())
    }
}

struct Flat<'a>(&'a Customer);

impl Serialize for Flat<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let c = self.0;
        let mut m = s.serialize_map(Some(c.attributes.len() + 2))?;
        m.serialize_entry("id", &c.id)?;
        for (k, v) in &c.attributes {
            if !RESERVED_ATTRIBUTES.contains(&k.as_str()) {
                m.serialize_entry(k, v)?;
            }
        }
        m.serialize_entry("events", &c.events)?;
        m.end()
    }
}

/// A customer's place in one journey.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PhaseState {
    pub phase: String,
    /// When the phase was entered (RFC 3339).
    pub since: String,
    /// Flags the rule raised with the phase (e.g. `moment_of_truth`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub flags: Vec<String>,
}

/// A customer's phases in every journey they are in, keyed by journey name.
pub type PhaseStates = BTreeMap<String, PhaseState>;

/// Encodes phase states for storage.
pub fn encode_states(states: &PhaseStates) -> Vec<u8> {
    rmp_serde::to_vec_named(states).expect("serializing to a Vec cannot fail")
}

/// Decodes stored phase states.
pub fn decode_states(bytes: &[u8]) -> Result<PhaseStates, CodecError> {
    rmp_serde::from_slice(bytes).map_err(|e| CodecError::Decode(e.to_string()))
}

/// A move from one phase to another (either side may be "not in the journey").
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Transition {
    pub journey: String,
    pub from: Option<String>,
    pub to: Option<String>,
    /// When it happened (RFC 3339).
    pub at: String,
    /// The version of the journey's rules that decided it.
    pub rules_version: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub flags: Vec<String>,
}

impl Transition {
    pub fn encode(&self) -> Vec<u8> {
        rmp_serde::to_vec_named(self).expect("serializing to a Vec cannot fail")
    }

    pub fn decode(bytes: &[u8]) -> Result<Transition, CodecError> {
        rmp_serde::from_slice(bytes).map_err(|e| CodecError::Decode(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn ev(kind: &str, at: &str) -> Event {
        Event {
            kind: kind.into(),
            at: at.into(),
            data: json!({}),
        }
    }

    #[test]
    fn merge_new_values_win_and_events_do_not_repeat() {
        let mut a = Customer::new("c1");
        a.attributes.insert("email".into(), json!("a@b.nl"));
        a.attributes.insert("orders_count".into(), json!(1));
        a.events.push(ev("order_created", "2026-11-01T10:00:00Z"));
        let mut b = Customer::new("c1");
        b.attributes.insert("orders_count".into(), json!(2));
        b.events.push(ev("order_created", "2026-11-01T10:00:00Z"));
        b.events.push(ev("page_view", "2026-10-01T10:00:00Z"));
        assert!(a.merge(b.clone()));
        assert_eq!(a.attributes["orders_count"], json!(2));
        assert_eq!(a.attributes["email"], json!("a@b.nl"));
        assert_eq!(a.events.len(), 2);
        assert_eq!(a.events[0].kind, "page_view", "events are ordered by time");
        assert!(!a.merge(b), "merging the same data again changes nothing");
    }

    #[test]
    fn record_round_trips() {
        let mut a = Customer::new("c1");
        a.attributes.insert("tags".into(), json!(["vip"]));
        a.attributes.insert("total_spent".into(), json!(59.5));
        a.events.push(Event {
            kind: "order_created".into(),
            at: "2026-11-01T10:00:00Z".into(),
            data: json!({"total": 59.5}),
        });
        assert_eq!(Customer::decode(&a.encode()).unwrap(), a);
    }
}
