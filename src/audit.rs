//! The audit trail (SPEC §9): one JSON line per token created, revoked or exchanged, from every
//! surface (main listener, admin API, CLI, `/auth/x509*`), never the secret.
//!
//! Lines go out through `tracing` with target `audit` at once, not through the access log's
//! buffer; the CLI's subscriber writes them to standard error.

use std::net::IpAddr;

use crate::clock::rfc3339;
use crate::store::TokenRecord;

/// Who did it.
#[derive(Debug, Clone, Copy)]
pub enum Actor<'a> {
    /// A caller authenticated as this subject.
    Subject(&'a str),
    /// Whoever held the token itself (Insight.io's `revokeApiToken`): its own subject.
    Holder,
    /// The admin API's bearer token.
    Admin,
    /// The command line.
    Cli,
}

/// What happened to a token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// An API token was created.
    Created,
    /// A token was revoked.
    Revoked,
    /// A token was issued for a client certificate.
    Exchanged,
}

impl Event {
    fn name(self) -> &'static str {
        match self {
            Event::Created => "token_created",
            Event::Revoked => "token_revoked",
            Event::Exchanged => "token_exchanged",
        }
    }
}

/// Writes the audit line of `event` on `record`.
pub fn record(event: Event, record: &TokenRecord, actor: Actor<'_>, client: Option<IpAddr>) {
    let actor = match actor {
        Actor::Subject(subject) => format!("subject:{subject}"),
        Actor::Holder => format!("subject:{}", record.subject),
        Actor::Admin => "admin".to_string(),
        Actor::Cli => "cli".to_string(),
    };
    tracing::info!(
        target: "audit",
        event = event.name(),
        token_id = %record.id,
        kind = record.kind.as_str(),
        subject = %record.subject,
        account = %record.account,
        name = %record.name,
        scopes = %record.scopes.join(","),
        expires = record.expires_ms.map(rfc3339),
        actor = %actor,
        client = client.map(tracing::field::display),
    );
}
