//! The Helm chart in `helm/tokengate` (SPEC §8), rendered by `tools/helm-render`, this
//! repository's `helm template` work-alike (Go, built here from Debian's Go packages; helm itself
//! is not installable here). Each values file in `helm/tokengate/ci/` is rendered, every manifest
//! parsed as YAML and checked, and the tokengate config the chart renders is run through the real
//! binary: `tokengate check`, and `tokengate serve` with a token created the way NOTES.txt says.
//! `values.schema.json` is checked to cover every value and to refuse bad ones at render time,
//! and the templates to refuse a config `tokengate check` would refuse (a table defined twice) or
//! a `configFile` that does not fit the pod. The four examples go through the chart as values and
//! as `configFile`. `mode=sidecar`'s patches are merged into a sample Deployment and Service here,
//! with the strategic-merge rules kubectl and kustomize apply, and by the real kubectl
//! (`kubectl patch --local`, and the README's kustomize flow through `kubectl kustomize`).
//! `upstreamSocket` (the app on a Unix socket) is rendered in both modes and served: the rendered
//! config forwards to an app listening on a Unix socket.
//!
//! Without `go` or Debian's Go libraries (or kubectl, or yq, for the tests that run them) the
//! tests print one "skipped:" line each (or fail under TOKENGATE_TEST_STRICT=1). Not covered: a
//! real cluster, helm itself, the Docker image.

mod common;

use common::{free_port, get, missing_tool, post, Gate, Upstream, BIN};
use serde_norway::Value;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");
const CONFIG_PATH: &str = "/etc/tokengate/tokengate.toml";
const ADMIN_PORT: u64 = 9901;
/// The Debian packages helm-render is built from (`.ci/run` installs them).
const GO_PACKAGES: &str = "golang-go golang-github-masterminds-sprig-dev \
golang-gopkg-yaml.v3-dev golang-github-xeipuuv-gojsonschema-dev";
/// Where Debian's Go library packages put their sources (GOPATH mode).
const DEBIAN_GOPATH: &str = "/usr/share/gocode";
/// The libraries helm-render imports, as directories under DEBIAN_GOPATH/src.
const GO_LIBRARIES: [&str; 3] = [
    "github.com/Masterminds/sprig",
    "gopkg.in/yaml.v3",
    "github.com/xeipuuv/gojsonschema",
];
/// The release name every render uses: the chart's objects are `demo-tokengate`.
const RELEASE: &str = "demo";

fn chart_dir() -> PathBuf {
    Path::new(ROOT).join("helm/tokengate")
}

/// The renderer, built once per test run.
#[derive(Clone, Copy)]
struct Helm {
    bin: &'static Path,
}

impl Helm {
    /// Builds `tools/helm-render` into the cargo target dir the first time; `None` (after the
    /// one-line skip notice) when `go` or a Go library package is missing.
    fn get() -> Option<Helm> {
        static BIN: OnceLock<Option<PathBuf>> = OnceLock::new();
        let bin = BIN.get_or_init(build_helm_render).as_deref();
        match bin {
            Some(bin) => Some(Helm { bin }),
            None => {
                missing_tool("go", GO_PACKAGES);
                None
            }
        }
    }

    fn command(&self, values: Option<&str>, sets: &[&str]) -> Command {
        let mut cmd = Command::new(self.bin);
        cmd.args(["--name", RELEASE, "--namespace", "apps"]);
        if let Some(values) = values {
            cmd.arg("-f").arg(chart_dir().join("ci").join(values));
        }
        for set in sets {
            cmd.args(["--set", set]);
        }
        cmd
    }

    /// Renders the chart with `ci/<values>` (if any) and `--set` assignments; `Err(stderr)` when
    /// the render fails.
    fn try_render(&self, values: Option<&str>, sets: &[&str]) -> Result<Rendered, String> {
        self.try_render_with(values, sets, &[])
    }

    /// Like `try_render`, with more helm-render arguments (`--set-file`, `-f FILE`, ...) after
    /// the `--set`s.
    fn try_render_with(
        &self,
        values: Option<&str>,
        sets: &[&str],
        more: &[&std::ffi::OsStr],
    ) -> Result<Rendered, String> {
        let out = self
            .command(values, sets)
            .args(more)
            .arg(chart_dir())
            .output()
            .expect("run helm-render");
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).into_owned());
        }
        let text = String::from_utf8(out.stdout).expect("utf-8 manifests");
        Ok(Rendered {
            docs: yaml_documents(&text),
        })
    }

    fn render(&self, values: &str, sets: &[&str]) -> Rendered {
        self.try_render(Some(values), sets)
            .unwrap_or_else(|e| panic!("rendering {values} failed: {e}"))
    }

    /// NOTES.txt as `helm install` would print it.
    fn notes(&self, sets: &[&str]) -> String {
        let out = self
            .command(None, sets)
            .arg("--notes")
            .arg(chart_dir())
            .output()
            .expect("run helm-render --notes");
        assert!(
            out.status.success(),
            "NOTES.txt failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).expect("utf-8 notes")
    }
}

fn build_helm_render() -> Option<PathBuf> {
    let go_found = Command::new("go")
        .arg("version")
        .output()
        .is_ok_and(|o| o.status.success());
    let libraries_found = GO_LIBRARIES
        .iter()
        .all(|lib| Path::new(DEBIAN_GOPATH).join("src").join(lib).is_dir());
    if !go_found || !libraries_found {
        return None;
    }
    let work = Path::new(env!("CARGO_TARGET_TMPDIR")).join("helm-render");
    let bin = work.join("helm-render");
    // GOPATH mode with Debian's library sources: no module downloads, no network.
    let out = Command::new("go")
        .args(["build", "-o"])
        .arg(&bin)
        .arg("./tools/helm-render")
        .current_dir(ROOT)
        .env("GO111MODULE", "off")
        .env(
            "GOPATH",
            format!("{}:{DEBIAN_GOPATH}", work.join("gopath").display()),
        )
        .env("GOCACHE", work.join("gocache"))
        .env("GOFLAGS", "")
        .env("GOTOOLCHAIN", "local")
        .output()
        .expect("run go build");
    assert!(
        out.status.success(),
        "go build ./tools/helm-render failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Some(bin)
}

/// Splits `helm template` output into documents on the `---` lines and parses each.
fn yaml_documents(text: &str) -> Vec<Value> {
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
    docs
}

/// The manifests of one render.
struct Rendered {
    docs: Vec<Value>,
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
    assert_eq!(
        resolve_port(gate, &Value::from("tokengate-admin")),
        ADMIN_PORT
    );

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
    assert_eq!(
        annotations["kubectl.kubernetes.io/default-container"], "app",
        "kubectl logs and exec pick the app, not tokengate"
    );
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
    let config_mount = mount(gate, "tokengate-config").expect("config mount");
    assert_eq!(config_mount["mountPath"], "/etc/tokengate");
    assert_eq!(config_mount["readOnly"], true);
    assert_eq!(
        &r.volume("tokengate-config").expect("config volume")["configMap"]["name"],
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
    let Some(helm) = Helm::get() else { return };
    let r = helm.render("default-values.yaml", &[]);
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
    assert!(r.volume("tokengate-tls").is_none() && mount(gate, "tokengate-tls").is_none());
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
    assert!(r.volume("tokengate-data").expect("data volume")["emptyDir"].is_mapping());
    assert_eq!(
        mount(gate, "tokengate-data").expect("data mount")["mountPath"],
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
    let Some(helm) = Helm::get() else { return };
    let r = helm.render("tls-redis-values.yaml", &[]);
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
        r.volume("tokengate-tls").expect("tls volume")["secret"]["secretName"],
        "insight-api-tls"
    );
    let tls_mount = mount(gate, "tokengate-tls").expect("tls mount");
    assert_eq!(tls_mount["mountPath"], "/etc/tokengate/tls");
    assert_eq!(tls_mount["readOnly"], true);
    assert_eq!(
        r.volume("tokengate-client-ca").expect("client-ca volume")["secret"]["secretName"],
        "insight-api-client-ca"
    );
    assert_eq!(
        mount(gate, "tokengate-client-ca").expect("client-ca mount")["mountPath"],
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
    assert!(r.volume("tokengate-data").is_none() && mount(gate, "tokengate-data").is_none());
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
    let memory = helm.render("tls-redis-values.yaml", &["store.backend=memory"]);
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
    let Some(helm) = Helm::get() else { return };
    let r = helm.render("tls-redis-values.yaml", &[]);
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
    let Some(helm) = Helm::get() else { return };
    let r = helm.render("sqlite-pvc-values.yaml", &[]);
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
        r.volume("tokengate-data").expect("data volume")["persistentVolumeClaim"]["claimName"],
        "tokengate-store"
    );
    assert_eq!(
        mount(gate, "tokengate-data").expect("data mount")["mountPath"],
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
    let Some(helm) = Helm::get() else { return };
    let checksum =
        |r: &Rendered| str_of(&r.pod()["metadata"]["annotations"]["checksum/config"]).to_string();
    let base = checksum(&helm.render("default-values.yaml", &[]));
    assert_eq!(base, checksum(&helm.render("default-values.yaml", &[])));
    assert_ne!(
        base,
        checksum(&helm.render("default-values.yaml", &["config.cache.ttl=2h"]))
    );
    // A change outside the config (the app's image) leaves it alone.
    assert_eq!(
        base,
        checksum(&helm.render("default-values.yaml", &["app.image.tag=1.4.3"]))
    );
}

/// Cross-value mistakes the schema cannot express fail in the templates, naming the values.
#[test]
fn inconsistent_values_fail_the_render_with_the_keys_named() {
    let Some(helm) = Helm::get() else { return };
    let cases: &[(Option<&str>, &[&str], &str)] = &[
        (None, &[], "app.image.repository is required"),
        (
            Some("default-values.yaml"),
            &["app.port=8443"],
            "must differ",
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
            None,
            &["mode=sidecar"],
            "mode=sidecar needs sidecar.deployment",
        ),
        (
            None,
            &["mode=sidecar", "sidecar.deployment=api"],
            "mode=sidecar needs sidecar.container",
        ),
        (
            None,
            &[
                "mode=sidecar",
                "sidecar.deployment=api",
                "sidecar.container=tokengate",
            ],
            "sidecar.container is your app's container, not tokengate's",
        ),
        (
            None,
            &[
                "mode=sidecar",
                "sidecar.deployment=api",
                "sidecar.container=api",
                "sidecar.service=api",
            ],
            "sidecar.service needs service.port",
        ),
        (
            Some("default-values.yaml"),
            &["config.x509.enabled=true"],
            "config.x509.enabled needs tls.clientCaSecretName",
        ),
        (
            Some("default-values.yaml"),
            &["verify.enabled=true"],
            "verify.enabled needs verify.tokenSecretName",
        ),
        (
            Some("default-values.yaml"),
            &[
                "verify.enabled=true",
                "verify.tokenSecretName=verify",
                "verify.port=9901",
            ],
            "verify.port (9901) must differ",
        ),
        (
            Some("default-values.yaml"),
            &[
                "verify.enabled=true",
                "verify.tokenSecretName=verify",
                "verify.tls=true",
            ],
            "verify.tls needs tls.enabled",
        ),
        (
            Some("default-values.yaml"),
            &["config.limits.shared=true"],
            "config.limits.shared keeps the rate-limit buckets in Redis: it needs store.backend \
             redis (store.backend is sqlite)",
        ),
        (
            Some("default-values.yaml"),
            &["config.limits.shared=true", "store.backend=memory"],
            "it needs store.backend redis (store.backend is memory)",
        ),
        (
            Some("default-values.yaml"),
            &["upstreamSocket=/tmp/app.sock"],
            "upstreamSocket /tmp/app.sock: its folder /tmp is, or is inside, /tmp, which \
             tokengate's container mounts itself",
        ),
        (
            Some("default-values.yaml"),
            &["upstreamSocket=/etc/tokengate/run/app.sock"],
            "its folder /etc/tokengate/run is, or is inside, /etc/tokengate",
        ),
        (
            Some("default-values.yaml"),
            &["upstreamSocket=/var/lib/tokengate/app.sock"],
            "its folder /var/lib/tokengate is, or is inside, /var/lib/tokengate",
        ),
        (
            Some("default-values.yaml"),
            &[
                "upstreamSocket=/run/app/app.sock",
                "app.volumeMounts[0].name=run",
                "app.volumeMounts[0].mountPath=/run/app",
            ],
            "upstreamSocket's folder /run/app is already a mount of app.volumeMounts (run)",
        ),
        (
            Some("default-values.yaml"),
            &["upstreamSocket=/run/app/app.sock", "admin.port=8443"],
            "tokengate.port (8443), admin.port (8443) must differ",
        ),
        (
            Some("default-values.yaml"),
            &["config.route.upstreamAuth.value=${env:UPSTREAM_KEY}"],
            "the rendered config refers to ${env:UPSTREAM_KEY}, which the tokengate container \
             does not have",
        ),
    ];
    for (values, sets, message) in cases {
        match helm.try_render(*values, sets) {
            Ok(_) => panic!("{values:?} {sets:?} rendered, expected an error"),
            Err(stderr) => assert!(
                stderr.contains("execution error at (tokengate/templates/")
                    && stderr.contains(message),
                "{values:?} {sets:?}: expected {message:?} in:\n{stderr}"
            ),
        }
    }
}

/// Wrong types, unknown keys and bad enum values are refused before any template runs, by
/// values.schema.json, with helm's message naming the value.
#[test]
fn bad_values_fail_the_schema_at_render_time() {
    let Some(helm) = Helm::get() else { return };
    let cases: &[(&[&str], &str)] = &[
        // wrong type
        (
            &["tokengate.port=http"],
            "- tokengate.port: Invalid type. Expected: integer, given: string",
        ),
        (
            &["config.cache.ttl=10"],
            "- config.cache.ttl: Invalid type. Expected: string, given: integer",
        ),
        (
            &["tls.enabled=yes"],
            "- tls.enabled: Invalid type. Expected: boolean, given: string",
        ),
        // unknown keys, at the top, nested, and in a validator of a given type
        (
            &["replicas=3"],
            "- (root): Additional property replicas is not allowed",
        ),
        (
            &["config.route.path_prefix=/x"],
            "- config.route: Additional property path_prefix is not allowed",
        ),
        (
            &[
                "config.validators[0].type=introspect",
                "config.validators[0].url=http://127.0.0.1:8080/whoami",
                "config.validators[0].jwksUrl=http://idp/jwks",
            ],
            "- config.validators.0: Additional property jwksUrl is not allowed",
        ),
        // bad enum values
        (
            &["store.backend=postgres"],
            r#"- store.backend: store.backend must be one of the following: "sqlite", "redis", "memory""#,
        ),
        (
            &["mode=daemonset"],
            r#"- mode: mode must be one of the following: "deployment", "sidecar""#,
        ),
        (
            &["config.validators[0].type=ldap"],
            r#"config.validators.0.type must be one of the following: "static", "introspect", "jwt", "oauth2_introspection""#,
        ),
        // rules, rate limits, [limits] and the validators' facts
        (
            &["config.route.deny[0].verbs={DELETE}"],
            "- config.route.deny.0: Additional property verbs is not allowed",
        ),
        (
            &[
                "config.extraRoutes[0].pathPrefix=/admin",
                "config.extraRoutes[0].allow[0].group={admin}",
            ],
            "- config.extraRoutes.0.allow.0: Additional property group is not allowed",
        ),
        (
            &["config.route.allow[0].groups=admin"],
            "- config.route.allow.0.groups: Invalid type. Expected: array, given: string",
        ),
        (
            &["config.route.allow[0].methods={}"],
            "- config.route.allow.0.methods: Array must have at least 1 items",
        ),
        (
            &["config.route.allow[0].claims.org\\.tenant[0].id=7"],
            "- config.route.allow.0.claims.org.tenant.0: Invalid type. Expected: \
             [string,integer,boolean], given: object",
        ),
        (
            &["config.route.rateLimits[0].per=ip", "config.route.rateLimits[0].rate=1/s"],
            r#"- config.route.rateLimits.0.per: config.route.rateLimits.0.per must be one of the following: "subject", "token", "client""#,
        ),
        (
            &["config.route.rateLimits[0].per=client"],
            "- config.route.rateLimits.0: rate is required",
        ),
        (
            &[
                "config.route.rateLimits[0].per=client",
                "config.route.rateLimits[0].rate=100s",
            ],
            "- config.route.rateLimits.0.rate: Does not match pattern",
        ),
        (
            &["config.route.preflight=skip"],
            r#"- config.route.preflight: config.route.preflight must be one of the following: "authenticate", "pass""#,
        ),
        (
            &["config.limits.failedAuthBurst=ten"],
            "- config.limits.failedAuthBurst: Invalid type. Expected: integer, given: string",
        ),
        (
            &["config.limits.shared=yes"],
            "- config.limits.shared: Invalid type. Expected: boolean, given: string",
        ),
        (
            &["config.limits.burst=10"],
            "- config.limits: Additional property burst is not allowed",
        ),
        (
            &[
                "config.validators[0].type=jwt",
                "config.validators[0].secret=0123456789abcdef0123456789abcdef",
                "config.validators[0].audience=7",
            ],
            "- config.validators.0.audience: Invalid type. Expected: [string,array], given: integer",
        ),
        (
            &[
                "config.validators[0].type=introspect",
                "config.validators[0].url=http://127.0.0.1:8080/whoami",
                "config.validators[0].groups=/groups",
            ],
            "- config.validators.0.groups: Does not match pattern",
        ),
        (
            &[
                "config.validators[0].type=jwt",
                "config.validators[0].secret=0123456789abcdef0123456789abcdef",
                "config.validators[0].scopes=json:/scope",
            ],
            "- config.validators.0: Additional property scopes is not allowed",
        ),
        (
            &["config.tokens.scopes={read write}"],
            "- config.tokens.scopes.0: Does not match pattern",
        ),
        // ranges and patterns
        (
            &["tokengate.port=443"],
            "- tokengate.port: Must be greater than or equal to 1024",
        ),
        (
            &["config.credentials.sources={bearer,header}"],
            "- config.credentials.sources.1: Does not match pattern",
        ),
        (
            &["config.validators[0].type=static"],
            "- config.validators.0: tokens is required",
        ),
        // upstreamSocket: an absolute path to a file in a folder, at most 107 characters
        (
            &["upstreamSocket=app.sock"],
            "- upstreamSocket: Does not match pattern",
        ),
        (
            &["upstreamSocket=/run/app/"],
            "- upstreamSocket: Does not match pattern",
        ),
        (
            &["upstreamSocket=/app.sock"],
            "- upstreamSocket: Does not match pattern",
        ),
        (
            &["upstreamSocket=/run/../app.sock"],
            "- upstreamSocket: Does not match pattern",
        ),
        (
            &["upstreamSocket=unix:/run/app/app.sock"],
            "- upstreamSocket: Does not match pattern",
        ),
        (
            &["upstreamSocket=/run/app/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa.sock"],
            "- upstreamSocket: String length must be less than or equal to 107",
        ),
    ];
    for (sets, message) in cases {
        let mut all = vec!["app.image.repository=registry.example/legacy-api"];
        all.extend_from_slice(sets);
        match helm.try_render(None, &all) {
            Ok(_) => panic!("{sets:?} rendered, expected a schema error"),
            Err(stderr) => {
                assert!(
                    stderr.starts_with(
                        "Error: values don't meet the specifications of the schema(s) in the \
                         following chart(s):\ntokengate:\n"
                    ),
                    "{sets:?}: not helm's schema error:\n{stderr}"
                );
                assert!(
                    stderr.contains(message),
                    "{sets:?}: expected {message:?} in:\n{stderr}"
                );
            }
        }
    }

    // A values file is checked the same way, after merging, and every violation is listed.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bad.yaml");
    std::fs::write(
        &file,
        "app:\n  image:\n    repository: x\n    tag: 2.1\ntokengate:\n  logFormat: xml\n",
    )
    .unwrap();
    let out = Command::new(helm.bin)
        .arg("-f")
        .arg(&file)
        .arg(chart_dir())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && out.stdout.is_empty(), "{stderr}");
    assert!(
        stderr.contains("- app.image.tag: Invalid type. Expected: [string,integer], given: number"),
        "an unquoted 2.1 tag is a number: {stderr}"
    );
    assert!(
        stderr.contains(r#"- tokengate.logFormat: tokengate.logFormat must be one of the following: "json", "text""#),
        "{stderr}"
    );

    // A null removes a default, as in helm; the schema sees the merged result.
    helm.render("default-values.yaml", &["config.route.upstreamAuth=null"]);
}

/// Every key of values.yaml is declared in values.schema.json (so no value escapes the check),
/// and every object of fixed keys refuses unknown ones.
#[test]
fn the_schema_covers_every_value() {
    let values: Value =
        serde_norway::from_str(&std::fs::read_to_string(chart_dir().join("values.yaml")).unwrap())
            .unwrap();
    let schema: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(chart_dir().join("values.schema.json")).unwrap(),
    )
    .expect("values.schema.json is JSON");
    let mut checked = 0;
    covers(&schema, &schema, &values, "(root)", &mut checked);
    assert!(checked > 100, "only {checked} values checked");
}

/// Walks `value` and `node` (its schema) together.
fn covers(
    root: &serde_json::Value,
    node: &serde_json::Value,
    value: &Value,
    path: &str,
    checked: &mut usize,
) {
    let node = match node["$ref"].as_str() {
        Some(r) => {
            let name = r.strip_prefix("#/definitions/").expect("local $ref");
            &root["definitions"][name]
        }
        None => node,
    };
    *checked += 1;
    assert!(
        node.get("type").is_some() || node.get("anyOf").is_some(),
        "{path}: the schema gives no type"
    );
    let Some(map) = value.as_mapping() else {
        return;
    };
    let free_form = node["additionalProperties"].is_object() || node.get("properties").is_none();
    if free_form {
        // A Kubernetes object or a string map: its contents are Kubernetes' to check.
        return;
    }
    assert_eq!(
        node["additionalProperties"], false,
        "{path}: unknown keys must be refused"
    );
    for (key, child) in map {
        let key = key.as_str().expect("string keys");
        let Some(child_schema) = node["properties"].get(key) else {
            panic!("{path}.{key} is in values.yaml but not in values.schema.json");
        };
        covers(root, child_schema, child, &format!("{path}.{key}"), checked);
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
    assert!(dockerfile.contains("cargo build --release --locked"));

    // Both images pinned: the builder to an exact Rust release no older than the crate's
    // rust-version, the runtime to a tag.
    let images: Vec<&str> = dockerfile
        .lines()
        .filter_map(|l| l.strip_prefix("FROM "))
        .map(|l| l.split_whitespace().next().unwrap())
        .collect();
    assert_eq!(images.len(), 2, "a build and a runtime stage: {images:?}");
    let rust = images[0]
        .strip_prefix("rust:")
        .and_then(|tag| tag.strip_suffix("-bookworm"))
        .unwrap_or_else(|| panic!("builder {} is not rust:X.Y.Z-bookworm", images[0]));
    let version: Vec<u64> = rust
        .split('.')
        .map(|n| {
            n.parse()
                .unwrap_or_else(|_| panic!("rust:{rust} is not X.Y.Z"))
        })
        .collect();
    assert_eq!(
        version.len(),
        3,
        "rust:{rust} is not an exact X.Y.Z release"
    );
    let minimum: Vec<u64> = env!("CARGO_PKG_RUST_VERSION")
        .split('.')
        .map(|n| n.parse().unwrap())
        .collect();
    assert!(
        version[..2] >= minimum[..2],
        "rust:{rust} is older than rust-version {}",
        env!("CARGO_PKG_RUST_VERSION")
    );
    let (runtime, tag) = images[1].rsplit_once(':').expect("runtime image tag");
    assert!(
        runtime.contains("distroless") && !tag.is_empty() && tag != "latest",
        "runtime image {} must be pinned by tag",
        images[1]
    );
}

/// The chart's config served on this machine: the listeners moved to free loopback ports, the
/// sqlite file to a temporary directory, the app's address (`http://127.0.0.1:8080`, the
/// chart's default app.port) to a test upstream. Each rewritten string must occur exactly once,
/// so a chart change cannot slip past it.
struct Served {
    upstream: Upstream,
    gate: Gate,
    admin_port: u16,
}

fn serve_rendered(config: &str, env: &[(&str, &str)]) -> Served {
    let upstream = Upstream::start();
    let dir = tempfile::tempdir().unwrap();
    let (gate_port, admin_port) = (free_port(), free_port());
    let mut text = config.to_string();
    for (from, to) in [
        (
            "\"0.0.0.0:8443\"".to_string(),
            format!("\"127.0.0.1:{gate_port}\""),
        ),
        (
            format!("\"0.0.0.0:{ADMIN_PORT}\""),
            format!("\"127.0.0.1:{admin_port}\""),
        ),
        (
            "\"/var/lib/tokengate/tokengate.db\"".to_string(),
            format!("\"{}\"", dir.path().join("tokengate.db").display()),
        ),
        (
            "\"http://127.0.0.1:8080\"".to_string(),
            format!("\"http://127.0.0.1:{}\"", upstream.port),
        ),
    ] {
        assert_eq!(
            text.matches(&from).count(),
            1,
            "{from} once in the config:\n{config}"
        );
        text = text.replace(&from, &to);
    }
    let gate = Gate::start_in(dir, &text, env);
    common::wait_port(admin_port);
    Served {
        upstream,
        gate,
        admin_port,
    }
}

/// The first-token command NOTES.txt prints, as argv after `kubectl exec ... --`.
fn notes_token_command(notes: &str) -> (String, Vec<String>) {
    let line = notes
        .lines()
        .find(|l| l.contains("tokengate token create"))
        .unwrap_or_else(|| panic!("NOTES.txt has no `tokengate token create`:\n{notes}"));
    let (kubectl, command) = line
        .split_once(" -- ")
        .expect("kubectl exec ... -- command");
    let command = command.trim().trim_end_matches(')');
    (
        kubectl.to_string(),
        command.split_whitespace().map(String::from).collect(),
    )
}

/// The README's `helm install` (only the app image set: no validator, no admin token) can
/// authenticate someone: the command NOTES.txt gives, run by the real binary against the
/// chart's own config while the server runs, creates a token the server accepts; without a
/// token, or with a wrong one, the request is refused and the app never sees it.
#[tokio::test]
async fn default_install_authenticates_the_token_notes_txt_creates() {
    let Some(helm) = Helm::get() else { return };
    let install = ["app.image.repository=registry.example/legacy-api"];
    let r = helm
        .try_render(None, &install)
        .expect("the README's install renders");
    let config = r.config();
    assert!(config.get("validator").is_none(), "no validator by default");
    assert!(config["admin"].get("token").is_none(), "no admin token");

    // NOTES.txt names the Deployment, the container and the config path the chart renders.
    let notes = helm.notes(&install);
    let (kubectl, argv) = notes_token_command(&notes);
    let deployment = str_of(&r.deployment()["metadata"]["name"]);
    assert!(
        kubectl.contains(&format!("exec deploy/{deployment} -c tokengate")),
        "{kubectl}"
    );
    r.container("tokengate");
    assert_eq!(argv[..3], ["tokengate", "token", "create"], "{argv:?}");
    let config_flag = argv.iter().position(|a| a == "--config").expect("--config");
    assert_eq!(argv[config_flag + 1], CONFIG_PATH);
    assert!(
        notes.contains("port-forward svc/demo-tokengate 8443:80"),
        "how to call it:\n{notes}"
    );
    assert!(notes.contains(r#"curl -H "Authorization: Bearer $TOKEN" http://127.0.0.1:8443/"#));

    let Served { upstream, gate, .. } = serve_rendered(&r.config_text(), &[]);

    get(&gate.url("/"), &[])
        .await
        .assert_error(401, "Credentials required");
    get(
        &gate.url("/"),
        &[("Authorization", "Bearer tg_not-a-real-token")],
    )
    .await
    .assert_error(401, "Invalid credentials");
    assert_eq!(upstream.requests(), 0, "nothing reached the app");

    // `kubectl exec ... -- tokengate token create ...`: the same binary, config and store.
    let mut args = argv[1..].to_vec();
    args[config_flag] = gate.config_path.display().to_string();
    let out = Command::new(BIN)
        .args(&args)
        .output()
        .expect("token create");
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let token = String::from_utf8(out.stdout).unwrap().trim().to_string();
    assert!(
        token.starts_with("tg_") && !token.contains(char::is_whitespace),
        "standard output is the token alone: {token:?}"
    );

    let resp = get(
        &gate.url("/hello"),
        &[("Authorization", &format!("Bearer {token}"))],
    )
    .await;
    assert_eq!(resp.status, 200, "{:?}", resp.body);
    assert_eq!(upstream.requests(), 1, "the app saw the request");
    assert_eq!(resp.echoed("x-auth-user").as_deref(), Some("alice"));
    assert_eq!(
        resp.echoed("auth-token"),
        Some(token),
        "the chart's upstreamAuth"
    );
    assert_eq!(resp.echoed_path(), "/hello");
}

/// With admin.tokenSecretName, the admin token from the Secret reaches tokengate and the admin
/// API call NOTES.txt prints creates a first token that the main listener accepts.
#[tokio::test]
async fn admin_token_from_a_secret_creates_the_first_token() {
    let Some(helm) = Helm::get() else { return };
    let install = [
        "app.image.repository=registry.example/legacy-api",
        "admin.tokenSecretName=tokengate-admin",
    ];
    let r = helm.try_render(None, &install).unwrap();
    let gate_container = r.container("tokengate");
    let secret = &env_var(gate_container, "TOKENGATE_ADMIN_TOKEN").expect("admin env")["valueFrom"];
    assert_eq!(secret["secretKeyRef"]["name"], "tokengate-admin");
    assert_eq!(secret["secretKeyRef"]["key"], "token");

    let notes = helm.notes(&install);
    assert!(
        notes.contains("get secret tokengate-admin -o jsonpath='{.data.token}' | base64 -d"),
        "{notes}"
    );
    let curl = notes
        .lines()
        .find(|l| l.contains("Bearer $ADMIN"))
        .unwrap_or_else(|| panic!("no admin API call in NOTES.txt:\n{notes}"));
    assert!(
        curl.contains(r#"-d '{"user":"alice"}' http://127.0.0.1:9901/tokens"#),
        "{curl}"
    );
    assert!(curl.contains("Content-Type: application/json"), "{curl}");

    let admin_secret = "admin-secret-from-the-secret";
    // `_upstream` is the app: it must live as long as the gate.
    let Served {
        gate,
        admin_port,
        upstream: _upstream,
    } = serve_rendered(&r.config_text(), &[("TOKENGATE_ADMIN_TOKEN", admin_secret)]);

    let admin_url = format!("http://127.0.0.1:{admin_port}/tokens");
    let json = [("Content-Type", "application/json")];
    let refused = post(&admin_url, &json, r#"{"user":"alice"}"#).await;
    assert_eq!(refused.status, 401, "the admin API needs the admin token");
    let bearer = format!("Bearer {admin_secret}");
    let created = post(
        &admin_url,
        &[("Authorization", bearer.as_str()), json[0]],
        r#"{"user":"alice"}"#,
    )
    .await;
    assert_eq!(created.status, 201, "{:?}", created.body);
    let token = created.json()["token"].as_str().unwrap().to_string();

    let resp = get(
        &gate.url("/"),
        &[("Authorization", &format!("Bearer {token}"))],
    )
    .await;
    assert_eq!(resp.status, 200);
    assert_eq!(resp.echoed("x-auth-user").as_deref(), Some("alice"));
    // The admin token is not a user credential on the main listener.
    get(&gate.url("/"), &[("Authorization", bearer.as_str())])
        .await
        .assert_error(401, "Invalid credentials");
}

/// The probe and scrape paths the chart points Kubernetes at are answered by `tokengate serve`
/// running the chart's rendered config, on the admin port.
#[tokio::test]
async fn rendered_config_serves_the_probe_and_metrics_paths() {
    let Some(helm) = Helm::get() else { return };
    let r = helm.render("default-values.yaml", &[]);
    let gate = r.container("tokengate");
    let mut paths: Vec<(String, u64)> = ["livenessProbe", "readinessProbe"]
        .iter()
        .map(|p| {
            let get = &gate[*p]["httpGet"];
            (
                str_of(&get["path"]).to_string(),
                resolve_port(gate, &get["port"]),
            )
        })
        .collect();
    let annotations = &r.pod()["metadata"]["annotations"];
    paths.push((
        str_of(&annotations["prometheus.io/path"]).to_string(),
        str_of(&annotations["prometheus.io/port"]).parse().unwrap(),
    ));

    let served = serve_rendered(&r.config_text(), &[]);
    for (path, port) in paths {
        assert_eq!(port, ADMIN_PORT, "{path} on the admin port");
        let url = format!("http://127.0.0.1:{}{path}", served.admin_port);
        assert_eq!(
            get(&url, &[]).await.status,
            200,
            "GET {path} on the admin port"
        );
    }
}

/// An existing app, as another chart or kustomize would have deployed it, for mode=sidecar.
const EXISTING_DEPLOYMENT: &str = r#"
apiVersion: apps/v1
kind: Deployment
metadata:
  name: legacy-api
  labels: {app: legacy-api}
spec:
  replicas: 2
  selector:
    matchLabels: {app: legacy-api}
  strategy:
    type: RollingUpdate
    rollingUpdate: {maxSurge: 1}
  template:
    metadata:
      labels: {app: legacy-api}
      annotations: {team: payments}
    spec:
      securityContext: {runAsNonRoot: true}
      containers:
        - name: api
          image: registry.example/legacy-api:1.4.2
          ports:
            - {name: http, containerPort: 8080}
          readinessProbe:
            httpGet: {path: /health, port: http}
          volumeMounts:
            - {name: config, mountPath: /etc/legacy}
      volumes:
        - name: config
          configMap: {name: legacy-api-config}
"#;

const EXISTING_SERVICE: &str = r#"
apiVersion: v1
kind: Service
metadata:
  name: legacy-api
spec:
  selector: {app: legacy-api}
  ports:
    - {name: http, port: 80, targetPort: http, protocol: TCP}
"#;

/// Applies a strategic-merge patch the way `kubectl patch` (and kustomize's patches) do for
/// the fields the chart's patches touch: maps merge key by key, `null` deletes, the lists
/// Kubernetes declares with a merge key (containers, volumes and env by name, volumeMounts by
/// mountPath, container ports by containerPort, Service ports by port) merge item by item,
/// other lists and scalars are replaced. A merged list holds the patch's items first, in the
/// patch's order, then the items the patch does not name: the order kubectl patch and kustomize
/// give for the chart's patches (the tests running the real kubectl below check it).
fn strategic_merge(target: &mut Value, patch: &Value, field: &str) {
    match (target, patch) {
        (Value::Mapping(target), Value::Mapping(patch)) => {
            for (key, value) in patch {
                if value.is_null() {
                    target.remove(key);
                } else if let Some(existing) = target.get_mut(key) {
                    strategic_merge(existing, value, key.as_str().unwrap_or(""));
                } else {
                    target.insert(key.clone(), value.clone());
                }
            }
        }
        (Value::Sequence(target), Value::Sequence(patch)) if merge_key(field, patch).is_some() => {
            let key = merge_key(field, patch).unwrap();
            let mut merged = Vec::new();
            for item in patch {
                match target.iter().position(|t| t[key] == item[key]) {
                    Some(i) => {
                        let mut existing = target.remove(i);
                        strategic_merge(&mut existing, item, "");
                        merged.push(existing);
                    }
                    None => merged.push(item.clone()),
                }
            }
            merged.append(target);
            *target = merged;
        }
        (target, patch) => *target = patch.clone(),
    }
}

fn merge_key(field: &str, items: &[Value]) -> Option<&'static str> {
    match field {
        "containers" | "initContainers" | "volumes" | "env" | "imagePullSecrets" => Some("name"),
        "volumeMounts" => Some("mountPath"),
        "ports" if items.iter().all(|p| !p["containerPort"].is_null()) => Some("containerPort"),
        "ports" => Some("port"),
        _ => None,
    }
}

fn names(list: &Value) -> Vec<&str> {
    seq(list).iter().map(|v| str_of(&v["name"])).collect()
}

/// mode=sidecar renders no Deployment, Service or ServiceAccount of its own: the config
/// ConfigMap and a ConfigMap with the patches. Merged into an existing Deployment, the patch
/// adds the same tokengate container the chart's own Deployment has, its volumes and the
/// config checksum, and leaves the app's container, volumes and annotations alone; the Service
/// patch re-aims the existing port at tokengate.
#[test]
fn sidecar_mode_patches_an_existing_deployment_and_service() {
    let Some(helm) = Helm::get() else { return };
    let sidecar = [
        "mode=sidecar",
        "sidecar.deployment=legacy-api",
        "sidecar.container=api",
        "sidecar.service=legacy-api",
        "service.port=80",
    ];
    let r = helm
        .try_render(None, &sidecar)
        .expect("sidecar mode renders");
    for kind in ["Deployment", "Service", "ServiceAccount", "NetworkPolicy"] {
        assert!(r.all(kind).is_empty(), "mode=sidecar renders no {kind}");
    }
    let config_maps = r.all("ConfigMap");
    assert_eq!(config_maps.len(), 2);
    let config_map = config_maps
        .iter()
        .find(|c| c["metadata"]["name"] == "demo-tokengate")
        .expect("the config ConfigMap");
    let config_text = str_of(&config_map["data"]["tokengate.toml"]);
    let patches = config_maps
        .iter()
        .find(|c| c["metadata"]["name"] == "demo-tokengate-sidecar")
        .expect("the patch ConfigMap");
    let patch: Value =
        serde_norway::from_str(str_of(&patches["data"]["deployment-patch.yaml"])).unwrap();
    assert_eq!(patch["kind"], "Deployment");
    assert_eq!(
        patch["metadata"]["name"], "legacy-api",
        "kustomize needs the target's name"
    );

    let original: Value = serde_norway::from_str(EXISTING_DEPLOYMENT).unwrap();
    let mut merged = original.clone();
    strategic_merge(&mut merged, &patch, "");
    let pod = &merged["spec"]["template"];
    let containers = &pod["spec"]["containers"];
    assert_eq!(names(containers), ["api", "tokengate"]);
    assert_eq!(
        seq(containers)[0],
        seq(&original["spec"]["template"]["spec"]["containers"])[0],
        "the app's container is untouched"
    );
    assert_eq!(
        names(&pod["spec"]["volumes"]),
        [
            "tokengate-config",
            "tokengate-data",
            "tokengate-tmp",
            "config"
        ]
    );
    assert_eq!(
        seq(&pod["spec"]["volumes"])[3]["configMap"]["name"],
        "legacy-api-config",
        "the app's volume named config is not merged with tokengate's"
    );
    assert_eq!(
        seq(&pod["spec"]["volumes"])[0]["configMap"]["name"],
        config_map["metadata"]["name"]
    );
    let gate = &seq(containers)[1];
    for m in seq(&gate["volumeMounts"]) {
        assert!(
            names(&pod["spec"]["volumes"]).contains(&str_of(&m["name"])),
            "mount {:?} has a volume",
            m["name"]
        );
    }
    let mut port_names: Vec<&str> = seq(containers)
        .iter()
        .flat_map(|c| seq(&c["ports"]).iter().map(|p| str_of(&p["name"])))
        .collect();
    let count = port_names.len();
    port_names.sort_unstable();
    port_names.dedup();
    assert_eq!(port_names.len(), count, "port names unique in the pod");
    for (probe, path) in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")] {
        assert_eq!(gate[probe]["httpGet"]["path"], path);
        assert_eq!(
            resolve_port(gate, &gate[probe]["httpGet"]["port"]),
            ADMIN_PORT
        );
    }
    let args: Vec<&str> = seq(&gate["args"]).iter().map(str_of).collect();
    assert_eq!(args[..3], ["serve", "--config", CONFIG_PATH]);
    let annotations = &pod["metadata"]["annotations"];
    assert_eq!(
        annotations["team"], "payments",
        "the app's annotations stay"
    );
    assert_eq!(
        annotations["kubectl.kubernetes.io/default-container"],
        "api"
    );
    let digest = ring::digest::digest(
        &ring::digest::SHA256,
        config_text.trim_end_matches('\n').as_bytes(),
    );
    assert_eq!(str_of(&annotations["checksum/config"]), hex::encode(digest));
    assert_eq!(merged["spec"]["strategy"], original["spec"]["strategy"]);
    assert_eq!(
        pod["spec"]["securityContext"],
        original["spec"]["template"]["spec"]["securityContext"]
    );

    // The same container as the chart's own Deployment renders for the same values.
    let own = helm
        .try_render(None, &["app.image.repository=registry.example/legacy-api"])
        .unwrap();
    assert_eq!(gate, own.container("tokengate"), "one container definition");

    // The config forwards to the app's port over loopback, and passes `tokengate check`.
    let config: toml::Table = config_text.parse().unwrap();
    assert_eq!(
        config["route"][0]["upstream"].as_str(),
        Some("http://127.0.0.1:8080")
    );
    let dir = tempfile::tempdir().unwrap();
    assert_check_ok(config_text, dir.path(), &[]);

    // The Service: same port, name and protocol, now aimed at tokengate.
    let service_patch: Value =
        serde_norway::from_str(str_of(&patches["data"]["service-patch.yaml"])).unwrap();
    assert_eq!(service_patch["metadata"]["name"], "legacy-api");
    let mut service: Value = serde_norway::from_str(EXISTING_SERVICE).unwrap();
    strategic_merge(&mut service, &service_patch, "");
    let ports = seq(&service["spec"]["ports"]);
    assert_eq!(ports.len(), 1);
    assert_eq!(ports[0]["name"], "http");
    assert_eq!(ports[0]["protocol"], "TCP");
    assert_eq!(u64_of(&ports[0]["port"]), 80);
    assert_eq!(
        resolve_port(gate, &ports[0]["targetPort"]),
        8443,
        "the Service now reaches tokengate"
    );
    assert_eq!(service["spec"]["selector"]["app"], "legacy-api");

    // NOTES.txt: the commands that fetch and apply exactly these patches, then the first token.
    let notes = helm.notes(&sidecar);
    for line in [
        r"kubectl -n apps get configmap demo-tokengate-sidecar -o jsonpath='{.data.deployment-patch\.yaml}' > tokengate-patch.yaml",
        "kubectl -n apps patch deployment legacy-api --patch-file tokengate-patch.yaml",
        r"kubectl -n apps get configmap demo-tokengate-sidecar -o jsonpath='{.data.service-patch\.yaml}' > tokengate-service-patch.yaml",
        "kubectl -n apps patch service legacy-api --patch-file tokengate-service-patch.yaml",
    ] {
        assert!(notes.contains(line), "NOTES.txt lacks {line:?}:\n{notes}");
    }
    let (kubectl, argv) = notes_token_command(&notes);
    assert!(
        kubectl.contains("exec deploy/legacy-api -c tokengate"),
        "{kubectl}"
    );
    assert!(argv.contains(&CONFIG_PATH.to_string()));
}

/// `ci/sidecar-values.yaml`: mode=sidecar with the sqlite store on a claim: the patch also switches the Deployment to
/// Recreate (dropping rollingUpdate) and adds fsGroup beside the pod's own securityContext;
/// networkPolicy selects the existing pods by sidecar.podSelector.
#[test]
fn sidecar_patch_with_a_claim_and_a_network_policy() {
    let Some(helm) = Helm::get() else { return };
    let r = helm.render("sidecar-values.yaml", &[]);
    let patches = r
        .all("ConfigMap")
        .into_iter()
        .find(|c| c["metadata"]["name"] == "demo-tokengate-sidecar")
        .expect("the patch ConfigMap");
    assert!(
        patches["data"].get("service-patch.yaml").is_none(),
        "no sidecar.service, no Service patch"
    );
    let patch: Value =
        serde_norway::from_str(str_of(&patches["data"]["deployment-patch.yaml"])).unwrap();
    let mut merged: Value = serde_norway::from_str(EXISTING_DEPLOYMENT).unwrap();
    strategic_merge(&mut merged, &patch, "");
    assert_eq!(merged["spec"]["strategy"]["type"], "Recreate");
    assert!(merged["spec"]["strategy"].get("rollingUpdate").is_none());
    let security = &merged["spec"]["template"]["spec"]["securityContext"];
    assert_eq!(security["runAsNonRoot"], true);
    assert_eq!(u64_of(&security["fsGroup"]), 65532);
    let data = seq(&merged["spec"]["template"]["spec"]["volumes"])
        .iter()
        .find(|v| v["name"] == "tokengate-data")
        .expect("data volume");
    assert_eq!(
        data["persistentVolumeClaim"]["claimName"],
        "tokengate-store"
    );

    let policy = r.one("NetworkPolicy");
    assert_eq!(
        policy["spec"]["podSelector"]["matchLabels"],
        merged["spec"]["template"]["metadata"]["labels"]
    );
}

// ---------------------------------------------------------------------------------------------
// upstreamSocket: the app on a Unix socket in an emptyDir both containers mount.

const SOCKET: &str = "/run/app/app.sock";

/// A stand-in app listening on a Unix socket (gunicorn `--bind unix:PATH`): HTTP/1.1 with
/// keep-alive, every answer a 200 with the JSON `{"path", "headers"}` of the request (the
/// shape `Resp::echoed` reads); counts the requests. Stops when dropped.
struct SocketApp {
    requests: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    path: PathBuf,
}

impl SocketApp {
    fn start(path: &Path) -> SocketApp {
        use std::io::{BufRead, BufReader, Write};
        use std::sync::atomic::Ordering;
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        let listener = std::os::unix::net::UnixListener::bind(path).expect("bind the app socket");
        let requests = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = requests.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { return };
                let counter = counter.clone();
                std::thread::spawn(move || {
                    let mut reader = BufReader::new(stream.try_clone().unwrap());
                    let mut writer = stream;
                    loop {
                        let mut line = String::new();
                        if reader.read_line(&mut line).unwrap_or(0) == 0 {
                            return;
                        }
                        let target = line.split_whitespace().nth(1).unwrap_or("").to_string();
                        let mut headers = serde_json::Map::new();
                        loop {
                            let mut h = String::new();
                            if reader.read_line(&mut h).unwrap_or(0) == 0 {
                                return;
                            }
                            let h = h.trim_end();
                            if h.is_empty() {
                                break;
                            }
                            if let Some((name, value)) = h.split_once(':') {
                                headers.insert(
                                    name.trim().to_ascii_lowercase(),
                                    serde_json::Value::from(value.trim()),
                                );
                            }
                        }
                        counter.fetch_add(1, Ordering::SeqCst);
                        let body =
                            serde_json::json!({"path": target, "headers": headers}).to_string();
                        let answer = format!(
                            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\
                             content-length: {}\r\n\r\n{body}",
                            body.len()
                        );
                        if writer.write_all(answer.as_bytes()).is_err() {
                            return;
                        }
                    }
                });
            }
        });
        SocketApp {
            requests,
            path: path.to_path_buf(),
        }
    }

    fn requests(&self) -> usize {
        self.requests.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl Drop for SocketApp {
    fn drop(&mut self) {
        // The accept thread stays blocked until the test process ends (tests are short);
        // the socket's file goes with the test's folder, or here.
        let _ = std::fs::remove_file(&self.path);
    }
}

/// mode=deployment with upstreamSocket: the route (and an extra route's default) goes to
/// `unix:<path>`, the emptyDir tokengate-socket is mounted at the socket's folder in both
/// containers (writable), the app declares no port, NOTES.txt says where the app must listen,
/// and the rendered config, served with its socket moved to a test folder, forwards to an app
/// listening there: a token that `tokengate token create` made gets through, no token gets
/// 401 and the app sees nothing.
#[tokio::test]
async fn upstream_socket_shares_an_empty_dir_with_the_app() {
    let Some(helm) = Helm::get() else { return };
    let sets = [
        "upstreamSocket=/run/app/app.sock",
        "config.extraRoutes[0].pathPrefix=/health",
        "config.extraRoutes[0].auth=none",
    ];
    let r = helm.render("default-values.yaml", &sets);
    assert_eq!(names(&r.pod()["spec"]["containers"]), ["app", "tokengate"]);
    let config = r.config();
    let routes = config["route"].as_array().unwrap();
    assert_eq!(routes.len(), 2);
    for route in routes {
        assert_eq!(
            route["upstream"].as_str(),
            Some("unix:/run/app/app.sock"),
            "{route:?}"
        );
    }
    assert!(!r.config_text().contains("127.0.0.1:8080"));

    let volume = r.volume("tokengate-socket").expect("the socket's volume");
    assert!(volume["emptyDir"].is_mapping(), "{volume:?}");
    let app = r.container("app");
    let gate = r.container("tokengate");
    for container in [app, gate] {
        let m = mount(container, "tokengate-socket").expect("the socket's folder mounted");
        assert_eq!(m["mountPath"], "/run/app");
        assert!(
            m.get("readOnly").is_none(),
            "the app creates its socket there"
        );
    }
    assert!(
        app.get("ports").is_none(),
        "no port of the app is open to the pod's network: {app:?}"
    );
    // The other mounts are still tokengate's own.
    for (name, path) in [
        ("tokengate-config", "/etc/tokengate"),
        ("tokengate-data", "/var/lib/tokengate"),
        ("tokengate-tmp", "/tmp"),
    ] {
        assert_eq!(mount(gate, name).expect(name)["mountPath"], path);
    }
    // The app's own mounts are kept beside the socket's.
    let with_mounts = helm.render(
        "default-values.yaml",
        &[
            "upstreamSocket=/run/app/app.sock",
            "app.volumeMounts[0].name=cache",
            "app.volumeMounts[0].mountPath=/var/cache/app",
            "app.volumes[0].name=cache",
            "app.volumes[0].emptyDir.medium=Memory",
        ],
    );
    let app_mounts: Vec<&str> = seq(&with_mounts.container("app")["volumeMounts"])
        .iter()
        .map(|m| str_of(&m["mountPath"]))
        .collect();
    assert_eq!(app_mounts, ["/var/cache/app", "/run/app"]);
    for name in ["cache", "tokengate-socket"] {
        assert!(with_mounts.volume(name).is_some(), "volume {name}");
    }

    let dir = tempfile::tempdir().unwrap();
    assert_check_ok(&r.config_text(), dir.path(), &[]);

    let notes = helm.notes(&[
        "app.image.repository=registry.example/legacy-api",
        "upstreamSocket=/run/app/app.sock",
    ]);
    assert!(
        notes.contains("forwards it to unix:/run/app/app.sock.")
            && notes.contains("Your container must listen on the Unix socket /run/app/app.sock")
            && !notes.contains("127.0.0.1:8080")
            && !notes.contains("Your container's port"),
        "{notes}"
    );

    // Served: listeners on free loopback ports, the sqlite file and the socket in a test folder.
    let gate_dir = tempfile::tempdir().unwrap();
    let socket = gate_dir.path().join("run/app/app.sock");
    let app = SocketApp::start(&socket);
    let (gate_port, admin_port) = (free_port(), free_port());
    let mut text = r.config_text();
    for (from, to, count) in [
        (
            "\"0.0.0.0:8443\"".to_string(),
            format!("\"127.0.0.1:{gate_port}\""),
            1,
        ),
        (
            format!("\"0.0.0.0:{ADMIN_PORT}\""),
            format!("\"127.0.0.1:{admin_port}\""),
            1,
        ),
        (
            "\"/var/lib/tokengate/tokengate.db\"".to_string(),
            format!("\"{}\"", gate_dir.path().join("tokengate.db").display()),
            1,
        ),
        (
            format!("\"unix:{SOCKET}\""),
            format!("\"unix:{}\"", socket.display()),
            2,
        ),
    ] {
        assert_eq!(text.matches(&from).count(), count, "{from} in:\n{text}");
        text = text.replace(&from, &to);
    }
    let served = Gate::start_in(gate_dir, &text, &[]);
    common::wait_port(admin_port);

    get(&served.url("/"), &[])
        .await
        .assert_error(401, "Credentials required");
    assert_eq!(app.requests(), 0, "nothing reached the app");
    let (token, _) = common::cli_create_token(&served.config_path, "alice");
    let resp = get(
        &served.url("/orders?id=7"),
        &[("Authorization", &format!("Bearer {token}"))],
    )
    .await;
    assert_eq!(resp.status, 200, "{:?}\n{}", resp.body, served.log());
    assert_eq!(resp.echoed_path(), "/orders?id=7");
    assert_eq!(resp.echoed("x-auth-user").as_deref(), Some("alice"));
    assert_eq!(resp.echoed("auth-token"), Some(token));
    assert_eq!(
        resp.echoed("host"),
        Some(format!("127.0.0.1:{gate_port}")),
        "preserve_host: the client's Host"
    );
    let health = get(&served.url("/health"), &[]).await;
    assert_eq!(health.status, 200, "the auth none route to the same socket");
    assert_eq!(app.requests(), 2);
}

/// mode=sidecar with upstreamSocket: the patch names the app's container with the socket's
/// mount and nothing else, adds the emptyDir and tokengate's mount of it; merged into an
/// existing Deployment (here, and by the real `kubectl patch --local` where kubectl is
/// installed) the app keeps its image, ports, probe and its own mounts, and gains the socket's
/// folder; the config goes to `unix:<path>` and passes `tokengate check`.
#[test]
fn sidecar_patch_mounts_the_socket_folder_into_the_app() {
    let Some(helm) = Helm::get() else { return };
    let r = helm.render("sidecar-values.yaml", &["upstreamSocket=/run/app/app.sock"]);
    let patch_text = patch_file(&r, "deployment-patch.yaml");
    let patch: Value = serde_norway::from_str(patch_text).unwrap();
    let containers = seq(&patch["spec"]["template"]["spec"]["containers"]);
    assert_eq!(
        containers[0],
        serde_norway::from_str::<Value>(
            "{name: api, volumeMounts: [{name: tokengate-socket, mountPath: /run/app}]}"
        )
        .unwrap(),
        "the app's container: its name and the socket's mount, nothing else"
    );

    let original: Value = serde_norway::from_str(EXISTING_DEPLOYMENT).unwrap();
    let check_merged = |merged: &Value, how: &str| {
        let pod = &merged["spec"]["template"]["spec"];
        assert_eq!(names(&pod["containers"]), ["api", "tokengate"], "{how}");
        let api = &seq(&pod["containers"])[0];
        let before = &seq(&original["spec"]["template"]["spec"]["containers"])[0];
        for key in ["image", "ports", "readinessProbe"] {
            assert_eq!(api[key], before[key], "{how}: the app's {key} stays");
        }
        let mut mounts: Vec<(&str, &str)> = seq(&api["volumeMounts"])
            .iter()
            .map(|m| (str_of(&m["name"]), str_of(&m["mountPath"])))
            .collect();
        mounts.sort_unstable();
        assert_eq!(
            mounts,
            [("config", "/etc/legacy"), ("tokengate-socket", "/run/app")],
            "{how}: the app's own mount and the socket's folder"
        );
        let gate = &seq(&pod["containers"])[1];
        assert_eq!(
            mount(gate, "tokengate-socket").expect("tokengate's socket mount")["mountPath"],
            "/run/app",
            "{how}"
        );
        let socket_volume = seq(&pod["volumes"])
            .iter()
            .find(|v| v["name"] == "tokengate-socket")
            .unwrap_or_else(|| panic!("{how}: no tokengate-socket volume"));
        assert!(socket_volume["emptyDir"].is_mapping(), "{how}");
        for container in seq(&pod["containers"]) {
            for m in seq(&container["volumeMounts"]) {
                assert!(
                    names(&pod["volumes"]).contains(&str_of(&m["name"])),
                    "{how}: mount {:?} has a volume",
                    m["name"]
                );
            }
        }
    };
    let mut merged = original.clone();
    strategic_merge(&mut merged, &patch, "");
    check_merged(&merged, "strategic_merge");

    let config_text = str_of(
        &r.all("ConfigMap")
            .into_iter()
            .find(|c| c["metadata"]["name"] == "demo-tokengate")
            .expect("the config ConfigMap")["data"]["tokengate.toml"],
    );
    let config: toml::Table = config_text.parse().unwrap();
    assert_eq!(
        config["route"][0]["upstream"].as_str(),
        Some("unix:/run/app/app.sock")
    );
    let dir = tempfile::tempdir().unwrap();
    assert_check_ok(config_text, dir.path(), &[]);
    let notes = helm.notes(&[
        "mode=sidecar",
        "sidecar.deployment=legacy-api",
        "sidecar.container=api",
        "upstreamSocket=/run/app/app.sock",
    ]);
    assert!(
        notes.contains("tokengate forwards to your container at unix:/run/app/app.sock.")
            && notes.contains("instead of your app's port."),
        "{notes}"
    );

    // The real strategic merge, where kubectl is installed.
    let Some(_) = kubectl(dir.path()) else { return };
    std::fs::write(dir.path().join("deployment.yaml"), EXISTING_DEPLOYMENT).unwrap();
    std::fs::write(dir.path().join("tokengate-patch.yaml"), patch_text).unwrap();
    let out = kubectl(dir.path())
        .unwrap()
        .args([
            "patch",
            "--local",
            "-f",
            "deployment.yaml",
            "--patch-file",
            "tokengate-patch.yaml",
            "-o",
            "yaml",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "kubectl patch --local: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    check_merged(
        &serde_norway::from_slice(&out.stdout).unwrap(),
        "kubectl patch --local",
    );
}

/// configFile with upstreamSocket: the file's Unix-socket upstreams must be the one whose
/// folder the chart shares, and the chart's socket must be used by a route; each fix renders.
#[test]
fn a_config_file_and_the_upstream_socket_must_agree() {
    let Some(helm) = Helm::get() else { return };
    let dir = tempfile::tempdir().unwrap();
    let render = |text: &str, sets: &[&str]| {
        let file = dir.path().join("tokengate.toml");
        std::fs::write(&file, text).unwrap();
        let arg = format!("configFile={}", file.display());
        let mut all = vec!["app.image.repository=registry.example/app"];
        all.extend_from_slice(sets);
        helm.try_render_with(None, &all, &["--set-file".as_ref(), arg.as_ref()])
    };
    let on_socket = FITTING_CONFIG.replace("http://127.0.0.1:8080", "unix:/run/app/app.sock");
    let cases: &[(String, &[&str], &str)] = &[
        (
            on_socket.clone(),
            &[],
            r#"configFile has upstream = "unix:/run/app/app.sock", but upstreamSocket is not set: set upstreamSocket=/run/app/app.sock"#,
        ),
        (
            on_socket.replace("/run/app/", "/run/other/"),
            &["upstreamSocket=/run/app/app.sock"],
            r#"configFile has upstream = "unix:/run/other/app.sock", which is not in the folder of upstreamSocket (/run/app)"#,
        ),
        (
            FITTING_CONFIG.to_string(),
            &["upstreamSocket=/run/app/app.sock"],
            r#"upstreamSocket is /run/app/app.sock, but no route of configFile goes there: upstream = "unix:/run/app/app.sock""#,
        ),
    ];
    for (text, sets, message) in cases {
        match render(text, sets) {
            Ok(_) => panic!("{sets:?} rendered, expected {message:?}:\n{text}"),
            Err(stderr) => assert!(
                stderr.contains("execution error at (tokengate/templates/")
                    && stderr.contains(message),
                "{sets:?}: expected {message:?} in:\n{stderr}\n--- configFile ---\n{text}"
            ),
        }
    }
    let r = render(&on_socket, &["upstreamSocket=/run/app/app.sock"]).expect("the fix renders");
    assert_eq!(r.config_text().trim_end(), on_socket.trim_end());
    let gate = r.container("tokengate");
    assert_eq!(
        mount(gate, "tokengate-socket").expect("socket mount")["mountPath"],
        "/run/app"
    );
    assert_check_ok(&r.config_text(), dir.path(), &[]);
}

/// README.md's `upstreamSocket` example: the values file as written there renders what the
/// README shows (the route to the socket, the emptyDir mounted in both containers, gunicorn's
/// `--bind` untouched) and passes `tokengate check`.
#[test]
fn the_readme_socket_values_render() {
    let Some(helm) = Helm::get() else { return };
    let readme = std::fs::read_to_string(Path::new(ROOT).join("README.md")).unwrap();
    for text in [
        README_SOCKET_VALUES,
        "upstream = \"unix:/run/app/app.sock\"\n",
        "helm install api helm/tokengate -f socket-values.yaml",
    ] {
        assert!(readme.contains(text), "README.md lacks:\n{text}");
    }
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("socket-values.yaml");
    std::fs::write(&file, README_SOCKET_VALUES).unwrap();
    let r = helm
        .try_render_with(None, &[], &["-f".as_ref(), file.as_os_str()])
        .expect("the README's socket values render");
    assert_eq!(
        r.config()["route"][0]["upstream"].as_str(),
        Some("unix:/run/app/app.sock")
    );
    let app = r.container("app");
    assert_eq!(str_of(&app["image"]), "registry.example/legacy-api:latest");
    let args: Vec<&str> = seq(&app["args"]).iter().map(str_of).collect();
    assert_eq!(args[..2], ["--bind", "unix:/run/app/app.sock"]);
    for container in [app, r.container("tokengate")] {
        assert_eq!(
            mount(container, "tokengate-socket").expect("socket mount")["mountPath"],
            "/run/app"
        );
    }
    assert_eq!(
        r.volume("tokengate-socket").expect("socket volume")["emptyDir"],
        serde_norway::from_str::<Value>("{}").unwrap()
    );
    assert_check_ok(&r.config_text(), dir.path(), &[]);
}

const README_SOCKET_VALUES: &str = "# socket-values.yaml
app:
  image:
    repository: registry.example/legacy-api
  command: [gunicorn]
  args: [--bind, unix:/run/app/app.sock, --workers, \"4\", legacy_api.wsgi]
upstreamSocket: /run/app/app.sock
";

// ---------------------------------------------------------------------------------------------
// The examples: through structured values, and through configFile.

/// The four examples of `examples/`, each with a values file `ci/<name>-values.yaml`.
const EXAMPLES: [&str; 4] = ["aircloak", "cloudsoar", "insightio", "rucio"];

fn example(name: &str) -> String {
    std::fs::read_to_string(
        Path::new(ROOT)
            .join("examples")
            .join(format!("{name}.toml")),
    )
    .unwrap_or_else(|e| panic!("examples/{name}.toml: {e}"))
}

/// Keys the chart sets itself from the pod it builds (listen addresses, the mounted files, the
/// store's place), whatever an example says: `Some(true)` where only their presence must match.
fn chart_owned(path: &str) -> Option<bool> {
    match path {
        "server.listen" | "admin.listen" | "store.path" | "store.url" => Some(false),
        "server.tls.cert" | "server.tls.key" | "server.tls.client_ca" | "admin.token" => Some(true),
        _ => None,
    }
}

/// Every key of `example` is in `rendered` with the same value (tables key by key, arrays of
/// tables element by element, identity headers and upstream_auth exactly), except the keys
/// the chart owns. `rendered` may hold more keys: the chart writes tokengate's defaults out.
fn assert_carries(example: &toml::Table, rendered: &toml::Table, path: &str, name: &str) {
    for (key, want) in example {
        let here = if path.is_empty() {
            key.clone()
        } else {
            format!("{path}.{key}")
        };
        let got = rendered.get(key);
        match chart_owned(&here) {
            Some(false) => continue,
            Some(true) => {
                assert!(got.is_some(), "{name}: the chart renders no {here}");
                continue;
            }
            None => {}
        }
        let Some(got) = got else {
            panic!("{name}: {here} = {want} is not in the rendered config");
        };
        let exact = key == "identity_headers" || key == "upstream_auth";
        match (want, got) {
            (toml::Value::Table(want), toml::Value::Table(got)) if !exact => {
                assert_carries(want, got, &here, name)
            }
            (toml::Value::Array(want), toml::Value::Array(got))
                if want.iter().all(toml::Value::is_table) =>
            {
                assert_eq!(want.len(), got.len(), "{name}: the number of [[{here}]]");
                for (w, g) in want.iter().zip(got) {
                    let (Some(w), Some(g)) = (w.as_table(), g.as_table()) else {
                        panic!("{name}: [[{here}]] is not an array of tables in the render");
                    };
                    assert_carries(w, g, &here, name);
                }
            }
            _ => assert_eq!(want, got, "{name}: {here}"),
        }
    }
}

/// Test values for the variables a config refers to (`${env:NAME}`): long enough for any
/// secret tokengate checks the length of.
fn env_of(config: &str) -> Vec<(String, String)> {
    let mut names: Vec<String> = config
        .split("${env:")
        .skip(1)
        .filter_map(|rest| rest.split_once('}'))
        .map(|(name, _)| name.to_string())
        .collect();
    names.sort();
    names.dedup();
    names
        .into_iter()
        .map(|n| (n, "0123456789abcdef0123456789abcdef0123456789".to_string()))
        .collect()
}

fn assert_check_ok_with_env(config: &str, dir: &Path, env: &[(String, String)]) {
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    assert_check_ok(config, dir, &env);
}

/// Each example, expressed in chart values (`ci/<example>-values.yaml`): the rendered config
/// carries every key of the example that is not the chart's own, the pod is the chart's usual
/// one, and `tokengate check` accepts the config (with test certificates at the mounted paths).
#[test]
fn each_example_through_the_chart_values() {
    let Some(helm) = Helm::get() else { return };
    for name in EXAMPLES {
        let values = format!("{name}-values.yaml");
        let r = helm.render(&values, &[]);
        r.one("Deployment");
        let example: toml::Table = example(name)
            .parse()
            .unwrap_or_else(|e| panic!("examples/{name}.toml: {e}"));
        let config = r.config();
        assert_carries(&example, &config, "", name);
        assert_eq!(
            example.contains_key("x509"),
            config.contains_key("x509"),
            "{name}: [x509]"
        );

        let dir = tempfile::tempdir().unwrap();
        let mut text = r.config_text();
        if config["server"].get("tls").is_some() {
            text = with_test_certificates(&text, dir.path());
        }
        let mut env = env_of(&text);
        for (name, value) in &mut env {
            if name == "TOKENGATE_ADMIN_TOKEN" {
                *value = "admin-secret".to_string();
            }
        }
        assert_check_ok_with_env(&text, dir.path(), &env);
    }
}

/// What a config written for a host (relative files, loopback admin, no admin listener) needs
/// to run in the chart's pod, as the chart's render-time messages ask for it: the listeners on
/// the pod IP at the chart's ports, the certificate and key (and client CA) at the paths the
/// chart mounts the Secrets at, the sqlite file on the data volume, every `${env:NAME}` in
/// tokengate.extraEnv. Returns the adapted file and the values that go with it.
fn fit_for_the_pod(text: &str) -> (String, Vec<String>) {
    let mut t: toml::Table = text.parse().expect("example is TOML");
    let mut sets = vec!["app.image.repository=registry.example/app".to_string()];
    let table = |t: &mut toml::Table, key: &str| -> toml::Table {
        t.remove(key)
            .map(|v| v.as_table().expect("a table").clone())
            .unwrap_or_default()
    };
    let mut server = table(&mut t, "server");
    server.insert("listen".into(), "0.0.0.0:8443".into());
    if let Some(tls) = server.get_mut("tls").and_then(toml::Value::as_table_mut) {
        tls.insert("cert".into(), "/etc/tokengate/tls/tls.crt".into());
        tls.insert("key".into(), "/etc/tokengate/tls/tls.key".into());
        sets.push("tls.enabled=true".into());
        sets.push("tls.secretName=server-tls".into());
        if tls.contains_key("client_ca") {
            tls.insert("client_ca".into(), "/etc/tokengate/client-ca/ca.crt".into());
            sets.push("tls.clientCaSecretName=client-ca".into());
        }
    }
    t.insert("server".into(), server.into());
    let mut admin = table(&mut t, "admin");
    admin.insert("listen".into(), "0.0.0.0:9901".into());
    t.insert("admin".into(), admin.into());
    let mut store = table(&mut t, "store");
    let backend = store
        .get("backend")
        .and_then(toml::Value::as_str)
        .unwrap_or("sqlite")
        .to_string();
    if backend == "sqlite" {
        store.insert("path".into(), "/var/lib/tokengate/tokengate.db".into());
    }
    sets.push(format!("store.backend={backend}"));
    t.insert("store".into(), store.into());
    let fitted = toml::to_string(&t).expect("serialise");
    for (i, (name, _)) in env_of(&fitted).iter().enumerate() {
        sets.push(format!("tokengate.extraEnv[{i}].name={name}"));
        sets.push(format!("tokengate.extraEnv[{i}].value=from-a-secret"));
    }
    (fitted, sets)
}

/// Each example as a whole file, `--set-file configFile=...`. As written for a host, the render
/// refuses it, saying what does not fit the pod (rather than a pod that cannot start or never
/// gets ready). Fitted as the messages ask, it goes into the ConfigMap unchanged, the pod is
/// built around it (TLS Secret, data volume, environment, checksum), and `tokengate check`
/// accepts it with test certificates where the chart mounts them.
#[test]
fn each_example_through_config_file() {
    let Some(helm) = Helm::get() else { return };
    let dir = tempfile::tempdir().unwrap();
    for name in EXAMPLES {
        let path = Path::new(ROOT).join(format!("examples/{name}.toml"));
        let arg = format!("configFile={}", path.display());
        let refused = helm
            .try_render_with(
                None,
                &["app.image.repository=registry.example/app"],
                &["--set-file".as_ref(), arg.as_ref()],
            )
            .err()
            .unwrap_or_else(|| panic!("examples/{name}.toml as it is rendered"));
        assert!(
            refused.contains("execution error at (tokengate/templates/")
                && refused.contains("configFile"),
            "{name}: {refused}"
        );

        let (fitted, sets) = fit_for_the_pod(&example(name));
        let file = dir.path().join(format!("{name}.toml"));
        std::fs::write(&file, &fitted).unwrap();
        let arg = format!("configFile={}", file.display());
        let sets: Vec<&str> = sets.iter().map(String::as_str).collect();
        let r = helm
            .try_render_with(None, &sets, &["--set-file".as_ref(), arg.as_ref()])
            .unwrap_or_else(|e| panic!("{name} fitted for the pod:\n{e}\n{fitted}"));
        let text = r.config_text();
        assert_eq!(
            text.trim_end(),
            fitted.trim_end(),
            "{name}: the file as it is"
        );
        let annotations = &r.pod()["metadata"]["annotations"];
        let digest = ring::digest::digest(&ring::digest::SHA256, text.trim_end().as_bytes());
        assert_eq!(
            str_of(&annotations["checksum/config"]),
            hex::encode(digest),
            "{name}: a change of the file rolls the pods"
        );
        let config = r.config();
        let gate = r.container("tokengate");
        let tls = config["server"].get("tls").is_some();
        assert_eq!(r.volume("tokengate-tls").is_some(), tls, "{name}");
        let sqlite = config["store"].get("backend").and_then(|b| b.as_str()) != Some("memory");
        assert_eq!(mount(gate, "tokengate-data").is_some(), sqlite, "{name}");
        for (var, _) in env_of(&text) {
            assert!(
                env_var(gate, &var).is_some(),
                "{name}: {var} in the container"
            );
        }

        let check_dir = tempfile::tempdir().unwrap();
        let text = if tls {
            with_test_certificates(&text, check_dir.path())
        } else {
            text
        };
        assert_check_ok_with_env(&text, check_dir.path(), &env_of(&text));
    }
}

/// A minimal config that fits the chart's default pod.
const FITTING_CONFIG: &str = r#"[server]
listen = "0.0.0.0:8443"

[admin]
listen = "0.0.0.0:9901"

[store]
backend = "sqlite"
path = "/var/lib/tokengate/tokengate.db" # the data volume

[[route]]
path_prefix = "/"
upstream = "http://127.0.0.1:8080"
"#;

/// configFile that does not fit the pod, or comes with config.* values that would not be used,
/// fails the render with what to change; each case's fix renders.
#[test]
fn a_config_file_that_does_not_fit_the_pod_fails_the_render() {
    let Some(helm) = Helm::get() else { return };
    let dir = tempfile::tempdir().unwrap();
    let render = |text: &str, sets: &[&str]| {
        let file = dir.path().join("tokengate.toml");
        std::fs::write(&file, text).unwrap();
        let arg = format!("configFile={}", file.display());
        let mut all = vec!["app.image.repository=registry.example/app"];
        all.extend_from_slice(sets);
        helm.try_render_with(None, &all, &["--set-file".as_ref(), arg.as_ref()])
    };
    let r = render(FITTING_CONFIG, &[]).expect("the fitting config renders");
    assert_eq!(r.config_text().trim_end(), FITTING_CONFIG.trim_end());
    assert_check_ok(&r.config_text(), dir.path(), &[]);
    // NOTES.txt does not quote config.* values that are not used.
    let out = helm
        .command(None, &["app.image.repository=registry.example/app"])
        .arg("--notes")
        .arg("--set-file")
        .arg(format!(
            "configFile={}",
            dir.path().join("tokengate.toml").display()
        ))
        .arg(chart_dir())
        .output()
        .unwrap();
    let notes = String::from_utf8_lossy(&out.stdout);
    assert!(
        notes.contains("Credentials are read from the [credentials] sources of your configFile.")
            && !notes.contains("config.credentials.sources"),
        "{notes}"
    );

    let tls_files = "[server.tls]\ncert = \"/etc/tokengate/tls/tls.crt\"\n\
                     key = \"/etc/tokengate/tls/tls.key\"\n";
    let cases: &[(String, &[&str], &str)] = &[
        (
            FITTING_CONFIG.replace("0.0.0.0:8443", "127.0.0.1:8443"),
            &[],
            r#"configFile [server] listen = "127.0.0.1:8443": the Service and the container port tokengate reach tokengate.port (8443) on the pod IP: listen = "0.0.0.0:8443""#,
        ),
        (
            FITTING_CONFIG.to_string(),
            &["tokengate.port=9443"],
            r#"configFile [server] listen = "0.0.0.0:8443": the Service and the container port tokengate reach tokengate.port (9443)"#,
        ),
        (
            FITTING_CONFIG.replace("[admin]\nlisten = \"0.0.0.0:9901\"\n", ""),
            &[],
            r#"configFile has no [admin] listen: the chart's liveness and readiness probes and the metrics scrape use admin.port (9901) on the pod IP: add [admin] listen = "0.0.0.0:9901""#,
        ),
        (
            FITTING_CONFIG.replace("0.0.0.0:9901", "127.0.0.1:9901"),
            &[],
            r#"configFile [admin] listen = "127.0.0.1:9901": the probes and the metrics scrape reach admin.port (9901)"#,
        ),
        (
            FITTING_CONFIG.replace("/var/lib/tokengate/tokengate.db", "tokengate.db"),
            &[],
            r#"configFile [store] path is "tokengate.db": the sqlite file must be on the chart's data volume, e.g. path = "/var/lib/tokengate/tokengate.db" (a relative path is in /etc/tokengate, the read-only ConfigMap)"#,
        ),
        (
            FITTING_CONFIG.replace("backend = \"sqlite\"", "").replace(
                "path = \"/var/lib/tokengate/tokengate.db\" # the data volume",
                "",
            ),
            &[],
            r#"configFile [store] path is "tokengate.db" (tokengate's default)"#,
        ),
        (
            FITTING_CONFIG.replace("\"sqlite\"", "\"memory\""),
            &[],
            r#"configFile [store] backend is "memory", but store.backend is "sqlite", which decides the volume or the redis URL the chart provides: set store.backend=memory"#,
        ),
        (
            format!("{FITTING_CONFIG}\n[server.tls]\ncert = \"certs/server.pem\"\nkey = \"certs/server-key.pem\"\n"),
            &[],
            r#"configFile [server.tls] cert = "certs/server.pem", but the tokengate container has no such file: set tls.enabled and tls.secretName (the chart mounts it at /etc/tokengate/tls/tls.crt)"#,
        ),
        (
            format!("{FITTING_CONFIG}\n[server.tls]\ncert = \"certs/server.pem\"\nkey = \"certs/server-key.pem\"\n"),
            &["tls.enabled=true", "tls.secretName=server-tls"],
            r#"configFile [server.tls] cert = "certs/server.pem": the file the chart mounts is "/etc/tokengate/tls/tls.crt""#,
        ),
        (
            FITTING_CONFIG.to_string(),
            &["tls.enabled=true", "tls.secretName=server-tls"],
            r#"tls.enabled mounts the certificate, but configFile has no [server.tls]: add cert = "/etc/tokengate/tls/tls.crt" and key = "/etc/tokengate/tls/tls.key""#,
        ),
        (
            format!("{FITTING_CONFIG}{tls_files}client_ca = \"/etc/tokengate/client-ca/ca.crt\"\n"),
            &["tls.enabled=true", "tls.secretName=server-tls"],
            r#"configFile [server.tls] client_ca = "/etc/tokengate/client-ca/ca.crt", but the tokengate container has no such file: set tls.clientCaSecretName"#,
        ),
        (
            format!("{FITTING_CONFIG}\n[tokens]\nformat = \"jwt\"\njwt_key = \"${{env:SOAR_JWT_KEY}}\" # or ${{env:OTHER}}\n"),
            &[],
            "configFile refers to ${env:SOAR_JWT_KEY}, which the tokengate container does not have (tokengate refuses to start): add it to tokengate.extraEnv",
        ),
        (
            FITTING_CONFIG.to_string(),
            &["verify.enabled=true", "verify.tokenSecretName=verify"],
            r#"verify.enabled exposes the decision port 9902, but configFile has no [verify] listen: add [verify] listen = "0.0.0.0:9902""#,
        ),
        (
            format!("{FITTING_CONFIG}\n[store]\nbackend = \"memory\"\n"),
            &[],
            "configFile line 15: table [store] is defined twice (first on line 7); tokengate check refuses it",
        ),
        (
            FITTING_CONFIG.to_string(),
            &["config.cache.ttl=2h", "config.extraToml=[x509]"],
            "configFile is the whole tokengate config, so the config.* values are not used, but these are set: config.cache.ttl, config.extraToml. Put them in the file, or leave them unset",
        ),
        (
            FITTING_CONFIG.to_string(),
            &[
                "config.limits.maxTracked=5000",
                "config.limits.shared=true",
                "config.route.preflight=pass",
                "config.route.rateLimits[0].per=client",
                "config.route.rateLimits[0].rate=10/1s",
                "config.route.deny[0].methods={DELETE}",
                "config.route.allow[0].groups={admin}",
                "config.tokens.scopes={read}",
                "config.validators[0].type=jwt",
                "config.validators[0].groupsClaim=groups",
            ],
            "configFile is the whole tokengate config, so the config.* values are not used, but these are set: config.limits.maxTracked, config.limits.shared, config.route.allow, config.route.deny, config.route.preflight, config.route.rateLimits, config.tokens.scopes, config.validators. Put them in the file, or leave them unset",
        ),
        (
            FITTING_CONFIG.to_string(),
            &[
                "config.extraRoutes[0].pathPrefix=/admin",
                "config.extraRoutes[0].allow[0].groups={admin}",
                "config.tokens.loginScopes={}",
            ],
            "but these are set: config.extraRoutes, config.tokens.loginScopes.",
        ),
    ];
    for (text, sets, message) in cases {
        match render(text, sets) {
            Ok(_) => panic!("{sets:?} rendered, expected {message:?}:\n{text}"),
            Err(stderr) => assert!(
                stderr.contains("execution error at (tokengate/templates/")
                    && stderr.contains(message),
                "{sets:?}: expected {message:?} in:\n{stderr}\n--- configFile ---\n{text}"
            ),
        }
    }

    // The fixes the messages name render, and tokengate check takes them.
    let fixed: &[(String, &[&str])] = &[
        (
            format!("{FITTING_CONFIG}\n[tokens]\njwt_key = \"${{env:SOAR_JWT_KEY}}\"\n"),
            &[
                "tokengate.extraEnv[0].name=SOAR_JWT_KEY",
                "tokengate.extraEnv[0].value=x",
            ],
        ),
        (
            FITTING_CONFIG.replace("\"sqlite\"", "\"memory\""),
            &["store.backend=memory"],
        ),
        (
            format!("{FITTING_CONFIG}{tls_files}"),
            &["tls.enabled=true", "tls.secretName=server-tls"],
        ),
        (
            format!("{FITTING_CONFIG}\n[verify]\nlisten = \"0.0.0.0:9902\"\ningress = \"nginx\"\ntoken = \"${{env:TOKENGATE_VERIFY_TOKEN}}\"\n"),
            &["verify.enabled=true", "verify.tokenSecretName=verify"],
        ),
        // A values file with config.* at its defaults (a copy of values.yaml) is no conflict.
        (
            FITTING_CONFIG.to_string(),
            &["config.cache.ttl=1h", "config.cache.maxEntries=1000000"],
        ),
        (
            FITTING_CONFIG.to_string(),
            &[
                "config.limits.failedAuth=20/1m",
                "config.limits.shared=false",
                "config.route.preflight=authenticate",
                "config.route.deny={}",
                "config.tokens.scopes={}",
            ],
        ),
    ];
    for (text, sets) in fixed {
        let r = render(text, sets).unwrap_or_else(|e| panic!("{sets:?}: {e}\n{text}"));
        let check_dir = tempfile::tempdir().unwrap();
        let mut config = r.config_text();
        if config.contains("[server.tls]") {
            config = with_test_certificates(&config, check_dir.path());
        }
        assert_check_ok_with_env(&config, check_dir.path(), &env_of(&config));
    }
    let copied = helm.try_render_with(
        None,
        &["app.image.repository=registry.example/app"],
        &[
            "-f".as_ref(),
            chart_dir().join("values.yaml").as_os_str(),
            "--set-file".as_ref(),
            format!("configFile={}", dir.path().join("tokengate.toml").display()).as_ref(),
        ],
    );
    if let Err(e) = copied {
        panic!("values.yaml itself conflicts with configFile: {e}");
    }
}

/// The chart's copy of the config.* defaults (`tokengate.configDefaults`, which tells configFile
/// what was set) is values.yaml's.
#[test]
fn the_config_defaults_the_chart_compares_with_are_values_yaml() {
    let helpers =
        std::fs::read_to_string(chart_dir().join("templates/_helpers.tpl")).expect("helpers");
    let start = helpers
        .find(r#"{{- define "tokengate.configDefaults" }}"#)
        .expect("tokengate.configDefaults");
    let body = &helpers[start..];
    let body = &body[body.find('\n').unwrap()..body.find("{{- end }}").unwrap()];
    let defaults: Value = serde_norway::from_str(body).expect("configDefaults is YAML");
    let values: Value =
        serde_norway::from_str(&std::fs::read_to_string(chart_dir().join("values.yaml")).unwrap())
            .unwrap();
    assert_eq!(defaults, values["config"]);
}

// ---------------------------------------------------------------------------------------------
// Tables defined twice, and the structured values beyond the examples.

/// The config the chart renders followed by `extra`, as the ConfigMap would hold it.
fn with_extra_toml(helm: Helm, extra: &str) -> Result<Rendered, String> {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("extra.toml");
    std::fs::write(&file, extra).unwrap();
    let arg = format!("config.extraToml={}", file.display());
    helm.try_render_with(
        Some("default-values.yaml"),
        &[],
        &["--set-file".as_ref(), arg.as_ref()],
    )
}

/// config.extraToml that repeats a table the chart renders (or one of its own) would make a
/// config `tokengate check` refuses, and a pod that crash-loops: the render fails instead,
/// naming the table and the values that set it. TOML that adds to the config renders.
#[test]
fn extra_toml_repeating_a_table_fails_the_render_naming_it() {
    let Some(helm) = Helm::get() else { return };
    let cases = [
        (
            "[endpoints]\npage = true\n",
            "config.extraToml line 1: table [endpoints] is already in the config the chart \
             renders, and tokengate check refuses a table defined twice: set it through the \
             values config.endpoints instead",
        ),
        (
            "# more TLS\n[server.tls]\nalpn = [\"h2\"]\n",
            "config.extraToml line 2: table [server.tls] is already in the config",
        ),
        (
            "[route.identity_headers]\n\"X-Site\" = \"{subject}\"\n",
            "table [route.identity_headers] is already in the config the chart renders, and \
             tokengate check refuses a table defined twice: set it through the values \
             config.route.identityHeaders (or extraRoutes) instead",
        ),
        (
            "[x509]\nenabled = false\n\n[x509]\ntoken_ttl = \"2h\"\n",
            "config.extraToml line 4: table [x509] is defined twice (first on line 1); tokengate \
             check refuses it",
        ),
        (
            "[[store]]\nbackend = \"memory\"\n",
            "config.extraToml line 1: [[store]] names a table that is already defined",
        ),
        (
            "[limits]\nshared = false\n",
            "config.extraToml line 1: table [limits] is already in the config the chart renders, \
             and tokengate check refuses a table defined twice: set it through the values \
             config.limits instead",
        ),
    ];
    let tls = ["tls.enabled=true", "tls.secretName=server-tls"];
    for (extra, message) in cases {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("extra.toml");
        std::fs::write(&file, extra).unwrap();
        let arg = format!("config.extraToml={}", file.display());
        let err = helm
            .try_render_with(
                Some("default-values.yaml"),
                &tls,
                &["--set-file".as_ref(), arg.as_ref()],
            )
            .err()
            .unwrap_or_else(|| panic!("extraToml {extra:?} rendered"));
        assert!(
            err.contains("execution error at (tokengate/templates/") && err.contains(message),
            "expected {message:?} in:\n{err}"
        );

        // What the chart refuses, tokengate itself refuses too: the same concatenation.
        let plain = helm
            .try_render(Some("default-values.yaml"), &tls)
            .unwrap()
            .config_text();
        let combined = with_test_certificates(&format!("{plain}\n{extra}"), dir.path());
        let (ok, output) = tokengate_check(&combined, dir.path(), &[]);
        assert!(!ok, "tokengate check took extraToml {extra:?}:\n{output}");
    }

    // Adding to the config is fine: another [[route]] with its own sub-tables (defined afresh
    // for each element), a table the chart does not render, and a multi-line string holding a
    // line that looks like a table.
    let extra = "[[route]]\npath_prefix = \"/admin\"\nupstream = \"http://127.0.0.1:8081\"\n\
                 [route.upstream_auth]\nheader = \"X-Admin\"\nvalue = \"{token}\"\n\
                 [route.identity_headers]\n\"X-Auth-User\" = \"{subject}\"\n\n\
                 [[validator]]\ntype = \"jwt\"\nsecret = '''\n[endpoints]\n0123456789abcdef0123456789abcdef'''\n";
    let r = with_extra_toml(helm, extra).unwrap_or_else(|e| panic!("{e}"));
    let config = r.config();
    let routes = config["route"].as_array().unwrap();
    assert_eq!(routes.len(), 2);
    assert_eq!(
        routes[1]["upstream_auth"]["header"].as_str(),
        Some("X-Admin")
    );
    let dir = tempfile::tempdir().unwrap();
    assert_check_ok(&r.config_text(), dir.path(), &[]);
}

/// The values beyond the four examples reach the config under their TOML names, and tokengate
/// check takes the result: [verify] (decision listener, token from a Secret, TLS), the token
/// page, [server] bounds, strip_headers, alpn, a JWT validator's timeout, an introspect
/// validator's max_concurrent, route upgrades and limits, the redis key prefix.
#[test]
fn every_structured_value_reaches_the_config() {
    let Some(helm) = Helm::get() else { return };
    let values = r#"
app:
  image: {repository: registry.example/app}
tls:
  enabled: true
  secretName: server-tls
  clientCaSecretName: client-ca
  alpn: [h2]
verify:
  enabled: true
  ingress: traefik
  tokenSecretName: verify-token
  tls: true
store:
  backend: redis
  redis: {urlSecretName: redis, prefix: "gate:"}
networkPolicy:
  enabled: true
config:
  server:
    idleTimeout: 90s
    bodyReadTimeout: 45s
    maxConcurrentStreams: 50
    workers: 2
    allowUnderscoresInHeaders: true
    stripHeaders: [X-Site-Role]
    trustedProxies: [10.0.0.0/8]
  endpoints:
    selfService: false
    page: true
    loginUrl: https://login.example/start
  credentials:
    sources: [bearer, "cookie:session"]
    keep: ["cookie:session"]
  validators:
    - type: jwt
      issuer: https://idp.example
      jwksUrl: https://idp.example/jwks
      timeout: 3s
    - type: introspect
      url: http://127.0.0.1:8080/whoami
      maxConcurrent: 8
  route:
    upgrades: []
    maxInflight: 100
    maxIdleConnections: 8
    preserveHeaderCase: false
  extraRoutes:
    - pathPrefix: /ws
      upgrades: [websocket]
      maxInflight: 10
"#;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("values.yaml");
    std::fs::write(&file, values).unwrap();
    let r = helm
        .try_render_with(None, &[], &["-f".as_ref(), file.as_os_str()])
        .unwrap_or_else(|e| panic!("{e}"));
    let config = r.config();
    let at = |path: &str| -> toml::Value {
        let mut v = toml::Value::Table(config.clone());
        for key in path.split('.') {
            v = match key.parse::<usize>() {
                Ok(i) => v[i].clone(),
                Err(_) => v
                    .get(key)
                    .unwrap_or_else(|| panic!("no {path} in\n{}", r.config_text()))
                    .clone(),
            };
        }
        v
    };
    let strings = |list: &[&str]| toml::Value::Array(list.iter().map(|s| (*s).into()).collect());
    for (path, want) in [
        ("server.idle_timeout", "90s".into()),
        ("server.body_read_timeout", "45s".into()),
        ("server.max_concurrent_streams", 50.into()),
        ("server.workers", 2.into()),
        ("server.allow_underscores_in_headers", true.into()),
        ("server.strip_headers", strings(&["X-Site-Role"])),
        ("server.trusted_proxies", strings(&["10.0.0.0/8"])),
        ("server.tls.alpn", strings(&["h2"])),
        ("verify.listen", "0.0.0.0:9902".into()),
        ("verify.ingress", "traefik".into()),
        ("verify.token", "${env:TOKENGATE_VERIFY_TOKEN}".into()),
        ("verify.tls.cert", "/etc/tokengate/tls/tls.crt".into()),
        (
            "verify.tls.client_ca",
            "/etc/tokengate/client-ca/ca.crt".into(),
        ),
        ("endpoints.self_service", false.into()),
        ("endpoints.page", true.into()),
        ("endpoints.login_url", "https://login.example/start".into()),
        ("credentials.keep", strings(&["cookie:session"])),
        ("store.prefix", "gate:".into()),
        ("validator.0.timeout", "3s".into()),
        ("validator.0.jwks_url", "https://idp.example/jwks".into()),
        ("validator.1.max_concurrent", 8.into()),
        ("route.0.upgrades", strings(&[])),
        ("route.0.max_inflight", 100.into()),
        ("route.0.max_idle_connections", 8.into()),
        ("route.0.preserve_header_case", false.into()),
        ("route.1.upgrades", strings(&["websocket"])),
        ("route.1.max_inflight", 10.into()),
    ] {
        assert_eq!(at(path), want, "{path}");
    }
    assert!(
        config["validator"][1].get("account").is_none(),
        "unset keys stay unset"
    );
    assert!(config["route"][1].get("max_idle_connections").is_none());

    // The decision port: in the container, the Service and the NetworkPolicy; its token from
    // the Secret.
    let gate = r.container("tokengate");
    assert_eq!(resolve_port(gate, &Value::from("tokengate-verify")), 9902);
    let token = &env_var(gate, "TOKENGATE_VERIFY_TOKEN").expect("verify token")["valueFrom"];
    assert_eq!(token["secretKeyRef"]["name"], "verify-token");
    let ports = seq(&r.one("Service")["spec"]["ports"]);
    let verify = ports
        .iter()
        .find(|p| p["name"] == "verify")
        .expect("verify port");
    assert_eq!(resolve_port(gate, &verify["targetPort"]), 9902);
    let allowed: Vec<u64> = seq(&r.one("NetworkPolicy")["spec"]["ingress"][0]["ports"])
        .iter()
        .map(|p| u64_of(&p["port"]))
        .collect();
    assert_eq!(allowed, [8443, ADMIN_PORT, 9902]);

    let text = with_test_certificates(&r.config_text(), dir.path());
    assert_check_ok(
        &text,
        dir.path(),
        &[
            ("TOKENGATE_VERIFY_TOKEN", "verify-token-at-least-16"),
            ("TOKENGATE_REDIS_URL", "redis://127.0.0.1:6379/0"),
        ],
    );
}

/// Authorization and abuse control through values: rules, rate limits and preflight on the
/// route and on extra routes, [limits], [tokens] scopes, and the facts rules read from each
/// validator type (static tokens' groups and scopes, a JWT's groups claim and audience list,
/// introspect's pointers, an oauth2_introspection validator) reach the config under their TOML
/// names with the values given, and tokengate check takes the result. Left at their defaults,
/// no rule or rate limit is rendered and [limits] holds tokengate's defaults. The README's
/// example of these values renders and passes check.
#[test]
fn rules_limits_and_validator_facts_reach_the_config() {
    let Some(helm) = Helm::get() else { return };
    let values = r#"
app:
  image: {repository: registry.example/app}
store:
  backend: redis
  redis: {urlSecretName: redis}
tokengate:
  extraEnv:
    - name: OAUTH_CLIENT_SECRET
      valueFrom: {secretKeyRef: {name: oauth-client, key: secret}}
config:
  tokens:
    scopes: [read, write]
    loginScopes: [read]
  limits:
    failedAuth: 5/10s
    failedAuthBurst: 3
    maxTracked: 5000
    shared: true
  validators:
    - type: static
      tokens:
        - sha256: 9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08
          subject: dev
          groups: [ops, dev]
          scopes: [read]
    - type: jwt
      issuer: https://idp.example/realms/main
      jwksUrl: https://idp.example/realms/main/certs
      audience: [legacy-api, account]
      groupsClaim: realm_access.roles
    - type: jwt
      secret: 0123456789abcdef0123456789abcdef
      audience: legacy-api
    - type: introspect
      url: http://127.0.0.1:8080/whoami
      subject: json:/uid
      groups: json:/groups
      scopes: json:/scope
    - type: oauth2_introspection
      url: https://idp.example/introspect
      clientId: tokengate
      clientSecret: "${env:OAUTH_CLIENT_SECRET}"
      audience: api
      issuer: https://idp.example
      subjectClaim: username
      groupsClaim: groups
      timeout: 3s
      maxConcurrent: 4
  route:
    preflight: pass
    rateLimits:
      - {per: subject, rate: 100/1s, burst: 200}
      - {per: client, rate: 600/1m}
    deny:
      - methods: [DELETE]
        clients: [10.20.0.0/16]
    allow:
      - {methods: [GET, HEAD], scopes: [read]}
      - {scopes: [write]}
      - groups: [admin]
        claims: {"realm_access.roles": [admin, editor], "org.tenant": 7, email_verified: true}
      - paths: [/reports]
        subjects: [alice]
        accounts: [ops]
        sources: [bearer, x509, "header:X-Api-Key"]
  extraRoutes:
    - pathPrefix: /health
      auth: none
      preflight: authenticate
      rateLimits: [{per: client, rate: 10/s}]
      allow: [{clients: [10.0.0.0/8]}]
    - pathPrefix: /admin
      deny: [{claims: {"org.tenant": [7, 8], name: "guest \"x\""}}]
"#;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("values.yaml");
    std::fs::write(&file, values).unwrap();
    let r = helm
        .try_render_with(None, &[], &["-f".as_ref(), file.as_os_str()])
        .unwrap_or_else(|e| panic!("{e}"));
    let config = r.config();

    // What each value must become, written as TOML.
    let want: toml::Table = r#"
        [tokens]
        scopes = ["read", "write"]
        login_scopes = ["read"]

        [limits]
        failed_auth = "5/10s"
        failed_auth_burst = 3
        max_tracked = 5000
        shared = true

        [[validator]]
        type = "static"
        [[validator.token]]
        sha256 = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
        subject = "dev"
        groups = ["ops", "dev"]
        scopes = ["read"]

        [[validator]]
        type = "jwt"
        issuer = "https://idp.example/realms/main"
        jwks_url = "https://idp.example/realms/main/certs"
        audience = ["legacy-api", "account"]
        groups_claim = "realm_access.roles"

        [[validator]]
        type = "jwt"
        secret = "0123456789abcdef0123456789abcdef"
        audience = "legacy-api"

        [[validator]]
        type = "introspect"
        url = "http://127.0.0.1:8080/whoami"
        subject = "json:/uid"
        groups = "json:/groups"
        scopes = "json:/scope"

        [[validator]]
        type = "oauth2_introspection"
        url = "https://idp.example/introspect"
        client_id = "tokengate"
        client_secret = "${env:OAUTH_CLIENT_SECRET}"
        audience = "api"
        issuer = "https://idp.example"
        subject_claim = "username"
        groups_claim = "groups"
        timeout = "3s"
        max_concurrent = 4

        [[route]]
        preflight = "pass"
        [[route.rate_limit]]
        per = "subject"
        rate = "100/1s"
        burst = 200
        [[route.rate_limit]]
        per = "client"
        rate = "600/1m"
        [[route.deny]]
        methods = ["DELETE"]
        clients = ["10.20.0.0/16"]
        [[route.allow]]
        methods = ["GET", "HEAD"]
        scopes = ["read"]
        [[route.allow]]
        scopes = ["write"]
        [[route.allow]]
        groups = ["admin"]
        claims = { "realm_access.roles" = ["admin", "editor"], "org.tenant" = 7, email_verified = true }
        [[route.allow]]
        paths = ["/reports"]
        subjects = ["alice"]
        accounts = ["ops"]
        sources = ["bearer", "x509", "header:X-Api-Key"]

        [[route]]
        path_prefix = "/health"
        auth = "none"
        preflight = "authenticate"
        [[route.rate_limit]]
        per = "client"
        rate = "10/s"
        [[route.allow]]
        clients = ["10.0.0.0/8"]

        [[route]]
        path_prefix = "/admin"
        [[route.deny]]
        claims = { "org.tenant" = [7, 8], name = 'guest "x"' }
    "#
    .parse()
    .expect("the expected TOML");
    let text = r.config_text();
    assert_eq!(config["tokens"]["scopes"], want["tokens"]["scopes"]);
    assert_eq!(
        config["tokens"]["login_scopes"],
        want["tokens"]["login_scopes"]
    );
    assert_eq!(config["limits"], want["limits"], "[limits] in\n{text}");
    // Each validator, whole: the keys given and no others.
    assert_eq!(
        config["validator"], want["validator"],
        "[[validator]] in\n{text}"
    );
    // Each rule and rate limit, whole; the route's other keys are the usual ones.
    let routes = config["route"].as_array().expect("[[route]]");
    let want_routes = want["route"].as_array().unwrap();
    assert_eq!(routes.len(), want_routes.len());
    for (got, want) in routes.iter().zip(want_routes) {
        for key in ["preflight", "rate_limit", "deny", "allow"] {
            assert_eq!(
                got.get(key),
                want.get(key),
                "route {} {key}",
                got["path_prefix"]
            );
        }
    }
    assert!(routes[2].get("preflight").is_none() && routes[2].get("allow").is_none());

    let mut env = env_of(&text);
    for (name, value) in &mut env {
        if name == "TOKENGATE_REDIS_URL" {
            *value = "redis://127.0.0.1:6379/0".to_string();
        }
    }
    assert_check_ok_with_env(&text, dir.path(), &env);
    // The secret the oauth2_introspection validator names is in the container.
    assert!(env_var(r.container("tokengate"), "OAUTH_CLIENT_SECRET").is_some());

    // Defaults: tokengate's own [limits], no rules, rate limits or token scopes.
    let r = helm.render("default-values.yaml", &[]);
    let config = r.config();
    let defaults: toml::Table = "failed_auth = \"20/1m\"\nfailed_auth_burst = 10\n\
                                 max_tracked = 100000\nshared = false\n"
        .parse()
        .unwrap();
    assert_eq!(config["limits"].as_table(), Some(&defaults));
    let route = &config["route"][0];
    assert_eq!(route["preflight"].as_str(), Some("authenticate"));
    for key in ["rate_limit", "deny", "allow"] {
        assert!(route.get(key).is_none(), "{key} rendered by default");
    }
    for key in ["scopes", "login_scopes"] {
        assert!(
            config["tokens"].get(key).is_none(),
            "[tokens] {key} rendered by default"
        );
    }
    // tokens.loginScopes: [] is rendered (no scopes for login tokens), unlike leaving it unset.
    let r = helm.render(
        "default-values.yaml",
        &[
            "config.tokens.scopes={read}",
            "config.tokens.loginScopes={}",
        ],
    );
    let config = r.config();
    assert_eq!(
        config["tokens"]["login_scopes"],
        toml::Value::Array(Vec::new())
    );
    assert_check_ok(&r.config_text(), dir.path(), &[]);

    // The README's values for rules and limits render, and tokengate check takes them.
    let readme = std::fs::read_to_string(Path::new(ROOT).join("README.md")).unwrap();
    let snippet = readme
        .split("Rules and limits are values too")
        .nth(1)
        .and_then(|rest| rest.split("```yaml\n").nth(1))
        .and_then(|rest| rest.split_once("```"))
        .expect("README.md shows rules and limits as values")
        .0;
    std::fs::write(&file, snippet).unwrap();
    let r = helm
        .try_render_with(
            None,
            &["app.image.repository=registry.example/app"],
            &["-f".as_ref(), file.as_os_str()],
        )
        .unwrap_or_else(|e| panic!("the README's values: {e}\n{snippet}"));
    let config = r.config();
    assert_eq!(
        config["route"][0]["allow"].as_array().map(Vec::len),
        Some(2)
    );
    assert_eq!(
        config["route"][0]["rate_limit"][0]["per"].as_str(),
        Some("subject")
    );
    assert_check_ok(&r.config_text(), dir.path(), &[]);
}

// ---------------------------------------------------------------------------------------------
// mode=sidecar with the real kubectl, and the README's kustomize flow.

/// The patch ConfigMap's file `key` of a render.
fn patch_file<'a>(r: &'a Rendered, key: &str) -> &'a str {
    let patches = r
        .all("ConfigMap")
        .into_iter()
        .find(|c| str_of(&c["metadata"]["name"]).ends_with("-tokengate-sidecar"))
        .expect("the patch ConfigMap");
    str_of(&patches["data"][key])
}

/// The sidecar patch names the release's namespace (kustomize matches a patch to its target by
/// kind, name and namespace), lists the app's container first by name alone (so tokengate is
/// not made container 0) and sets kubectl.kubernetes.io/default-container to it.
#[test]
fn the_sidecar_patch_carries_the_namespace_and_the_default_container() {
    let Some(helm) = Helm::get() else { return };
    for namespace in ["apps", "payments"] {
        let out = Command::new(helm.bin)
            .args(["gate", "-n", namespace, "-f"])
            .arg(chart_dir().join("ci/sidecar-values.yaml"))
            .args(["--set", "sidecar.service=legacy-api,service.port=80"])
            .arg(chart_dir())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let r = Rendered {
            docs: yaml_documents(&String::from_utf8(out.stdout).unwrap()),
        };
        for key in ["deployment-patch.yaml", "service-patch.yaml"] {
            let patch: Value = serde_norway::from_str(patch_file(&r, key)).unwrap();
            assert_eq!(patch["metadata"]["namespace"], namespace, "{key}");
        }
        let patch: Value = serde_norway::from_str(patch_file(&r, "deployment-patch.yaml")).unwrap();
        let pod = &patch["spec"]["template"];
        let containers = seq(&pod["spec"]["containers"]);
        assert_eq!(names(&pod["spec"]["containers"]), ["api", "tokengate"]);
        assert_eq!(
            containers[0].as_mapping().unwrap().len(),
            1,
            "the app's container is named, nothing of it changed"
        );
        assert_eq!(
            pod["metadata"]["annotations"]["kubectl.kubernetes.io/default-container"],
            "api"
        );
        assert!(
            str_of(&pod["spec"]["volumes"][0]["configMap"]["name"]).starts_with("gate-"),
            "the config of this release"
        );
    }
}

/// kubectl, for the tests that run it: `None` after the one-line skip notice when it is not
/// installed. KUBECONFIG points nowhere: nothing here talks to a cluster.
fn kubectl(dir: &Path) -> Option<Command> {
    let found = Command::new("kubectl")
        .args(["version", "--client"])
        .env("KUBECONFIG", dir.join("no-kubeconfig"))
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        missing_tool("kubectl", "kubernetes-client");
        return None;
    }
    let mut cmd = Command::new("kubectl");
    cmd.env("KUBECONFIG", dir.join("no-kubeconfig"))
        .current_dir(dir);
    Some(cmd)
}

/// The minor version of kubectl (`1.MINOR`).
fn kubectl_minor(dir: &Path) -> u64 {
    let out = kubectl(dir)
        .expect("kubectl")
        .args(["version", "--client"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let after = text
        .split_once("v1.")
        .unwrap_or_else(|| panic!("no v1.N in kubectl version: {text}"))
        .1;
    let digits: String = after.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().expect("kubectl minor version")
}

/// The README's `kubectl patch` on an existing Deployment and Service, run by the real kubectl
/// (`--local`: the same strategic merge the API server applies, without a cluster): the app
/// stays container 0 and untouched, tokengate and its volumes are added, the default-container
/// annotation names the app, the Service port is re-aimed at tokengate.
#[test]
fn kubectl_patch_adds_tokengate_after_the_app() {
    let Some(helm) = Helm::get() else { return };
    let dir = tempfile::tempdir().unwrap();
    let Some(_) = kubectl(dir.path()) else { return };
    let r = helm.render(
        "sidecar-values.yaml",
        &["sidecar.service=legacy-api", "service.port=80"],
    );
    let existing = EXISTING_DEPLOYMENT.replace(
        "  name: legacy-api\n  labels",
        "  name: legacy-api\n  namespace: apps\n  labels",
    );
    for (file, text) in [
        ("deployment.yaml", existing.as_str()),
        ("service.yaml", EXISTING_SERVICE),
        (
            "tokengate-patch.yaml",
            patch_file(&r, "deployment-patch.yaml"),
        ),
        (
            "tokengate-service-patch.yaml",
            patch_file(&r, "service-patch.yaml"),
        ),
    ] {
        std::fs::write(dir.path().join(file), text).unwrap();
    }
    let patched = |target: &str, patch: &str| -> Value {
        let out = kubectl(dir.path())
            .unwrap()
            .args([
                "patch",
                "--local",
                "-f",
                target,
                "--patch-file",
                patch,
                "-o",
                "yaml",
            ])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "kubectl patch --local -f {target}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_norway::from_slice(&out.stdout).unwrap()
    };

    let deployment = patched("deployment.yaml", "tokengate-patch.yaml");
    let original: Value = serde_norway::from_str(&existing).unwrap();
    let pod = &deployment["spec"]["template"];
    assert_eq!(names(&pod["spec"]["containers"]), ["api", "tokengate"]);
    assert_eq!(
        pod["spec"]["containers"][0], original["spec"]["template"]["spec"]["containers"][0],
        "the app's container is untouched"
    );
    let patch: Value = serde_norway::from_str(patch_file(&r, "deployment-patch.yaml")).unwrap();
    assert_eq!(
        str_of(&pod["spec"]["containers"][1]["image"]),
        str_of(&patch["spec"]["template"]["spec"]["containers"][1]["image"])
    );
    let mut volumes = names(&pod["spec"]["volumes"]);
    volumes.sort_unstable();
    assert_eq!(
        volumes,
        [
            "config",
            "tokengate-config",
            "tokengate-data",
            "tokengate-tmp"
        ]
    );
    let annotations = &pod["metadata"]["annotations"];
    assert_eq!(
        annotations["kubectl.kubernetes.io/default-container"],
        "api"
    );
    assert_eq!(annotations["team"], "payments");
    assert_eq!(deployment["metadata"]["namespace"], "apps");
    assert_eq!(deployment["spec"]["strategy"]["type"], "Recreate");

    let service = patched("service.yaml", "tokengate-service-patch.yaml");
    let ports = seq(&service["spec"]["ports"]);
    assert_eq!(ports.len(), 1);
    assert_eq!(u64_of(&ports[0]["port"]), 80);
    assert_eq!(u64_of(&ports[0]["targetPort"]), 8443);
    assert_eq!(ports[0]["name"], "http");
}

/// README.md's kustomize flow, exactly as written there: the values file, the `helm template`
/// commands (with tools/helm-render standing in for helm), yq, the kustomization.yaml, and
/// `kubectl kustomize` over a Deployment and Service that carry `metadata.namespace`. The
/// result has tokengate after the app, its volumes, the config ConfigMap, the namespace and the
/// default-container annotation. The variant with `target:` (for manifests that leave the
/// namespace to kustomize) builds too.
#[test]
fn the_readme_kustomize_flow_builds() {
    let Some(helm) = Helm::get() else { return };
    let dir = tempfile::tempdir().unwrap();
    let Some(_) = kubectl(dir.path()) else { return };
    // Debian bookworm's kubectl (kubernetes-client, 1.20) embeds kustomize 2, which does not
    // read `patches:` (kustomize 3.1 and later do; kubectl 1.21 and later have such a
    // kustomize). It is the only kubectl Debian packages, so this test says why it skips, even
    // under TOKENGATE_TEST_STRICT=1, rather than fail a machine that installed it;
    // kubectl_patch_adds_tokengate_after_the_app still runs there.
    let minor = kubectl_minor(dir.path());
    if minor < 21 {
        println!(
            "skipped: kubectl 1.{minor} embeds kustomize 2, which cannot read `patches:` \
             (kubectl 1.21 or later)"
        );
        return;
    }
    let yq = Command::new("yq").arg("--version").output();
    if !yq.is_ok_and(|o| o.status.success()) {
        missing_tool("yq", "yq");
        return;
    }

    let readme = std::fs::read_to_string(Path::new(ROOT).join("README.md")).unwrap();
    for text in [README_VALUES, README_RENDER, README_KUSTOMIZATION] {
        assert!(readme.contains(text), "README.md no longer shows:\n{text}");
    }
    let root = dir.path();
    std::fs::create_dir_all(root.join("helm")).unwrap();
    std::os::unix::fs::symlink(chart_dir(), root.join("helm/tokengate")).unwrap();
    let deployment = EXISTING_DEPLOYMENT.replace(
        "  name: legacy-api\n  labels",
        "  name: legacy-api\n  namespace: apps\n  labels",
    );
    let service = EXISTING_SERVICE.replace(
        "  name: legacy-api\n",
        "  name: legacy-api\n  namespace: apps\n",
    );
    std::fs::write(root.join("tokengate-values.yaml"), README_VALUES).unwrap();
    std::fs::write(root.join("deployment.yaml"), &deployment).unwrap();
    std::fs::write(root.join("service.yaml"), &service).unwrap();
    std::fs::write(root.join("kustomization.yaml"), README_KUSTOMIZATION).unwrap();
    // `helm template ARGS` is `helm-render ARGS`.
    let script = format!(
        "set -euo pipefail\nhelm() {{ [ \"$1\" = template ] && shift && {:?} \"$@\"; }}\n{}\n",
        helm.bin,
        README_RENDER.replace("\\\n", " ")
    );
    let out = Command::new("bash")
        .arg("-c")
        .arg(&script)
        .current_dir(root)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{script}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let patch_text = std::fs::read_to_string(root.join("tokengate-patch.yaml")).unwrap();
    let patch: Value = serde_norway::from_str(&patch_text).expect("the patch is YAML, not JSON");
    assert_eq!(patch["kind"], "Deployment");

    let build = |dir: &Path| -> Vec<Value> {
        let out = kubectl(dir)
            .unwrap()
            .args(["kustomize", "."])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "kubectl kustomize: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        yaml_documents(&String::from_utf8(out.stdout).unwrap())
    };
    let check = |docs: &[Value]| {
        let find = |kind: &str, name: &str| {
            docs.iter()
                .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
                .unwrap_or_else(|| panic!("no {kind} {name} in the kustomize output"))
        };
        let deployment = find("Deployment", "legacy-api");
        assert_eq!(deployment["metadata"]["namespace"], "apps");
        let pod = &deployment["spec"]["template"];
        assert_eq!(names(&pod["spec"]["containers"]), ["api", "tokengate"]);
        let gate = &pod["spec"]["containers"][1];
        assert_eq!(
            gate["args"],
            patch["spec"]["template"]["spec"]["containers"][1]["args"]
        );
        assert_eq!(
            pod["metadata"]["annotations"]["kubectl.kubernetes.io/default-container"],
            "api"
        );
        assert_eq!(pod["metadata"]["annotations"]["team"], "payments");
        let volumes = seq(&pod["spec"]["volumes"]);
        for m in seq(&gate["volumeMounts"]) {
            assert!(
                volumes.iter().any(|v| v["name"] == m["name"]),
                "mount {:?} has a volume",
                m["name"]
            );
        }
        let config = volumes
            .iter()
            .find(|v| v["name"] == "tokengate-config")
            .expect("config volume");
        let config_map = find("ConfigMap", str_of(&config["configMap"]["name"]));
        assert_eq!(config_map["metadata"]["namespace"], "apps");
        assert!(config_map["data"]["tokengate.toml"].is_string());
        let service = find("Service", "legacy-api");
        assert_eq!(service["metadata"]["namespace"], "apps");
        assert_eq!(u64_of(&service["spec"]["ports"][0]["port"]), 80);
        assert_eq!(u64_of(&service["spec"]["ports"][0]["targetPort"]), 8443);
    };
    check(&build(root));

    // Manifests without metadata.namespace (kustomize's `namespace:` sets it): patches by
    // target.
    std::fs::write(root.join("deployment.yaml"), EXISTING_DEPLOYMENT).unwrap();
    std::fs::write(root.join("service.yaml"), EXISTING_SERVICE).unwrap();
    let without_target = Command::new("kubectl")
        .args(["kustomize", "."])
        .env("KUBECONFIG", root.join("no-kubeconfig"))
        .current_dir(root)
        .output()
        .unwrap();
    assert!(
        !without_target.status.success(),
        "a patch for namespace apps matched a Deployment without one"
    );
    assert!(
        readme.contains(README_TARGETS),
        "README.md no longer shows:\n{README_TARGETS}"
    );
    let targeted = README_KUSTOMIZATION.replace(
        "patches:\n  - path: tokengate-patch.yaml\n  - path: tokengate-service-patch.yaml\n",
        README_TARGETS,
    );
    assert_ne!(targeted, README_KUSTOMIZATION);
    std::fs::write(root.join("kustomization.yaml"), targeted).unwrap();
    check(&build(root));
}

/// The values file of the README's kustomize flow.
const README_VALUES: &str = "# tokengate-values.yaml
mode: sidecar
sidecar:
  deployment: legacy-api       # your Deployment
  container: api               # your app's container in it
  service: legacy-api          # your Service, whose port service.port is re-aimed at tokengate
service:
  port: 80
app:
  port: 8080                   # the port your app listens on
";

/// The README's render commands for kustomize.
const README_RENDER: &str = r#"helm template gate helm/tokengate -n apps -f tokengate-values.yaml > tokengate.yaml
helm template gate helm/tokengate -n apps -f tokengate-values.yaml --show-only templates/sidecar.yaml \
  | yq -r '.data["deployment-patch.yaml"]' > tokengate-patch.yaml
helm template gate helm/tokengate -n apps -f tokengate-values.yaml --show-only templates/sidecar.yaml \
  | yq -r '.data["service-patch.yaml"]' > tokengate-service-patch.yaml"#;

/// The README's kustomization.yaml.
const README_KUSTOMIZATION: &str = "# kustomization.yaml
namespace: apps
resources:
  - deployment.yaml            # your app, with metadata.namespace: apps
  - service.yaml
  - tokengate.yaml             # tokengate's config ConfigMap (and the patch ConfigMap)
patches:
  - path: tokengate-patch.yaml
  - path: tokengate-service-patch.yaml
";

/// The README's patches by target, for manifests without metadata.namespace.
const README_TARGETS: &str = "patches:
  - path: tokengate-patch.yaml
    target: {kind: Deployment, name: legacy-api}
  - path: tokengate-service-patch.yaml
    target: {kind: Service, name: legacy-api}
";

/// helm-render takes the flags the README's commands use: the release name and chart as
/// arguments with flags after them, `-n`/`--namespace` (the patches' namespace and NOTES.txt),
/// `--show-only` (only that template; one that renders nothing is an error, as in helm),
/// `--set-file` (a file's contents as a string value, after the `--set`s).
#[test]
fn helm_render_takes_the_readme_flags() {
    let Some(helm) = Helm::get() else { return };
    let run = |args: &[&std::ffi::OsStr]| {
        let out = Command::new(helm.bin).args(args).output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let chart = chart_dir();
    let values = chart.join("ci/sidecar-values.yaml");
    let (ok, stdout, stderr) = run(&[
        "template-name".as_ref(),
        chart.as_os_str(),
        "-n".as_ref(),
        "payments".as_ref(),
        "-f".as_ref(),
        values.as_os_str(),
        "--show-only".as_ref(),
        "templates/sidecar.yaml".as_ref(),
    ]);
    assert!(ok, "{stderr}");
    let docs = yaml_documents(&stdout);
    assert_eq!(docs.len(), 1, "only templates/sidecar.yaml:\n{stdout}");
    assert_eq!(
        docs[0]["metadata"]["name"],
        "template-name-tokengate-sidecar"
    );
    assert!(stdout.starts_with("---\n# Source: tokengate/templates/sidecar.yaml\n"));
    let patch: Value =
        serde_norway::from_str(str_of(&docs[0]["data"]["deployment-patch.yaml"])).unwrap();
    assert_eq!(patch["metadata"]["namespace"], "payments");

    // Globs, and several --show-only.
    let (ok, stdout, _) = run(&[
        "--namespace".as_ref(),
        "payments".as_ref(),
        "-f".as_ref(),
        values.as_os_str(),
        "-s".as_ref(),
        "templates/network*.yaml".as_ref(),
        "--show-only".as_ref(),
        "templates/configmap.yaml".as_ref(),
        chart.as_os_str(),
    ]);
    assert!(ok);
    let kinds: Vec<String> = yaml_documents(&stdout)
        .iter()
        .map(|d| str_of(&d["kind"]).to_string())
        .collect();
    assert_eq!(kinds, ["NetworkPolicy", "ConfigMap"]);

    // A template that renders nothing in this mode, or none of that name: helm's error.
    for missing in ["templates/deployment.yaml", "templates/nothing.yaml"] {
        let (ok, stdout, stderr) = run(&[
            "-f".as_ref(),
            values.as_os_str(),
            "--show-only".as_ref(),
            missing.as_ref(),
            chart.as_os_str(),
        ]);
        assert!(!ok && stdout.is_empty());
        assert_eq!(
            stderr,
            format!("Error: could not find template {missing} in chart\n")
        );
    }

    // NOTES.txt uses the namespace too.
    let (ok, notes, _) = run(&[
        "--notes".as_ref(),
        "-n".as_ref(),
        "payments".as_ref(),
        "-f".as_ref(),
        values.as_os_str(),
        chart.as_os_str(),
    ]);
    assert!(
        ok && notes.contains("kubectl -n payments patch deployment legacy-api"),
        "{notes}"
    );

    // --set-file: the contents as they are (a string, never typed), after --set.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("extra.toml");
    std::fs::write(&file, "[x509]\nenabled = false\n").unwrap();
    let set_file = format!("config.extraToml={}", file.display());
    let (ok, stdout, stderr) = run(&[
        "-f".as_ref(),
        chart.join("ci/default-values.yaml").as_os_str(),
        "--set-file".as_ref(),
        set_file.as_ref(),
        "--set".as_ref(),
        "config.extraToml=[ignored]".as_ref(),
        "--show-only".as_ref(),
        "templates/configmap.yaml".as_ref(),
        chart.as_os_str(),
    ]);
    assert!(ok, "{stderr}");
    let config = str_of(&yaml_documents(&stdout)[0]["data"]["tokengate.toml"]).to_string();
    assert!(config.ends_with("\n[x509]\nenabled = false\n"), "{config}");
    assert!(!config.contains("[ignored]"));
    let (ok, _, stderr) = run(&[
        "--set-file".as_ref(),
        "configFile=/nonexistent/tokengate.toml".as_ref(),
        chart.as_os_str(),
    ]);
    assert!(
        !ok && stderr.contains("/nonexistent/tokengate.toml"),
        "{stderr}"
    );
}

/// The README's `--set-file configFile=insightio.toml` install, with the edits the README shows
/// for examples/insightio.toml: the edits are those the chart's messages ask for, and the
/// command renders (helm-render standing in for `helm install`).
#[test]
fn the_readme_config_file_install_renders() {
    let Some(helm) = Helm::get() else { return };
    let readme = std::fs::read_to_string(Path::new(ROOT).join("README.md")).unwrap();
    let snippet = readme
        .split("for\n`examples/insightio.toml`:\n\n```toml\n")
        .nth(1)
        .and_then(|rest| rest.split_once("```"))
        .expect("README.md shows the edits of examples/insightio.toml")
        .0;
    let (fitted, _) = fit_for_the_pod(&example("insightio"));
    let edits: toml::Table = snippet.parse().expect("the README's edits are TOML");
    let fitted_table: toml::Table = fitted.parse().unwrap();
    assert_eq!(
        edits.keys().collect::<Vec<_>>(),
        ["admin", "server", "store"],
        "the tables the edits touch"
    );
    for (table, keys) in &edits {
        let keys = keys.as_table().unwrap();
        for (key, value) in keys {
            assert_eq!(
                fitted_table[table].get(key),
                Some(value),
                "[{table}] {key} in the README's edits"
            );
        }
    }

    assert!(
        readme.contains(README_CONFIG_FILE_INSTALL),
        "README.md no longer shows:\n{README_CONFIG_FILE_INSTALL}"
    );
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("insightio.toml"), &fitted).unwrap();
    std::fs::create_dir_all(dir.path().join("helm")).unwrap();
    std::os::unix::fs::symlink(chart_dir(), dir.path().join("helm/tokengate")).unwrap();
    let script = format!(
        "set -euo pipefail\nhelm() {{ [ \"$1\" = install ] && shift && {:?} \"$@\"; }}\n{}\n",
        helm.bin,
        README_CONFIG_FILE_INSTALL.replace("\\\n", " ")
    );
    let out = Command::new("bash")
        .arg("-c")
        .arg(&script)
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{script}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r = Rendered {
        docs: yaml_documents(&String::from_utf8(out.stdout).unwrap()),
    };
    assert_eq!(r.config_text().trim_end(), fitted.trim_end());
    let secret = &env_var(r.container("tokengate"), "INSIGHT_GATEWAY_SECRET").expect("env")
        ["valueFrom"]["secretKeyRef"];
    assert_eq!(secret["name"], "insight-gateway");
}

/// The README's install of examples/insightio.toml as a whole file.
const README_CONFIG_FILE_INSTALL: &str =
    "    helm install insight helm/tokengate --set-file configFile=insightio.toml \\
      --set app.image.repository=registry.example/insight-api --set app.port=9000 \\
      --set tls.enabled=true --set tls.secretName=insight-tls \\
      --set 'tokengate.extraEnv[0].name=INSIGHT_GATEWAY_SECRET' \\
      --set 'tokengate.extraEnv[0].valueFrom.secretKeyRef.name=insight-gateway' \\
      --set 'tokengate.extraEnv[0].valueFrom.secretKeyRef.key=secret'";
