//! Header-value templates with placeholders (`{token}`, `{subject}`, `{account}`, `{dn}`,
//! `{token_id}`, `{source}`, `{groups}`, `{scopes}`, `{claim:NAME}`): parsed once when the config is read, rendered per request from the
//! verified identity. Data and a pure function, so the config can hold them.

use std::borrow::Cow;

use http::HeaderValue;

use crate::identity::Identity;

/// A header value with placeholders: `{token}`, `{subject}`, `{account}`, `{dn}`, `{token_id}`,
/// `{source}`. Parsed once at config load.
#[derive(Clone, PartialEq, Eq)]
pub struct Template {
    pieces: Vec<Piece>,
}

#[derive(Clone, PartialEq, Eq)]
enum Piece {
    Literal(String),
    Token,
    Subject,
    Account,
    Dn,
    TokenId,
    Source,
    /// Comma-separated.
    Groups,
    /// Comma-separated.
    Scopes,
    /// A claim's values (dotted path), comma-separated.
    Claim(String),
}

impl std::fmt::Debug for Template {
    // A template may hold a fixed service secret: show its shape only.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for piece in &self.pieces {
            f.write_str(match piece {
                Piece::Literal(_) => "[literal]",
                Piece::Token => "{token}",
                Piece::Subject => "{subject}",
                Piece::Account => "{account}",
                Piece::Dn => "{dn}",
                Piece::TokenId => "{token_id}",
                Piece::Source => "{source}",
                Piece::Groups => "{groups}",
                Piece::Scopes => "{scopes}",
                Piece::Claim(_) => "{claim:…}",
            })?;
        }
        Ok(())
    }
}

/// What placeholders are filled from.
#[derive(Clone, Copy, Default)]
pub struct Values<'a> {
    /// The client's credential.
    pub token: Option<&'a str>,
    /// The verified identity.
    pub identity: Option<&'a Identity>,
    /// Where the credential came from.
    pub source: Option<&'a str>,
    /// The DN of a verified client certificate on the connection, used for `{dn}` when the
    /// identity has none of its own.
    pub client_dn: Option<&'a str>,
}

impl Template {
    /// Parses a template; an unknown `{placeholder}` is an error.
    pub fn parse(text: &str) -> Result<Template, String> {
        let mut pieces = Vec::new();
        let mut rest = text;
        while let Some(start) = rest.find('{') {
            let Some(len) = rest[start..].find('}') else {
                break;
            };
            let name = &rest[start + 1..start + len];
            let piece = match name {
                "token" => Piece::Token,
                "subject" => Piece::Subject,
                "account" => Piece::Account,
                "dn" => Piece::Dn,
                "token_id" => Piece::TokenId,
                "source" => Piece::Source,
                "groups" => Piece::Groups,
                "scopes" => Piece::Scopes,
                claim if claim.starts_with("claim:") => {
                    let path = &claim["claim:".len()..];
                    if path.is_empty() || path.split('.').any(str::is_empty) {
                        return Err(format!(
                            "{{{name}}} needs a claim path, e.g. {{claim:realm_access.roles}}"
                        ));
                    }
                    Piece::Claim(path.to_string())
                }
                _ => {
                    return Err(format!(
                        "unknown placeholder {{{name}}}: expected {{token}}, {{subject}}, \
                         {{account}}, {{dn}}, {{token_id}}, {{source}}, {{groups}}, {{scopes}} \
                         or {{claim:NAME}}"
                    ))
                }
            };
            if start > 0 {
                pieces.push(Piece::Literal(rest[..start].to_string()));
            }
            pieces.push(piece);
            rest = &rest[start + len + 1..];
        }
        if !rest.is_empty() {
            pieces.push(Piece::Literal(rest.to_string()));
        }
        let template = Template { pieces };
        // A literal that cannot be a header value is a config error, not a per-request one.
        if let Some(Piece::Literal(l)) = template
            .pieces
            .iter()
            .find(|p| matches!(p, Piece::Literal(l) if HeaderValue::from_str(l).is_err()))
        {
            return Err(format!(
                "{:?} cannot be part of a header value",
                l.escape_debug().to_string()
            ));
        }
        Ok(template)
    }

    /// Whether the template uses the client's credential.
    pub fn uses_token(&self) -> bool {
        self.pieces.contains(&Piece::Token)
    }

    /// The claims (`{claim:NAME}`) the template reads.
    pub fn claim_names(&self) -> impl Iterator<Item = &str> {
        self.pieces.iter().filter_map(|p| match p {
            Piece::Claim(name) => Some(name.as_str()),
            _ => None,
        })
    }

    /// The rendered header value; `None` when a placeholder has no value here, the result is
    /// empty, or it cannot be a header value (the header is then not set).
    pub fn render(&self, values: &Values<'_>) -> Option<HeaderValue> {
        self.render_checked(values).ok().flatten()
    }

    /// The rendered header value: `Ok(None)` when a placeholder has no value here or the result
    /// is empty (the header is then not set); `Err` when the values are there but cannot be a
    /// header value (a subject with CR/LF): the request must not go on without the header.
    pub fn render_checked(&self, values: &Values<'_>) -> Result<Option<HeaderValue>, Unrenderable> {
        fn joined(list: &[Box<str>]) -> Option<Cow<'_, str>> {
            match list {
                [] => None,
                [one] => Some(Cow::Borrowed(one)),
                many => Some(Cow::Owned(many.join(","))),
            }
        }
        fn value_of<'v>(piece: &'v Piece, values: &Values<'v>) -> Option<Cow<'v, str>> {
            let identity = values.identity;
            let borrowed = match piece {
                Piece::Literal(l) => Some(l.as_str()),
                Piece::Token => values.token,
                Piece::Subject => identity.map(|i| i.subject.as_str()),
                Piece::Account => identity.map(|i| i.account.as_str()),
                Piece::Dn => identity.and_then(|i| i.dn.as_deref()).or(values.client_dn),
                Piece::TokenId => identity.and_then(|i| i.token_id.as_deref()),
                Piece::Source => values.source,
                Piece::Groups => return identity.and_then(|i| joined(i.groups())),
                Piece::Scopes => return identity.and_then(|i| joined(i.scopes())),
                Piece::Claim(name) => return identity.and_then(|i| joined(i.claim(name)?)),
            };
            borrowed.map(Cow::Borrowed)
        }
        let value = if let [piece] = self.pieces.as_slice() {
            match (piece, values.identity) {
                // Made once per principal: no allocation per request.
                (Piece::Subject, Some(identity)) => {
                    identity.subject_value().ok_or(Unrenderable)?.clone()
                }
                (Piece::Account, Some(identity)) => {
                    identity.account_value().ok_or(Unrenderable)?.clone()
                }
                _ => match value_of(piece, values) {
                    None => return Ok(None),
                    Some(text) => {
                        HeaderValue::from_bytes(text.as_bytes()).map_err(|_| Unrenderable)?
                    }
                },
            }
        } else {
            let mut text = String::with_capacity(64);
            for piece in &self.pieces {
                match value_of(piece, values) {
                    None => return Ok(None),
                    Some(value) => text.push_str(&value),
                }
            }
            HeaderValue::from_bytes(text.as_bytes()).map_err(|_| Unrenderable)?
        };
        Ok((!value.is_empty()).then_some(value))
    }
}

/// A template whose values cannot form a header value (control characters).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unrenderable;
