//! A component shaped like one built for a WASI 0.3 release candidate: it
//! imports `wasi:http/types@0.3.0-rc-2025-09-16` and exports
//! `wasi:http/handler@0.3.0-rc-2025-09-16`. Wharf's tests deploy it to see
//! it refused with a reason that names the version.

wit_bindgen::generate!({ path: "wit", world: "service" });

struct Rc;

impl exports::wasi::http::handler::Guest for Rc {
    async fn handle(request: wasi::http::types::Request) -> String {
        request.path()
    }
}

export!(Rc);
