//! The developer's commands: `wharf check` tells whether a file deploys
//! without serving it; `wharf deploy`, `rm` and `status` drive a running
//! host's admin API.

use std::process::{Command, Output};
use std::time::Duration;

use crate::support::{ServiceDir, WharfProcess, eventually, get, guest, guest_bytes};

pub(crate) fn wharf(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_wharf"));
    command
        .args(args)
        .env_remove("WHARF_ADMIN_TOKEN")
        .env_remove("WHARF_ADMIN_URL");
    for (key, value) in env {
        command.env(key, value);
    }
    command.output().expect("run wharf")
}

pub(crate) fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

pub(crate) fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// A component importing `wasi:nope/thing@1.0.0` (an empty instance) and
/// exporting nothing, encoded by hand.
fn component_importing_nope() -> Vec<u8> {
    let name = b"wasi:nope/thing@1.0.0";
    let types = [0x01, 0x42, 0x00];
    let mut import = vec![0x01, 0x00, name.len() as u8];
    import.extend_from_slice(name);
    import.extend_from_slice(&[0x05, 0x00]);
    let mut bytes = b"\0asm\x0d\x00\x01\x00".to_vec();
    bytes.extend_from_slice(&[0x07, types.len() as u8]);
    bytes.extend_from_slice(&types);
    bytes.extend_from_slice(&[0x0a, import.len() as u8]);
    bytes.extend_from_slice(&import);
    bytes
}

#[test]
fn check_says_a_good_component_deploys_and_what_it_imports() {
    let output = wharf(&["check", guest("hello").to_str().unwrap()], &[]);
    let text = stdout(&output);
    assert!(output.status.success(), "{text}{}", stderr(&output));
    for needle in [
        "hello: a WebAssembly component",
        "serves:  wasi:http/incoming-handler@0.2",
        "wasi:cli/environment@0.2",
        "[env]",
        "compile: ",
        "verdict: deploys",
    ] {
        assert!(text.contains(needle), "no {needle:?} in:\n{text}");
    }
    // --json, for scripts.
    let output = wharf(&["check", "--json", guest("kv").to_str().unwrap()], &[]);
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(report["refused"], serde_json::Value::Null);
    assert!(report["compiled_size"].as_u64().unwrap() > 0);
    let imports = report["imports"].as_array().unwrap();
    assert!(
        imports.iter().any(
            |i| i["name"].as_str().unwrap().starts_with("wasi:keyvalue/")
                && i["note"].as_str().unwrap().contains("[keyvalue] buckets")
        ),
        "{report}"
    );
}

#[test]
fn check_refuses_what_would_not_deploy_and_says_why() {
    let dir = ServiceDir::new();
    // A core module.
    dir.write("core.wasm", b"\0asm\x01\0\0\0");
    // A good component with a broken manifest beside it (read by default).
    dir.install_bytes("svc.wasm", &guest_bytes("hello"));
    dir.write("svc.toml", b"[limits]\nmemory = \"lots\"\n");
    // A component importing what no host provides, and exporting nothing.
    dir.write("nope.wasm", &component_importing_nope());
    let path = |file: &str| dir.path().join(file).to_str().unwrap().to_string();
    for (file, needle) in [
        ("core.wasm", "core WebAssembly module"),
        ("svc.wasm", "svc.toml: limits.memory"),
        ("nope.wasm", "exports neither wasi:http"),
    ] {
        let output = wharf(&["check", &path(file)], &[]);
        let text = stdout(&output);
        assert_eq!(output.status.code(), Some(1), "{file}: {text}");
        assert!(
            text.contains("verdict: refused") && text.contains(needle),
            "{file}: no {needle:?} in:\n{text}"
        );
    }
    let nope = stdout(&wharf(&["check", &path("nope.wasm")], &[]));
    assert!(
        nope.contains("wasi:nope/thing@1.0.0  NOT PROVIDED"),
        "{nope}"
    );
    // The manifest given on the command line wins over the one beside it.
    let good = dir.path().join("good.toml");
    std::fs::write(&good, "[limits]\nmemory = \"64MiB\"\n").unwrap();
    let output = wharf(
        &[
            "check",
            &path("svc.wasm"),
            "--manifest",
            good.to_str().unwrap(),
        ],
        &[],
    );
    assert!(output.status.success(), "{}", stdout(&output));
}

/// `wharf serve DIR` with an admin endpoint whose writes need `token`,
/// and the directory holding the token's file (`token`).
fn host_with_token(dir: &ServiceDir, token: &str) -> (WharfProcess, ServiceDir) {
    let secrets = ServiceDir::new();
    let token_file = secrets.path().join("token");
    std::fs::write(&token_file, format!("{token}\n")).unwrap();
    let host = WharfProcess::start(
        dir.path(),
        &[
            "--admin",
            "127.0.0.1:0",
            "--admin-token-file",
            token_file.to_str().unwrap(),
        ],
    );
    (host, secrets)
}

#[tokio::test(flavor = "multi_thread")]
async fn deploy_status_and_rm_drive_a_running_host() {
    let dir = ServiceDir::new();
    let (host, secrets) = host_with_token(&dir, "s3cret");
    let token_file = secrets.path().join("token");
    let admin = host.admin_url();
    let to = ["--to", admin.as_str()];
    let token = ["--token-file", token_file.to_str().unwrap()];

    // A component and the manifest beside it, deployed as `greeter`.
    let work = ServiceDir::new();
    work.install_bytes("hello.wasm", &guest_bytes("hello"));
    work.write("hello.toml", b"route = \"/greet\"\n");
    let file = work.path().join("hello.wasm");
    let file = file.to_str().unwrap();
    let args = |extra: &[&str]| -> Vec<String> {
        ["deploy", file, "--name", "greeter"]
            .iter()
            .chain(to.iter())
            .chain(extra.iter())
            .map(|s| s.to_string())
            .collect()
    };
    let run = |args: Vec<String>, env: &[(&str, &str)]| {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        wharf(&args, env)
    };
    // Without the token: refused, and the message says why.
    let output = run(args(&[]), &[]);
    assert_eq!(output.status.code(), Some(1));
    assert!(stderr(&output).contains("401"), "{}", stderr(&output));
    // With it (from the file, or from WHARF_ADMIN_TOKEN).
    let output = run(args(&token), &[]);
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(
        stdout(&output).contains("greeter: serving at /greet, generation 1, sha256:"),
        "{}",
        stdout(&output)
    );
    assert_eq!(
        get(&host.url("/greet")).await.map(|r| r.0),
        Some(200),
        "the deploy serves at its manifest's route"
    );
    assert!(dir.path().join("greeter.toml").exists());

    // A broken version is refused with its reason; the previous one serves.
    work.write("broken.wasm", b"\0asm\x01\0\0\0");
    let broken = work.path().join("broken.wasm");
    let output = wharf(
        &[
            "deploy",
            broken.to_str().unwrap(),
            "--name",
            "greeter",
            "--to",
            &admin,
        ],
        &[("WHARF_ADMIN_TOKEN", "s3cret")],
    );
    assert_eq!(output.status.code(), Some(1));
    assert!(
        stderr(&output).contains("core WebAssembly module"),
        "{}",
        stderr(&output)
    );
    assert_eq!(get(&host.url("/greet")).await.map(|r| r.0), Some(200));

    // Status: the service, its generation, its traffic, the last deploy.
    let load = tokio::spawn({
        let url = host.url("/greet");
        async move {
            for _ in 0..200 {
                let _ = get(&url).await;
            }
        }
    });
    let output = wharf(&["status", "--window", "1", "--to", &admin], &[]);
    load.await.unwrap();
    let table = stdout(&output);
    assert!(output.status.success(), "{table}{}", stderr(&output));
    let row = table
        .lines()
        .find(|l| l.starts_with("greeter "))
        .unwrap_or_else(|| panic!("no greeter row:\n{table}"));
    let fields: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(fields[1], "/greet", "{table}");
    assert_eq!(fields[2], "1", "{table}");
    let rate: f64 = fields[3].parse().unwrap();
    assert!(rate > 0.0, "no requests counted:\n{table}");
    assert!(
        row.contains("rejected: admin upload:") && row.contains("core WebAssembly module"),
        "the refused deploy is the last result:\n{table}"
    );

    // rm, then nothing is left.
    let output = wharf(
        &[
            "rm",
            "greeter",
            "--to",
            &admin,
            "--token-file",
            token_file.to_str().unwrap(),
        ],
        &[],
    );
    assert!(output.status.success(), "{}", stderr(&output));
    eventually(Duration::from_secs(10), "greeter gone", || {
        let url = host.url("/greet");
        async move { get(&url).await.is_some_and(|(s, _)| s == 404) }
    })
    .await;
    let output = wharf(
        &["rm", "greeter", "--to", &admin],
        &[("WHARF_ADMIN_TOKEN", "s3cret")],
    );
    assert_eq!(output.status.code(), Some(1));
    assert!(
        stderr(&output).contains("no service named greeter"),
        "{}",
        stderr(&output)
    );
}

/// Runs a build step of a generated project, failing with its output.
pub(crate) fn build_step(
    dir: &std::path::Path,
    program: &str,
    args: &[&str],
    path_first: Option<&str>,
) {
    let mut command = Command::new(program);
    command
        .args(args)
        .current_dir(dir)
        // The outer `cargo test` must not steer the project's own build.
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("CARGO_BUILD_TARGET")
        .env_remove("CARGO_TARGET_DIR");
    if let Some(first) = path_first {
        let path = std::env::var("PATH").unwrap_or_default();
        command.env("PATH", format!("{first}:{path}"));
    }
    let output = command
        .output()
        .unwrap_or_else(|err| panic!("running {program}: {err}"));
    assert!(
        output.status.success(),
        "{program} {args:?} failed in {}:\n{}{}",
        dir.display(),
        stdout(&output),
        stderr(&output)
    );
}

/// `wharf new NAME --lang LANG`, the printed next steps, and the project.
pub(crate) fn new_project(name: &str, lang: &str) -> (tempfile::TempDir, std::path::PathBuf) {
    let parent = tempfile::tempdir().unwrap();
    let dir = parent.path().join(name);
    let output = wharf(
        &["new", name, "--lang", lang, "--dir", dir.to_str().unwrap()],
        &[],
    );
    let text = stdout(&output);
    assert!(output.status.success(), "{text}{}", stderr(&output));
    assert!(
        text.contains("wharf check") && text.contains(&format!("{name}.toml")),
        "the next steps build, check and deploy it:\n{text}"
    );
    (parent, dir)
}

/// Serves `wasm` with the project's manifest and checks every route the
/// templates promise.
async fn serve_and_probe(name: &str, project: &std::path::Path, wasm: &std::path::Path) {
    let output = wharf(
        &[
            "check",
            wasm.to_str().unwrap(),
            "--manifest",
            project.join(format!("{name}.toml")).to_str().unwrap(),
            "--name",
            name,
        ],
        &[],
    );
    assert!(output.status.success(), "{}", stdout(&output));
    let services = ServiceDir::new();
    services.write(
        &format!("{name}.toml"),
        &std::fs::read(project.join(format!("{name}.toml"))).unwrap(),
    );
    services.install_bytes(&format!("{name}.wasm"), &std::fs::read(wasm).unwrap());
    let server = crate::support::TestServer::for_dir(&services).await;
    let (status, body) = get(&server.url(&format!("/{name}/"))).await.unwrap();
    assert_eq!(status, 200, "{body}");
    assert!(body.contains(&format!("Hello from {name}!")), "{body}");
    let (status, body) = get(&server.url(&format!("/{name}/hello?name=Ada%20L")))
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("Hello, Ada L!"), "{body}");
    let response = crate::support::client()
        .post(server.url(&format!("/{name}/echo")))
        .body(r#"{"order":42}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let echoed: serde_json::Value = response.json().await.unwrap();
    assert_eq!(echoed["bytes"], 12, "{echoed}");
    let (status, _) = get(&server.url(&format!("/{name}/nowhere"))).await.unwrap();
    assert_eq!(status, 404);
    // Key-value and messaging out of the box: the template's own bucket and
    // topics, granted by its own manifest, through its helper module.
    for expected in [1, 2] {
        let (status, body) = get(&server.url(&format!("/{name}/count"))).await.unwrap();
        assert_eq!(status, 200, "{body}");
        let count: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(count["count"], expected, "{body}");
    }
    let response = crate::support::client()
        .post(server.url(&format!("/{name}/publish")))
        .body("an event")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    let sent: serde_json::Value = response.json().await.unwrap();
    assert_eq!(sent["topic"], format!("{name}.events"), "{sent}");
}

fn workspace() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_rust_template_builds_and_serves() {
    let (_parent, project) = new_project("hello-rs", "rust");
    // A target directory of the workspace's, so later runs build quickly.
    let target = workspace().join("target").join("templates");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    build_step(
        &project,
        &cargo,
        &[
            "build",
            "--release",
            "--target",
            "wasm32-wasip2",
            "--target-dir",
            target.to_str().unwrap(),
        ],
        None,
    );
    let wasm = target.join("wasm32-wasip2/release/hello_rs.wasm");
    serve_and_probe("hello-rs", &project, &wasm).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_javascript_template_builds_and_serves() {
    let (_parent, project) = new_project("hello-js", "js");
    build_step(
        &project,
        "npm",
        &["install", "--no-audit", "--no-fund", "--prefer-offline"],
        None,
    );
    build_step(&project, "npm", &["run", "build"], None);
    serve_and_probe("hello-js", &project, &project.join("hello-js.wasm")).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_python_template_builds_and_serves() {
    let (_parent, project) = new_project("hello-py", "python");
    // componentize-py from the venv `cargo xtask guests` made, as the
    // project's `pip install .` would provide it.
    let venv = workspace().join("guests/python/.venv/bin");
    build_step(&project, "sh", &["build.sh"], Some(venv.to_str().unwrap()));
    serve_and_probe("hello-py", &project, &project.join("hello-py.wasm")).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_typescript_template_builds_and_serves() {
    let (_parent, project) = new_project("hello-ts", "ts");
    build_step(
        &project,
        "npm",
        &["install", "--no-audit", "--no-fund", "--prefer-offline"],
        None,
    );
    build_step(&project, "npm", &["run", "build"], None);
    serve_and_probe("hello-ts", &project, &project.join("hello-ts.wasm")).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn regression_a_refused_deploy_is_refused_before_its_file_is_sent() {
    // The host answered 401 before reading the upload and closed the
    // connection; a client still sending sometimes saw only "Broken pipe"
    // (once in CI). The token is now checked before the file is streamed,
    // so the upload is never attempted.
    let dir = ServiceDir::new();
    let (host, _secrets) = host_with_token(&dir, "right");
    let admin = host.admin_url();
    let work = ServiceDir::new();
    work.write("big.wasm", &vec![0u8; 64 << 20]);
    let file = work.path().join("big.wasm");
    let output = wharf(
        &["deploy", file.to_str().unwrap(), "--to", &admin],
        &[("WHARF_ADMIN_TOKEN", "wrong")],
    );
    assert_eq!(output.status.code(), Some(1));
    let error = stderr(&output);
    assert!(
        error.contains("401")
            && error.contains("wrong bearer token")
            && !error.contains("Broken pipe"),
        "{error}"
    );
    assert!(!dir.path().join("big.wasm").exists());
    // One refusal: the token check (GET /auth), not a second one for an
    // upload sent anyway.
    let refusals = host.log().matches("wrong bearer token").count();
    assert_eq!(
        refusals,
        1,
        "the upload was sent before the token was checked:\n{}",
        host.log()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn regression_admin_endpoint_served_plain_http_beside_a_tls_listener() {
    // With --tls-cert the public listener spoke HTTPS but the admin
    // endpoint plain HTTP, so its bearer token crossed the wire in the
    // clear. Now it speaks HTTPS only, and refuses plain HTTP by name.
    let pki = crate::support::Pki::new();
    let dir = ServiceDir::new();
    dir.install_bytes("hello.wasm", &guest_bytes("hello"));
    let host = WharfProcess::start_with(|command| {
        command
            .args(["serve"])
            .arg(dir.path())
            .args(["--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"])
            .args(["--tls-cert", &pki.arg("server.pem")])
            .args(["--tls-key", &pki.arg("server-key.pem")])
            .env("WHARF_ADMIN_TOKEN", "tls-t0ken");
    });
    let admin = host.admin_url();
    assert!(admin.starts_with("https://"), "{admin}");
    let plain = admin.replace("https://", "http://");
    let answer = reqwest::Client::new()
        .get(format!("{plain}/services"))
        .bearer_auth("tls-t0ken")
        .send()
        .await
        .expect("a plain HTTP answer");
    assert_eq!(answer.status(), 400);
    let said = answer.text().await.unwrap_or_default();
    assert!(
        said.contains("HTTPS only") && said.contains(&admin),
        "{said}"
    );

    // Over TLS with the CA: the CLI works; without it, it fails to verify.
    let ca = pki.arg("ca.pem");
    let env = [("WHARF_ADMIN_TOKEN", "tls-t0ken")];
    let output = wharf(&["status", "--to", &admin, "--ca", &ca], &env);
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(stdout(&output).contains("hello"), "{}", stdout(&output));
    let output = wharf(&["status", "--to", &admin], &env);
    assert!(!output.status.success());
    drop(host);

    // Required by wharf.toml, and no certificate: the host refuses to start.
    dir.write("wharf.toml", b"[admin]\ntls_required = true\n");
    let data = tempfile::tempdir().expect("temp dir");
    let output = wharf(
        &[
            "serve",
            dir.path().to_str().expect("a UTF-8 path"),
            "--listen",
            "127.0.0.1:0",
            "--admin",
            "127.0.0.1:0",
            "--data-dir",
            data.path().to_str().expect("a UTF-8 path"),
        ],
        &[],
    );
    assert!(!output.status.success());
    assert!(
        stderr(&output).contains("the admin endpoint must use TLS"),
        "{}",
        stderr(&output)
    );
}
