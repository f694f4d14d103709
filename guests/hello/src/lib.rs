//! The classic hello-world microservice: answers every request with a small
//! JSON document, like `res.json({ message: 'Hello from the microservice!' })`.

use kit::wasip2;
use wasip2::http::types::{IncomingRequest, ResponseOutparam};

struct Hello;

impl wasip2::exports::http::incoming_handler::Guest for Hello {
    fn handle(_request: IncomingRequest, out: ResponseOutparam) {
        kit::respond(
            out,
            200,
            &[("content-type", "application/json")],
            br#"{"message":"Hello from the microservice!"}"#,
        );
    }
}

wasip2::http::proxy::export!(Hello with_types_in wasip2);
