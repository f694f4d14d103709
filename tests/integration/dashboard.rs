//! The dashboard in a real browser: headless Chromium, driven through
//! ChromeDriver's WebDriver protocol, loads the page from a running host
//! and sees its services, their request counters move, and a rejected
//! deploy with its reason. The last screenshot is kept as an artifact in
//! `target/artifacts/dashboard.png`.

use std::process::Command;
use std::time::Duration;

use base64::Engine as _;
use serde_json::{Value, json};

use crate::support::{ServerProcess, ServiceDir, WharfProcess, client, eventually, free_port, get};

/// A WebDriver session on a ChromeDriver of the test's own.
struct Browser {
    driver: String,
    session: String,
    _chromedriver: ServerProcess,
    _profile: tempfile::TempDir,
}

impl Browser {
    async fn start() -> Browser {
        let port = free_port();
        let chromedriver =
            ServerProcess::start("chromedriver", port, Duration::from_secs(30), move || {
                let mut command = Command::new("chromedriver");
                command.arg(format!("--port={port}"));
                command
            });
        let profile = tempfile::tempdir().unwrap();
        let driver = format!("http://127.0.0.1:{port}");
        // The flags that keep Chromium off the network it has no use for.
        let capabilities = json!({
            "capabilities": { "alwaysMatch": {
                "browserName": "chrome",
                "goog:chromeOptions": {
                    "binary": "/usr/bin/chromium",
                    "args": [
                        "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                        "--disable-background-networking", "--disable-component-update",
                        "--disable-sync", "--disable-quic", "--no-first-run",
                        "--window-size=1400,900",
                        format!("--user-data-dir={}", profile.path().display()),
                    ],
                },
            }},
        });
        let response = webdriver(
            client()
                .post(format!("{driver}/session"))
                .json(&capabilities),
        )
        .await;
        let session = response["value"]["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no WebDriver session: {response}"))
            .to_string();
        Browser {
            driver,
            session,
            _chromedriver: chromedriver,
            _profile: profile,
        }
    }

    async fn command(&self, path: &str, body: Value) -> Value {
        let url = format!("{}/session/{}/{path}", self.driver, self.session);
        webdriver(client().post(url).json(&body)).await["value"].clone()
    }

    async fn open(&self, url: &str) {
        self.command("url", json!({ "url": url })).await;
    }

    /// Runs `script` in the page and returns its result.
    async fn eval(&self, script: &str) -> Value {
        self.command("execute/sync", json!({ "script": script, "args": [] }))
            .await
    }

    /// The text of the first element matching `selector`, if any.
    async fn text(&self, selector: &str) -> Option<String> {
        let script = format!(
            "const e = document.querySelector({}); return e ? e.textContent : null;",
            serde_json::to_string(selector).unwrap()
        );
        self.eval(&script).await.as_str().map(str::to_string)
    }

    async fn screenshot(&self, path: &std::path::Path) {
        let url = format!("{}/session/{}/screenshot", self.driver, self.session);
        let response = webdriver(client().get(url)).await;
        let png = base64::engine::general_purpose::STANDARD
            .decode(response["value"].as_str().expect("a screenshot"))
            .expect("base64");
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, png).unwrap();
    }
}

/// Sends a WebDriver request and reads its JSON answer.
async fn webdriver(request: reqwest::RequestBuilder) -> Value {
    request
        .send()
        .await
        .expect("reach chromedriver")
        .json()
        .await
        .expect("a WebDriver answer")
}

impl Drop for Browser {
    fn drop(&mut self) {
        // Ends the browser; chromedriver itself is killed with its process.
        let url = format!("{}/session/{}", self.driver, self.session);
        let _ = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async { client().delete(url).send().await.ok() });
        })
        .join();
    }
}

const PATIENCE: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread")]
async fn the_dashboard_shows_services_traffic_and_rejections_in_a_browser() {
    let dir = ServiceDir::new();
    dir.install("hello", "hello");
    let host = WharfProcess::start(dir.path(), &["--admin", "127.0.0.1:0"]);
    let admin = host.admin_url();
    let browser = Browser::start().await;
    browser.open(&format!("{admin}/")).await;

    // The service, with its route and no traffic yet.
    let row = r#"#services tr[data-service="hello"]"#;
    eventually(PATIENCE, "the page listing hello", || async {
        browser.text(&format!("{row} .route")).await.as_deref() == Some("/hello")
    })
    .await;
    let wasi = browser
        .text(&format!("{row} .wasi"))
        .await
        .unwrap_or_default();
    assert!(wasi.starts_with("incoming-handler@0.2."), "{wasi}");
    // Traffic moves its request counter.
    for _ in 0..25 {
        assert_eq!(get(&host.url("/hello/")).await.map(|r| r.0), Some(200));
    }
    eventually(PATIENCE, "the request counter at 25", || async {
        browser
            .text(&format!("{row} .requests"))
            .await
            .and_then(|t| t.parse::<u64>().ok())
            .is_some_and(|n| n >= 25)
    })
    .await;
    // The log shows the access lines with their request ids.
    eventually(PATIENCE, "access lines in the log", || async {
        browser
            .text("#logs")
            .await
            .is_some_and(|t| t.contains("[hello]") && t.contains("GET"))
    })
    .await;
    // A broken file is rejected; the page says why, in the service list
    // and the deploy history.
    dir.write("broken.wasm", b"\0asm\x01\0\0\0");
    let broken = r#"#services tr[data-service="broken"] .last-deploy"#;
    eventually(PATIENCE, "the rejection with its reason", || async {
        browser
            .text(broken)
            .await
            .is_some_and(|t| t.contains("rejected") && t.contains("core WebAssembly module"))
    })
    .await;
    eventually(PATIENCE, "the rejection in the deploy history", || async {
        browser
            .text(r#"#history li[data-event="reject"][data-service="broken"]"#)
            .await
            .is_some()
    })
    .await;
    // At 1400 px the page fits its window: a wide table scrolls inside its
    // section (it overflowed the page before).
    let overflow = browser
        .eval("return document.documentElement.scrollWidth - window.innerWidth;")
        .await;
    assert!(
        overflow.as_i64().is_some_and(|px| px <= 0),
        "the page is {overflow} px wider than its window"
    );
    let artifact =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/artifacts/dashboard.png");
    browser.screenshot(&artifact).await;
    eprintln!("dashboard screenshot: {}", artifact.display());
}
