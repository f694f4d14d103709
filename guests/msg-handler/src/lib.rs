//! A service with no HTTP at all: it exports
//! `wasi:messaging/incoming-handler@0.2.0-draft`, as a component built for
//! a wasi-messaging host does. Each message is counted in the `msgs` bucket
//! under `seen:wasi-handler:BODY`; a message whose body is `fail` fails
//! every attempt; a request (a message on a topic starting with `ask.`) is
//! answered with `re:BODY`.

wit_bindgen::generate!({
    path: "../../wit/messaging-0.2.0-draft",
    world: "wasi:messaging/messaging-request-reply@0.2.0-draft",
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
use wasi::messaging::request_reply;
use wasi::messaging::types::{Error, Message};

struct Handler;

impl exports::wasi::messaging::incoming_handler::Guest for Handler {
    fn handle(message: Message) -> Result<(), Error> {
        let body = message.data();
        if body == b"fail" {
            return Err(Error::Other("this message always fails".into()));
        }
        let bucket = store::open("msgs").map_err(|err| Error::Other(format!("{err:?}")))?;
        let key = format!("seen:wasi-handler:{}", String::from_utf8_lossy(&body));
        atomics::increment(&bucket, &key, 1).map_err(|err| Error::Other(format!("{err:?}")))?;
        if message
            .topic()
            .is_some_and(|topic| topic.starts_with("ask."))
        {
            let mut answer = b"re:".to_vec();
            answer.extend(&body);
            request_reply::reply(&message, Message::new(&answer))?;
        }
        Ok(())
    }
}

export!(Handler);
