//! Authorize: what a caller may do on a route (SPEC §10). The route's `[[route.deny]]` and
//! `[[route.allow]]` rules are evaluated on every request against the identity the cache
//! keeps (never a cached decision), so a reload that changes a rule applies at once.
//!
//! A request matching any deny rule is refused; a route with allow rules needs one to match.
//! Within a rule every key given must match, within a key any value listed. Paths are matched
//! under every reading an upstream may give them (SPEC §9): a deny rule matches when any
//! reading lies under its path, an allow rule only when every reading does.

use std::net::IpAddr;

use http::Method;

use crate::config::{RouteConfig, Rule, RuleSource};
use crate::credential::Source;
use crate::identity::Identity;
use crate::path::{self, Reading};

/// What a rule looks at.
pub struct Ask<'a> {
    /// The request method (for `[verify]`, the one the ingress names).
    pub method: &'a Method,
    /// The normalised path.
    pub path: &'a str,
    /// The verified identity; `None` without a credential (`auth = "optional"` / `"none"`).
    pub identity: Option<&'a Identity>,
    /// Where the credential came from.
    pub source: Option<&'a Source>,
    /// The client address (behind trusted proxies, the one they name).
    pub client: IpAddr,
}

/// The rule that refused a request (`deny[0]`), or `no allow`.
pub type Refused<'r> = &'r str;

/// `Ok` when the route's rules let the request through; else which rule refused it.
pub fn authorize<'r>(route: &'r RouteConfig, ask: &Ask<'_>) -> Result<(), Refused<'r>> {
    deny_only(route, ask)?;
    if route.allow.is_empty()
        || route
            .allow
            .iter()
            .any(|r| matches(r, ask, Paths::EveryReading))
    {
        return Ok(());
    }
    Err("no allow")
}

/// Only the deny rules: what holds a CORS preflight that passes (`preflight = "pass"`).
pub fn deny_only<'r>(route: &'r RouteConfig, ask: &Ask<'_>) -> Result<(), Refused<'r>> {
    match route
        .deny
        .iter()
        .find(|r| matches(r, ask, Paths::AnyReading))
    {
        Some(rule) => Err(&rule.label),
        None => Ok(()),
    }
}

/// How a rule's `paths` are matched against the readings of the request's path.
#[derive(Clone, Copy)]
enum Paths {
    /// Deny: any reading under a listed path matches (no reading may reach it).
    AnyReading,
    /// Allow: every reading must lie under a listed path.
    EveryReading,
}

/// Whether every key of `rule` matches.
fn matches(rule: &Rule, ask: &Ask<'_>, readings: Paths) -> bool {
    let identity = ask.identity;
    let listed = |list: &Option<Vec<String>>, value: Option<&str>| match list {
        None => true,
        Some(list) => value.is_some_and(|v| list.iter().any(|l| l == v)),
    };
    let any_of = |list: &Option<Vec<String>>, have: &[Box<str>]| match list {
        None => true,
        Some(list) => have.iter().any(|h| list.iter().any(|l| **l == **h)),
    };
    let method = match &rule.methods {
        None => true,
        Some(methods) => methods
            .iter()
            .any(|m| m.as_str().eq_ignore_ascii_case(ask.method.as_str())),
    };
    method
        && listed(&rule.subjects, identity.map(|i| i.subject.as_str()))
        && listed(&rule.accounts, identity.map(|i| i.account.as_str()))
        && any_of(&rule.groups, identity.map_or(&[], |i| i.groups()))
        && any_of(&rule.scopes, identity.map_or(&[], |i| i.scopes()))
        && sources_match(rule, ask)
        && clients_match(rule, ask.client)
        && claims_match(rule, identity)
        && rule
            .paths
            .as_ref()
            .is_none_or(|paths| paths_match(paths, ask.path, readings))
}

fn sources_match(rule: &Rule, ask: &Ask<'_>) -> bool {
    let Some(sources) = &rule.sources else {
        return true;
    };
    sources.iter().any(|s| match s {
        RuleSource::Dialect(source) => ask.source == Some(source),
        // A token exchanged for a certificate carries the certificate's DN.
        RuleSource::X509 => ask.identity.is_some_and(|i| i.dn.is_some()),
    })
}

fn clients_match(rule: &Rule, client: IpAddr) -> bool {
    let Some(networks) = &rule.clients else {
        return true;
    };
    let client = client.to_canonical();
    networks.iter().any(|n| n.contains(&client))
}

fn claims_match(rule: &Rule, identity: Option<&Identity>) -> bool {
    rule.claims.iter().all(|(name, wanted)| {
        identity
            .and_then(|i| i.claim(name))
            .is_some_and(|have| have.iter().any(|h| wanted.iter().any(|w| **w == **h)))
    })
}

/// Whether `path` lies under one of `paths`, as [`Paths`] says. The path as it is always
/// counts; case-insensitively too for a deny rule; the other readings only when the path has
/// anything they would read differently.
fn paths_match(paths: &[String], path: &str, readings: Paths) -> bool {
    let under = |read: &str, fold: bool| paths.iter().any(|p| path::under_read(read, p, fold));
    match readings {
        Paths::AnyReading => {
            under(path, false)
                || under(path, true)
                || (path::has_other_readings(path)
                    && Reading::ALL.iter().any(|r| match r.read(path) {
                        Ok(read) => under(&read, r.folds()),
                        // A path some reading cannot make sense of is refused before this.
                        Err(_) => true,
                    }))
        }
        Paths::EveryReading => {
            under(path, false)
                && (!path::has_other_readings(path)
                    || Reading::ALL.iter().all(|r| match r.read(path) {
                        Ok(read) => under(&read, false),
                        Err(_) => false,
                    }))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::{principal, Facts, ValidatedBy};
    use proptest::prelude::*;

    fn identity(
        subject: &str,
        groups: &[&str],
        scopes: &[&str],
        claims: &[(&str, &[&str])],
    ) -> Identity {
        let mut identity = Identity::of(principal(subject, subject, None), ValidatedBy::Static);
        identity.facts = Facts {
            groups: groups.iter().map(|g| (*g).into()).collect(),
            scopes: scopes.iter().map(|s| (*s).into()).collect(),
            claims: claims
                .iter()
                .map(|(n, v)| ((*n).into(), v.iter().map(|x| (*x).into()).collect()))
                .collect(),
        }
        .boxed();
        identity
    }

    fn route(deny: Vec<Rule>, allow: Vec<Rule>) -> RouteConfig {
        let text = "[[route]]\npath_prefix = \"/\"\nupstream = \"http://127.0.0.1:1\"\n";
        let mut config = crate::config::Config::parse(std::path::Path::new("t.toml"), text)
            .expect("config")
            .routes
            .remove(0);
        config.deny = deny;
        config.allow = allow;
        config
    }

    fn ask<'a>(method: &'a Method, path: &'a str, identity: Option<&'a Identity>) -> Ask<'a> {
        Ask {
            method,
            path,
            identity,
            source: None,
            client: "192.0.2.7".parse().unwrap(),
        }
    }

    #[test]
    fn deny_comes_first_and_allow_rules_need_a_match() {
        let reader = identity("ann", &[], &["read"], &[]);
        let ops = identity("olga", &["ops"], &[], &[]);
        let deny_admin = Rule {
            label: "deny[0]".into(),
            paths: Some(vec!["/admin".into()]),
            groups: None,
            ..Rule::default()
        };
        let read_only = Rule {
            label: "allow[0]".into(),
            methods: Some(vec![Method::GET, Method::HEAD]),
            scopes: Some(vec!["read".into()]),
            ..Rule::default()
        };
        let ops_all = Rule {
            label: "allow[1]".into(),
            groups: Some(vec!["ops".into()]),
            ..Rule::default()
        };
        let r = route(vec![deny_admin], vec![read_only, ops_all]);
        let get = Method::GET;
        let post = Method::POST;
        assert_eq!(authorize(&r, &ask(&get, "/files", Some(&reader))), Ok(()));
        assert_eq!(
            authorize(&r, &ask(&post, "/files", Some(&reader))),
            Err("no allow")
        );
        assert_eq!(authorize(&r, &ask(&post, "/files", Some(&ops))), Ok(()));
        // Deny wins over an allow that matches, under every reading of the path.
        for path in [
            "/admin",
            "/admin/x",
            "/ADMIN/x",
            "/admin;v=1/x",
            "/x%2f..%2fadmin",
            "/admin./x",
        ] {
            assert_eq!(
                authorize(&r, &ask(&get, path, Some(&ops))),
                Err("deny[0]"),
                "{path}"
            );
        }
        assert_eq!(
            authorize(&r, &ask(&get, "/administrator", Some(&ops))),
            Ok(())
        );
    }

    #[test]
    fn an_allowed_path_must_be_allowed_under_every_reading() {
        let someone = identity("s", &[], &[], &[]);
        let public = Rule {
            label: "allow[0]".into(),
            paths: Some(vec!["/public".into()]),
            ..Rule::default()
        };
        let r = route(vec![], vec![public]);
        let get = Method::GET;
        assert_eq!(
            authorize(&r, &ask(&get, "/public/a", Some(&someone))),
            Ok(())
        );
        // Read as /private/x by an upstream that decodes %2f.
        assert_eq!(
            authorize(&r, &ask(&get, "/public%2f..%2fprivate/x", Some(&someone))),
            Err("no allow")
        );
        assert_eq!(
            authorize(&r, &ask(&get, "/PUBLIC/a", Some(&someone))),
            Err("no allow")
        );
    }

    #[test]
    fn claims_match_on_containment_and_need_every_claim() {
        let who = identity(
            "c",
            &[],
            &[],
            &[
                ("realm_access.roles", &["viewer", "editor"]),
                ("tenant", &["7"]),
            ],
        );
        let rule = |claims: Vec<(&str, Vec<&str>)>| Rule {
            label: "allow[0]".into(),
            claims: claims
                .into_iter()
                .map(|(n, v)| (n.to_string(), v.into_iter().map(String::from).collect()))
                .collect(),
            ..Rule::default()
        };
        let get = Method::GET;
        let yes = route(
            vec![],
            vec![rule(vec![
                ("realm_access.roles", vec!["editor"]),
                ("tenant", vec!["7", "8"]),
            ])],
        );
        assert_eq!(authorize(&yes, &ask(&get, "/", Some(&who))), Ok(()));
        let no = route(
            vec![],
            vec![rule(vec![
                ("realm_access.roles", vec!["editor"]),
                ("tenant", vec!["9"]),
            ])],
        );
        assert_eq!(authorize(&no, &ask(&get, "/", Some(&who))), Err("no allow"));
        let absent = route(vec![], vec![rule(vec![("missing", vec!["x"])])]);
        assert_eq!(
            authorize(&absent, &ask(&get, "/", Some(&who))),
            Err("no allow")
        );
    }

    /// A rule set and identity drawn at random: the decision equals a plain reading of the
    /// SPEC (deny first; with allow rules one must match; and within a rule, or within a key).
    fn reference(
        deny: &[Rule],
        allow: &[Rule],
        method: &str,
        groups: &[&str],
        scopes: &[&str],
        client: IpAddr,
    ) -> bool {
        let key_ok = |rule: &Rule| {
            let methods = rule
                .methods
                .as_ref()
                .is_none_or(|m| m.iter().any(|x| x.as_str() == method));
            let groups = rule
                .groups
                .as_ref()
                .is_none_or(|g| g.iter().any(|x| groups.contains(&x.as_str())));
            let scopes = rule
                .scopes
                .as_ref()
                .is_none_or(|s| s.iter().any(|x| scopes.contains(&x.as_str())));
            let clients = rule
                .clients
                .as_ref()
                .is_none_or(|c| c.iter().any(|n| n.contains(&client)));
            methods && groups && scopes && clients
        };
        if deny.iter().any(key_ok) {
            return false;
        }
        allow.is_empty() || allow.iter().any(key_ok)
    }

    fn arb_rule(label: &'static str) -> impl Strategy<Value = Rule> {
        let names = ["a", "b", "c"];
        let list =
            move || proptest::option::of(proptest::sample::subsequence(names.to_vec(), 1..=3));
        (
            proptest::option::of(proptest::sample::subsequence(
                vec!["GET", "POST", "DELETE"],
                1..=3,
            )),
            list(),
            list(),
            proptest::option::of(proptest::sample::subsequence(
                vec!["10.0.0.0/8", "192.0.2.0/24"],
                1..=2,
            )),
        )
            .prop_map(move |(methods, groups, scopes, clients)| Rule {
                label: label.to_string(),
                methods: methods.map(|m| {
                    m.iter()
                        .map(|x| Method::from_bytes(x.as_bytes()).unwrap())
                        .collect()
                }),
                groups: groups.map(|g| g.iter().map(|x| x.to_string()).collect()),
                scopes: scopes.map(|s| s.iter().map(|x| x.to_string()).collect()),
                clients: clients.map(|c| c.iter().map(|x| x.parse().unwrap()).collect()),
                ..Rule::default()
            })
    }

    proptest! {
        #[test]
        fn decisions_follow_the_spec(
            deny in proptest::collection::vec(arb_rule("deny[0]"), 0..3),
            allow in proptest::collection::vec(arb_rule("allow[0]"), 0..3),
            method in proptest::sample::select(vec!["GET", "POST", "DELETE"]),
            groups in proptest::sample::subsequence(vec!["a", "b", "c"], 0..=3),
            scopes in proptest::sample::subsequence(vec!["a", "b", "c"], 0..=3),
            client in proptest::sample::select(vec!["10.1.2.3", "192.0.2.9", "198.51.100.1"]),
        ) {
            let who = identity("p", &groups, &scopes, &[]);
            let r = route(deny.clone(), allow.clone());
            let m = Method::from_bytes(method.as_bytes()).unwrap();
            let client: IpAddr = client.parse().unwrap();
            let asked = Ask { method: &m, path: "/x", identity: Some(&who), source: None, client };
            let expected = reference(&deny, &allow, method, &groups, &scopes, client);
            prop_assert_eq!(authorize(&r, &asked).is_ok(), expected);
        }
    }
}
