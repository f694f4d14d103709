//! The embedding API: a host built from a directory, requests handed to it
//! in-process with no socket, and deploying from bytes.

use http_body_util::BodyExt;
use wharf::{Config, Host};

use crate::support::{ServiceDir, guest_bytes};

async fn body_text(response: http::Response<wharf::Body>) -> String {
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    String::from_utf8(bytes.to_vec()).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_request_is_handled_in_process() {
    let dir = ServiceDir::new();
    dir.install("hello", "hello");
    dir.install("echo", "echo");
    let host = Host::new(Config::for_dir(dir.path()).watch(false))
        .await
        .unwrap();

    let response = host
        .handle(http::Request::get("/hello").body(String::new()).unwrap())
        .await;
    assert_eq!(response.status(), 200);
    assert!(
        body_text(response)
            .await
            .contains("Hello from the microservice!")
    );

    let response = host
        .handle(
            http::Request::post("/echo/in-process?x=1")
                .header("x-embedder", "yes")
                .body("payload".to_string())
                .unwrap(),
        )
        .await;
    assert_eq!(response.status(), 200);
    let doc: serde_json::Value = serde_json::from_str(&body_text(response).await).unwrap();
    assert_eq!(doc["path"], "/in-process?x=1");
    assert_eq!(doc["body"], "payload");
    // No Host header and no authority: the host supplies one.
    assert_eq!(doc["authority"], "localhost");

    let response = host
        .handle(http::Request::get("/missing").body(String::new()).unwrap())
        .await;
    assert_eq!(response.status(), 404);
}

#[tokio::test(flavor = "multi_thread")]
async fn services_can_be_deployed_from_bytes() {
    let host = Host::new(Config::default()).await.unwrap();
    let deployed = host.deploy("greeter", guest_bytes("hello")).await.unwrap();
    assert_eq!(deployed.route().as_str(), "/greeter");
    assert_eq!(deployed.generation(), 1);
    let response = host
        .handle(http::Request::get("/greeter").body(String::new()).unwrap())
        .await;
    assert_eq!(response.status(), 200);

    let err = host.deploy("greeter", b"nope".to_vec()).await.unwrap_err();
    assert!(format!("{err:#}").contains("not a WebAssembly binary"));
    assert_eq!(host.services().service("greeter").unwrap().generation(), 1);

    assert!(host.deploy("bad name", guest_bytes("hello")).await.is_err());
    assert!(host.undeploy("greeter"));
    assert!(!host.undeploy("greeter"));
}
