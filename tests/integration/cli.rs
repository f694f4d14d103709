//! The `wharf` binary: help text, the address line, logs, signals and
//! graceful shutdown.

use std::process::Command;
use std::time::Duration;

use crate::support::{ServiceDir, WharfProcess, get};

#[test]
fn help_explains_every_flag() {
    let top = Command::new(env!("CARGO_BIN_EXE_wharf"))
        .arg("--help")
        .output()
        .unwrap();
    let top = String::from_utf8_lossy(&top.stdout);
    assert!(top.contains("serve"), "{top}");
    let serve = Command::new(env!("CARGO_BIN_EXE_wharf"))
        .args(["serve", "--help"])
        .output()
        .unwrap();
    let serve = String::from_utf8_lossy(&serve.stdout);
    for flag in [
        "--listen",
        "--no-watch",
        "--timeout",
        "--memory",
        "--drain-timeout",
        "--max-instances",
        "--log",
        "[DIR]",
    ] {
        assert!(serve.contains(flag), "serve --help lacks {flag}:\n{serve}");
    }
}

#[test]
fn a_missing_directory_is_a_clear_error() {
    let output = Command::new(env!("CARGO_BIN_EXE_wharf"))
        .args([
            "serve",
            "/nonexistent/wharf-services",
            "--listen",
            "127.0.0.1:0",
        ])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("/nonexistent/wharf-services"), "{stderr}");
    assert!(stderr.contains("does not exist"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_binary_serves_and_logs_rejections_by_file_name() {
    let dir = ServiceDir::new();
    dir.install("hello", "hello");
    let wharf = WharfProcess::start(dir.path(), &[]);
    let (status, body) = get(&wharf.url("/hello")).await.unwrap();
    assert_eq!(status, 200, "{body}");
    wharf
        .wait_for_log_line(
            &["access", "service=hello", "status=200"],
            Duration::from_secs(5),
        )
        .await;

    dir.install_bytes("hello.wasm", b"garbage");
    wharf
        .wait_for_log_line(
            &["rejected", "hello.wasm", "not a WebAssembly binary"],
            Duration::from_secs(10),
        )
        .await;
    let (status, _) = get(&wharf.url("/hello")).await.unwrap();
    assert_eq!(status, 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_lets_the_request_in_flight_finish_then_exits_zero() {
    let dir = ServiceDir::new();
    dir.install("hostile", "hostile");
    let mut wharf = WharfProcess::start(dir.path(), &[]);
    let slow_url = wharf.url("/hostile/sleep?ms=1500");
    let slow = tokio::spawn(async move { get(&slow_url).await });
    // The guest logs when it starts sleeping: the request is in flight.
    wharf
        .wait_for_log_line(&["sleeping 1500 ms"], Duration::from_secs(10))
        .await;
    wharf.terminate();
    let status = wharf.wait_exit(Duration::from_secs(20)).await;
    assert!(
        status.success(),
        "exit status {status}; log:\n{}",
        wharf.log()
    );
    let (code, body) = slow
        .await
        .unwrap()
        .expect("the in-flight request completes");
    assert_eq!((code, body.as_str()), (200, "slept 1500 ms"));
    // Nothing listens any more.
    assert!(get(&wharf.url("/hostile/")).await.is_none());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_slow_request_finishes_on_v1_while_v2_serves_new_ones() {
    let dir = ServiceDir::new();
    dir.install("svc", "hostile");
    let wharf = WharfProcess::start(dir.path(), &[]);
    let slow_url = wharf.url("/svc/sleep?ms=2000");
    let slow = tokio::spawn(async move {
        let response = crate::support::client()
            .get(&slow_url)
            .send()
            .await
            .unwrap();
        let generation = response.headers()[wharf::GENERATION_HEADER]
            .to_str()
            .unwrap()
            .to_string();
        (
            response.status().as_u16(),
            generation,
            response.text().await.unwrap(),
        )
    });
    wharf
        .wait_for_log_line(&["sleeping 2000 ms"], Duration::from_secs(10))
        .await;

    dir.install("svc", "hello");
    let url = wharf.url("/svc");
    crate::support::eventually(Duration::from_secs(10), "v2 to answer", || async {
        get(&url)
            .await
            .is_some_and(|(_, body)| body.contains("Hello from the microservice!"))
    })
    .await;
    assert!(
        !slow.is_finished(),
        "the slow request ended before v2 took over"
    );

    let (status, generation, body) = slow.await.unwrap();
    assert_eq!(
        (status, generation.as_str(), body.as_str()),
        (200, "1", "slept 2000 ms")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn regression_a_second_wharf_on_a_used_port_fails_instead_of_sharing_it() {
    // SO_REUSEPORT let another process join the listening group: a second
    // `wharf serve --listen` on a port Wharf already used started silently
    // and took about half of the traffic.
    let first_dir = ServiceDir::new();
    first_dir.install("hello", "hello");
    let first = WharfProcess::start(first_dir.path(), &[]);
    let addr = first.base.trim_start_matches("http://").to_string();
    let other_dir = ServiceDir::new();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_wharf"))
        .arg("serve")
        .arg(other_dir.path())
        .args(["--listen", &addr])
        .output()
        .expect("run a second wharf");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        !output.status.success(),
        "the second wharf started: {stderr}"
    );
    assert!(stderr.contains("in use"), "{stderr}");
    // Every request still reaches the first one.
    for _ in 0..20 {
        assert_eq!(get(&first.url("/hello")).await.unwrap().0, 200);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn regression_serve_without_a_directory_creates_the_default_one() {
    // `wharf serve` with no directory failed when ./services did not exist,
    // and so did the README's walkthrough.
    let work = ServiceDir::new();
    let wharf = WharfProcess::start_with(|command| {
        command
            .current_dir(work.path())
            .args(["serve", "--listen", "127.0.0.1:0"]);
    });
    assert!(work.path().join("services").is_dir());
    wharf
        .wait_for_log_line(&["created the services directory"], Duration::from_secs(5))
        .await;
    // It is watched like any other: a service dropped in is served.
    let bytes = crate::support::guest_bytes("hello");
    std::fs::write(work.path().join("services").join(".hello.tmp"), &bytes).unwrap();
    std::fs::rename(
        work.path().join("services").join(".hello.tmp"),
        work.path().join("services").join("hello.wasm"),
    )
    .unwrap();
    crate::support::eventually(Duration::from_secs(10), "hello to be served", || async {
        get(&wharf.url("/hello"))
            .await
            .is_some_and(|(s, _)| s == 200)
    })
    .await;
    // A directory given explicitly must exist: a typo is an error.
    let output = Command::new(env!("CARGO_BIN_EXE_wharf"))
        .current_dir(work.path())
        .args(["serve", "no-such-dir", "--listen", "127.0.0.1:0"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(!work.path().join("no-such-dir").exists());
}

/// The `wharf` flags a recipe's text passes: every `--flag` token, in
/// `lines` that run wharf.
fn wharf_flags<'a>(lines: impl Iterator<Item = &'a str>) -> Vec<String> {
    let mut flags = Vec::new();
    for line in lines {
        for token in
            line.split(|c: char| c.is_whitespace() || c == '"' || c == ',' || c == '[' || c == ']')
        {
            let token = token.trim_end_matches('\\');
            if let Some(name) = token.strip_prefix("--")
                && !name.is_empty()
                && name.chars().all(|c| c.is_ascii_lowercase() || c == '-')
            {
                flags.push(format!("--{name}"));
            }
        }
    }
    flags
}

#[test]
fn the_cluster_and_kubernetes_recipes_use_only_flags_the_binary_has() {
    let serve = Command::new(env!("CARGO_BIN_EXE_wharf"))
        .args(["serve", "--help"])
        .output()
        .unwrap();
    let serve = String::from_utf8_lossy(&serve.stdout);
    let examples = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let read = |path: &str| std::fs::read_to_string(examples.join(path)).unwrap();

    // run.sh: the lines from the wharf invocation to its end.
    let script = read("cluster/run.sh");
    let mut in_wharf = false;
    let script_lines = script.lines().filter(|line| {
        if line.contains("\"$wharf\" serve") {
            in_wharf = true;
        }
        let take = in_wharf;
        if in_wharf && !line.trim_end().ends_with('\\') {
            in_wharf = false;
        }
        take
    });
    let mut flags = wharf_flags(script_lines);
    // The Kubernetes manifest's container args, and the image's CMD.
    let manifest = read("kubernetes/wharf.yaml");
    flags.extend(wharf_flags(
        manifest
            .lines()
            .filter(|line| line.trim_start().starts_with("- --")),
    ));
    let dockerfile = read("kubernetes/Dockerfile");
    flags.extend(wharf_flags(
        dockerfile.lines().filter(|line| line.starts_with("CMD")),
    ));
    assert!(flags.len() >= 12, "too few flags found: {flags:?}");
    for flag in &flags {
        assert!(
            serve.contains(flag.as_str()),
            "a recipe passes {flag}, which `wharf serve` does not have"
        );
    }
    // The probes and the scrape path are routes the admin endpoint has.
    for path in ["/readyz", "/healthz", "/metrics"] {
        assert!(manifest.contains(path));
    }
    assert!(read("cluster/haproxy.cfg").contains("GET /readyz"));
}

#[tokio::test(flavor = "multi_thread")]
async fn the_kubernetes_config_map_is_a_wharf_toml_that_joins_its_cluster() {
    let manifest = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/kubernetes/wharf.yaml"),
    )
    .unwrap();
    // The block under `wharf.toml: |`, unindented.
    let file: String = manifest
        .lines()
        .skip_while(|line| line.trim() != "wharf.toml: |")
        .skip(1)
        .take_while(|line| line.starts_with("    "))
        .map(|line| format!("{}\n", &line[4..]))
        .collect();
    assert!(file.contains("[cluster]"), "{file}");
    let dir = ServiceDir::new();
    dir.write("wharf.toml", file.as_bytes());
    // The recipe's NATS is not here: the host starts, and keeps trying.
    let wharf = WharfProcess::start(dir.path(), &[]);
    wharf
        .wait_for_log_line(
            &["joining the cluster", "prod", "nats://nats:4222"],
            Duration::from_secs(30),
        )
        .await;
}

/// A field `name=VALUE` of a log line, as a number.
fn log_field(line: &str, name: &str) -> Option<f64> {
    let at = line.find(&format!(" {name}="))? + name.len() + 2;
    line[at..]
        .split(|c: char| c.is_whitespace())
        .next()?
        .parse()
        .ok()
}

#[tokio::test(flavor = "multi_thread")]
async fn regression_compile_time_excludes_the_wait_behind_other_compiles() {
    // Ten services compiled at once, with no cache, on a machine that
    // compiles two at a time: most wait. Each deploy line says how long it
    // waited (queue_ms) apart from how long its own compile took
    // (compile_ms); before, compile_ms counted the wait too, so a small
    // service queued behind big ones looked slow to compile.
    let dir = ServiceDir::new();
    for guest in [
        "hello",
        "echo",
        "users",
        "orders",
        "gateway",
        "cart",
        "kv",
        "kv_draft",
        "messenger",
        "report",
    ] {
        dir.install(&guest.replace('_', "-"), guest);
    }
    let wharf = WharfProcess::start(dir.path(), &["--no-cache"]);
    let log = wharf.log();
    let deployed: Vec<&str> = log
        .lines()
        .filter(|line| line.contains("service deployed"))
        .collect();
    assert_eq!(deployed.len(), 10, "{log}");
    let mut compiles: Vec<f64> = Vec::new();
    let mut waits: Vec<f64> = Vec::new();
    for line in &deployed {
        compiles
            .push(log_field(line, "compile_ms").unwrap_or_else(|| panic!("no compile_ms: {line}")));
        waits.push(log_field(line, "queue_ms").unwrap_or_else(|| panic!("no queue_ms: {line}")));
    }
    let longest_wait = waits.iter().cloned().fold(0.0, f64::max);
    assert!(
        longest_wait > 0.0,
        "nothing waited (compiles {compiles:?}): {deployed:#?}"
    );
}
