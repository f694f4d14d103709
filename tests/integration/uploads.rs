//! Deploying through the admin API when things go wrong: a full disk, racing
//! uploads, a crash mid-upload, and a large body — the previous version's
//! files and deployment stay whole, and memory stays bounded.

use std::path::Path;
use std::time::Duration;

use crate::support::{
    ServiceDir, WharfProcess, admin_services, client, eventually, get, guest_bytes, limit_file_size,
};

const TOKEN: &str = "up-load";

/// Starts wharf on `dir` with the admin endpoint and `TOKEN`, configured
/// further by `extra`.
fn wharf_with_admin(
    dir: &ServiceDir,
    args: &[&str],
    extra: impl FnOnce(&mut std::process::Command),
) -> (WharfProcess, String) {
    let token_file = dir.path().join(".token");
    std::fs::write(&token_file, TOKEN).unwrap();
    let wharf = WharfProcess::start_with(|command| {
        command
            .arg("serve")
            .arg(dir.path())
            .args(["--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"])
            .arg("--admin-token-file")
            .arg(&token_file)
            .args(args);
        extra(command);
    });
    let admin = wharf
        .log()
        .lines()
        .find_map(|l| l.split("admin listening on ").nth(1).map(str::to_string))
        .expect("admin address line");
    (wharf, admin)
}

fn put(admin: &str, name: &str) -> reqwest::RequestBuilder {
    client()
        .put(format!("{admin}/services/{name}"))
        .header("authorization", format!("Bearer {TOKEN}"))
}

fn pair(component: Vec<u8>, manifest: &str) -> reqwest::multipart::Form {
    reqwest::multipart::Form::new()
        .part("component", reqwest::multipart::Part::bytes(component))
        .text("manifest", manifest.to_string())
}

/// Upload temporaries left in `dir`.
fn leftovers(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .filter(|n| n.starts_with(".wharf-upload-"))
        .collect()
}

/// A body that starts like a component and is `size` bytes long.
fn component_sized(size: usize) -> Vec<u8> {
    let mut bytes = vec![0u8; size];
    bytes[..8].copy_from_slice(b"\0asm\x0d\0\x01\0");
    bytes
}

#[tokio::test(flavor = "multi_thread")]
async fn regression_a_failed_upload_leaves_the_previous_pair_serving() {
    // The manifest was written before the component: on a full disk the PUT
    // answered 500 but the old component ran with the new manifest (its
    // route moved); a raw PUT that failed deleted the manifest first.
    let dir = ServiceDir::new();
    dir.install("greeter", "hello");
    let manifest = "route = \"/hi\"\n";
    dir.write("greeter.toml", manifest.as_bytes());
    // Files over 1 MiB cannot be written, as on a nearly full disk.
    let (wharf, admin) = wharf_with_admin(&dir, &["--no-cache"], |command| {
        limit_file_size(command, 1 << 20)
    });
    assert_eq!(get(&wharf.url("/hi")).await.unwrap().0, 200);

    let response = put(&admin, "greeter")
        .multipart(pair(component_sized(2 << 20), "route = \"/moved\"\n"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 500);
    let reason = response.text().await.unwrap();
    assert!(reason.contains("cannot store the upload"), "{reason}");

    let response = put(&admin, "greeter")
        .body(component_sized(2 << 20))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 500);

    // Nothing changed: files, route, and no temporary files left behind.
    assert_eq!(
        std::fs::read_to_string(dir.path().join("greeter.toml")).unwrap(),
        manifest
    );
    assert_eq!(
        std::fs::read(dir.path().join("greeter.wasm")).unwrap(),
        guest_bytes("hello")
    );
    assert!(
        leftovers(dir.path()).is_empty(),
        "{:?}",
        leftovers(dir.path())
    );
    assert_eq!(get(&wharf.url("/hi")).await.unwrap().0, 200);
    assert_eq!(get(&wharf.url("/moved")).await.unwrap().0, 404);
}

#[tokio::test(flavor = "multi_thread")]
async fn regression_concurrent_uploads_of_one_service_never_tear() {
    // Two PUTs of one name at once could end with one upload's component
    // and the other's manifest.
    let dir = ServiceDir::new();
    let (wharf, admin) = wharf_with_admin(&dir, &[], |_| {});
    let components = [guest_bytes("hello"), guest_bytes("echo")];
    let uploads = (0..8).map(|i| {
        let admin = admin.clone();
        let component = components[i % 2].clone();
        async move {
            put(&admin, "svc")
                .multipart(pair(component, &format!("route = \"/v{i}\"\n")))
                .send()
                .await
                .unwrap()
                .status()
        }
    });
    for status in futures_join_all(uploads).await {
        assert_eq!(status, 200);
    }
    // Whichever upload was last, its two files are there together...
    let manifest = std::fs::read_to_string(dir.path().join("svc.toml")).unwrap();
    let n: usize = manifest
        .trim()
        .trim_start_matches("route = \"/v")
        .trim_end_matches('"')
        .parse()
        .unwrap();
    assert_eq!(
        std::fs::read(dir.path().join("svc.wasm")).unwrap(),
        components[n % 2],
        "manifest of upload {n} beside another upload's component"
    );
    // ...and they are what serves.
    let doc = admin_services(&admin).await;
    let svc = doc["services"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "svc")
        .unwrap();
    assert_eq!(svc["route"], format!("/v{n}"));
    assert_eq!(svc["digest"], wharf::digest_of(&components[n % 2]).as_str());
    assert_eq!(get(&wharf.url(&format!("/v{n}"))).await.unwrap().0, 200);
    assert!(leftovers(dir.path()).is_empty());
}

/// Awaits every future, in order.
async fn futures_join_all<F>(futures: impl Iterator<Item = F>) -> Vec<F::Output>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    let handles: Vec<_> = futures.map(tokio::spawn).collect();
    let mut outputs = Vec::new();
    for handle in handles {
        outputs.push(handle.await.unwrap());
    }
    outputs
}

#[tokio::test(flavor = "multi_thread")]
async fn regression_uploaded_files_get_the_mode_of_copied_files() {
    // Uploads were written 0600, unlike the files a user copies in.
    use std::os::unix::fs::PermissionsExt as _;
    let dir = ServiceDir::new();
    let (_wharf, admin) = wharf_with_admin(&dir, &[], |_| {});
    let response = put(&admin, "svc")
        .multipart(pair(guest_bytes("hello"), "route = \"/svc\"\n"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    dir.write("copied.txt", b"x");
    let mode = |file: &str| {
        std::fs::metadata(dir.path().join(file))
            .unwrap()
            .permissions()
            .mode()
            & 0o777
    };
    assert_eq!(mode("svc.wasm"), mode("copied.txt"));
    assert_eq!(mode("svc.toml"), mode("copied.txt"));
}

#[tokio::test(flavor = "multi_thread")]
async fn regression_stale_upload_files_are_removed_at_start() {
    // A crashed upload left its .wharf-upload-* file forever.
    let dir = ServiceDir::new();
    dir.install("hello", "hello");
    dir.write(
        ".wharf-upload-hello-00000000deadbeef.wasm",
        b"half a component",
    );
    dir.write(".wharf-upload-x-0000000000000001.toml", b"route = ");
    let wharf = WharfProcess::start(dir.path(), &[]);
    assert!(
        leftovers(dir.path()).is_empty(),
        "{:?}",
        leftovers(dir.path())
    );
    assert_eq!(get(&wharf.url("/hello")).await.unwrap().0, 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_upload_a_crash_interrupted_is_completed_at_start() {
    // The journal was written and the manifest renamed; the crash came
    // before the component's rename. The next start completes the upload,
    // so the pair on disk is never the new manifest with the old component.
    let dir = ServiceDir::new();
    dir.install("svc", "hello");
    let temp = ".wharf-upload-svc-00000000000000aa.wasm";
    dir.write(temp, &guest_bytes("echo"));
    dir.write("svc.toml", b"route = \"/new\"\n");
    dir.write(
        ".wharf-upload-svc-00000000000000ab.journal",
        format!(
            "service svc\ncomponent {temp}\nmanifest .wharf-upload-svc-00000000000000ac.toml\n"
        )
        .as_bytes(),
    );
    let wharf = WharfProcess::start(dir.path(), &[]);
    assert_eq!(
        std::fs::read(dir.path().join("svc.wasm")).unwrap(),
        guest_bytes("echo")
    );
    let (status, body) = get(&wharf.url("/new/x")).await.unwrap();
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"path\""), "echo answers: {body}");
    assert!(leftovers(dir.path()).is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn regression_a_large_upload_is_streamed_not_buffered() {
    // A 100 MB upload peaked at 317 MiB of RSS (the body buffered about
    // three times) and 337 MiB stayed after four. Now it streams to disk;
    // the one copy in memory is what the compiler reads.
    let dir = ServiceDir::new();
    let (wharf, admin) = wharf_with_admin(&dir, &["--no-cache"], |_| {});
    assert_eq!(get(&wharf.url("/none")).await.unwrap().0, 404);
    let before = wharf.memory_kib("VmHWM");
    let body = component_sized(100 << 20);
    let response = put(&admin, "big").body(body).send().await.unwrap();
    // Not a valid component, but received, stored and read whole first.
    assert_eq!(response.status(), 422);
    let peak = wharf.memory_kib("VmHWM");
    let grew_mib = (peak.saturating_sub(before)) / 1024;
    assert!(
        grew_mib < 160,
        "a 100 MiB upload raised the peak RSS by {grew_mib} MiB"
    );
    let after = wharf.memory_kib("VmRSS");
    assert!(
        after.saturating_sub(before) / 1024 < 64,
        "{} MiB stayed resident after the upload",
        after.saturating_sub(before) / 1024
    );
    assert!(leftovers(dir.path()).is_empty());
    assert!(!dir.path().join("big.wasm").exists());
    eventually(Duration::from_secs(5), "the admin to stay up", || async {
        client()
            .get(format!("{admin}/healthz"))
            .send()
            .await
            .is_ok()
    })
    .await;
}
