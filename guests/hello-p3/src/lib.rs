//! The hello-world JSON service written for WASI 0.3: an async
//! `wasi:http/handler@0.3.0` export answering every request with
//! `{"message":"Hello from the microservice!"}`.
//!
//! Wharf does not serve WASI 0.3 yet; its tests use this component to check
//! that a 0.3 component is refused with a reason that says so.

use wasip3::http::types::{ErrorCode, Fields, Request, Response};
use wasip3::{wit_bindgen, wit_future, wit_stream};

wasip3::http::service::export!(Hello);

struct Hello;

impl wasip3::exports::http::handler::Guest for Hello {
    async fn handle(_request: Request) -> Result<Response, ErrorCode> {
        let headers = Fields::new();
        let _ = headers.append("content-type", b"application/json");
        let (mut body_tx, body_rx) = wit_stream::new();
        let (trailers_tx, trailers_rx) = wit_future::new(|| Ok(None));
        let (response, _sent) = Response::new(headers, Some(body_rx), trailers_rx);
        drop(trailers_tx);
        wit_bindgen::spawn_local(async move {
            let _ = body_tx
                .write_all(br#"{"message":"Hello from the microservice!"}"#.to_vec())
                .await;
        });
        Ok(response)
    }
}
