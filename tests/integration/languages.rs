//! Services written in JavaScript (ComponentizeJS) and Python
//! (componentize-py), built from `guests/js` and `guests/python`: JSON
//! answers, a POST with a JSON body, non-200 statuses and custom headers, a
//! JavaScript service calling another service, and a hot replacement.

use std::time::Duration;

use serde_json::{Value, json};

use crate::support::{ServiceDir, TestServer, client, eventually, get};

/// Large components compile for seconds (more in a debug build on a busy
/// CI machine); replacements may take that long the first time.
const APPLY: Duration = Duration::from_secs(180);

pub(crate) async fn check_hello_service(server: &TestServer, prefix: &str, lang: &str) {
    let response = client().get(server.url(prefix)).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "application/json");
    let doc: Value = response.json().await.unwrap();
    assert_eq!(doc, json!({"message": "Hello from the microservice!"}));

    let response = client()
        .post(server.url(&format!("{prefix}/echo")))
        .json(&json!({"order": 42, "items": ["tea", "scones"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
    let handled_by = format!("wharf-{lang}");
    assert_eq!(response.headers()["x-handled-by"], handled_by.as_str());
    let doc: Value = response.json().await.unwrap();
    assert_eq!(
        doc["received"],
        json!({"order": 42, "items": ["tea", "scones"]})
    );
    assert_eq!(doc["lang"], lang);

    let response = client()
        .get(server.url(&format!("{prefix}/nope")))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 404);
    assert_eq!(response.headers()["x-handled-by"], handled_by.as_str());
    let doc: Value = response.json().await.unwrap();
    assert!(doc["error"].as_str().unwrap().contains("/nope"), "{doc}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_javascript_service_answers_like_the_express_original() {
    let dir = ServiceDir::new();
    dir.install_from("hello-js", "js", "hello");
    let server = TestServer::for_dir(&dir).await;
    check_hello_service(&server, "/hello-js", "js").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_python_service_answers_like_the_express_original() {
    let dir = ServiceDir::new();
    dir.install_from("hello-py", "python", "hello");
    let server = TestServer::for_dir(&dir).await;
    check_hello_service(&server, "/hello-py", "python").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_python_wasi_0_3_service_answers_and_streams_its_echo() {
    let dir = ServiceDir::new();
    dir.install_from("py3", "python", "hello-p3");
    dir.write("py3.toml", b"[instance]\nreuse = 8\nconcurrent = 4\n");
    let server = TestServer::for_dir(&dir).await;
    let (status, body) = get(&server.url("/py3")).await.unwrap();
    assert_eq!(status, 200, "{body}");
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(json["message"], "Hello from the microservice!");
    let echoed = client()
        .post(server.url("/py3"))
        .body("from python")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(echoed, "from python");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_javascript_service_calls_another_service_with_fetch() {
    let dir = ServiceDir::new();
    dir.install_from("team", "js", "team");
    dir.write(
        "team.toml",
        b"[outbound]\nallow = [\"http://users.internal\"]\n",
    );
    dir.install("users", "users");
    let server = TestServer::for_dir(&dir).await;
    let (status, body) = get(&server.url("/team")).await.unwrap();
    assert_eq!(status, 200, "{body}");
    let doc: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(doc["source"], "js");
    assert_eq!(doc["count"], 3);
    assert_eq!(doc["users"][1]["name"], "Grace");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_javascript_service_is_hot_replaced_by_a_new_version() {
    let dir = ServiceDir::new();
    dir.install_from("svc", "js", "hello");
    dir.install("users", "users");
    dir.write(
        "svc.toml",
        b"[outbound]\nallow = [\"http://users.internal\"]\n",
    );
    let server = TestServer::for_dir(&dir).await;
    let url = server.url("/svc");
    let (_, body) = get(&url).await.unwrap();
    assert!(body.contains("Hello from the microservice!"), "{body}");

    dir.install_from("svc", "js", "team");
    eventually(APPLY, "the new JavaScript version", || async {
        get(&url)
            .await
            .is_some_and(|(_, body)| body.contains("\"source\":\"js\""))
    })
    .await;
    let deployment = server.host.services().service("svc").unwrap().clone();
    assert_eq!(deployment.generation(), 2);
}

/// Sends `n` GETs to `path`, each of which must get the hello JSON.
pub(crate) async fn hello_n_times(server: &TestServer, path: &str, n: usize) {
    for _ in 0..n {
        let response = client().get(server.url(path)).send().await.unwrap();
        assert_eq!(response.status(), 200, "{path}");
        let doc: Value = response.json().await.unwrap();
        assert_eq!(
            doc,
            json!({"message": "Hello from the microservice!"}),
            "{path}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn interpreted_services_under_instance_reuse() {
    let dir = ServiceDir::new();
    dir.install_from("py", "python", "hello");
    dir.install_from("js-handler", "js", "hello-handler");
    dir.install_from("js-fetch", "js", "hello");
    for name in ["py", "js-handler", "js-fetch"] {
        dir.write(&format!("{name}.toml"), b"[instance]\nreuse = 8\n");
    }
    // The swap's effect on reuse is pinned in `tiers`.
    let server = TestServer::without_tier_swaps(&dir).await;
    let service = |name: &str| server.host.services().service(name).unwrap().clone();

    // componentize-py and a JS service exporting its handler survive reuse.
    for name in ["py", "js-handler"] {
        hello_n_times(&server, &format!("/{name}"), 6).await;
        assert!(service(name).reuses_instances(), "{name}");
        // The instance goes back to the pool once the guest has finished,
        // which may be just after the client has the response (so a next
        // request may briefly have needed a second one: at least one).
        eventually(
            Duration::from_secs(30),
            &format!("{name}'s instance back in the pool"),
            || {
                let warm = service(name).warm_instances();
                async move { warm >= 1 }
            },
        )
        .await;
    }
    // A fetch-event JS service fails on a reused instance (StarlingMonkey
    // #247): every request still succeeds, retried on a fresh instance, and
    // reuse is turned off for it.
    hello_n_times(&server, "/js-fetch", 6).await;
    assert!(!service("js-fetch").reuses_instances());
    assert_eq!(service("js-fetch").warm_instances(), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn javascript_and_python_services_keep_state_in_wasi_keyvalue() {
    // Built against the `stateful-service` world: wasi:keyvalue and
    // wasi:config imported the way each language's toolchain does it.
    let dir = ServiceDir::new();
    let data = ServiceDir::new();
    dir.install_from("visits-js", "js", "visits");
    dir.install_from("visits-py", "python", "visits");
    for (name, label) in [("visits-js", "js"), ("visits-py", "py")] {
        dir.write(
            &format!("{name}.toml"),
            format!("[keyvalue]\nbuckets = [\"default\"]\n[config]\nservice_name = \"{label}\"\n")
                .as_bytes(),
        );
    }
    let server = TestServer::start(
        wharf::Config::for_dir(dir.path()).data_dir(Some(data.path().to_path_buf())),
    )
    .await;
    for (prefix, label) in [("/visits-js", "js"), ("/visits-py", "py")] {
        for expected in 1..=3 {
            let (status, body) = get(&server.url(prefix)).await.unwrap();
            assert_eq!(status, 200, "{body}");
            let doc: Value = serde_json::from_str(&body).unwrap();
            assert_eq!(doc, json!({"service": label, "visits": expected}));
        }
    }
    let response = client()
        .post(server.url("/visits-py/notes"))
        .body("buy milk")
        .send()
        .await
        .unwrap();
    let doc: Value = response.json().await.unwrap();
    assert_eq!(doc["notes"], json!(["buy milk"]));
    let (_, body) = get(&server.url("/visits-js/last")).await.unwrap();
    assert_eq!(serde_json::from_str::<Value>(&body).unwrap()["last"], "/");
    // Without the grant, the store refuses and the service says so.
    dir.write("visits-js.toml", b"");
    eventually(APPLY, "the grant to be gone", || async {
        get(&server.url("/visits-js"))
            .await
            .is_some_and(|(status, _)| status == 503)
    })
    .await;
}
