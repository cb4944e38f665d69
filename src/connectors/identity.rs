//! Identity: which customer a pulled record belongs to.
//!
//! The rule (also in `connectors/README.md`):
//! - With `join = "email"` (the default), a record whose lower-cased, trimmed email
//!   is already known (the store's email index, or an earlier record on the same
//!   page) belongs to that customer. Otherwise it starts a new customer with the id
//!   `<instance>:<source id>` (`crm:151`); a file source keeps the file's own ids.
//! - With `join = "<attribute>"`, records with the same value of that mapped
//!   attribute are one customer, `<attribute>:<value>`; with `join = "none"` every
//!   record is its own customer.
//! - Every source keeps its own id in `<prefix>_id` (`hubspot_id`, `shopify_id`),
//!   so actions can address the record in that system.
//! - Tags are a union over sources: each source's current tags are kept in
//!   `<prefix>_tags`, and `tags` is the union, so a tag removed in Mailchimp leaves
//!   `tags` while one added by Shopify stays.
//!
//! Sources are synced one after another, never interleaved, so which id a new
//! person gets does not depend on timing and a rerun gives the same store.

use super::instance::Join;
use super::mapping::Mapped;
use super::path::scalar_string;
use crate::model::Customer;
use crate::store::{Store, StoreError};
use serde_json::{Map, Value};
use std::collections::HashMap;

/// Resolves ids for one instance's records, page by page.
pub(crate) struct Resolver<'a> {
    store: &'a dyn Store,
    join: &'a Join,
    id_attribute: Option<String>,
    tags_attribute: String,
    /// Emails seen on the current page, so two records of one person on one page
    /// (not yet in the store's index) become one customer.
    page_emails: HashMap<String, String>,
    /// Tags written on the current page: id → (all tags, this source's tags).
    page_tags: HashMap<String, (Vec<String>, Vec<String>)>,
}

impl<'a> Resolver<'a> {
    pub fn new(
        store: &'a dyn Store,
        join: &'a Join,
        id_attribute: Option<String>,
        tags_attribute: String,
    ) -> Self {
        Self {
            store,
            join,
            id_attribute,
            tags_attribute,
            page_emails: HashMap::new(),
            page_tags: HashMap::new(),
        }
    }

    /// Forgets the page-local state; the store knows everything committed.
    pub fn begin_page(&mut self) {
        self.page_emails.clear();
        self.page_tags.clear();
    }

    /// The id a record joins under.
    pub fn resolve_id(
        &mut self,
        default_id: String,
        email: Option<&str>,
        attributes: &Map<String, Value>,
    ) -> Result<String, StoreError> {
        let id = match self.join {
            Join::Email => match email
                .map(crate::store::normalize_email)
                .filter(|e| !e.is_empty())
            {
                Some(e) => match self.page_emails.get(&e) {
                    Some(id) => id.clone(),
                    None => {
                        let id = self.store.id_for_email(&e)?.unwrap_or(default_id);
                        self.page_emails.insert(e, id.clone());
                        id
                    }
                },
                None => default_id,
            },
            Join::Attribute(a) => match attributes.get(a).and_then(scalar_string) {
                Some(v) => format!("{a}:{v}"),
                None => default_id,
            },
            Join::None => default_id,
        };
        Ok(id)
    }

    /// The customer a mapped record contributes.
    pub fn customer(&mut self, instance: &str, m: Mapped) -> Result<Customer, StoreError> {
        let default_id = format!("{instance}:{}", m.source_id);
        let id = self.resolve_id(default_id, m.email.as_deref(), &m.attributes)?;
        let mut c = Customer::new(id);
        c.attributes = m.attributes;
        if let Some(e) = m.email {
            c.attributes.insert("email".into(), Value::String(e));
        }
        if let Some(a) = &self.id_attribute {
            c.attributes.insert(a.clone(), Value::String(m.source_id));
        }
        if let Some(tags) = m.tags {
            let (all, mine) = match self.page_tags.get(&c.id) {
                Some(t) => t.clone(),
                None => match self.store.customer(&c.id)? {
                    Some(existing) => (
                        tag_values(existing.attributes.get("tags")),
                        tag_values(existing.attributes.get(&self.tags_attribute)),
                    ),
                    None => (Vec::new(), Vec::new()),
                },
            };
            let mut union: Vec<String> = all.into_iter().filter(|t| !mine.contains(t)).collect();
            union.extend(tags.iter().cloned());
            union.sort();
            union.dedup();
            c.attributes.insert("tags".into(), strings(&union));
            c.attributes
                .insert(self.tags_attribute.clone(), strings(&tags));
            self.page_tags.insert(c.id.clone(), (union, tags));
        }
        Ok(c)
    }
}

fn strings(v: &[String]) -> Value {
    Value::Array(v.iter().map(|s| Value::String(s.clone())).collect())
}

/// Tags as stored: a list, or a comma-separated string (CSV imports).
fn tag_values(v: Option<&Value>) -> Vec<String> {
    match v {
        Some(Value::Array(a)) => a.iter().filter_map(scalar_string).collect(),
        Some(Value::String(s)) => s
            .split(',')
            .map(|t| t.trim().to_string())
            .filter(|t| !t.is_empty())
            .collect(),
        _ => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::SledStore;
    use serde_json::json;

    fn mapped(id: &str, email: Option<&str>, tags: Option<&[&str]>) -> Mapped {
        Mapped {
            source_id: id.into(),
            email: email.map(str::to_string),
            attributes: Map::new(),
            tags: tags.map(|t| t.iter().map(|s| s.to_string()).collect()),
        }
    }

    #[test]
    fn joins_on_email_and_keeps_each_sources_id_and_tags() {
        let store = SledStore::temporary().unwrap();
        let join = Join::Email;
        let mut hub = Resolver::new(
            &store,
            &join,
            Some("hubspot_id".into()),
            "hubspot_tags".into(),
        );
        let c = hub
            .customer("crm", mapped("151", Some("ann@example.com"), None))
            .unwrap();
        assert_eq!(c.id, "crm:151");
        // The same email later on the same page joins before anything is stored.
        let c2 = hub
            .customer("crm", mapped("152", Some("ann@example.com"), None))
            .unwrap();
        assert_eq!(c2.id, "crm:151");
        store.merge_customers(vec![c]).unwrap();

        let mut mc = Resolver::new(
            &store,
            &join,
            Some("mailchimp_id".into()),
            "mailchimp_tags".into(),
        );
        let c = mc
            .customer(
                "news",
                mapped("62ee", Some("ann@example.com"), Some(&["VIP", "b"])),
            )
            .unwrap();
        assert_eq!(c.id, "crm:151");
        assert_eq!(c.attributes["tags"], json!(["VIP", "b"]));
        store.merge_customers(vec![c]).unwrap();

        let mut shop = Resolver::new(
            &store,
            &join,
            Some("shopify_id".into()),
            "shopify_tags".into(),
        );
        let c = shop
            .customer(
                "shop",
                mapped("7064", Some("ann@example.com"), Some(&["a"])),
            )
            .unwrap();
        assert_eq!(c.attributes["tags"], json!(["VIP", "a", "b"]));
        store.merge_customers(vec![c]).unwrap();

        // Mailchimp drops "VIP": it leaves the union; Shopify's "a" stays.
        mc.begin_page();
        let c = mc
            .customer(
                "news",
                mapped("62ee", Some("ann@example.com"), Some(&["b"])),
            )
            .unwrap();
        assert_eq!(c.attributes["tags"], json!(["a", "b"]));
        store.merge_customers(vec![c]).unwrap();

        let ann = store.customer("crm:151").unwrap().unwrap();
        assert_eq!(ann.attributes["hubspot_id"], json!("151"));
        assert_eq!(ann.attributes["mailchimp_id"], json!("62ee"));
        assert_eq!(ann.attributes["shopify_id"], json!("7064"));
        assert_eq!(store.customer_count().unwrap(), 1);
    }

    #[test]
    fn records_without_email_and_other_join_keys() {
        let store = SledStore::temporary().unwrap();
        let none = Join::None;
        let mut r = Resolver::new(&store, &none, None, "x_tags".into());
        assert_eq!(
            r.customer("crm", mapped("9", Some("a@b.c"), None))
                .unwrap()
                .id,
            "crm:9"
        );
        let by_ext = Join::Attribute("external_id".into());
        let mut r = Resolver::new(&store, &by_ext, None, "x_tags".into());
        let mut m = mapped("9", None, None);
        m.attributes.insert("external_id".into(), json!(42));
        assert_eq!(r.customer("crm", m).unwrap().id, "external_id:42");
        let email = Join::Email;
        let mut r = Resolver::new(&store, &email, None, "x_tags".into());
        assert_eq!(
            r.customer("crm", mapped("10", None, None)).unwrap().id,
            "crm:10"
        );
    }
}
