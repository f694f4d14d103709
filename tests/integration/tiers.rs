//! Tiered compilation: a new component serves from Winch's code at once,
//! Cranelift's optimised code takes over in the background without
//! downtime and keeping the generation, a newer file discards a stale
//! optimisation, and only optimised code is cached.

use std::time::Duration;

use wharf::{Config, Host};
use wharf::{Tier, Tiers};

use crate::languages::{check_hello_service, hello_n_times};
use crate::support::{ServiceDir, TestServer, WharfProcess, client, eventually, get};

/// Large components compile for seconds, Cranelift in a debug build on a
/// busy CI machine for much longer.
const COMPILE: Duration = Duration::from_secs(180);

fn tier_of(host: &Host, name: &str) -> Option<Tier> {
    Some(host.services().service(name)?.tier())
}

/// A host serving `dir` tiered, with no code cache: every first deploy is
/// Winch code, optimised `optimise_delay` later.
async fn tiered_server(dir: &ServiceDir, optimise_delay: Duration) -> TestServer {
    let mut config = Config::for_dir(dir.path())
        .tiers(Tiers::Tiered)
        .cache_dir(None);
    config.engine.optimise_delay = optimise_delay;
    TestServer::start(config).await
}

fn cached_entries(cache: &ServiceDir) -> usize {
    let Ok(engines) = std::fs::read_dir(cache.path()) else {
        return 0;
    };
    engines
        .flatten()
        .flat_map(|engine| std::fs::read_dir(engine.path()).into_iter().flatten())
        .flatten()
        .filter(|entry| entry.path().extension().is_some_and(|e| e == "cwasm"))
        .count()
}

#[tokio::test(flavor = "multi_thread")]
async fn winch_code_answers_correctly_in_every_language() {
    let dir = ServiceDir::new();
    let cache = ServiceDir::new();
    dir.install("echo", "echo");
    dir.install("hello3", "hello_p3");
    dir.install_from("hello-js", "js", "hello");
    dir.install_from("hello-py", "python", "hello");
    let config = Config::for_dir(dir.path())
        .tiers(Tiers::Winch)
        .cache_dir(Some(cache.path().to_path_buf()));
    let server = TestServer::start(config).await;
    for name in ["echo", "hello3", "hello-js", "hello-py"] {
        assert_eq!(tier_of(&server.host, name), Some(Tier::Baseline), "{name}");
    }
    check_hello_service(&server, "/hello-js", "js").await;
    check_hello_service(&server, "/hello-py", "python").await;
    let (status, body) = get(&server.url("/hello3")).await.unwrap();
    assert_eq!((status, body.contains("Hello")), (200, true), "{body}");
    let echoed = client()
        .post(server.url("/echo/x"))
        .body("through winch")
        .send()
        .await
        .unwrap();
    assert_eq!(echoed.status(), 200);
    assert!(echoed.text().await.unwrap().contains("through winch"));
    // Baseline code is never cached, and never replaced: after every
    // service has served (a tiered host has queued its optimising compiles
    // by then, see only_optimised_code_is_cached_and_a_restart_serves_it_at_once),
    // nothing is cached and nothing is queued.
    assert_eq!(cached_entries(&cache), 0);
    assert_eq!(tier_of(&server.host, "echo"), Some(Tier::Baseline));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_request_in_flight_during_the_tier_swap_finishes_on_the_winch_code() {
    let dir = ServiceDir::new();
    dir.install("slow", "hostile");
    dir.write("slow.toml", b"[limits]\ntimeout = \"60s\"\n");
    let server = tiered_server(&dir, Duration::from_millis(300)).await;
    let host = server.host.clone();
    assert_eq!(tier_of(&host, "slow"), Some(Tier::Baseline));
    let before = host.services().service("slow").unwrap().generation();

    let slow_url = server.url("/slow/sleep?ms=4000");
    let in_flight = tokio::spawn(async move { get(&slow_url).await });
    eventually(COMPILE, "the optimised code to take over", || async {
        tier_of(&host, "slow") == Some(Tier::Optimised)
    })
    .await;
    assert!(
        !in_flight.is_finished(),
        "the request ended before the swap"
    );
    let optimised = host.services().service("slow").unwrap().clone();
    assert_eq!(
        optimised.generation(),
        before,
        "a tier swap keeps the generation"
    );
    assert!(optimised.compile_info().optimised_at.is_some());
    // New requests run the optimised code meanwhile.
    let (status, body) = get(&server.url("/slow/count")).await.unwrap();
    assert_eq!((status, body.as_str()), (200, "1"));

    let (status, body) = in_flight.await.unwrap().unwrap();
    assert_eq!((status, body.as_str()), (200, "slept 4000 ms"));
}

#[tokio::test(flavor = "multi_thread")]
async fn regression_a_guest_that_fails_on_reuse_keeps_reuse_off_after_the_tier_swap() {
    // A fetch-event JS service fails on a reused instance (StarlingMonkey
    // #247). Once its Winch code has shown that, the optimised code must not
    // try reuse again: that would cost failed requests and retries anew.
    let dir = ServiceDir::new();
    dir.install_from("js-fetch", "js", "hello");
    dir.write("js-fetch.toml", b"[instance]\nreuse = 8\n");
    let server = tiered_server(&dir, Duration::from_secs(2)).await;
    let host = server.host.clone();
    let service = |name: &str| host.services().service(name).unwrap().clone();
    assert!(service("js-fetch").reuses_instances());

    hello_n_times(&server, "/js-fetch", 6).await;
    assert!(!service("js-fetch").reuses_instances());
    assert_eq!(
        tier_of(&host, "js-fetch"),
        Some(Tier::Baseline),
        "reuse was turned off on the Winch code"
    );
    eventually(COMPILE, "the optimised code to take over", || async {
        tier_of(&host, "js-fetch") == Some(Tier::Optimised)
    })
    .await;
    assert!(
        !service("js-fetch").reuses_instances(),
        "the optimised code tries reuse again"
    );
    hello_n_times(&server, "/js-fetch", 3).await;
    assert_eq!(service("js-fetch").warm_instances(), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn only_optimised_code_is_cached_and_a_restart_serves_it_at_once() {
    let dir = ServiceDir::new();
    let cache = ServiceDir::new();
    dir.install("hello", "hello");
    let start = |delay| {
        let mut config = Config::for_dir(dir.path())
            .watch(false)
            .tiers(Tiers::Tiered)
            .cache_dir(Some(cache.path().to_path_buf()));
        config.engine.optimise_delay = delay;
        Host::new(config)
    };
    let first = start(Duration::from_millis(500)).await.unwrap();
    assert_eq!(tier_of(&first, "hello"), Some(Tier::Baseline));
    assert_eq!(cached_entries(&cache), 0, "Winch code was cached");
    eventually(COMPILE, "the optimised code", || async {
        tier_of(&first, "hello") == Some(Tier::Optimised)
    })
    .await;
    assert_eq!(cached_entries(&cache), 1);
    drop(first);

    let second = start(Duration::ZERO).await.unwrap();
    let deployed = second.services().service("hello").unwrap().clone();
    let compile = deployed.compile_info();
    assert_eq!(
        (deployed.tier(), compile.cache_hit, compile.optimised_at),
        (Tier::Optimised, true, None)
    );
    assert_eq!(cached_entries(&cache), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn regression_a_newer_file_during_the_optimising_compile_is_not_replaced_by_stale_code() {
    let dir = ServiceDir::new();
    let cache = tempfile::tempdir().unwrap();
    dir.install_from("svc", "js", "hello");
    let wharf = WharfProcess::start(
        dir.path(),
        &[
            "--tiers",
            "tiered",
            "--cache-dir",
            cache.path().to_str().unwrap(),
            "--admin",
            "127.0.0.1:0",
        ],
    );
    wharf
        .wait_for_log_line(&["event=\"optimising\"", "service=svc"], COMPILE)
        .await;
    // While Cranelift compiles the JavaScript version, a Rust one arrives.
    dir.install("svc", "hello");
    wharf
        .wait_for_log_line(
            &["event=\"replace\"", "service=svc", "generation=2"],
            COMPILE,
        )
        .await;
    wharf
        .wait_for_log_line(
            &["event=\"optimise\"", "service=svc", "generation=2"],
            COMPILE,
        )
        .await;
    // The JavaScript version's optimised code is discarded when it is done.
    wharf
        .wait_for_log_line(
            &[
                "event=\"superseded\"",
                "service=svc",
                "discarding the optimised code",
            ],
            COMPILE,
        )
        .await;
    let services = crate::support::admin_services(&wharf.admin_url()).await;
    let svc = services["services"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "svc")
        .unwrap()
        .clone();
    assert_eq!(svc["generation"], 2, "{svc}");
    assert_eq!(svc["tier"], "cranelift", "{svc}");
    assert_eq!(
        svc["digest"],
        wharf::digest_of(&crate::support::guest_bytes("hello")),
        "{svc}"
    );
    let optimised_generations = wharf
        .log()
        .lines()
        .filter(|l| l.contains("event=\"optimise\"") && l.contains("service=svc"))
        .count();
    assert_eq!(optimised_generations, 1, "{}", wharf.log());
    let (status, body) = get(&wharf.url("/svc")).await.unwrap();
    assert_eq!(status, 200, "{body}");
}
