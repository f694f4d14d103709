//! What Wharf offers a Rust service besides `wasi:http`, without writing
//! WIT: key-value buckets, configuration and publishing.
//!
//! ```ignore
//! let bucket = wharf::Bucket::open("{{name}}")?;       // within [keyvalue] buckets
//! let n = bucket.increment("visits", 1)?;
//! wharf::publish("{{name}}.visited", b"...", "text/plain")?;  // within [messaging] publish
//! let url = wharf::config("api_url")?;                   // [config] and [secrets]
//! ```
//!
//! A bucket or topic the manifest does not grant is an error saying which
//! grant to add.

// Helpers to use as needed: the ones a service does not call are fine.
#![allow(dead_code)]

use std::io::{Read as _, Write as _};

use wasip2::http::outgoing_handler;
use wasip2::http::types::{Fields, Method, OutgoingBody, OutgoingRequest, Scheme};

mod bindings {
    // wasi:keyvalue and wasi:config, from the WIT in wit/.
    wit_bindgen::generate!({
        path: "wit",
        world: "wharf:service/capabilities",
        generate_all,
    });
}

use bindings::wasi::config::store as config_store;
use bindings::wasi::keyvalue::{atomics, store};

fn explain(err: store::Error, bucket: &str) -> String {
    match err {
        store::Error::AccessDenied => format!(
            "bucket {bucket:?} is not granted to this service: add it to buckets under [keyvalue] in its manifest"
        ),
        store::Error::NoSuchStore => {
            format!("{bucket:?} is not a bucket name: use 1-64 letters, digits, '-' or '_'")
        }
        store::Error::Other(why) => format!("bucket {bucket:?}: {why}"),
    }
}

/// A key-value bucket (`wasi:keyvalue`).
pub struct Bucket {
    name: String,
    handle: store::Bucket,
}

impl Bucket {
    /// Opens bucket `name`.
    pub fn open(name: &str) -> Result<Bucket, String> {
        let handle = store::open(name).map_err(|err| explain(err, name))?;
        Ok(Bucket {
            name: name.to_string(),
            handle,
        })
    }

    /// The value of `key`, if any.
    pub fn get(&self, key: &str) -> Result<Option<Vec<u8>>, String> {
        self.handle.get(key).map_err(|err| explain(err, &self.name))
    }

    /// Sets `key` to `value`.
    pub fn set(&self, key: &str, value: &[u8]) -> Result<(), String> {
        self.handle
            .set(key, value)
            .map_err(|err| explain(err, &self.name))
    }

    /// Deletes `key`.
    pub fn delete(&self, key: &str) -> Result<(), String> {
        self.handle.delete(key).map_err(|err| explain(err, &self.name))
    }

    /// Adds `by` to the counter at `key`, atomically; the new value.
    pub fn increment(&self, key: &str, by: u64) -> Result<u64, String> {
        atomics::increment(&self.handle, key, by).map_err(|err| explain(err, &self.name))
    }
}

/// The configuration or secret value of `key` (`wasi:config`), if set.
pub fn config(key: &str) -> Result<Option<String>, String> {
    config_store::get(key).map_err(|err| format!("config {key}: {err:?}"))
}

/// Publishes `body` to `topic` once the broker has it; the broker's answer
/// (`{"id": …, "topic": …}`).
pub fn publish(topic: &str, body: &[u8], content_type: &str) -> Result<String, String> {
    let (status, answer) = post(&format!("/{topic}"), body, content_type)?;
    if status != 202 {
        return Err(format!(
            "publishing to {topic:?} failed ({status}): {}",
            String::from_utf8_lossy(&answer).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&answer).into_owned())
}

/// Sends `body` as a request to `topic` and returns the first reply,
/// waiting at most `within` (like "2s").
pub fn request(topic: &str, body: &[u8], within: &str) -> Result<Vec<u8>, String> {
    let (status, answer) = post(
        &format!("/{topic}?reply-within={within}"),
        body,
        "application/octet-stream",
    )?;
    if status != 200 {
        return Err(format!(
            "the request to {topic:?} failed ({status}): {}",
            String::from_utf8_lossy(&answer).trim()
        ));
    }
    Ok(answer)
}

/// POSTs `body` to `http://messages.internal{path}`: status and body.
fn post(path: &str, body: &[u8], content_type: &str) -> Result<(u16, Vec<u8>), String> {
    let headers = Fields::new();
    headers
        .append("content-type", content_type.as_bytes())
        .map_err(|err| format!("content-type: {err:?}"))?;
    let request = OutgoingRequest::new(headers);
    request
        .set_method(&Method::Post)
        .and_then(|()| request.set_scheme(Some(&Scheme::Http)))
        .and_then(|()| request.set_authority(Some("messages.internal")))
        .and_then(|()| request.set_path_with_query(Some(path)))
        .map_err(|()| format!("{path:?} is not a topic path"))?;
    let outgoing = request.body().map_err(|()| "no request body".to_string())?;
    let pending = outgoing_handler::handle(request, None)
        .map_err(|err| format!("messages.internal refused the request: {err:?}"))?;
    {
        let mut stream = outgoing
            .write()
            .map_err(|()| "no request body stream".to_string())?;
        stream
            .write_all(body)
            .and_then(|()| std::io::Write::flush(&mut stream))
            .map_err(|err| format!("sending the message: {err}"))?;
    }
    OutgoingBody::finish(outgoing, None).map_err(|err| format!("{err:?}"))?;
    let response = loop {
        match pending.get() {
            Some(result) => break result,
            None => pending.subscribe().block(),
        }
    };
    let response = response
        .map_err(|()| "the response was taken".to_string())?
        .map_err(|err| format!("messages.internal did not answer: {err:?}"))?;
    let status = response.status();
    let mut bytes = Vec::new();
    if let Ok(body) = response.consume()
        && let Ok(mut stream) = body.stream()
    {
        stream
            .read_to_end(&mut bytes)
            .map_err(|err| format!("reading the answer: {err}"))?;
    }
    Ok((status, bytes))
}
