//! Loopback fakes of the vendor APIs klantreis talks to, for integration tests and
//! benchmarks (feature `fakes`). Each fake is an in-process axum server on
//! `127.0.0.1:0` that speaks the vendor's exact wire format as written down in
//! `API-NOTES.md`: paths, parameters, auth, JSON shapes, pagination, error and 429
//! bodies, headers.
//!
//! | module | vendor | API-NOTES | serves |
//! |---|---|---|---|
//! | [`hubspot`] | HubSpot CRM v3 | A | contacts list, search, get, PATCH |
//! | [`mailchimp`] | Mailchimp Marketing 3.0 | B | list members, member tags |
//! | [`klaviyo`] | Klaviyo (JSON:API) | C | profiles, events |
//! | [`shopify`] | Shopify Admin | D | customers (REST), price rules + discount codes (REST), `discountCodeBasicCreate` (GraphQL); webhook signing and samples |
//! | [`woocommerce`] | WooCommerce REST v3 | E | customers, coupons; webhook signing, ping and samples |
//! | [`superoffice`] | SuperOffice WebAPI v1 | I | the Person archive |
//! | [`brevo`] | Brevo | H | transactional email |
//! | [`mollie`] | Mollie | G | payments by id; unsigned webhook body |
//! | [`webhook`] | any | — | a receiver with a scripted status sequence |
//!
//! # The harness
//! Every fake is a [`FakeServer<V>`](FakeServer) around a [`Vendor`]:
//! `vendor::start(Config).await` runs it on the current tokio runtime,
//! `vendor::start_blocking(Config)` on a thread of its own (for benchmarks and tests
//! that run the CLI as a process). It stops when dropped. The server records every
//! request ([`FakeServer::requests`], [`RecordedRequest`]) and injects [`Faults`]:
//! a 500 every Nth request, 429s in the vendor's own shape (every Nth, or past a
//! fixed-window [`RateLimit`], or past N concurrent requests per credential), a delay,
//! and the vendor's 401/403 for wrong credentials. `FakeServer` derefs to the vendor,
//! so `server.contacts()`, `server.sent()`, `server.events()` work directly.
//!
//! # Seed data
//! The CRM and shop fakes serve a shared [`ContactBook`]: `ContactBook::generate(n)`
//! makes `n` realistic contacts deterministically; clone the book into several
//! configs to serve the same people from several vendors; change it between syncs
//! ([`ContactBook::update`], [`ContactBook::touch`], [`ContactBook::add`]) to test
//! incremental sync. Changes take `updated_at` from the book's clock
//! ([`ContactBook::set_clock`], the system clock by default); the generated data is
//! all from 2023–2024, so any change is newer than every generated contact.
//!
//! # What is UNCONFIRMED and how the fakes choose
//! Where API-NOTES marks a fact UNCONFIRMED the fake picks the reading that makes a
//! client most careful, and says so in the module docs. In short:
//! - HubSpot: list `limit` is clamped to 100; no `Retry-After` on 429 unless asked;
//!   search `after` is a numeric offset; unset known properties are `null`.
//! - Mailchimp: the datacenter check compares the key suffix with the fake's own `dc`
//!   (loopback has no dc host); `since_last_changed` is strict; 429 text.
//! - Klaviyo: `Retry-After` is absent unless configured (the brief's default).
//! - Shopify: REST 429 always has `Retry-After: 2.0` (a float, as Shopify writes it);
//!   GraphQL throttling is HTTP 200; creates answer 201; `page_info` with filters is a 400.
//! - WooCommerce: coupon 201 and the duplicate-code 400; ordering by id.
//! - SuperOffice: column names, date format, default `$top`, error bodies; `Accept:
//!   application/json` is required.
//! - Brevo: error bodies, the 202 for scheduled sends, the 429 body.
//!
//! Fakes are strict where the notes are firm (a HubSpot PATCH value that is not a
//! string, Mailchimp `count > 1000`, a Klaviyo call without `revision`), so tests catch
//! a client that drifts from the real contract.

// Handlers answer errors as ready `Response`s; boxing them would only add noise.
#![allow(clippy::result_large_err)]

mod util;

pub mod brevo;
pub mod contacts;
pub mod hubspot;
pub mod klaviyo;
pub mod mailchimp;
pub mod mollie;
pub mod server;
pub mod shopify;
pub mod superoffice;
pub mod webhook;
pub mod woocommerce;

pub use contacts::{generate_contacts, subscriber_hash, Consent, Contact, ContactBook};
pub use server::{
    Ctx, FakeServer, Faults, RateLimit, RateUsage, RecordedRequest, Throttle, ThrottleReason,
    Vendor,
};
