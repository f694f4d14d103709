//! A users microservice: `GET /` lists users, `GET /ID` shows one.

use kit::wasip2;
use serde_json::json;
use wasip2::http::types::{IncomingRequest, ResponseOutparam};

struct Users;

const USERS: &[(u64, &str)] = &[(1, "Ada"), (2, "Grace"), (3, "Linus")];

impl wasip2::exports::http::incoming_handler::Guest for Users {
    fn handle(request: IncomingRequest, out: ResponseOutparam) {
        let path = request.path_with_query().unwrap_or_default();
        let path = path.split('?').next().unwrap_or_default();
        let json_type = &[("content-type", "application/json")];
        let all = || {
            USERS
                .iter()
                .map(|(id, name)| json!({"id": id, "name": name}))
        };
        match path.trim_matches('/') {
            "" => kit::respond(
                out,
                200,
                json_type,
                json!(all().collect::<Vec<_>>()).to_string().as_bytes(),
            ),
            id => match all().find(|user| user["id"].to_string() == id) {
                Some(user) => kit::respond(out, 200, json_type, user.to_string().as_bytes()),
                None => kit::respond(out, 404, json_type, br#"{"error":"no such user"}"#),
            },
        }
    }
}

wasip2::http::proxy::export!(Users with_types_in wasip2);
