//! The shipped definitions, built into the binary so an instance works without a
//! `connectors/` folder next to config.toml. A file of the same name there wins.

/// (name, TOML text) of every shipped definition.
pub const BUILTIN: &[(&str, &str)] = &[
    ("brevo", include_str!("../../connectors/brevo.toml")),
    ("file", include_str!("../../connectors/file.toml")),
    ("hubspot", include_str!("../../connectors/hubspot.toml")),
    ("klaviyo", include_str!("../../connectors/klaviyo.toml")),
    ("mailchimp", include_str!("../../connectors/mailchimp.toml")),
    ("mollie", include_str!("../../connectors/mollie.toml")),
    ("shopify", include_str!("../../connectors/shopify.toml")),
    (
        "superoffice",
        include_str!("../../connectors/superoffice.toml"),
    ),
    ("webhook", include_str!("../../connectors/webhook.toml")),
    (
        "woocommerce",
        include_str!("../../connectors/woocommerce.toml"),
    ),
];
