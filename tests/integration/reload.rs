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
        server.host.rejection("hello").is_none()
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
            .rejection("empty")
            .is_some_and(|r| r.reason.contains("wasi:http/incoming-handler"))
    })
    .await;
    assert_eq!(status_of(&server.url("/empty")).await, Some(404));
}

/// Waits until service `name` has a rejected version, and says why.
async fn rejection_reason(server: &TestServer, name: &str) -> String {
    eventually(APPLY, "the rejection", || async {
        server.host.rejection(name).is_some()
    })
    .await;
    server.host.rejection(name).unwrap().reason
}

#[tokio::test(flavor = "multi_thread")]
async fn a_0_2_service_replaced_by_its_0_3_build_serves_and_drains_the_old() {
    let dir = ServiceDir::new();
    dir.install("hostile", "hostile");
    let server = TestServer::for_dir(&dir).await;
    // A request in flight on the 0.2 version...
    let running = tokio::spawn({
        let url = server.url("/hostile/sleep?ms=1500");
        async move { get(&url).await }
    });
    eventually(APPLY, "the request running on the 0.2 version", || async {
        server
            .host
            .services()
            .service("hostile")
            .is_some_and(|d| d.requests_in_flight() == 1)
    })
    .await;
    // ...while the same service, rebuilt for WASI 0.3, takes over.
    dir.install_bytes("hostile.wasm", &guest_bytes("hostile_p3"));
    eventually(APPLY, "the 0.3 version", || async {
        server
            .host
            .services()
            .service("hostile")
            .is_some_and(|d| d.generation() == 2)
    })
    .await;
    let (status, body) = get(&server.url("/hostile/sleep?ms=10")).await.unwrap();
    assert_eq!(status, 200);
    assert!(body.contains("peak"), "the 0.3 build answers: {body}");
    let (status, body) = running.await.unwrap().unwrap();
    assert_eq!(
        status, 200,
        "the 0.2 request finished on the old version: {body}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_component_exporting_both_http_versions_is_refused_and_the_previous_version_serves() {
    let dir = ServiceDir::new();
    dir.install("hello", "hello");
    let server = TestServer::for_dir(&dir).await;
    dir.install_bytes("hello.wasm", &guest_bytes("both_http"));
    let reason = rejection_reason(&server, "hello").await;
    assert!(
        reason
            .contains("exports both wasi:http/incoming-handler@0.2.x and wasi:http/handler@0.3.0"),
        "{reason}"
    );
    assert_eq!(status_of(&server.url("/hello")).await, Some(200));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_wasi_0_3_release_candidate_is_refused_naming_its_version() {
    let dir = ServiceDir::new();
    dir.install("hello", "hello");
    let server = TestServer::for_dir(&dir).await;
    dir.install_bytes("hello.wasm", &guest_bytes("http_rc"));
    let reason = rejection_reason(&server, "hello").await;
    assert!(
        reason.contains("wasi:http/types@0.3.0-rc-2025-09-16 is from a WASI 0.3 release candidate"),
        "{reason}"
    );
    assert!(reason.contains("wasi:http/handler@0.3.0"), "{reason}");
    assert_eq!(status_of(&server.url("/hello")).await, Some(200));
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_instances_are_refused_for_a_0_2_component() {
    let dir = ServiceDir::new();
    dir.install("hello", "hello");
    dir.write("hello.toml", b"[instance]\nreuse = 8\nconcurrent = 4\n");
    let server = TestServer::for_dir(&dir).await;
    let reason = rejection_reason(&server, "hello").await;
    assert!(
        reason.contains("instance.concurrent: 4 needs a WASI 0.3 component"),
        "{reason}"
    );
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
    assert!(server.host.rejections().is_empty());
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

#[tokio::test(flavor = "multi_thread")]
async fn replacing_a_service_under_load_loses_no_request() {
    const REPLACEMENTS: u64 = 100;
    const CLIENTS: usize = 8;
    let dir = ServiceDir::new();
    let versions = [guest_bytes("hello"), guest_bytes("echo")];
    dir.install_bytes("svc.wasm", &versions[0]);
    let server = TestServer::for_dir(&dir).await;
    let url = server.url("/svc");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));

    let mut clients = Vec::new();
    for _ in 0..CLIENTS {
        let (url, stop) = (url.clone(), stop.clone());
        clients.push(tokio::spawn(async move {
            let client = client();
            let mut seen = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let response = client.get(&url).send().await.expect("request failed");
                let status = response.status().as_u16();
                let generation: u64 = response.headers()[wharf::GENERATION_HEADER]
                    .to_str()
                    .unwrap()
                    .parse()
                    .unwrap();
                let body = response.text().await.expect("body failed");
                assert_eq!(
                    status, 200,
                    "generation {generation} answered {status}: {body}"
                );
                seen.push(generation);
            }
            seen
        }));
    }

    for i in 1..=REPLACEMENTS {
        dir.install_bytes("svc.wasm", &versions[(i % 2) as usize]);
        let want = i + 1;
        eventually(APPLY, &format!("generation {want}"), || async {
            server
                .host
                .services()
                .service("svc")
                .is_some_and(|d| d.generation() == want)
        })
        .await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);

    let last = REPLACEMENTS + 1;
    let mut answered = 0;
    for client in clients {
        let seen = client.await.expect("client task");
        answered += seen.len();
        // Each client sends one request at a time: the generations it sees
        // never go backwards.
        assert!(seen.windows(2).all(|w| w[0] <= w[1]), "{seen:?}");
        assert!(seen.iter().all(|g| (1..=last).contains(g)));
    }
    assert!(answered >= CLIENTS, "clients made {answered} requests");
    for _ in 0..CLIENTS {
        assert_eq!(
            generation_of(&url).await.as_deref(),
            Some(last.to_string().as_str())
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn rapid_successive_writes_end_on_the_last_version() {
    let dir = ServiceDir::new();
    dir.install("svc", "hello");
    let server = TestServer::for_dir(&dir).await;
    let last = guest_bytes("echo");
    for guest_name in ["hostile", "hello", "hostile", "echo"] {
        dir.install("svc", guest_name);
    }
    let digest = wharf::digest_of(&last);
    eventually(APPLY, "the last version", || async {
        server
            .host
            .services()
            .service("svc")
            .is_some_and(|d| d.digest() == digest)
    })
    .await;
    // And it stays there: nothing older lands afterwards.
    let url = server.url("/svc");
    let (_, body) = get(&url).await.unwrap();
    assert!(body.contains("\"method\""), "{body}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_slowly_written_file_is_never_deployed_half_written() {
    use std::io::Write as _;
    let dir = ServiceDir::new();
    let server = TestServer::for_dir(&dir).await;
    let bytes = guest_bytes("echo");
    let mut file = std::fs::File::create(dir.path().join("slow.wasm")).unwrap();
    for chunk in bytes.chunks(bytes.len() / 10 + 1) {
        file.write_all(chunk).unwrap();
        file.flush().unwrap();
        // The writer's pace (not a wait for the host): a slow copy.
        tokio::time::sleep(Duration::from_millis(60)).await;
        assert!(
            server.host.rejection("slow").is_none(),
            "a partial file was compiled"
        );
        assert!(server.host.services().service("slow").is_none());
    }
    drop(file);
    let url = server.url("/slow");
    eventually(APPLY, "the complete file to deploy", || async {
        status_of(&url).await == Some(200)
    })
    .await;
    assert!(server.host.rejection("slow").is_none());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_file_replaced_by_a_directory_removes_the_service() {
    let dir = ServiceDir::new();
    dir.install("svc", "hello");
    let server = TestServer::for_dir(&dir).await;
    dir.remove("svc.wasm");
    std::fs::create_dir(dir.path().join("svc.wasm")).unwrap();
    let url = server.url("/svc");
    eventually(APPLY, "the service to be removed", || async {
        status_of(&url).await == Some(404)
    })
    .await;
    // The directory is not a service; a file next to it still is.
    dir.install("other", "hello");
    let other = server.url("/other");
    eventually(APPLY, "the other service", || async {
        status_of(&other).await == Some(200)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn symlinks_inside_the_directory_are_followed_and_outside_refused() {
    let dir = ServiceDir::new();
    let outside = ServiceDir::new();
    std::fs::create_dir(dir.path().join("versions")).unwrap();
    std::fs::copy(
        crate::support::guest("hello"),
        dir.path().join("versions/hello-v1.bin"),
    )
    .unwrap();
    std::fs::copy(
        crate::support::guest("echo"),
        outside.path().join("echo.bin"),
    )
    .unwrap();
    std::os::unix::fs::symlink("versions/hello-v1.bin", dir.path().join("inside.wasm")).unwrap();
    std::os::unix::fs::symlink(
        outside.path().join("echo.bin"),
        dir.path().join("outside.wasm"),
    )
    .unwrap();
    let server = TestServer::for_dir(&dir).await;
    assert_eq!(status_of(&server.url("/inside")).await, Some(200));
    assert_eq!(status_of(&server.url("/outside")).await, Some(404));
    let rejection = server.host.rejection("outside").unwrap();
    assert!(
        rejection.reason.contains("outside the services directory"),
        "{rejection:?}"
    );

    // Allowed explicitly, the outside link is served.
    let config = wharf::Config::for_dir(dir.path()).watch(false);
    let allowed = TestServer::start(wharf::Config {
        allow_external_symlinks: true,
        ..config
    })
    .await;
    assert_eq!(status_of(&allowed.url("/outside")).await, Some(200));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dangling_symlink_is_rejected_and_the_old_version_kept() {
    let dir = ServiceDir::new();
    dir.install("svc", "hello");
    let server = TestServer::for_dir(&dir).await;
    let temp_link = dir.path().join(".svc.link");
    std::os::unix::fs::symlink("missing-target.bin", &temp_link).unwrap();
    std::fs::rename(&temp_link, dir.path().join("svc.wasm")).unwrap();
    eventually(APPLY, "the rejection", || async {
        server
            .host
            .rejection("svc")
            .is_some_and(|r| r.reason.contains("symlink to a missing file"))
    })
    .await;
    assert_eq!(status_of(&server.url("/svc")).await, Some(200));
}

#[tokio::test(flavor = "multi_thread")]
async fn the_directory_deleted_and_recreated_is_followed() {
    let parent = ServiceDir::new();
    let services = parent.path().join("services");
    std::fs::create_dir(&services).unwrap();
    std::fs::copy(crate::support::guest("hello"), services.join("hello.wasm")).unwrap();
    let server = TestServer::start(wharf::Config::for_dir(&services)).await;
    let url = server.url("/hello");
    assert_eq!(status_of(&url).await, Some(200));

    std::fs::remove_dir_all(&services).unwrap();
    eventually(
        APPLY,
        "services to be removed with their directory",
        || async { status_of(&url).await == Some(404) },
    )
    .await;

    std::fs::create_dir(&services).unwrap();
    std::fs::copy(crate::support::guest("echo"), services.join("echo.wasm")).unwrap();
    let echo = server.url("/echo");
    eventually(APPLY, "the recreated directory to be served", || async {
        status_of(&echo).await == Some(200)
    })
    .await;
    // And it is watched again: a later change is picked up too.
    std::fs::copy(crate::support::guest("hello"), services.join("hello.wasm")).unwrap();
    eventually(APPLY, "a change in the recreated directory", || async {
        status_of(&url).await == Some(200)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn regression_wharf_toml_reloads_with_a_relative_services_dir() {
    // With the directory given as a relative path (the default, `services`)
    // file events carried absolute paths that never matched it: wharf.toml
    // was not reloaded, and service changes waited for the periodic rescan.
    for relative in [true, false] {
        let parent = ServiceDir::new();
        let dir = parent.path().join("services");
        std::fs::create_dir(&dir).unwrap();
        std::fs::copy(crate::support::guest("hello"), dir.join("hello.wasm")).unwrap();
        let wharf = crate::support::WharfProcess::start_with(|command| {
            command.current_dir(parent.path()).arg("serve");
            if relative {
                command.arg("services");
            } else {
                command.arg(&dir);
            }
            command.args(["--listen", "127.0.0.1:0"]);
        });
        std::fs::write(dir.join("wharf.toml"), "[limits]\ntimeout = \"7s\"\n").unwrap();
        wharf
            .wait_for_log_line(&["default limits changed"], Duration::from_secs(10))
            .await;
        assert_eq!(
            status_of(&wharf.url("/hello")).await,
            Some(200),
            "relative: {relative}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn regression_a_file_broken_across_a_restart_serves_the_last_good_version() {
    // A file truncated while the host was down (its writer died mid-copy)
    // made the service vanish at the next start: 404.
    use crate::support::WharfProcess;
    let dir = ServiceDir::new();
    let data = ServiceDir::new();
    dir.install("greeter", "hello");
    dir.write("greeter.toml", b"route = \"/hi\"\n");
    dir.install("gone", "hello");
    let args = ["--data-dir", data.path().to_str().unwrap()];
    let mut wharf = WharfProcess::start(dir.path(), &args);
    assert_eq!(status_of(&wharf.url("/hi")).await, Some(200));
    assert_eq!(status_of(&wharf.url("/gone")).await, Some(200));
    wharf.terminate();
    assert!(wharf.wait_exit(Duration::from_secs(20)).await.success());

    let bytes = guest_bytes("hello");
    dir.write("greeter.wasm", &bytes[..bytes.len() / 2]);
    dir.remove("gone.wasm");
    let wharf = WharfProcess::start(dir.path(), &args);
    // The last good version serves, at its route, and the log says why.
    let (status, body) = get(&wharf.url("/hi")).await.unwrap();
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("Hello from the microservice!"));
    wharf
        .wait_for_log_line(
            &[
                "greeter.wasm is broken",
                "serving the last version that deployed",
            ],
            Duration::from_secs(5),
        )
        .await;
    // A service whose file was removed stays removed.
    assert_eq!(status_of(&wharf.url("/gone")).await, Some(404));
    assert!(!data.path().join("last-good").join("gone.wasm").exists());

    // Fixing the file deploys the fix.
    dir.install("greeter", "echo");
    eventually(
        Duration::from_secs(10),
        "the repaired file to serve",
        || async {
            match get(&wharf.url("/hi/x")).await {
                Some((200, body)) => body.contains("\"path\""),
                _ => false,
            }
        },
    )
    .await;
}
