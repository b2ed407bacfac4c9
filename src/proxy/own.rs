//! tokengate's own endpoints, out of the request chain: the token API, the token page, the
//! Insight.io endpoints and the Rucio exchange, each authenticated as its rules say (a login
//! credential, a cookie from the same origin, a client certificate).

use super::*;

/// One of tokengate's own endpoints.
pub(super) async fn serve_own<'g>(
    gate: &'g Gate,
    peer: &Peer,
    request: Request<Incoming>,
    outcome: &mut Outcome<'g>,
) -> Result<Response<Body>, ProxyError> {
    // The gate's own endpoints are boxed: their futures are large, and inline they would make
    // every proxied request's future as large (hyper keeps room for one per connection).
    if let Some(endpoint) = rucio::route(&gate.config.x509, request.uri().path()) {
        outcome.endpoint = Some(endpoint.label());
        let (parts, _) = request.into_parts();
        return Box::pin(serve_rucio(gate, peer, endpoint, &parts, outcome)).await;
    }
    if let Some(endpoint) = endpoints::route(&gate.config.endpoints, request.uri().path()) {
        outcome.endpoint = Some(endpoint.label());
        let (parts, body) = request.into_parts();
        return Box::pin(serve_endpoint(gate, peer, endpoint, parts, body, outcome)).await;
    }
    if let Some(endpoint) = page::route(&gate.config.endpoints, request.uri().path()) {
        outcome.endpoint = Some(endpoint.label());
        let (parts, body) = request.into_parts();
        return Ok(Box::pin(serve_page(gate, peer, endpoint, parts, body, outcome)).await);
    }
    Err(ProxyError::NoRoute)
}

/// The token API and the Insight.io endpoints, for an authenticated caller.
async fn serve_endpoint<'g>(
    gate: &'g Gate,
    peer: &Peer,
    endpoint: Endpoint,
    parts: http::request::Parts,
    body: Incoming,
    outcome: &mut Outcome<'g>,
) -> Result<Response<Body>, ProxyError> {
    let mints = endpoint.mints(&parts.method);
    if mints && !gate.config.endpoints.self_service {
        return Err(ProxyError::Disabled);
    }
    let service = |actor| TokenService {
        store: &gate.store,
        cache: &gate.cache,
        config: &gate.config.tokens,
        actor,
        client: Some(peer.addr.ip()),
    };
    {
        if endpoint == Endpoint::InsightRevoke && parts.method == Method::GET {
            // Always 200, valid or not (no oracle): the presented token is not validated first.
            let presented = parts
                .headers
                .get("x-auth-token")
                .and_then(|v| v.to_str().ok())
                .map(str::trim)
                .filter(|t| !t.is_empty() && (!token::is_ours(t) || token::well_formed(t)));
            return Ok(service(Actor::Holder).insight_revoke(presented).await);
        }
    }
    let (caller, token, by_cookie) = match identify(gate, Some(&peer.keys), &parts, outcome).await?
    {
        Some(found) => (
            found.identity,
            found.token,
            matches!(found.source, Source::Cookie(_)),
        ),
        // Insight.io: a verified client certificate is a caller too.
        None => match (&endpoint, client_caller(gate, peer).await?) {
            (Endpoint::InsightCreate | Endpoint::InsightList, Some(caller)) => {
                outcome.auth = Some((AuthResult::Allowed, "x509"));
                (caller, Cow::Borrowed(""), false)
            }
            _ => {
                outcome.auth = Some((AuthResult::Missing, "none"));
                return Err(ProxyError::MissingCredentials);
            }
        },
    };
    outcome.identity = Some(Arc::clone(&caller));
    // SPEC §9: only a login credential mints; a leaked issued token cannot be turned into one
    // that outlives its revocation.
    if mints && caller.token_id.is_some() {
        return Err(ProxyError::TokensCannotMint);
    }
    if by_cookie {
        same_origin_only(peer, &parts, &endpoint)?;
    }
    let service = service(Actor::Subject(&caller.subject));
    endpoints::serve(
        &service,
        &endpoint,
        &parts,
        &caller,
        &token,
        body,
        gate.config.server.body_read_timeout,
    )
    .await
}

/// The token page for browsers: its assets for anyone, the page for a caller signed in with a
/// credential or a verified client certificate; anyone else is sent to sign in.
async fn serve_page<'g>(
    gate: &'g Gate,
    peer: &Peer,
    endpoint: PageEndpoint,
    parts: http::request::Parts,
    body: Incoming,
    outcome: &mut Outcome<'g>,
) -> Response<Body> {
    let endpoints = &gate.config.endpoints;
    if let Some(asset) = page::asset(endpoint, &parts.method) {
        return asset;
    }
    let caller = match identify(gate, Some(&peer.keys), &parts, outcome).await {
        Ok(Some(found)) => Some(page::Caller {
            identity: found.identity,
            credential: found.key,
        }),
        // A verified client certificate signs in too.
        Ok(None) => match client_caller(gate, peer).await {
            Ok(Some(identity)) => {
                outcome.source = Some("x509");
                outcome.auth = Some((AuthResult::Allowed, "x509"));
                let dn = identity.dn.as_deref().unwrap_or_default();
                Some(page::Caller {
                    credential: crate::identity::hash(&format!("x509:{dn}")),
                    identity,
                })
            }
            Ok(None) => {
                outcome.auth = Some((AuthResult::Missing, "none"));
                None
            }
            Err(e) => return page::error_page(endpoints, e),
        },
        // An expired or revoked session: sign in again.
        Err(ProxyError::InvalidCredentials) => None,
        Err(e) => return page::error_page(endpoints, e),
    };
    let Some(caller) = caller else {
        return page::sign_in(endpoints, &parts.method, parts.uri.path());
    };
    outcome.identity = Some(Arc::clone(&caller.identity));
    let service = TokenService {
        store: &gate.store,
        cache: &gate.cache,
        config: &gate.config.tokens,
        actor: Actor::Subject(&caller.identity.subject),
        client: Some(peer.addr.ip()),
    };
    page::serve(
        &service,
        &gate.config,
        endpoint,
        &parts,
        origin(peer, &parts),
        body,
        &caller,
    )
    .await
}

/// Where a request says it comes from: its `Origin` against this listener's scheme and the
/// request's host, and `Sec-Fetch-Site`.
fn origin(peer: &Peer, parts: &http::request::Parts) -> page::Origin {
    let headers = &parts.headers;
    let cross_site = headers
        .get("sec-fetch-site")
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"cross-site"));
    if cross_site {
        return page::Origin::Other;
    }
    let Some(origin) = headers.get(header::ORIGIN) else {
        return page::Origin::Absent;
    };
    let host = headers
        .get(header::HOST)
        .map(|h| h.as_bytes())
        .or_else(|| parts.uri.authority().map(|a| a.as_str().as_bytes()))
        .unwrap_or_default();
    let scheme: &[u8] = if peer.tls { b"https://" } else { b"http://" };
    let origin = origin.as_bytes();
    let same = origin.len() == scheme.len() + host.len()
        && origin[..scheme.len()].eq_ignore_ascii_case(scheme)
        && origin[scheme.len()..].eq_ignore_ascii_case(host);
    if same {
        page::Origin::Same
    } else {
        page::Origin::Other
    }
}

/// A browser sends its cookie with requests that other sites make: a cookie-authenticated call
/// must come from this origin (SPEC §5), and a POST must be JSON, which a cross-site form
/// cannot send.
fn same_origin_only(
    peer: &Peer,
    parts: &http::request::Parts,
    endpoint: &Endpoint,
) -> Result<(), ProxyError> {
    if origin(peer, parts) == page::Origin::Other {
        return Err(ProxyError::CrossOrigin);
    }
    if *endpoint == Endpoint::Tokens && parts.method == Method::POST {
        let json = parts
            .headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(';').next())
            .is_some_and(|media| media.trim().eq_ignore_ascii_case("application/json"));
        if !json {
            return Err(ProxyError::JsonRequired);
        }
    }
    Ok(())
}

/// The Rucio endpoints: token exchange for a client certificate, and token validation.
async fn serve_rucio<'g>(
    gate: &'g Gate,
    peer: &Peer,
    endpoint: RucioEndpoint,
    parts: &http::request::Parts,
    outcome: &mut Outcome<'g>,
) -> Result<Response<Body>, ProxyError> {
    if parts.method != Method::GET && parts.method != Method::HEAD {
        return Err(ProxyError::MethodNotAllowed);
    }
    match endpoint {
        RucioEndpoint::X509 | RucioEndpoint::X509Proxy => {
            let response = rucio::exchange(
                &gate.store,
                &gate.config.x509,
                &gate.config.tokens,
                peer.client.as_deref(),
                &parts.headers,
                peer.addr.ip(),
            )
            .await;
            let result = match response.status() {
                StatusCode::OK => AuthResult::Allowed,
                StatusCode::SERVICE_UNAVAILABLE => AuthResult::Error,
                _ if peer.client.is_none() => AuthResult::Missing,
                _ => AuthResult::Denied,
            };
            outcome.source = Some("x509");
            outcome.auth = Some((result, "x509"));
            Ok(response)
        }
        RucioEndpoint::Validate => match identify(gate, Some(&peer.keys), parts, outcome).await {
            Ok(Some(Caller { identity, .. })) => {
                let response = rucio::validated(&identity);
                outcome.identity = Some(identity);
                Ok(response)
            }
            Ok(None) => {
                outcome.auth = Some((AuthResult::Missing, "none"));
                Ok(rucio::no_token())
            }
            Err(ProxyError::InvalidCredentials) => Ok(rucio::cannot_authenticate(
                "Cannot authenticate: the token is invalid or has expired",
            )),
            Err(e) => Err(e),
        },
    }
}

/// The caller behind a verified client certificate with no token: its DN's default account.
async fn client_caller(gate: &Gate, peer: &Peer) -> Result<Option<Arc<Identity>>, ProxyError> {
    let Some(client) = peer.client.as_deref() else {
        return Ok(None);
    };
    let dn = client.dn(gate.config.x509.dn_format);
    let accounts = rucio::accounts_for(&gate.store, &gate.config.x509, dn)
        .await
        .map_err(|e| {
            tracing::warn!(error = %e, "token store unavailable");
            ProxyError::BackendUnavailable
        })?;
    let account = accounts.first().map_or(dn, String::as_str);
    Ok(Some(Arc::new(Identity::of(
        crate::identity::principal(dn, account, Some(dn)),
        crate::identity::ValidatedBy::X509,
    ))))
}
