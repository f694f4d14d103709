//! The compiled-code cache: a second start compiles nothing, and a corrupt
//! entry is detected and rebuilt.

use wharf::Tiers;
use wharf::{Config, Host};

use crate::support::ServiceDir;

/// A host compiling with Cranelift only: what it compiles is cached at
/// once. (Tiered compiling caches only the optimised code, later; see the
/// `tiers` tests.)
async fn start(services: &ServiceDir, cache: &ServiceDir) -> Host {
    let config = Config::for_dir(services.path())
        .watch(false)
        .tiers(Tiers::Cranelift)
        .cache_dir(Some(cache.path().to_path_buf()));
    Host::new(config).await.expect("host")
}

fn cache_hits(host: &Host) -> Vec<(String, bool)> {
    host.services()
        .services()
        .map(|d| (d.name().to_string(), d.compile_info().cache_hit))
        .collect()
}

fn entries(cache: &ServiceDir) -> Vec<std::path::PathBuf> {
    let mut found = Vec::new();
    for engine_dir in std::fs::read_dir(cache.path()).unwrap() {
        let engine_dir = engine_dir.unwrap().path();
        // Beside the engines' directories: the function cache's file.
        if !engine_dir.is_dir() {
            continue;
        }
        for entry in std::fs::read_dir(engine_dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "cwasm") {
                found.push(path);
            }
        }
    }
    found
}

/// Changes a cache entry in place, as a tool other than Wharf might (Wharf
/// writes its entries read-only).
fn overwrite(entry: &std::path::Path, bytes: &[u8]) {
    let mut permissions = std::fs::metadata(entry).unwrap().permissions();
    assert!(
        permissions.readonly(),
        "cache entries are written read-only"
    );
    #[allow(clippy::permissions_set_readonly_false)]
    permissions.set_readonly(false);
    std::fs::set_permissions(entry, permissions).unwrap();
    std::fs::write(entry, bytes).unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_second_start_compiles_nothing() {
    let services = ServiceDir::new();
    let cache = ServiceDir::new();
    services.install("hello", "hello");
    services.install("echo", "echo");
    // A WASI 0.3 component is cached like any other.
    services.install("hello3", "hello_p3");

    let first = start(&services, &cache).await;
    assert_eq!(
        cache_hits(&first),
        [
            ("echo".into(), false),
            ("hello".into(), false),
            ("hello3".into(), false)
        ]
    );
    assert_eq!(entries(&cache).len(), 3);
    drop(first);

    let second = start(&services, &cache).await;
    assert_eq!(
        cache_hits(&second),
        [
            ("echo".into(), true),
            ("hello".into(), true),
            ("hello3".into(), true)
        ]
    );
    for path in ["/hello", "/hello3"] {
        let response = second
            .handle(http::Request::get(path).body(String::new()).unwrap())
            .await;
        assert_eq!(response.status(), 200, "{path}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_corrupt_cache_entry_is_detected_and_rebuilt() {
    let services = ServiceDir::new();
    let cache = ServiceDir::new();
    services.install("hello", "hello");
    drop(start(&services, &cache).await);

    let [entry] = entries(&cache).try_into().unwrap();
    let mut bytes = std::fs::read(&entry).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0xff;
    overwrite(&entry, &bytes);

    let host = start(&services, &cache).await;
    assert_eq!(cache_hits(&host), [("hello".into(), false)]);
    let response = host
        .handle(http::Request::get("/hello").body(String::new()).unwrap())
        .await;
    assert_eq!(response.status(), 200);
    drop(host);

    // The entry was rewritten intact.
    let host = start(&services, &cache).await;
    assert_eq!(cache_hits(&host), [("hello".into(), true)]);

    // A truncated entry is rejected the same way.
    drop(host);
    let [entry] = entries(&cache).try_into().unwrap();
    let bytes = std::fs::read(&entry).unwrap();
    overwrite(&entry, &bytes[..bytes.len() - 100]);
    let host = start(&services, &cache).await;
    assert_eq!(cache_hits(&host), [("hello".into(), false)]);
}

#[tokio::test(flavor = "multi_thread")]
async fn without_a_cache_nothing_is_written() {
    let services = ServiceDir::new();
    services.install("hello", "hello");
    let config = Config::for_dir(services.path())
        .watch(false)
        .cache_dir(None);
    let host = Host::new(config).await.unwrap();
    assert_eq!(cache_hits(&host), [("hello".into(), false)]);
}
