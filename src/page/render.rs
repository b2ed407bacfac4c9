//! The token page's HTML: server-rendered, every value escaped, no inline script or style (the
//! Content-Security-Policy allows neither), the stable hooks SPEC §5 names (`form#create`,
//! `#new-token`, `table#tokens`, `tr[data-id]`, `button.revoke`).

use std::fmt::Write as _;
use std::time::Duration;

use crate::store::TokenRecord;

/// `text` safe in HTML text and in quoted attribute values.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// A message above the list.
pub enum Notice {
    /// Something worked.
    Done(String),
    /// Something was refused.
    Problem(String),
}

/// One lifetime the create form offers.
pub struct Lifetime {
    /// The form value (`"30d"`, `"0"` for never).
    pub value: String,
    /// What the user reads.
    pub label: String,
    /// Whether it is preselected.
    pub selected: bool,
}

/// One scope the create form offers (a checkbox per `[tokens] scopes`).
pub struct ScopeChoice {
    /// The scope's name.
    pub name: String,
    /// Whether it is checked (the caller's allowance, or a refused form's choice).
    pub checked: bool,
    /// Whether the caller may give it (else shown, disabled).
    pub allowed: bool,
}

/// Everything the page shows.
pub struct View<'a> {
    /// `[endpoints] tokens_prefix`.
    pub prefix: &'a str,
    /// Who is signed in.
    pub subject: &'a str,
    /// The account their tokens act as.
    pub account: &'a str,
    /// Their tokens, oldest first.
    pub tokens: &'a [TokenRecord],
    /// The CSRF token every form carries.
    pub csrf: &'a str,
    /// The token just created: its secret (shown once) and record.
    pub created: Option<(&'a str, &'a TokenRecord)>,
    /// A message.
    pub notice: Option<Notice>,
    /// The create form's lifetimes; `None`: creation is off (`self_service = false`).
    pub lifetimes: Option<Vec<Lifetime>>,
    /// The name the create form keeps after a refused create.
    pub name: &'a str,
    /// The create form's scopes; empty when `[tokens] scopes` names none.
    pub scopes: Vec<ScopeChoice>,
}

/// The head of every page, up to and including `<main>`.
fn head(out: &mut String, prefix: &str, title: &str) {
    let prefix = escape(prefix);
    let _ = write!(
        out,
        "<!doctype html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n\
         <title>{title}</title>\n\
         <link rel=\"stylesheet\" href=\"{prefix}/page.css\">\n\
         <script src=\"{prefix}/page.js\" defer></script>\n</head>\n<body>\n\
         <header class=\"bar\"><span class=\"brand\">tokengate</span></header>\n<main>\n",
        title = escape(title),
    );
}

fn foot(out: &mut String) {
    out.push_str("</main>\n</body>\n</html>\n");
}

/// A page with a heading and one paragraph (sign-in required, refusals, outages).
pub fn message(prefix: &str, title: &str, text: &str) -> String {
    let mut out = String::with_capacity(1024);
    head(&mut out, prefix, title);
    let _ = write!(
        out,
        "<section class=\"card\">\n<h1>{}</h1>\n<p>{}</p>\n</section>\n",
        escape(title),
        escape(text)
    );
    foot(&mut out);
    out
}

/// The token page.
pub fn page(view: &View<'_>) -> String {
    let prefix = escape(view.prefix);
    let csrf = escape(view.csrf);
    let mut out = String::with_capacity(8192);
    head(&mut out, view.prefix, "API tokens");
    let _ = write!(
        out,
        "<div class=\"title\">\n<h1>API tokens</h1>\n\
         <p class=\"who\">Signed in as <strong>{}</strong>{}</p>\n</div>\n\
         <p class=\"lead\">A token acts as you on this API. Send it as \
         <code>Authorization: Bearer &lt;token&gt;</code> (or in the header your client uses). \
         Revoke it here when you no longer need it.</p>\n",
        escape(view.subject),
        if view.account == view.subject {
            String::new()
        } else {
            format!(" (account <strong>{}</strong>)", escape(view.account))
        },
    );
    match &view.notice {
        Some(Notice::Done(text)) => {
            let _ = writeln!(
                out,
                "<p class=\"notice done\" role=\"status\">{}</p>",
                escape(text)
            );
        }
        Some(Notice::Problem(text)) => {
            let _ = writeln!(
                out,
                "<p class=\"notice problem\" role=\"alert\">{}</p>",
                escape(text)
            );
        }
        None => {}
    }
    if let Some((secret, record)) = view.created {
        let _ = write!(
            out,
            "<section class=\"card secret\" aria-labelledby=\"new-token-title\">\n\
             <h2 id=\"new-token-title\">New token{}</h2>\n\
             <p>Copy it now: it is shown only once. Expires: {}.</p>\n\
             <div class=\"copy\">\n<label class=\"hidden\" for=\"new-token\">New token</label>\n\
             <input id=\"new-token\" type=\"text\" readonly value=\"{}\" autocomplete=\"off\" \
             spellcheck=\"false\" autocapitalize=\"off\">\n\
             <button type=\"button\" id=\"copy\" class=\"button\" hidden>Copy</button>\n\
             <span id=\"copy-status\" class=\"hidden\" role=\"status\"></span>\n</div>\n\
             </section>\n",
            if record.name.is_empty() {
                String::new()
            } else {
                format!(" “{}”", escape(&record.name))
            },
            record
                .expires_ms
                .map_or_else(|| "never".to_string(), shown_time),
            escape(secret),
        );
    }
    if let Some(lifetimes) = &view.lifetimes {
        let _ = write!(
            out,
            "<section class=\"card\" aria-labelledby=\"create-title\">\n\
             <h2 id=\"create-title\">Create a token</h2>\n\
             <form id=\"create\" method=\"post\" action=\"{prefix}/\">\n\
             <input type=\"hidden\" name=\"csrf\" value=\"{csrf}\">\n\
             <div class=\"field\"><label for=\"name\">Name</label>\n\
             <input id=\"name\" name=\"name\" type=\"text\" maxlength=\"100\" value=\"{}\" \
             placeholder=\"e.g. CI deploy\" autocomplete=\"off\"></div>\n\
             <div class=\"field\"><label for=\"ttl\">Expires after</label>\n\
             <select id=\"ttl\" name=\"ttl\">\n",
            escape(view.name),
        );
        for l in lifetimes {
            let _ = writeln!(
                out,
                "<option value=\"{}\"{}>{}</option>",
                escape(&l.value),
                if l.selected { " selected" } else { "" },
                escape(&l.label)
            );
        }
        out.push_str("</select></div>\n");
        scope_choices(&mut out, &view.scopes);
        out.push_str(
            "<button type=\"submit\" class=\"button primary\">Create token</button>\n\
             </form>\n</section>\n",
        );
    }
    tokens_table(&mut out, view, &prefix, &csrf);
    foot(&mut out);
    out
}

/// The create form's scope checkboxes, and the marker that says the form chose (so that none
/// checked is a token with no scopes, not the default).
fn scope_choices(out: &mut String, scopes: &[ScopeChoice]) {
    if scopes.is_empty() {
        return;
    }
    out.push_str(
        "<fieldset class=\"field scopes\"><legend>Scopes</legend>\n\
         <input type=\"hidden\" name=\"scopes-chosen\" value=\"1\">\n",
    );
    for (i, scope) in scopes.iter().enumerate() {
        let name = escape(&scope.name);
        let _ = writeln!(
            out,
            "<label for=\"scope-{i}\"><input id=\"scope-{i}\" type=\"checkbox\" name=\"scope\" \
             value=\"{name}\"{}{}> {name}{}</label>",
            if scope.checked { " checked" } else { "" },
            if scope.allowed { "" } else { " disabled" },
            if scope.allowed {
                ""
            } else {
                " <span class=\"muted\">(not for your sign-in)</span>"
            },
        );
    }
    out.push_str("</fieldset>\n");
}

fn tokens_table(out: &mut String, view: &View<'_>, prefix: &str, csrf: &str) {
    // A Scopes column only where tokens can have scopes.
    let scoped = !view.scopes.is_empty() || view.tokens.iter().any(|t| !t.scopes.is_empty());
    let _ = write!(
        out,
        "<section class=\"card\" aria-labelledby=\"tokens-title\">\n\
         <h2 id=\"tokens-title\">Your tokens</h2>\n\
         <table id=\"tokens\">\n<thead><tr><th scope=\"col\">Name</th><th scope=\"col\">Id</th>\
         {}<th scope=\"col\">Created (UTC)</th><th scope=\"col\">Expires (UTC)</th>\
         <th scope=\"col\">Last used (UTC)</th><th scope=\"col\"><span class=\"hidden\">Actions</span></th>\
         </tr></thead>\n<tbody>\n",
        if scoped {
            "<th scope=\"col\">Scopes</th>"
        } else {
            ""
        },
    );
    if view.tokens.is_empty() {
        let _ = writeln!(
            out,
            "<tr class=\"empty\"><td colspan=\"{}\">No tokens yet.</td></tr>",
            if scoped { 7 } else { 6 }
        );
    }
    for t in view.tokens {
        let id = escape(&t.id);
        let name = if t.name.is_empty() {
            "(unnamed)".to_string()
        } else {
            escape(&t.name)
        };
        let scopes = match (scoped, t.scopes.is_empty()) {
            (false, _) => String::new(),
            (true, true) => "<td data-label=\"Scopes\" class=\"scopes\">None</td>".to_string(),
            (true, false) => format!(
                "<td data-label=\"Scopes\" class=\"scopes\">{}</td>",
                escape(&t.scopes.join(", "))
            ),
        };
        let _ = write!(
            out,
            "<tr data-id=\"{id}\"><td data-label=\"Name\">{name}</td>\
             <td data-label=\"Id\"><code>{id}</code></td>{scopes}\
             <td data-label=\"Created\">{}</td><td data-label=\"Expires\">{}</td>\
             <td data-label=\"Last used\">{}</td>\
             <td class=\"actions\"><form method=\"post\" action=\"{prefix}/revoke\">\
             <input type=\"hidden\" name=\"csrf\" value=\"{csrf}\">\
             <input type=\"hidden\" name=\"id\" value=\"{id}\">\
             <button type=\"submit\" class=\"button revoke\" aria-label=\"Revoke {name} ({id})\">\
             Revoke</button></form></td></tr>",
            time_cell(Some(t.created_ms), ""),
            time_cell(t.expires_ms, "Never"),
            time_cell(t.last_used_ms, "Never"),
        );
        out.push('\n');
    }
    out.push_str("</tbody>\n</table>\n</section>\n");
}

/// A `<time>` element (UTC, as the column heading says), or `none` for no time.
fn time_cell(ms: Option<i64>, none: &str) -> String {
    match ms {
        Some(ms) => {
            let shown = shown_time(ms);
            format!(
                "<time datetime=\"{}\">{}</time>",
                crate::clock::rfc3339(ms),
                shown.trim_end_matches(" UTC")
            )
        }
        None => none.to_string(),
    }
}

/// `2026-11-27 10:40 UTC`.
fn shown_time(ms: i64) -> String {
    let rfc = crate::clock::rfc3339(ms);
    // `2026-11-27T10:40:05Z` → date and minutes.
    match (rfc.get(..10), rfc.get(11..16)) {
        (Some(date), Some(time)) => format!("{date} {time} UTC"),
        _ => rfc,
    }
}

/// How a lifetime reads: `1 day`, `30 days`, `1 year`, `12 hours`.
pub fn lifetime_label(ttl: Duration) -> String {
    const DAY: u64 = 24 * 3600;
    let secs = ttl.as_secs();
    let plural = |n: u64, unit: &str| {
        if n == 1 {
            format!("1 {unit}")
        } else {
            format!("{n} {unit}s")
        }
    };
    if secs == 0 {
        "Never".to_string()
    } else if secs.is_multiple_of(365 * DAY) {
        plural(secs / (365 * DAY), "year")
    } else if secs.is_multiple_of(DAY) {
        plural(secs / DAY, "day")
    } else if secs.is_multiple_of(3600) {
        plural(secs / 3600, "hour")
    } else {
        crate::config::format_duration(ttl)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escape_covers_text_and_attributes() {
        assert_eq!(
            escape("<script>alert(\"x\" & 'y')</script>"),
            "&lt;script&gt;alert(&quot;x&quot; &amp; &#39;y&#39;)&lt;/script&gt;"
        );
    }

    #[test]
    fn lifetimes_read_as_people_say_them() {
        let day = 24 * 3600;
        assert_eq!(lifetime_label(Duration::from_secs(day)), "1 day");
        assert_eq!(lifetime_label(Duration::from_secs(30 * day)), "30 days");
        assert_eq!(lifetime_label(Duration::from_secs(365 * day)), "1 year");
        assert_eq!(lifetime_label(Duration::from_secs(12 * 3600)), "12 hours");
        assert_eq!(lifetime_label(Duration::ZERO), "Never");
    }

    #[test]
    fn times_are_shown_to_the_minute() {
        assert_eq!(shown_time(0), "1970-01-01 00:00 UTC");
    }
}
