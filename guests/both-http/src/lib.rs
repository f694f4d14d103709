//! A component exporting both `wasi:http/incoming-handler@0.2.x` and
//! `wasi:http/handler@0.3.0`: Wharf cannot tell which one is the service
//! and refuses it, naming both.

use kit::wasip2;
use kit3::wasip3;

struct Both;

impl wasip2::exports::http::incoming_handler::Guest for Both {
    fn handle(
        _request: wasip2::http::types::IncomingRequest,
        out: wasip2::http::types::ResponseOutparam,
    ) {
        kit::respond(out, 200, &[], b"0.2");
    }
}

wasip2::http::proxy::export!(Both with_types_in wasip2);

impl wasip3::exports::http::handler::Guest for Both {
    async fn handle(
        _request: wasip3::http::types::Request,
    ) -> Result<wasip3::http::types::Response, wasip3::http::types::ErrorCode> {
        kit3::text(200, "0.3")
    }
}

wasip3::http::service::export!(Both);
