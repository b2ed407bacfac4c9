//! The Helm chart in `helm/tokengate` (SPEC §8): each values file in `helm/tokengate/ci/` is
//! rendered with helm-render, the stand-in for `helm template` in
//! `../shared/tools/helm-render` (helm itself is not installable here), every manifest is parsed
//! as YAML and checked, and the tokengate config the chart renders into its ConfigMap is run
//! through the real `tokengate check`.
//!
//! Not covered here: a real cluster, `helm lint`'s schema checks, the Docker image.

use serde_norway::Value;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");
const CONFIG_PATH: &str = "/etc/tokengate/tokengate.toml";
const ADMIN_PORT: u64 = 9901;

fn chart_dir() -> PathBuf {
    Path::new(ROOT).join("helm/tokengate")
}

/// Builds helm-render once per test run (its build script installs Go from apt when missing).
fn helm_render() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let script = Path::new(ROOT).join("../shared/tools/helm-render/build.sh");
        let out = Command::new("bash")
            .arg(&script)
            .output()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
        assert!(
            out.status.success(),
            "{} failed:\n{}",
            script.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        let stdout = String::from_utf8(out.stdout).expect("utf-8 path");
        let path = PathBuf::from(stdout.lines().last().expect("a path").trim());
        assert!(
            path.is_file(),
            "helm-render not built at {}",
            path.display()
        );
        path
    })
}

/// The manifests of one render.
struct Rendered {
    docs: Vec<Value>,
}

/// Renders the chart with `ci/<values>` (if any) and `--set` assignments; `Err(stderr)` when
/// the render fails.
fn try_render(values: Option<&str>, sets: &[&str]) -> Result<Rendered, String> {
    let mut cmd = Command::new(helm_render());
    cmd.args(["--name", "demo", "--namespace", "apps"]);
    if let Some(values) = values {
        cmd.arg("-f").arg(chart_dir().join("ci").join(values));
    }
    for set in sets {
        cmd.args(["--set", set]);
    }
    let out = cmd.arg(chart_dir()).output().expect("run helm-render");
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    let text = String::from_utf8(out.stdout).expect("utf-8 manifests");
    // Split into documents on the `---` separator lines, as `helm template` prints them.
    let mut docs = Vec::new();
    let mut current = String::new();
    for line in text.lines().chain(std::iter::once("---")) {
        if line == "---" {
            if !current.trim().is_empty() {
                let doc: Value = serde_norway::from_str(&current)
                    .unwrap_or_else(|e| panic!("invalid YAML: {e}\n{current}"));
                if !doc.is_null() {
                    docs.push(doc);
                }
            }
            current.clear();
        } else {
            current.push_str(line);
            current.push('\n');
        }
    }
    Ok(Rendered { docs })
}

fn render(values: &str, sets: &[&str]) -> Rendered {
    try_render(Some(values), sets).unwrap_or_else(|e| panic!("rendering {values} failed: {e}"))
}

impl Rendered {
    fn all(&self, kind: &str) -> Vec<&Value> {
        self.docs.iter().filter(|d| d["kind"] == kind).collect()
    }

    /// The one object of this kind.
    fn one(&self, kind: &str) -> &Value {
        let found = self.all(kind);
        assert_eq!(found.len(), 1, "expected one {kind}, got {}", found.len());
        found[0]
    }

    fn deployment(&self) -> &Value {
        self.one("Deployment")
    }

    fn pod(&self) -> &Value {
        &self.deployment()["spec"]["template"]
    }

    fn container(&self, name: &str) -> &Value {
        seq(&self.pod()["spec"]["containers"])
            .iter()
            .find(|c| c["name"] == name)
            .unwrap_or_else(|| panic!("no container {name}"))
    }

    fn volume(&self, name: &str) -> Option<&Value> {
        seq(&self.pod()["spec"]["volumes"])
            .iter()
            .find(|v| v["name"] == name)
    }

    /// The tokengate config file from the ConfigMap.
    fn config_text(&self) -> String {
        let text = str_of(&self.one("ConfigMap")["data"]["tokengate.toml"]);
        text.to_string()
    }

    fn config(&self) -> toml::Table {
        let text = self.config_text();
        text.parse()
            .unwrap_or_else(|e| panic!("rendered config is not TOML: {e}\n{text}"))
    }
}

fn seq(v: &Value) -> &Vec<Value> {
    v.as_sequence()
        .unwrap_or_else(|| panic!("expected a list, got {v:?}"))
}

fn str_of(v: &Value) -> &str {
    v.as_str()
        .unwrap_or_else(|| panic!("expected a string, got {v:?}"))
}

fn u64_of(v: &Value) -> u64 {
    v.as_u64()
        .unwrap_or_else(|| panic!("expected a number, got {v:?}"))
}

/// A container port given by name or number, as the containerPort number.
fn resolve_port(container: &Value, port: &Value) -> u64 {
    if let Some(n) = port.as_u64() {
        return n;
    }
    let name = str_of(port);
    seq(&container["ports"])
        .iter()
        .find(|p| p["name"] == name)
        .map(|p| u64_of(&p["containerPort"]))
        .unwrap_or_else(|| panic!("no container port named {name}"))
}

/// An env var of a container.
fn env_var<'a>(container: &'a Value, name: &str) -> Option<&'a Value> {
    container["env"]
        .as_sequence()?
        .iter()
        .find(|e| e["name"] == name)
}

fn mount<'a>(container: &'a Value, name: &str) -> Option<&'a Value> {
    container["volumeMounts"]
        .as_sequence()?
        .iter()
        .find(|m| m["name"] == name)
}

fn toml_str<'a>(table: &'a toml::Table, path: &[&str]) -> &'a str {
    let mut v: &toml::Value = table
        .get(path[0])
        .unwrap_or_else(|| panic!("config has no {}", path[0]));
    for key in &path[1..] {
        v = v
            .get(key)
            .unwrap_or_else(|| panic!("config has no {}", path.join(".")));
    }
    v.as_str()
        .unwrap_or_else(|| panic!("config {} is not a string", path.join(".")))
}

/// What a values file sets, for the checks every render gets.
struct Expect {
    app_image: &'static str,
    app_port: u64,
    gate_port: u64,
    service_port: u64,
}

/// The checks every render must pass: the objects, the two containers, the Service aimed at
/// tokengate, probes and scrape annotations on the admin port, the security context, the
/// config mount and checksum, and the config's listeners and route.
fn check_common(r: &Rendered, e: &Expect) {
    for kind in ["Deployment", "Service", "ConfigMap", "ServiceAccount"] {
        r.one(kind);
    }
    let names: Vec<&str> = seq(&r.pod()["spec"]["containers"])
        .iter()
        .map(|c| str_of(&c["name"]))
        .collect();
    assert_eq!(
        names,
        ["app", "tokengate"],
        "the app and the tokengate sidecar"
    );

    let app = r.container("app");
    assert_eq!(str_of(&app["image"]), e.app_image);
    assert_eq!(resolve_port(app, &Value::from("app")), e.app_port);

    let gate = r.container("tokengate");
    let args: Vec<&str> = seq(&gate["args"]).iter().map(str_of).collect();
    assert_eq!(args[..3], ["serve", "--config", CONFIG_PATH]);
    assert_eq!(resolve_port(gate, &Value::from("tokengate")), e.gate_port);
    assert_eq!(resolve_port(gate, &Value::from("admin")), ADMIN_PORT);

    // The Service reaches tokengate, never the app directly.
    let service = r.one("Service");
    let ports = seq(&service["spec"]["ports"]);
    assert_eq!(ports.len(), 1);
    assert_eq!(u64_of(&ports[0]["port"]), e.service_port);
    let target = resolve_port(gate, &ports[0]["targetPort"]);
    assert_eq!(target, e.gate_port, "Service must target tokengate's port");
    assert_ne!(target, e.app_port);
    let selector = service["spec"]["selector"].as_mapping().expect("selector");
    let labels = &r.pod()["metadata"]["labels"];
    for (k, v) in selector {
        assert_eq!(
            &labels[k.as_str().unwrap()],
            v,
            "Service selector matches the pods"
        );
    }
    assert_eq!(
        &r.deployment()["spec"]["selector"]["matchLabels"],
        &service["spec"]["selector"]
    );

    // Probes on the admin listener.
    for (probe, path) in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")] {
        let get = &gate[probe]["httpGet"];
        assert_eq!(str_of(&get["path"]), path, "{probe}");
        assert_eq!(resolve_port(gate, &get["port"]), ADMIN_PORT, "{probe} port");
    }

    // Prometheus scrape annotations (strings, as Kubernetes requires) and the config checksum.
    let annotations = &r.pod()["metadata"]["annotations"];
    assert_eq!(annotations["prometheus.io/scrape"], "true");
    assert_eq!(
        annotations["prometheus.io/port"],
        ADMIN_PORT.to_string().as_str()
    );
    assert_eq!(annotations["prometheus.io/path"], "/metrics");
    let config_text = r.config_text();
    let digest = ring::digest::digest(
        &ring::digest::SHA256,
        config_text.trim_end_matches('\n').as_bytes(),
    );
    assert_eq!(
        str_of(&annotations["checksum/config"]),
        hex::encode(digest),
        "checksum/config is the sha256 of the rendered config"
    );

    // The sidecar's hardening and resources.
    let sc = &gate["securityContext"];
    assert_eq!(sc["runAsNonRoot"], true);
    assert_eq!(u64_of(&sc["runAsUser"]), 65532);
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert!(seq(&sc["capabilities"]["drop"]).contains(&Value::from("ALL")));
    assert_eq!(sc["seccompProfile"]["type"], "RuntimeDefault");
    for kind in ["requests", "limits"] {
        for resource in ["cpu", "memory"] {
            assert!(
                !gate["resources"][kind][resource].is_null(),
                "tokengate resources.{kind}.{resource}"
            );
        }
    }

    // The config file: the ConfigMap mounted read-only where --config points.
    let config_mount = mount(gate, "config").expect("config mount");
    assert_eq!(config_mount["mountPath"], "/etc/tokengate");
    assert_eq!(config_mount["readOnly"], true);
    assert_eq!(
        &r.volume("config").expect("config volume")["configMap"]["name"],
        &r.one("ConfigMap")["metadata"]["name"]
    );

    let config = r.config();
    assert_eq!(
        toml_str(&config, &["server", "listen"]),
        format!("0.0.0.0:{}", e.gate_port)
    );
    assert_eq!(
        toml_str(&config, &["admin", "listen"]),
        format!("0.0.0.0:{ADMIN_PORT}")
    );
    let first_route = &config["route"].as_array().expect("[[route]]")[0];
    assert_eq!(first_route["path_prefix"].as_str(), Some("/"));
    assert_eq!(
        first_route["upstream"].as_str(),
        Some(format!("http://127.0.0.1:{}", e.app_port).as_str()),
        "the route forwards to the app over loopback"
    );
}

/// Writes the config to `dir` and runs `tokengate check` on it with only `env` set among the
/// variables the chart's config refers to; returns (success, stdout + stderr).
fn tokengate_check(config: &str, dir: &Path, env: &[(&str, &str)]) -> (bool, String) {
    let path = dir.join("tokengate.toml");
    std::fs::write(&path, config).expect("write config");
    let out = Command::new(env!("CARGO_BIN_EXE_tokengate"))
        .arg("check")
        .arg("--config")
        .arg(&path)
        .env_remove("TOKENGATE_CONFIG")
        .env_remove("TOKENGATE_ADMIN_TOKEN")
        .env_remove("TOKENGATE_REDIS_URL")
        .envs(env.iter().copied())
        .output()
        .expect("run tokengate check");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains("config ok"),
        text,
    )
}

fn assert_check_ok(config: &str, dir: &Path, env: &[(&str, &str)]) {
    let (ok, output) = tokengate_check(config, dir, env);
    assert!(
        ok,
        "tokengate check rejected the rendered config:\n{output}\n--- config ---\n{config}"
    );
}

/// A CA, a server certificate signed by it and its key, written where the chart mounts them
/// (`/etc/tokengate/tls/tls.{crt,key}`, `/etc/tokengate/client-ca/ca.crt`) but under `dir`;
/// returns the config with those paths rewritten to the files.
fn with_test_certificates(config: &str, dir: &Path) -> String {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate().expect("ca key");
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("ca params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "helm test CA");
    let ca_cert = ca_params.self_signed(&ca_key).expect("self-sign ca");
    let issuer = Issuer::new(ca_params, ca_key);
    let key = KeyPair::generate().expect("server key");
    let params =
        CertificateParams::new(vec!["demo-tokengate.apps.svc".to_string()]).expect("server params");
    let cert = params.signed_by(&key, &issuer).expect("sign server cert");

    let root = dir.join("etc/tokengate");
    for (file, pem) in [
        ("tls/tls.crt", cert.pem()),
        ("tls/tls.key", key.serialize_pem()),
        ("client-ca/ca.crt", ca_cert.pem()),
    ] {
        let path = root.join(file);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, pem).unwrap();
    }
    let rewritten = config.replace("/etc/tokengate/", &format!("{}/", root.display()));
    assert_ne!(
        rewritten, config,
        "the config names no /etc/tokengate files"
    );
    rewritten
}

#[test]
fn default_values_render_and_pass_check() {
    let r = render("default-values.yaml", &[]);
    check_common(
        &r,
        &Expect {
            app_image: "registry.example/legacy-api:1.4.2",
            app_port: 8080,
            gate_port: 8443,
            service_port: 80,
        },
    );
    let gate = r.container("tokengate");

    // Plain HTTP: no TLS table, no certificate volumes.
    let config = r.config();
    assert!(config["server"].get("tls").is_none());
    assert!(r.volume("tls").is_none() && mount(gate, "tls").is_none());
    assert_eq!(
        str_of(&r.one("Service")["spec"]["ports"][0]["name"]),
        "http"
    );

    // sqlite on an emptyDir at /var/lib/tokengate.
    assert_eq!(toml_str(&config, &["store", "backend"]), "sqlite");
    assert_eq!(
        toml_str(&config, &["store", "path"]),
        "/var/lib/tokengate/tokengate.db"
    );
    assert!(r.volume("data").expect("data volume")["emptyDir"].is_mapping());
    assert_eq!(
        mount(gate, "data").expect("data mount")["mountPath"],
        "/var/lib/tokengate"
    );
    assert_eq!(r.deployment()["spec"]["strategy"]["type"], "RollingUpdate");

    // No admin token, no redis: neither the env vars nor the keys.
    assert!(env_var(gate, "TOKENGATE_ADMIN_TOKEN").is_none());
    assert!(env_var(gate, "TOKENGATE_REDIS_URL").is_none());
    assert!(config["admin"].get("token").is_none());
    assert!(r.all("NetworkPolicy").is_empty());

    // The validator and the default route rewrite.
    let validator = &config["validator"].as_array().unwrap()[0];
    assert_eq!(validator["type"].as_str(), Some("static"));
    assert_eq!(
        validator["token"][0]["sha256"].as_str(),
        Some("7c43ef5ae21d43ce2743f770c68e24def1a43ee2f416d2438410c8af7af2ff2c")
    );
    let route = &config["route"][0];
    assert_eq!(
        route["upstream_auth"]["header"].as_str(),
        Some("auth-token")
    );
    assert_eq!(route["upstream_auth"]["value"].as_str(), Some("{token}"));
    assert_eq!(
        route["identity_headers"]["X-Auth-User"].as_str(),
        Some("{subject}")
    );

    let dir = tempfile::tempdir().unwrap();
    assert_check_ok(&r.config_text(), dir.path(), &[]);
}

#[test]
fn tls_redis_values_render_and_pass_check() {
    let r = render("tls-redis-values.yaml", &[]);
    check_common(
        &r,
        &Expect {
            app_image: "registry.example/insight-api:2.0",
            app_port: 9000,
            gate_port: 8443,
            service_port: 443,
        },
    );
    let gate = r.container("tokengate");
    let config = r.config();

    // TLS from the kubernetes.io/tls Secret, client CA from its own Secret, both read-only.
    assert_eq!(
        r.volume("tls").expect("tls volume")["secret"]["secretName"],
        "insight-api-tls"
    );
    let tls_mount = mount(gate, "tls").expect("tls mount");
    assert_eq!(tls_mount["mountPath"], "/etc/tokengate/tls");
    assert_eq!(tls_mount["readOnly"], true);
    assert_eq!(
        r.volume("client-ca").expect("client-ca volume")["secret"]["secretName"],
        "insight-api-client-ca"
    );
    assert_eq!(
        mount(gate, "client-ca").expect("client-ca mount")["mountPath"],
        "/etc/tokengate/client-ca"
    );
    assert_eq!(
        toml_str(&config, &["server", "tls", "cert"]),
        "/etc/tokengate/tls/tls.crt"
    );
    assert_eq!(
        toml_str(&config, &["server", "tls", "key"]),
        "/etc/tokengate/tls/tls.key"
    );
    assert_eq!(
        toml_str(&config, &["server", "tls", "client_ca"]),
        "/etc/tokengate/client-ca/ca.crt"
    );
    assert_eq!(
        str_of(&r.one("Service")["spec"]["ports"][0]["name"]),
        "https"
    );

    // Redis URL and admin token from Secrets, through env vars the config refers to.
    let redis = &env_var(gate, "TOKENGATE_REDIS_URL").expect("redis env")["valueFrom"];
    assert_eq!(redis["secretKeyRef"]["name"], "tokengate-redis");
    assert_eq!(redis["secretKeyRef"]["key"], "url");
    assert_eq!(toml_str(&config, &["store", "backend"]), "redis");
    assert_eq!(
        toml_str(&config, &["store", "url"]),
        "${env:TOKENGATE_REDIS_URL}"
    );
    let admin = &env_var(gate, "TOKENGATE_ADMIN_TOKEN").expect("admin env")["valueFrom"];
    assert_eq!(admin["secretKeyRef"]["name"], "tokengate-admin");
    assert_eq!(admin["secretKeyRef"]["key"], "token");
    assert_eq!(
        toml_str(&config, &["admin", "token"]),
        "${env:TOKENGATE_ADMIN_TOKEN}"
    );
    // Redis needs no local volume.
    assert!(r.volume("data").is_none() && mount(gate, "data").is_none());
    assert_eq!(u64_of(&r.deployment()["spec"]["replicas"]), 3);

    // The NetworkPolicy admits tokengate's ports only.
    let policy = r.one("NetworkPolicy");
    let ports: Vec<u64> = seq(&policy["spec"]["ingress"][0]["ports"])
        .iter()
        .map(|p| u64_of(&p["port"]))
        .collect();
    assert_eq!(ports, [8443, ADMIN_PORT]);

    // Validators in order, the Bearer rewrite and the identity headers.
    let validators = config["validator"].as_array().unwrap();
    assert_eq!(validators[0]["type"].as_str(), Some("introspect"));
    assert_eq!(
        validators[0]["url"].as_str(),
        Some("http://127.0.0.1:9000/api/whoami")
    );
    assert_eq!(validators[0]["subject"].as_str(), Some("json:/uid"));
    assert_eq!(validators[1]["type"].as_str(), Some("static"));
    let route = &config["route"][0];
    assert_eq!(
        route["upstream_auth"]["value"].as_str(),
        Some("Bearer {token}")
    );
    assert_eq!(
        route["identity_headers"]["X-Client-DN"].as_str(),
        Some("{dn}")
    );

    // `tokengate check` loads the certificate files: real ones at the mounted paths' layout.
    // The redis URL is checked by `tls_redis_config_with_redis_url_passes_check` below; here
    // the same values with the memory store check TLS, client CA and the admin token.
    let dir = tempfile::tempdir().unwrap();
    let memory = render("tls-redis-values.yaml", &["store.backend=memory"]);
    let text = with_test_certificates(&memory.config_text(), dir.path());
    assert_check_ok(
        &text,
        dir.path(),
        &[("TOKENGATE_ADMIN_TOKEN", "admin-secret")],
    );
    // Without the admin token's env var the config is refused, as the pod would be.
    let (ok, output) = tokengate_check(&text, dir.path(), &[]);
    assert!(!ok && output.contains("TOKENGATE_ADMIN_TOKEN"), "{output}");
}

#[test]
fn tls_redis_config_with_redis_url_passes_check() {
    let r = render("tls-redis-values.yaml", &[]);
    let dir = tempfile::tempdir().unwrap();
    let text = with_test_certificates(&r.config_text(), dir.path());
    assert_check_ok(
        &text,
        dir.path(),
        &[
            ("TOKENGATE_ADMIN_TOKEN", "admin-secret"),
            (
                "TOKENGATE_REDIS_URL",
                "redis://:password@redis.apps.svc:6379/0",
            ),
        ],
    );
}

#[test]
fn sqlite_pvc_values_render_and_pass_check() {
    let r = render("sqlite-pvc-values.yaml", &[]);
    check_common(
        &r,
        &Expect {
            app_image: "registry.example/aircloak:19.3",
            app_port: 4000,
            gate_port: 8080,
            service_port: 8080,
        },
    );
    let gate = r.container("tokengate");
    let config = r.config();

    // The store on the existing claim; Recreate, since the claim cannot be attached twice.
    assert_eq!(
        r.volume("data").expect("data volume")["persistentVolumeClaim"]["claimName"],
        "tokengate-store"
    );
    assert_eq!(
        mount(gate, "data").expect("data mount")["mountPath"],
        "/var/lib/tokengate"
    );
    assert_eq!(
        toml_str(&config, &["store", "path"]),
        "/var/lib/tokengate/tokengate.db"
    );
    assert_eq!(r.deployment()["spec"]["strategy"]["type"], "Recreate");
    assert_eq!(
        u64_of(&r.pod()["spec"]["securityContext"]["fsGroup"]),
        65532,
        "the claim is writable by tokengate's group"
    );
    let args: Vec<&str> = seq(&gate["args"]).iter().map(str_of).collect();
    assert_eq!(args[3..], ["--log-format", "text"]);

    // Values reach the config unchanged, escaping included.
    assert_eq!(toml_str(&config, &["server", "max_body_bytes"]), "10MB");
    assert_eq!(config["endpoints"]["insight"].as_bool(), Some(true));
    let sources: Vec<&str> = config["credentials"]["sources"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap())
        .collect();
    assert_eq!(
        sources,
        ["auth-token", "header:X-Api-Key", "cookie:session"]
    );
    let tokens = config["validator"][0]["token"].as_array().unwrap();
    assert_eq!(tokens.len(), 2);
    assert_eq!(tokens[1]["subject"].as_str(), Some("quote\"and\\backslash"));
    assert!(tokens[1].get("account").is_none());

    // auth optional, no credential upstream, and the extra unauthenticated route.
    let routes = config["route"].as_array().unwrap();
    assert_eq!(routes[0]["auth"].as_str(), Some("optional"));
    assert_eq!(routes[0]["preserve_host"].as_bool(), Some(false));
    assert!(routes[0].get("upstream_auth").is_none());
    assert_eq!(routes[1]["path_prefix"].as_str(), Some("/health"));
    assert_eq!(
        routes[1]["upstream"].as_str(),
        Some("http://127.0.0.1:4000")
    );
    assert_eq!(routes[1]["auth"].as_str(), Some("none"));

    let dir = tempfile::tempdir().unwrap();
    assert_check_ok(&r.config_text(), dir.path(), &[]);
}

#[test]
fn a_config_change_changes_the_checksum_annotation() {
    let checksum =
        |r: &Rendered| str_of(&r.pod()["metadata"]["annotations"]["checksum/config"]).to_string();
    let base = checksum(&render("default-values.yaml", &[]));
    assert_eq!(base, checksum(&render("default-values.yaml", &[])));
    assert_ne!(
        base,
        checksum(&render("default-values.yaml", &["config.cache.ttl=2h"]))
    );
    // A change outside the config (the app's image) leaves it alone.
    assert_eq!(
        base,
        checksum(&render("default-values.yaml", &["app.image.tag=1.4.3"]))
    );
}

#[test]
fn bad_values_fail_the_render_with_the_key_named() {
    let cases: &[(Option<&str>, &[&str], &str)] = &[
        (None, &[], "app.image.repository is required"),
        (
            Some("default-values.yaml"),
            &["app.port=8443"],
            "must differ",
        ),
        (
            Some("default-values.yaml"),
            &["tokengate.port=443"],
            "must be 1024 or more",
        ),
        (
            Some("default-values.yaml"),
            &["tls.enabled=true"],
            "tls.enabled needs tls.secretName",
        ),
        (
            Some("default-values.yaml"),
            &["store.backend=redis"],
            "store.redis.urlSecretName",
        ),
        (
            Some("default-values.yaml"),
            &["store.backend=postgres"],
            "store.backend must be",
        ),
        (
            Some("default-values.yaml"),
            &["config.route.path_prefix=/x"],
            "config.route: unknown key \"path_prefix\"",
        ),
    ];
    for (values, sets, message) in cases {
        match try_render(*values, sets) {
            Ok(_) => panic!("{values:?} {sets:?} rendered, expected an error"),
            Err(stderr) => assert!(
                stderr.contains(message),
                "{values:?} {sets:?}: expected {message:?} in:\n{stderr}"
            ),
        }
    }
}

#[test]
fn image_and_chart_agree() {
    let chart = std::fs::read_to_string(chart_dir().join("Chart.yaml")).unwrap();
    let chart: Value = serde_norway::from_str(&chart).unwrap();
    assert_eq!(
        str_of(&chart["appVersion"]),
        env!("CARGO_PKG_VERSION"),
        "the chart's default image tag is the crate's version"
    );
    // The chart passes only args: the image's ENTRYPOINT must be the binary, and its user the
    // one the chart's securityContext runs as.
    let dockerfile = std::fs::read_to_string(Path::new(ROOT).join("Dockerfile")).unwrap();
    assert!(dockerfile.contains(r#"ENTRYPOINT ["/usr/local/bin/tokengate"]"#));
    assert!(dockerfile.contains(&format!(r#"CMD ["serve", "--config", "{CONFIG_PATH}"]"#)));
    assert!(dockerfile.lines().any(|l| l.trim() == "USER 65532:65532"));
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `GET path` over plain HTTP/1.1; the status code, or None while nothing answers.
fn http_status(port: u16, path: &str) -> Option<u16> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream
        .set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .ok()?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    response.split(' ').nth(1)?.parse().ok()
}

/// The probe and scrape paths the chart points Kubernetes at are answered by `tokengate serve`
/// running the chart's rendered config, on the admin port.
#[test]
fn rendered_config_serves_the_probe_and_metrics_paths() {
    let (gate_port, admin_port) = (free_port(), free_port());
    let r = render(
        "default-values.yaml",
        &[
            &format!("tokengate.port={gate_port}"),
            &format!("admin.port={admin_port}"),
            "store.backend=memory",
        ],
    );
    let gate = r.container("tokengate");
    let probes: Vec<(String, u64)> = ["livenessProbe", "readinessProbe"]
        .iter()
        .map(|p| {
            let get = &gate[*p]["httpGet"];
            (
                str_of(&get["path"]).to_string(),
                resolve_port(gate, &get["port"]),
            )
        })
        .collect();
    let scrape_port: u64 = str_of(&r.pod()["metadata"]["annotations"]["prometheus.io/port"])
        .parse()
        .unwrap();
    let scrape_path = str_of(&r.pod()["metadata"]["annotations"]["prometheus.io/path"]);

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tokengate.toml");
    std::fs::write(&path, r.config_text()).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_tokengate"))
        .arg("serve")
        .arg("--config")
        .arg(&path)
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start tokengate serve");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while http_status(admin_port, "/healthz").is_none() {
        if std::time::Instant::now() > deadline || child.try_wait().unwrap().is_some() {
            let _ = child.kill();
            panic!("tokengate serve did not answer on the admin port {admin_port}");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let mut answers = Vec::new();
    for (path, port) in probes
        .iter()
        .map(|(p, port)| (p.as_str(), *port))
        .chain([(scrape_path, scrape_port)])
    {
        answers.push((path.to_string(), http_status(port as u16, path)));
    }
    let _ = child.kill();
    let _ = child.wait();
    for (path, status) in answers {
        assert_eq!(status, Some(200), "GET {path} on the admin port");
    }
}
