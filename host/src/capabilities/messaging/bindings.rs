//! The generated messaging bindings — `wasi:messaging@0.2.0-draft` and
//! `wasmcloud:messaging@0.2.0`, imports and exported handlers — and their
//! host side: thin translations onto [`MessagingView`]'s operations.

use std::time::Duration;

use wasmtime::component::{Instance, InstancePre, Linker, Resource};
use wasmtime::{AsContextMut, Store};

use crate::capabilities::messaging::message::Message;
use crate::capabilities::messaging::{
    ClientHandle, MessageHandle, Messaging, MessagingError, MessagingView, RequestOptionsHandle,
};

mod wasi_imports {
    wasmtime::component::bindgen!({
        path: "../wit/messaging-0.2.0-draft",
        world: "wasi:messaging/imports-request-reply@0.2.0-draft",
        imports: { default: async | trappable },
        with: {
            "wasi:messaging/types.client": crate::capabilities::messaging::ClientHandle,
            "wasi:messaging/types.message": crate::capabilities::messaging::MessageHandle,
            "wasi:messaging/request-reply.request-options": crate::capabilities::messaging::RequestOptionsHandle,
        },
    });
}

mod wasi_handler {
    wasmtime::component::bindgen!({
        path: "../wit/messaging-0.2.0-draft",
        world: "wasi:messaging/messaging-core@0.2.0-draft",
        imports: { default: async | trappable },
        exports: { default: async },
        with: {
            "wasi:messaging/types": super::wasi_imports::wasi::messaging::types,
            "wasi:messaging/producer": super::wasi_imports::wasi::messaging::producer,
        },
    });
}

mod wasmcloud_imports {
    wasmtime::component::bindgen!({
        path: "../wit/wasmcloud-messaging-0.2.0",
        world: "wasmcloud:messaging/messaging@0.2.0",
        imports: { default: async | trappable },
    });
}

mod wasmcloud_handler {
    wasmtime::component::bindgen!({
        path: "../wit/wasmcloud-messaging-0.2.0",
        world: "wasmcloud:messaging/messaging-handler@0.2.0",
        imports: { default: async | trappable },
        exports: { default: async },
        with: {
            "wasmcloud:messaging/types": super::wasmcloud_imports::wasmcloud::messaging::types,
            "wasmcloud:messaging/consumer": super::wasmcloud_imports::wasmcloud::messaging::consumer,
        },
    });
}

use wasi_imports::wasi::messaging as wasi;
use wasmcloud_imports::wasmcloud::messaging as wc;

/// Adds both packages' imports to `linker`.
pub(super) fn add_to_linker<T: Send + 'static>(
    linker: &mut Linker<T>,
    get: fn(&mut T) -> MessagingView<'_>,
) -> wasmtime::Result<()> {
    wasi::types::add_to_linker::<T, Messaging>(linker, get)?;
    wasi::producer::add_to_linker::<T, Messaging>(linker, get)?;
    wasi::request_reply::add_to_linker::<T, Messaging>(linker, get)?;
    wc::consumer::add_to_linker::<T, Messaging>(linker, get)?;
    Ok(())
}

type Answer<T, E> = wasmtime::Result<Result<T, E>>;

impl From<MessagingError> for wasi::types::Error {
    fn from(err: MessagingError) -> Self {
        use crate::capabilities::messaging::broker::BrokerError;
        match err {
            MessagingError::Denied(why) => wasi::types::Error::PermissionDenied(why),
            MessagingError::Timeout(_) => wasi::types::Error::Timeout,
            MessagingError::Broker(BrokerError::Unavailable(why)) => {
                wasi::types::Error::Connection(why)
            }
            other => wasi::types::Error::Other(other.to_string()),
        }
    }
}

impl MessagingView<'_> {
    fn message(&self, message: &Resource<MessageHandle>) -> wasmtime::Result<&MessageHandle> {
        Ok(self.table.get(message)?)
    }

    fn message_mut(
        &mut self,
        message: &Resource<MessageHandle>,
    ) -> wasmtime::Result<&mut MessageHandle> {
        Ok(self.table.get_mut(message)?)
    }

    /// The replies of a request, as guest messages.
    fn push_replies(
        &mut self,
        replies: Vec<Message>,
    ) -> wasmtime::Result<Vec<Resource<MessageHandle>>> {
        replies
            .iter()
            .map(|reply| Ok(self.table.push(MessageHandle::received(reply))?))
            .collect()
    }
}

impl wasi::types::Host for MessagingView<'_> {}

impl wasi::types::HostClient for MessagingView<'_> {
    async fn connect(
        &mut self,
        _name: String,
    ) -> Answer<Resource<ClientHandle>, wasi::types::Error> {
        // One broker per host: any name reaches it, and what the client may
        // do is the manifest's grant.
        Ok(Ok(self.table.push(ClientHandle)?))
    }

    async fn disconnect(
        &mut self,
        _client: Resource<ClientHandle>,
    ) -> Answer<(), wasi::types::Error> {
        Ok(Ok(()))
    }

    async fn drop(&mut self, client: Resource<ClientHandle>) -> wasmtime::Result<()> {
        self.table.delete(client)?;
        Ok(())
    }
}

impl wasi::types::HostMessage for MessagingView<'_> {
    async fn new(&mut self, data: Vec<u8>) -> wasmtime::Result<Resource<MessageHandle>> {
        Ok(self.table.push(MessageHandle {
            data,
            ..Default::default()
        })?)
    }

    async fn topic(
        &mut self,
        message: Resource<MessageHandle>,
    ) -> wasmtime::Result<Option<String>> {
        Ok(self.message(&message)?.topic.clone())
    }

    async fn content_type(
        &mut self,
        message: Resource<MessageHandle>,
    ) -> wasmtime::Result<Option<String>> {
        Ok(self.message(&message)?.content_type.clone())
    }

    async fn set_content_type(
        &mut self,
        message: Resource<MessageHandle>,
        content_type: String,
    ) -> wasmtime::Result<()> {
        self.message_mut(&message)?.content_type = Some(content_type);
        Ok(())
    }

    async fn data(&mut self, message: Resource<MessageHandle>) -> wasmtime::Result<Vec<u8>> {
        Ok(self.message(&message)?.data.clone())
    }

    async fn set_data(
        &mut self,
        message: Resource<MessageHandle>,
        data: Vec<u8>,
    ) -> wasmtime::Result<()> {
        self.message_mut(&message)?.data = data;
        Ok(())
    }

    async fn metadata(
        &mut self,
        message: Resource<MessageHandle>,
    ) -> wasmtime::Result<Option<Vec<(String, String)>>> {
        let metadata = &self.message(&message)?.metadata;
        Ok((!metadata.is_empty()).then(|| metadata.clone()))
    }

    async fn add_metadata(
        &mut self,
        message: Resource<MessageHandle>,
        key: String,
        value: String,
    ) -> wasmtime::Result<()> {
        self.message_mut(&message)?.metadata.push((key, value));
        Ok(())
    }

    async fn set_metadata(
        &mut self,
        message: Resource<MessageHandle>,
        meta: Vec<(String, String)>,
    ) -> wasmtime::Result<()> {
        self.message_mut(&message)?.metadata = meta;
        Ok(())
    }

    async fn remove_metadata(
        &mut self,
        message: Resource<MessageHandle>,
        key: String,
    ) -> wasmtime::Result<()> {
        self.message_mut(&message)?
            .metadata
            .retain(|(k, _)| *k != key);
        Ok(())
    }

    async fn drop(&mut self, message: Resource<MessageHandle>) -> wasmtime::Result<()> {
        self.table.delete(message)?;
        Ok(())
    }
}

impl wasi::producer::Host for MessagingView<'_> {
    async fn send(
        &mut self,
        _client: Resource<ClientHandle>,
        topic: String,
        message: Resource<MessageHandle>,
    ) -> Answer<(), wasi::types::Error> {
        // The message is the guest's to give away (an owned handle).
        let message = self.table.delete(message)?;
        Ok(MessagingView::send(self, &topic, &message)
            .await
            .map_err(Into::into))
    }
}

impl wasi::request_reply::Host for MessagingView<'_> {
    async fn request(
        &mut self,
        _client: Resource<ClientHandle>,
        topic: String,
        message: Resource<MessageHandle>,
        options: Option<Resource<RequestOptionsHandle>>,
    ) -> Answer<Vec<Resource<MessageHandle>>, wasi::types::Error> {
        let message = self.message(&message)?.clone();
        let options = match options {
            Some(options) => self.table.delete(options)?,
            None => RequestOptionsHandle::default(),
        };
        match MessagingView::request(self, &topic, &message, options.timeout, options.expected)
            .await
        {
            Ok(replies) => Ok(Ok(self.push_replies(replies)?)),
            Err(err) => Ok(Err(err.into())),
        }
    }

    async fn reply(
        &mut self,
        reply_to: Resource<MessageHandle>,
        message: Resource<MessageHandle>,
    ) -> Answer<(), wasi::types::Error> {
        let address = self.message(&reply_to)?.reply_to.clone();
        let message = self.table.delete(message)?;
        let Some(address) = address else {
            return Ok(Err(wasi::types::Error::Other(
                "the message carries no reply address: it was not sent as a request".into(),
            )));
        };
        Ok(MessagingView::reply(self, &address, &message)
            .await
            .map_err(Into::into))
    }
}

impl wasi::request_reply::HostRequestOptions for MessagingView<'_> {
    async fn new(&mut self) -> wasmtime::Result<Resource<RequestOptionsHandle>> {
        Ok(self.table.push(RequestOptionsHandle::default())?)
    }

    async fn set_timeout_ms(
        &mut self,
        options: Resource<RequestOptionsHandle>,
        timeout_ms: u32,
    ) -> wasmtime::Result<()> {
        self.table.get_mut(&options)?.timeout = Some(Duration::from_millis(timeout_ms.into()));
        Ok(())
    }

    async fn set_expected_replies(
        &mut self,
        options: Resource<RequestOptionsHandle>,
        expected: u32,
    ) -> wasmtime::Result<()> {
        self.table.get_mut(&options)?.expected = Some(expected);
        Ok(())
    }

    async fn drop(&mut self, options: Resource<RequestOptionsHandle>) -> wasmtime::Result<()> {
        self.table.delete(options)?;
        Ok(())
    }
}

impl wc::types::Host for MessagingView<'_> {}

impl wc::consumer::Host for MessagingView<'_> {
    async fn request(
        &mut self,
        subject: String,
        body: Vec<u8>,
        timeout_ms: u32,
    ) -> Answer<wc::types::BrokerMessage, String> {
        let message = MessageHandle {
            data: body,
            ..Default::default()
        };
        let timeout = Some(Duration::from_millis(timeout_ms.into()));
        Ok(
            match MessagingView::request(self, &subject, &message, timeout, Some(1)).await {
                Ok(replies) => match replies.into_iter().next() {
                    Some(reply) => Ok(wc::types::BrokerMessage {
                        subject: reply.topic,
                        body: reply.body.to_vec(),
                        reply_to: None,
                    }),
                    None => Err("no reply".to_string()),
                },
                Err(err) => Err(err.to_string()),
            },
        )
    }

    async fn publish(&mut self, msg: wc::types::BrokerMessage) -> Answer<(), String> {
        // wasmCloud handlers answer a request by publishing to its
        // reply-to subject: `send` turns that into a reply.
        let message = MessageHandle {
            data: msg.body,
            ..Default::default()
        };
        Ok(MessagingView::send(self, &msg.subject, &message)
            .await
            .map_err(|err| err.to_string()))
    }
}

/// The messaging handler a component exports, if any.
#[derive(Clone)]
pub enum HandlerExports {
    /// `wasi:messaging/incoming-handler@0.2.0-draft`.
    Wasi(wasi_handler::exports::wasi::messaging::incoming_handler::GuestIndices),
    /// `wasmcloud:messaging/handler@0.2.0`.
    Wasmcloud(wasmcloud_handler::exports::wasmcloud::messaging::handler::GuestIndices),
}

impl HandlerExports {
    /// The handler `pre`'s component exports, if it exports one.
    pub fn find<T>(pre: &InstancePre<T>) -> Option<HandlerExports> {
        use wasi_handler::exports::wasi::messaging::incoming_handler::GuestIndices as WasiIndices;
        use wasmcloud_handler::exports::wasmcloud::messaging::handler::GuestIndices as WcIndices;
        if let Ok(indices) = WasiIndices::new(pre) {
            return Some(HandlerExports::Wasi(indices));
        }
        WcIndices::new(pre).ok().map(HandlerExports::Wasmcloud)
    }

    /// The exported interface, for logs and the service list.
    pub fn interface(&self) -> &'static str {
        match self {
            HandlerExports::Wasi(_) => "wasi:messaging/incoming-handler@0.2.0-draft",
            HandlerExports::Wasmcloud(_) => "wasmcloud:messaging/handler@0.2.0",
        }
    }
}

/// Calls the exported handler of `instance` with `message`; the inner
/// error is the guest's own ("try again later").
pub async fn call_handler<T: Send + 'static>(
    exports: &HandlerExports,
    store: &mut Store<T>,
    instance: &Instance,
    message: &Message,
    view: fn(&mut T) -> MessagingView<'_>,
) -> wasmtime::Result<Result<(), String>> {
    match exports {
        HandlerExports::Wasi(indices) => {
            let handler = indices.load(store.as_context_mut(), instance)?;
            let resource = view(store.data_mut())
                .table
                .push(MessageHandle::received(message))?;
            let result = handler
                .call_handle(store.as_context_mut(), resource)
                .await?;
            Ok(result.map_err(|err| match err {
                wasi::types::Error::Timeout => "timeout".to_string(),
                wasi::types::Error::Connection(why) => format!("connection: {why}"),
                wasi::types::Error::PermissionDenied(why) => format!("permission denied: {why}"),
                wasi::types::Error::Other(why) => why,
            }))
        }
        HandlerExports::Wasmcloud(indices) => {
            let handler = indices.load(store.as_context_mut(), instance)?;
            let msg = wc::types::BrokerMessage {
                subject: message.topic.clone(),
                body: message.body.to_vec(),
                reply_to: message.reply_to.clone(),
            };
            handler
                .call_handle_message(store.as_context_mut(), &msg)
                .await
        }
    }
}
