//! Where an accepted connection's driver sends its packets: the current link's writer queue.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use tunnel_proto::driver::PacketSink;
use tunnel_proto::Packet;

use crate::shared::Shared;

/// Sends a connection's packets on whatever link is up when they are sent.
pub(crate) struct LinkSink {
    pub shared: Arc<Shared>,
}

impl PacketSink for LinkSink {
    fn send(&self, packets: Vec<Packet>) -> Pin<Box<dyn Future<Output = ()> + Send + '_>> {
        Box::pin(async move {
            // No link now: drop. The connection retransmits what is unacknowledged once a
            // link is back, so nothing is lost for good.
            let Some(tx) = self.shared.current_link() else {
                return;
            };
            for packet in packets {
                self.shared.observe_option(&packet);
                // Waits for room: the link's pace is the connections' pace. If the link
                // dies meanwhile its queue closes and the rest of the batch is dropped.
                if tx.send(packet).await.is_err() {
                    return;
                }
            }
        })
    }
}
