//! The token page for browsers (SPEC §5, `[endpoints] page = true`): `GET {tokens_prefix}/`
//! lists the signed-in caller's tokens with a form to create one; `POST {tokens_prefix}/`
//! creates and re-renders the page with the secret shown once; `POST {tokens_prefix}/revoke`
//! revokes. Plain HTML forms, a small same-origin script for the copy button only, and two
//! static assets served beside the page.
//!
//! Who the caller is (a browser credential, e.g. a `cookie:NAME` source, or a verified client
//! certificate) is decided by the request chain in `proxy.rs`; this module gets the answer and
//! does the rest: the CSRF and `Origin` checks of every POST, the form, the token operations
//! (the JSON API's, so audit lines, cache eviction and `max_ttl` are the same), the HTML and
//! its security headers.

mod csrf;
mod render;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Response, StatusCode};
use percent_encoding::{percent_decode_str, utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};

use crate::config::{Config, EndpointsConfig, TokensConfig};
use crate::endpoints::{self, BadCreate, CreateRequest, TokenService};
use crate::error::ProxyError;
use crate::identity::Identity;
use crate::store::TokenRecord;
use crate::token::{IssueError, Minter};
use crate::upstream::{full, Body};

pub use csrf::Csrf;
use render::{Lifetime, Notice, ScopeChoice, View};

/// The page's stylesheet.
const CSS: &str = include_str!("page.css");
/// The page's script: the copy button, nothing else.
const JS: &str = include_str!("page.js");

/// The longest token name the form accepts.
const MAX_NAME_CHARS: usize = 100;

/// `Content-Security-Policy` of every page response (SPEC §5).
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; \
                   form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

/// What a path under `{tokens_prefix}` is, for the page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageEndpoint {
    /// `{prefix}/` (and `{prefix}`): GET shows the page, POST creates a token.
    Page,
    /// `{prefix}/revoke`: POST revokes a token.
    Revoke,
    /// `{prefix}/page.css`.
    Css,
    /// `{prefix}/page.js`.
    Js,
}

impl PageEndpoint {
    /// The name in the access log's `route` field.
    pub fn label(self) -> &'static str {
        "tokengate:page"
    }
}

/// Which page endpoint, if any, a path is (only with `[endpoints] page = true`).
pub fn route(config: &EndpointsConfig, path: &str) -> Option<PageEndpoint> {
    if !config.page {
        return None;
    }
    match path.strip_prefix(config.tokens_prefix.as_str())? {
        "" | "/" => Some(PageEndpoint::Page),
        "/revoke" => Some(PageEndpoint::Revoke),
        "/page.css" => Some(PageEndpoint::Css),
        "/page.js" => Some(PageEndpoint::Js),
        _ => None,
    }
}

/// The signed-in caller, as the request chain found them.
pub struct Caller {
    /// Who.
    pub identity: Arc<Identity>,
    /// SHA-256 of the credential they signed in with (for a client certificate: of
    /// `x509:` + its DN), which the CSRF token is bound to.
    pub credential: [u8; 32],
}

/// Where a POST came from, by its `Origin` (and `Sec-Fetch-Site`) header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// No `Origin` header.
    Absent,
    /// This origin.
    Same,
    /// Another origin, or `Sec-Fetch-Site: cross-site`.
    Other,
}

/// The static assets: no credential needed.
pub fn asset(endpoint: PageEndpoint, method: &Method) -> Option<Response<Body>> {
    let (body, content_type) = match endpoint {
        PageEndpoint::Css => (CSS, "text/css; charset=utf-8"),
        PageEndpoint::Js => (JS, "text/javascript; charset=utf-8"),
        PageEndpoint::Page | PageEndpoint::Revoke => return None,
    };
    if method != Method::GET && method != Method::HEAD {
        return Some(not_allowed("GET"));
    }
    let mut response = Response::new(full(Bytes::from_static(body.as_bytes())));
    secure(&mut response, content_type);
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    Some(response)
}

/// The answer to a browser without a (valid) credential: a 302 to `[endpoints] login_url`
/// with `rd=` the page's path (a path only, so the login app cannot be made to send the user
/// elsewhere), or a 401 page.
pub fn sign_in(config: &EndpointsConfig, method: &Method, path: &str) -> Response<Body> {
    let Some(login) = &config.login_url else {
        let mut response = html(
            StatusCode::UNAUTHORIZED,
            render::message(
                &config.tokens_prefix,
                "Sign in required",
                "Sign in to the application first, then come back to this page to manage \
                 your API tokens.",
            ),
        );
        response.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer realm=\"tokengate\""),
        );
        return response;
    };
    // After signing in the browser comes back with a GET: to the page, not to a POST target.
    let back = if method == Method::GET || method == Method::HEAD {
        path.to_string()
    } else {
        format!("{}/", config.tokens_prefix)
    };
    const RD: &AsciiSet = &NON_ALPHANUMERIC
        .remove(b'/')
        .remove(b'-')
        .remove(b'.')
        .remove(b'_')
        .remove(b'~');
    let separator = if login.contains('?') { '&' } else { '?' };
    let location = format!("{login}{separator}rd={}", utf8_percent_encode(&back, RD));
    let mut response = html(
        StatusCode::FOUND,
        render::message(
            &config.tokens_prefix,
            "Sign in required",
            "Redirecting to the sign-in page.",
        ),
    );
    if let Ok(value) = HeaderValue::try_from(location) {
        response.headers_mut().insert(header::LOCATION, value);
    }
    response
}

/// An error of the request chain (conflicting credentials, the store down) as an HTML page.
pub fn error_page(config: &EndpointsConfig, error: ProxyError) -> Response<Body> {
    let text = match error {
        ProxyError::BackendUnavailable => {
            "The sign-in service or the token store cannot be reached. Try again in a moment."
        }
        ProxyError::ConflictingCredentials => {
            "The request carries two different credentials. Sign out of the other one and \
             try again."
        }
        ProxyError::TokensCannotMint => {
            "Tokens cannot manage tokens: sign in to the application with your own account."
        }
        ProxyError::CrossOrigin => "This form was sent from another site and was refused.",
        _ => "The request could not be handled.",
    };
    html(
        error.status(),
        render::message(&config.tokens_prefix, error.message(), text),
    )
}

/// Serves the page to a signed-in caller. `origin` says where a POST came from; `body` is
/// `request`'s.
pub async fn serve(
    service: &TokenService<'_>,
    config: &Config,
    endpoint: PageEndpoint,
    request: &http::request::Parts,
    origin: Origin,
    body: hyper::body::Incoming,
    caller: &Caller,
) -> Response<Body> {
    let endpoints = &config.endpoints;
    let identity = &caller.identity;
    let method = &request.method;
    match (endpoint, method) {
        (PageEndpoint::Page, &Method::GET | &Method::HEAD) => {}
        (PageEndpoint::Page | PageEndpoint::Revoke, &Method::POST) => {
            // SPEC §9: only a login credential acts here; checked before anything else.
            if identity.token_id.is_some() {
                return error_page(endpoints, ProxyError::TokensCannotMint);
            }
            if endpoint == PageEndpoint::Page && !endpoints.self_service {
                return error_page(endpoints, ProxyError::Disabled);
            }
            if origin != Origin::Same {
                return error_page(endpoints, ProxyError::CrossOrigin);
            }
        }
        (PageEndpoint::Page, _) => return not_allowed("GET, HEAD, POST"),
        _ => return not_allowed("POST"),
    }
    let csrf = match Csrf::load(service.store, caller.credential).await {
        Ok(csrf) => csrf,
        Err(e) => {
            tracing::warn!(error = %e, "token store unavailable");
            return error_page(endpoints, ProxyError::BackendUnavailable);
        }
    };
    let mut shown = Shown::default();
    let status = if method == Method::POST {
        let within = config.server.body_read_timeout;
        let content_type = request.headers.get(header::CONTENT_TYPE);
        let form = match read_form(&endpoints.tokens_prefix, content_type, body, within).await {
            Ok(form) => form,
            Err(response) => return response,
        };
        if !form.get("csrf").is_some_and(|t| csrf.verify(t)) {
            return html(
                StatusCode::FORBIDDEN,
                render::message(
                    &endpoints.tokens_prefix,
                    "Form expired",
                    "The form was not issued for your current sign-in. Reload the page and \
                     try again.",
                ),
            );
        }
        let done = match endpoint {
            PageEndpoint::Revoke => revoke(service, identity, &form, &mut shown).await,
            _ => create(service, identity, &form, &mut shown).await,
        };
        match done {
            Ok(status) => status,
            Err(error) => return error_page(endpoints, error),
        }
    } else {
        StatusCode::OK
    };
    let tokens = match service.store.list(Some(&identity.subject)).await {
        Ok(tokens) => tokens,
        Err(e) => {
            tracing::warn!(error = %e, "token store unavailable");
            return error_page(endpoints, ProxyError::BackendUnavailable);
        }
    };
    let view = View {
        prefix: &endpoints.tokens_prefix,
        subject: &identity.subject,
        account: &identity.account,
        tokens: &tokens,
        csrf: &csrf.token(),
        created: shown.created.as_ref().map(|(s, r)| (s.as_str(), r)),
        notice: shown.notice,
        lifetimes: endpoints
            .self_service
            .then(|| lifetimes(&config.tokens, shown.ttl.as_deref())),
        name: &shown.name,
        scopes: scope_choices(&config.tokens, identity, shown.scopes.as_deref()),
    };
    html(status, render::page(&view))
}

/// What a POST leaves for the page to show.
#[derive(Default)]
struct Shown {
    created: Option<(String, TokenRecord)>,
    notice: Option<Notice>,
    /// The form's values after a refused create, so the user need not type them again.
    name: String,
    ttl: Option<String>,
    scopes: Option<Vec<String>>,
}

/// `POST {prefix}/`: creates a token; 200 with the secret, or 400 with the reason.
async fn create(
    service: &TokenService<'_>,
    caller: &Identity,
    form: &Form,
    shown: &mut Shown,
) -> Result<StatusCode, ProxyError> {
    let name = form.get("name").unwrap_or_default().trim().to_string();
    let ttl_text = form.get("ttl").unwrap_or_default().trim().to_string();
    let problem = if name.chars().count() > MAX_NAME_CHARS {
        Some(format!(
            "The name is too long (at most {MAX_NAME_CHARS} characters)."
        ))
    } else if name.chars().any(char::is_control) {
        Some("The name cannot hold control characters.".to_string())
    } else {
        None
    };
    let ttl = match ttl_text.as_str() {
        "" => Ok(None),
        text => crate::config::parse_duration(text).map(Some),
    };
    // The form's checkboxes, when it had them (none checked: a token with no scopes); a form
    // without them gets the caller's allowance.
    let scopes = form
        .get("scopes-chosen")
        .map(|_| form.all("scope").map(str::to_string).collect::<Vec<_>>());
    shown.scopes.clone_from(&scopes);
    let request = match (problem, ttl) {
        (None, Ok(ttl)) => CreateRequest {
            name: name.clone(),
            ttl,
            user: None,
            account: None,
            scopes,
        },
        (Some(problem), _) | (None, Err(problem)) => {
            return Ok(refuse(shown, problem, name, ttl_text));
        }
    };
    let minter = Minter::Caller(caller);
    match service
        .create_token(&caller.subject, Some(&caller.account), &request, minter)
        .await
    {
        Ok(created) => {
            shown.created = Some(created);
            shown.scopes = None;
            Ok(StatusCode::OK)
        }
        Err(IssueError::Lifetime(message) | IssueError::Scope(message)) => {
            Ok(refuse(shown, message, name, ttl_text))
        }
        Err(IssueError::Store(e)) => {
            tracing::warn!(error = %e, "token store unavailable");
            Err(ProxyError::BackendUnavailable)
        }
    }
}

/// A refused create: 400, the reason, and the form as the user filled it.
fn refuse(shown: &mut Shown, problem: String, name: String, ttl: String) -> StatusCode {
    shown.notice = Some(Notice::Problem(problem));
    shown.name = name;
    shown.ttl = Some(ttl);
    StatusCode::BAD_REQUEST
}

/// `POST {prefix}/revoke` with `id`: revokes one of the caller's own tokens; 200, or 404 when
/// they have no such token.
async fn revoke(
    service: &TokenService<'_>,
    caller: &Identity,
    form: &Form,
    shown: &mut Shown,
) -> Result<StatusCode, ProxyError> {
    let id = form.get("id").unwrap_or_default().trim();
    let revoked = if id.is_empty() {
        None
    } else {
        service
            .revoke_token(id, Some(&caller.subject))
            .await
            .map_err(|e| {
                tracing::warn!(error = %e, "token store unavailable");
                ProxyError::BackendUnavailable
            })?
    };
    Ok(match revoked {
        Some(record) => {
            let what = if record.name.is_empty() {
                format!("Token {} revoked.", record.id)
            } else {
                format!("Token “{}” ({}) revoked.", record.name, record.id)
            };
            shown.notice = Some(Notice::Done(what));
            StatusCode::OK
        }
        None => {
            shown.notice = Some(Notice::Problem(
                "No such token: it may have been revoked already.".to_string(),
            ));
            StatusCode::NOT_FOUND
        }
    })
}

/// The create form's scope checkboxes: one per `[tokens] scopes`, those of the caller's
/// allowance checked (or a refused form's `chosen`), those beyond it disabled.
fn scope_choices(
    tokens: &TokensConfig,
    caller: &Identity,
    chosen: Option<&[String]>,
) -> Vec<ScopeChoice> {
    let allowance =
        crate::token::scopes_for(tokens, None, Minter::Caller(caller)).unwrap_or_default();
    tokens
        .scopes
        .iter()
        .map(|name| {
            let allowed = allowance.contains(name);
            ScopeChoice {
                checked: allowed && chosen.is_none_or(|c| c.contains(name)),
                allowed,
                name: name.clone(),
            }
        })
        .collect()
}

/// The lifetimes the create form offers: common ones up to `max_ttl`, `max_ttl` itself, and
/// "Never" when there is no cap; `chosen` (a refused form's value) or the default preselected.
fn lifetimes(tokens: &TokensConfig, chosen: Option<&str>) -> Vec<Lifetime> {
    const DAY: u64 = 24 * 3600;
    let cap = tokens.max_ttl;
    let mut offered: Vec<Duration> = [1, 7, 30, 90, 180, 365]
        .into_iter()
        .map(|days| Duration::from_secs(days * DAY))
        .filter(|d| cap.is_zero() || *d <= cap)
        .collect();
    let default = tokens.lifetime(None).unwrap_or(cap);
    for extra in [cap, default] {
        if !offered.contains(&extra) {
            offered.push(extra);
        }
    }
    // "Never" last, and only without a cap.
    offered.retain(|d| !d.is_zero());
    offered.sort();
    if cap.is_zero() {
        offered.push(Duration::ZERO);
    }
    let chosen = chosen.and_then(|c| crate::config::parse_duration(c).ok());
    let selected = chosen.filter(|c| offered.contains(c)).unwrap_or(default);
    offered
        .into_iter()
        .map(|d| Lifetime {
            value: duration_value(d),
            label: render::lifetime_label(d),
            selected: d == selected,
        })
        .collect()
}

/// A lifetime as the form sends it: `30d`, `12h`, `90s`, `0`.
fn duration_value(d: Duration) -> String {
    let secs = d.as_secs();
    if secs == 0 {
        "0".to_string()
    } else if secs.is_multiple_of(24 * 3600) {
        format!("{}d", secs / (24 * 3600))
    } else if secs.is_multiple_of(3600) {
        format!("{}h", secs / 3600)
    } else {
        format!("{secs}s")
    }
}

/// A decoded `application/x-www-form-urlencoded` body.
struct Form(Vec<(String, String)>);

impl Form {
    /// Parses `a=1&b=two+words`; a name given twice keeps its first value.
    fn parse(body: &[u8]) -> Form {
        let text = String::from_utf8_lossy(body);
        let decode = |s: &str| {
            percent_decode_str(&s.replace('+', " "))
                .decode_utf8_lossy()
                .into_owned()
        };
        Form(
            text.split('&')
                .filter(|pair| !pair.is_empty())
                .map(|pair| {
                    let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
                    (decode(name), decode(value))
                })
                .collect(),
        )
    }

    fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// Every value of `name` (checkboxes), in order.
    fn all<'f>(&'f self, name: &'f str) -> impl Iterator<Item = &'f str> + 'f {
        self.0
            .iter()
            .filter(move |(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Reads a form POST: 415 unless it is `application/x-www-form-urlencoded`, 400 or 408 when the
/// body is too large or too slow.
async fn read_form(
    prefix: &str,
    content_type: Option<&HeaderValue>,
    body: hyper::body::Incoming,
    within: Duration,
) -> Result<Form, Response<Body>> {
    let form = content_type
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|m| {
            m.trim()
                .eq_ignore_ascii_case("application/x-www-form-urlencoded")
        });
    if !form {
        return Err(html(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            render::message(prefix, "Form required", "Send the page's form."),
        ));
    }
    match endpoints::read_body(body, within).await {
        Ok(bytes) => Ok(Form::parse(&bytes)),
        Err(BadCreate::Timeout) => Err(ProxyError::RequestTimeout.into_response()),
        Err(BadCreate::Invalid(message)) => Err(html(
            StatusCode::BAD_REQUEST,
            render::message(prefix, "Bad request", &message),
        )),
    }
}

/// An HTML response with the page's headers.
fn html(status: StatusCode, page: String) -> Response<Body> {
    let mut response = Response::new(full(Bytes::from(page)));
    *response.status_mut() = status;
    secure(&mut response, "text/html; charset=utf-8");
    response
}

/// The security headers SPEC §5 lists, on every page response.
fn secure(response: &mut Response<Body>, content_type: &'static str) {
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
}

/// 405 naming the methods allowed.
fn not_allowed(allow: &'static str) -> Response<Body> {
    let mut response = ProxyError::MethodNotAllowed.into_response();
    response
        .headers_mut()
        .insert(header::ALLOW, HeaderValue::from_static(allow));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forms_decode_as_browsers_encode() {
        let form = Form::parse(b"csrf=a%2Bb&name=%3Cscript%3E+x&ttl=30d&name=second&flag");
        assert_eq!(form.get("csrf"), Some("a+b"));
        assert_eq!(form.get("name"), Some("<script> x"));
        assert_eq!(form.get("ttl"), Some("30d"));
        assert_eq!(form.get("flag"), Some(""));
        assert_eq!(form.get("missing"), None);
    }

    #[test]
    fn lifetimes_stay_within_max_ttl() {
        let day = Duration::from_secs(24 * 3600);
        let mut tokens = TokensConfig {
            scopes: Vec::new(),
            login_scopes: Vec::new(),
            default_ttl: 90 * day,
            max_ttl: 45 * day,
            format: crate::config::TokenFormat::Opaque,
            jwt: None,
        };
        let offered = lifetimes(&tokens, None);
        let values: Vec<&str> = offered.iter().map(|l| l.value.as_str()).collect();
        assert_eq!(values, ["1d", "7d", "30d", "45d"]);
        // The default (90d) is over the cap: the cap is preselected.
        assert!(offered.iter().any(|l| l.value == "45d" && l.selected));
        tokens.max_ttl = Duration::ZERO;
        let offered = lifetimes(&tokens, Some("7d"));
        assert_eq!(offered.last().map(|l| l.value.as_str()), Some("0"));
        assert!(offered.iter().any(|l| l.value == "7d" && l.selected));
        assert_eq!(offered.iter().filter(|l| l.selected).count(), 1);
    }

    #[test]
    fn the_page_answers_only_its_own_paths() {
        let mut config = EndpointsConfig {
            tokens_prefix: "/_tokengate".to_string(),
            self_service: true,
            page: false,
            login_url: None,
            insight: false,
        };
        assert_eq!(route(&config, "/_tokengate/"), None);
        config.page = true;
        assert_eq!(route(&config, "/_tokengate/"), Some(PageEndpoint::Page));
        assert_eq!(route(&config, "/_tokengate"), Some(PageEndpoint::Page));
        assert_eq!(
            route(&config, "/_tokengate/revoke"),
            Some(PageEndpoint::Revoke)
        );
        assert_eq!(route(&config, "/_tokengate/tokens"), None);
        assert_eq!(route(&config, "/_tokengatex/"), None);
    }

    #[test]
    fn sign_in_redirects_with_a_path_only() {
        let config = EndpointsConfig {
            tokens_prefix: "/_tokengate".to_string(),
            self_service: true,
            page: true,
            login_url: Some("https://app.example/login?next=1".to_string()),
            insight: false,
        };
        let response = sign_in(&config, &Method::GET, "/_tokengate/");
        assert_eq!(response.status(), StatusCode::FOUND);
        assert_eq!(
            response.headers()[header::LOCATION],
            "https://app.example/login?next=1&rd=/_tokengate/"
        );
        let response = sign_in(&config, &Method::POST, "/_tokengate/revoke");
        assert_eq!(
            response.headers()[header::LOCATION],
            "https://app.example/login?next=1&rd=/_tokengate/"
        );
    }
}
