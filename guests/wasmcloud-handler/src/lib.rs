//! A service with no HTTP at all: it exports
//! `wasmcloud:messaging/handler@0.2.0`, as a wasmCloud messaging component
//! does. Each message is counted in the `msgs` bucket under
//! `seen:wasmcloud-handler:BODY`; a message whose body is `fail` fails
//! every attempt; a message with a reply address is answered with
//! `re:BODY`, published to that address.

wit_bindgen::generate!({
    path: "../../wit/wasmcloud-messaging-0.2.0",
    world: "wasmcloud:messaging/messaging-handler@0.2.0",
    generate_all,
});

mod keyvalue {
    wit_bindgen::generate!({
        path: "../../wit/keyvalue-0.2.0-draft",
        world: "wasi:keyvalue/imports@0.2.0-draft",
        generate_all,
    });
}

use keyvalue::wasi::keyvalue::{atomics, store};
use wasmcloud::messaging::consumer;
use wasmcloud::messaging::types::BrokerMessage;

struct Handler;

impl exports::wasmcloud::messaging::handler::Guest for Handler {
    fn handle_message(msg: BrokerMessage) -> Result<(), String> {
        if msg.body == b"fail" {
            return Err("this message always fails".into());
        }
        let bucket = store::open("msgs").map_err(|err| format!("{err:?}"))?;
        let key = format!(
            "seen:wasmcloud-handler:{}",
            String::from_utf8_lossy(&msg.body)
        );
        atomics::increment(&bucket, &key, 1).map_err(|err| format!("{err:?}"))?;
        if let Some(reply_to) = msg.reply_to {
            let mut body = b"re:".to_vec();
            body.extend(&msg.body);
            consumer::publish(&BrokerMessage {
                subject: reply_to,
                body,
                reply_to: None,
            })?;
        }
        Ok(())
    }
}

export!(Handler);
