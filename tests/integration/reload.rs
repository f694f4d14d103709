//! The live directory: deploy, replace and remove by file, rejections that
//! keep the previous version, and files that are ignored.

use std::time::Duration;

use crate::support::{CORE_MODULE, ServiceDir, TestServer, client, eventually, get, guest_bytes};

/// The brief promises changes within a second; tests allow slack for a
/// loaded CI machine compiling in parallel.
const APPLY: Duration = Duration::from_secs(10);

async fn status_of(url: &str) -> Option<u16> {
    get(url).await.map(|(status, _)| status)
}

async fn generation_of(url: &str) -> Option<String> {
    let response = client().get(url).send().await.ok()?;
    response
        .headers()
        .get(wharf::GENERATION_HEADER)
        .map(|v| v.to_str().unwrap_or_default().to_string())
}

#[tokio::test(flavor = "multi_thread")]
async fn copying_a_file_in_deploys_it_while_serving() {
    let dir = ServiceDir::new();
    let server = TestServer::for_dir(&dir).await;
    assert_eq!(status_of(&server.url("/hello")).await, Some(404));
    // A plain write, as `cp` does: not atomic.
    dir.write("hello.wasm", &guest_bytes("hello"));
    let url = server.url("/hello");
    eventually(APPLY, "hello to be deployed", || async {
        status_of(&url).await == Some(200)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn replacing_a_file_switches_to_the_new_version() {
    let dir = ServiceDir::new();
    dir.install("svc", "hello");
    let server = TestServer::for_dir(&dir).await;
    let url = server.url("/svc");
    let (_, body) = get(&url).await.unwrap();
    assert!(body.contains("Hello from the microservice!"));
    assert_eq!(generation_of(&url).await.as_deref(), Some("1"));

    dir.install("svc", "echo");
    eventually(APPLY, "the echo version to answer", || async {
        get(&url)
            .await
            .is_some_and(|(_, body)| body.contains("\"method\""))
    })
    .await;
    assert_eq!(generation_of(&url).await.as_deref(), Some("2"));
}

#[tokio::test(flavor = "multi_thread")]
async fn deleting_a_file_removes_the_service() {
    let dir = ServiceDir::new();
    dir.install("hello", "hello");
    let server = TestServer::for_dir(&dir).await;
    let url = server.url("/hello");
    assert_eq!(status_of(&url).await, Some(200));
    dir.remove("hello.wasm");
    eventually(APPLY, "hello to be removed", || async {
        status_of(&url).await == Some(404)
    })
    .await;
    assert!(server.host.services().service("hello").is_none());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_broken_replacement_is_rejected_and_the_old_version_keeps_serving() {
    let dir = ServiceDir::new();
    dir.install("hello", "hello");
    let server = TestServer::for_dir(&dir).await;
    let url = server.url("/hello");
    let first_digest = server
        .host
        .services()
        .service("hello")
        .unwrap()
        .digest()
        .to_string();

    for (bytes, reason) in [
        (&b"this is not wasm at all"[..], "not a WebAssembly binary"),
        (CORE_MODULE, "core WebAssembly module, not a component"),
    ] {
        dir.install_bytes("hello.wasm", bytes);
        eventually(APPLY, "the rejection to be recorded", || async {
            server
                .host
                .registry()
                .rejection("hello")
                .is_some_and(|r| r.reason.contains(reason))
        })
        .await;
        let (status, body) = get(&url).await.unwrap();
        assert_eq!(status, 200);
        assert!(body.contains("Hello from the microservice!"));
        let current = server.host.services();
        let current = current.service("hello").unwrap();
        assert_eq!(current.digest(), first_digest);
        assert_eq!(current.generation(), 1);
    }

    // A good file clears the rejection and takes over.
    dir.install("hello", "echo");
    eventually(APPLY, "the good replacement", || async {
        server.host.registry().rejection("hello").is_none()
            && server
                .host
                .services()
                .service("hello")
                .is_some_and(|d| d.generation() == 2)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_component_without_the_http_handler_is_rejected() {
    let dir = ServiceDir::new();
    let server = TestServer::for_dir(&dir).await;
    // A valid component, but an empty one: it exports nothing.
    let empty_component = b"\0asm\x0d\0\x01\0";
    dir.install_bytes("empty.wasm", empty_component);
    eventually(APPLY, "the rejection", || async {
        server
            .host
            .registry()
            .rejection("empty")
            .is_some_and(|r| r.reason.contains("wasi:http/incoming-handler"))
    })
    .await;
    assert_eq!(status_of(&server.url("/empty")).await, Some(404));
}

#[tokio::test(flavor = "multi_thread")]
async fn temp_dot_and_other_files_are_ignored() {
    let dir = ServiceDir::new();
    let server = TestServer::for_dir(&dir).await;
    let hello = guest_bytes("hello");
    dir.write(".hidden.wasm", &hello);
    dir.write("hello.wasm~", &hello);
    dir.write("hello.wasm.part", &hello);
    dir.write("notes.txt", b"not a service");
    // Then a real one: once it is live, the others had their chance.
    dir.install("real", "hello");
    let url = server.url("/real");
    eventually(APPLY, "the real service", || async {
        status_of(&url).await == Some(200)
    })
    .await;
    let services = server.host.services();
    let names: Vec<&str> = services.services().map(|d| d.name()).collect();
    assert_eq!(names, ["real"]);
    assert!(server.host.registry().rejections().is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn services_present_at_start_are_loaded_before_the_host_is_ready() {
    let dir = ServiceDir::new();
    for name in ["a", "b", "c"] {
        dir.install(name, "hello");
    }
    dir.install_bytes("broken.wasm", b"garbage");
    let server = TestServer::for_dir(&dir).await;
    let report = server.host.load_report();
    assert_eq!((report.deployed, report.rejected), (3, 1));
    for name in ["a", "b", "c"] {
        assert_eq!(status_of(&server.url(&format!("/{name}"))).await, Some(200));
    }
}
