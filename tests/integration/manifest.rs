//! Per-service manifests and the host-wide `wharf.toml`: routes, env, limits
//! and their precedence, hot reload of either file, and rejections that keep
//! the previous version.

use std::time::Duration;

use wharf::Config;

use crate::support::{ServiceDir, TestServer, WharfProcess, client, eventually, get};

const APPLY: Duration = Duration::from_secs(10);

#[tokio::test(flavor = "multi_thread")]
async fn a_manifest_route_replaces_the_default_mount() {
    let dir = ServiceDir::new();
    dir.install("orders", "echo");
    dir.write("orders.toml", b"route = \"/api/orders\"\n");
    let server = TestServer::for_dir(&dir).await;
    let (status, body) = get(&server.url("/api/orders/7?full=1")).await.unwrap();
    assert_eq!(status, 200);
    assert!(body.contains("\"path\":\"/7?full=1\""), "{body}");
    assert!(
        body.contains("[\"x-forwarded-prefix\",\"/api/orders\"]"),
        "{body}"
    );
    assert_eq!(get(&server.url("/orders")).await.unwrap().0, 404);
}

#[tokio::test(flavor = "multi_thread")]
async fn editing_the_manifest_redeploys_the_service() {
    let dir = ServiceDir::new();
    dir.install("svc", "hostile");
    dir.write("svc.toml", b"[env]\nGREETING = \"hello\"\n");
    let server = TestServer::for_dir(&dir).await;
    let url = server.url("/svc/env");
    assert_eq!(get(&url).await.unwrap().1, "GREETING=hello");

    dir.install_bytes("svc.toml", b"[env]\nGREETING = \"bonjour\"\n");
    eventually(APPLY, "the new environment", || async {
        get(&url)
            .await
            .is_some_and(|(_, body)| body == "GREETING=bonjour")
    })
    .await;
    assert_eq!(
        server.host.services().service("svc").unwrap().generation(),
        2
    );

    // Removing the manifest goes back to defaults (an empty environment).
    dir.remove("svc.toml");
    eventually(APPLY, "the default environment", || async {
        get(&url)
            .await
            .is_some_and(|(status, body)| status == 200 && body.is_empty())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_bad_manifest_is_rejected_naming_file_and_key_and_the_old_version_serves() {
    let dir = ServiceDir::new();
    dir.install("svc", "hello");
    let server = TestServer::for_dir(&dir).await;
    let url = server.url("/svc");

    for (manifest, needles) in [
        (
            "[limits]\ntimeout = \"soon\"\n",
            &["svc.toml", "limits.timeout", "duration"][..],
        ),
        (
            "[limits]\nmemory = \"64GiB\"\n",
            &["svc.toml", "limits.memory"][..],
        ),
        (
            "rout = \"/x\"\n",
            &["svc.toml", "line 1", "unknown field `rout`"][..],
        ),
        (
            "[outbound]\nallow = [\"example.com\"]\n",
            &["svc.toml", "outbound.allow", "scheme"][..],
        ),
    ] {
        dir.install_bytes("svc.toml", manifest.as_bytes());
        eventually(APPLY, "the rejection", || async {
            server
                .host
                .rejection("svc")
                .is_some_and(|r| needles.iter().all(|n| r.reason.contains(n)))
        })
        .await;
        let (status, body) = get(&url).await.unwrap();
        assert_eq!(status, 200, "{body}");
        assert_eq!(
            server.host.services().service("svc").unwrap().generation(),
            1
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn two_services_on_one_route_reject_the_newer() {
    let dir = ServiceDir::new();
    dir.install("first", "hello");
    dir.write("first.toml", b"route = \"/shared\"\n");
    let server = TestServer::for_dir(&dir).await;
    dir.write("second.toml", b"route = \"/shared\"\n");
    dir.install("second", "echo");
    eventually(APPLY, "the conflict to be reported", || async {
        server
            .host
            .rejection("second")
            .is_some_and(|r| r.reason.contains("already served by service \"first\""))
    })
    .await;
    let (_, body) = get(&server.url("/shared")).await.unwrap();
    assert!(body.contains("Hello from the microservice!"), "{body}");
}

#[tokio::test(flavor = "multi_thread")]
async fn host_defaults_come_from_wharf_toml_and_follow_its_changes() {
    let dir = ServiceDir::new();
    dir.install("hostile", "hostile");
    dir.write("wharf.toml", b"[limits]\ntimeout = \"1s\"\n");
    let server = TestServer::for_dir(&dir).await;
    let deployment = server.host.services().service("hostile").unwrap().clone();
    assert_eq!(deployment.limits().timeout, Duration::from_secs(1));
    let (status, body) = get(&server.url("/hostile/busy-loop")).await.unwrap();
    assert_eq!(status, 504);
    assert!(body.contains("time limit of 1s"), "{body}");

    dir.install_bytes("wharf.toml", b"[limits]\ntimeout = \"2s\"\n");
    eventually(APPLY, "the new default", || async {
        server
            .host
            .services()
            .service("hostile")
            .unwrap()
            .limits()
            .timeout
            == Duration::from_secs(2)
    })
    .await;

    // A broken wharf.toml keeps the defaults in force.
    dir.install_bytes("wharf.toml", b"[limits]\ntimeout = 2\n");
    let busy = server.url("/hostile/busy-loop");
    let (status, body) = get(&busy).await.unwrap();
    assert_eq!(status, 504);
    assert!(body.contains("time limit of 2s"), "{body}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_bad_wharf_toml_at_start_is_an_error() {
    let dir = ServiceDir::new();
    dir.write("wharf.toml", b"[limits]\nmemory = \"lots\"\n");
    let err = wharf::Host::new(Config::for_dir(dir.path()))
        .await
        .err()
        .expect("must fail");
    let err = format!("{err:#}");
    assert!(
        err.contains("wharf.toml") && err.contains("limits.memory"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn precedence_is_manifest_then_flags_then_wharf_toml() {
    let dir = ServiceDir::new();
    dir.install("plain", "hostile");
    dir.install("own", "hostile");
    dir.write("own.toml", b"[limits]\ntimeout = \"3s\"\n");
    dir.write(
        "wharf.toml",
        b"[limits]\ntimeout = \"5s\"\nconcurrency = 7\n",
    );
    let wharf = WharfProcess::start(dir.path(), &["--timeout", "1s"]);
    // plain: the flag beats wharf.toml for the timeout; wharf.toml still
    // sets the concurrency nobody else set.
    let response = client()
        .get(wharf.url("/plain/busy-loop"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 504);
    assert!(response.text().await.unwrap().contains("time limit of 1s"));
    // own: its manifest beats the flag.
    let response = client()
        .get(wharf.url("/own/busy-loop"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 504);
    assert!(response.text().await.unwrap().contains("time limit of 3s"));
}
