//! Schedule ticks in a cluster: a host runs a tick only if it is the
//! first to create the tick's key, so each tick runs on exactly one host.

use bytes::Bytes;

use super::Cluster;

impl Cluster {
    /// Claims one schedule tick for this host: true for exactly one host
    /// of the cluster (none while NATS is unreachable: a tick is skipped
    /// rather than run twice).
    pub async fn claim_tick(&self, service: &str, trigger: usize, due_ms: u64) -> bool {
        let Ok(stores) = self.stores().await else {
            return false;
        };
        let key = format!("{service}.{trigger}.{due_ms}");
        stores
            .ticks
            .create(key.as_str(), Bytes::from(self.host_id.clone()))
            .await
            .is_ok()
    }
}
