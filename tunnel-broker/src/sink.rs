//! Where an accepted connection's driver sends its packets: the writer queue of the link
//! the connection is on (it changes when the connection moves to another relay).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use tunnel_proto::driver::PacketSink;
use tunnel_proto::Packet;

use crate::shared::Shared;

/// Sends a connection's packets on the link it is on when they are sent.
pub(crate) struct LinkSink {
    pub shared: Arc<Shared>,
    pub conn_id: u32,
}

impl PacketSink for LinkSink {
    fn send(&self, packets: Vec<Packet>) -> Pin<Box<dyn Future<Output = ()> + Send + '_>> {
        Box::pin(async move {
            // Its link is down: drop. The connection retransmits what is unacknowledged once
            // the link is back or the connection has moved, so nothing is lost for good.
            let link = self.shared.table.link_of(self.conn_id);
            let Some(tx) = link.and_then(|link| self.shared.link_tx(link)) else {
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
