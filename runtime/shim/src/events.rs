//! Task events to containerd (its ttrpc `Events.Forward`).
//!
//! `publish` returns once containerd has the event, and callers publish in the order
//! containerd requires (create, start, exit, delete). Waiting, rather than queueing as
//! `containerd_shim`'s `RemotePublisher` does, keeps that order across tasks and means no
//! event is still queued when the shim exits after `Shutdown`.

use std::time::Duration;

use anyhow::{Context, Result};
use containerd_shim::util::{convert_to_any, timestamp};
use containerd_shim_protos::protobuf::MessageDyn;
use containerd_shim_protos::shim::event::Envelope;
use containerd_shim_protos::shim::events::ForwardRequest;
use containerd_shim_protos::shim_async::{Client, EventsClient};
use containerd_shim_protos::ttrpc::context;

const FORWARD_TIMEOUT: Duration = Duration::from_secs(5);

pub struct Events {
    address: String,
    namespace: String,
    client: tokio::sync::Mutex<Option<EventsClient>>,
}

impl Events {
    /// Connects to containerd's ttrpc socket (`TTRPC_ADDRESS`, with or without `unix://`).
    pub async fn connect(address: &str, namespace: &str) -> Result<Self> {
        let client = connect_client(address).await?;
        Ok(Self {
            address: address.to_owned(),
            namespace: namespace.to_owned(),
            client: tokio::sync::Mutex::new(Some(client)),
        })
    }

    /// Sends one event; on failure reconnects and tries once more. Failures are logged,
    /// never returned: a lost event must not fail the task RPC that caused it.
    pub async fn publish(&self, topic: &str, event: Box<dyn MessageDyn>) {
        let mut envelope = Envelope::new();
        envelope.topic = topic.to_owned();
        envelope.namespace = self.namespace.clone();
        match (timestamp(), convert_to_any(event)) {
            (Ok(ts), Ok(any)) => {
                envelope.timestamp = Some(ts).into();
                envelope.event = Some(any).into();
            }
            (Err(e), _) | (_, Err(e)) => {
                tracing::error!(topic, "cannot encode event: {e}");
                return;
            }
        }
        let mut req = ForwardRequest::new();
        req.envelope = Some(envelope).into();

        let mut client = self.client.lock().await;
        for attempt in 1..=2 {
            if client.is_none() {
                match connect_client(&self.address).await {
                    Ok(c) => *client = Some(c),
                    Err(e) => {
                        tracing::warn!(topic, attempt, "reconnecting to containerd: {e:#}");
                        continue;
                    }
                }
            }
            let Some(c) = client.as_ref() else { continue };
            let ctx = context::with_timeout(FORWARD_TIMEOUT.as_nanos() as i64);
            match c.forward(ctx, &req).await {
                Ok(_) => {
                    tracing::debug!(topic, "event published");
                    return;
                }
                Err(e) => {
                    tracing::warn!(topic, attempt, "publishing event: {e}");
                    *client = None;
                }
            }
        }
        tracing::error!(topic, "event lost: containerd did not take it");
    }
}

async fn connect_client(address: &str) -> Result<EventsClient> {
    let path = address.strip_prefix("unix://").unwrap_or(address);
    let client = Client::connect(&format!("unix://{path}"))
        .await
        .with_context(|| format!("connecting to containerd's ttrpc socket {path}"))?;
    Ok(EventsClient::new(client))
}
