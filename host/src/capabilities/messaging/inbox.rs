//! Reply inboxes for request-reply: a requester opens an inbox, publishes
//! its request with the inbox's address as `reply_to`, and waits there for
//! replies. Addresses are `_inbox.HOST.ID`, where HOST is random per host
//! process (so a reply from another host can be routed here: each broker's
//! `listen_for_replies` forwards what it receives for this host's prefix)
//! and ID is 128 bits from the operating system's CSPRNG, fresh for every
//! inbox: knowing one address tells nothing about any other.
//!
//! Guests cannot publish to `_` topics, and may reply only to an inbox named
//! by a message delivered to them in the same invocation (see
//! `MessagingCtx::owe_reply`): an inbox is reached by answering the request
//! that named it, never by naming it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::mpsc;

use crate::base::random::unguessable_hex;
use crate::capabilities::messaging::message::Message;

/// The first token of every inbox address.
pub const INBOX_PREFIX: &str = "_inbox.";

/// Replies one inbox buffers before further ones are dropped.
const INBOX_CAPACITY: usize = 64;

/// Whether `topic` is an inbox address (of any host).
pub fn is_inbox(topic: &str) -> bool {
    topic.starts_with(INBOX_PREFIX)
}

/// This host's open inboxes.
pub struct Inboxes {
    /// `_inbox.HOST.`
    prefix: String,
    open: Mutex<HashMap<String, mpsc::Sender<Message>>>,
}

impl Inboxes {
    /// The inboxes of a new host process.
    pub fn new() -> Result<Arc<Inboxes>, String> {
        Ok(Arc::new(Inboxes {
            prefix: format!("{INBOX_PREFIX}{}.", unguessable_hex::<8>()?),
            open: Mutex::new(HashMap::new()),
        }))
    }

    /// `_inbox.HOST.`: every address of this host starts with it.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    fn open_map(&self) -> std::sync::MutexGuard<'_, HashMap<String, mpsc::Sender<Message>>> {
        self.open.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Opens a new inbox with an unguessable address; it closes when
    /// dropped.
    pub fn open(self: &Arc<Self>) -> Result<Inbox, String> {
        let address = format!("{}{}", self.prefix, unguessable_hex::<16>()?);
        let (sender, receiver) = mpsc::channel(INBOX_CAPACITY);
        self.open_map().insert(address.clone(), sender);
        Ok(Inbox {
            address,
            receiver,
            inboxes: self.clone(),
        })
    }

    /// Delivers a reply to the inbox at `address`; false if no such inbox
    /// is open here (it timed out, or is another host's).
    pub fn deliver(&self, address: &str, message: Message) -> bool {
        let sender = self.open_map().get(address).cloned();
        match sender {
            Some(sender) => sender.try_send(message).is_ok(),
            None => false,
        }
    }

    /// Whether `address` is one of this host's (open or not).
    pub fn is_local(&self, address: &str) -> bool {
        address.starts_with(&self.prefix)
    }
}

/// One open inbox.
pub struct Inbox {
    address: String,
    receiver: mpsc::Receiver<Message>,
    inboxes: Arc<Inboxes>,
}

impl Inbox {
    /// Where replies are sent.
    pub fn address(&self) -> &str {
        &self.address
    }

    /// The next reply.
    pub async fn recv(&mut self) -> Option<Message> {
        self.receiver.recv().await
    }
}

impl Drop for Inbox {
    fn drop(&mut self) {
        self.inboxes.open_map().remove(&self.address);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regression_inbox_addresses_are_unguessable() {
        let inboxes = Inboxes::new().unwrap();
        let (a, b) = (inboxes.open().unwrap(), inboxes.open().unwrap());
        let id = |inbox: &Inbox| inbox.address()[inboxes.prefix().len()..].to_string();
        // 128 bits of hex each, not a counter.
        assert_eq!(id(&a).len(), 32);
        assert_ne!(id(&a), id(&b));
        assert!(id(&a).bytes().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(id(&a), "0");
    }

    #[tokio::test]
    async fn replies_reach_the_open_inbox_only() {
        let inboxes = Inboxes::new().unwrap();
        let mut inbox = inboxes.open().unwrap();
        assert!(is_inbox(inbox.address()) && inboxes.is_local(inbox.address()));
        let reply = Message::new("x", bytes::Bytes::from_static(b"re"));
        assert!(inboxes.deliver(inbox.address(), reply));
        assert_eq!(inbox.recv().await.unwrap().body, "re");
        let address = inbox.address().to_string();
        drop(inbox);
        let late = Message::new("x", bytes::Bytes::new());
        assert!(!inboxes.deliver(&address, late));
    }
}
