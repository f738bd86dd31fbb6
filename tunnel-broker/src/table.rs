//! The broker's connection table: what it must remember of each live connection to route
//! packets to it, to send its packets on the link it is on, and to re-announce it on a new
//! link or move it to another relay's link.

use std::collections::HashMap;
use std::sync::Mutex;

use tunnel_proto::driver::ConnHandle;
use tunnel_proto::payload::AnnouncedConn;
use tunnel_proto::Token;

use crate::shared::LinkId;

/// One live connection.
#[derive(Debug, Clone)]
pub(crate) struct ConnEntry {
    pub handle: ConnHandle,
    pub token: Token,
    /// Last pull period seen in a CONN_OPTION either way (0 until one is seen: continuous
    /// long-poll, the protocol's default).
    pub pull_period_ms: u32,
    /// The window the client announced in its CONN_INIT.
    pub client_window: u16,
    /// The link (relay) the connection is on: its packets go there only.
    pub link: LinkId,
}

/// conn_id → entry. Critical sections are short and never await.
#[derive(Debug, Default)]
pub(crate) struct ConnTable {
    entries: Mutex<HashMap<u32, ConnEntry>>,
}

impl ConnTable {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u32, ConnEntry>> {
        // A panic while holding this lock cannot leave the map half-updated (every
        // operation is a single map call), so a poisoned lock is still usable.
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn insert(&self, conn_id: u32, entry: ConnEntry) {
        self.lock().insert(conn_id, entry);
    }

    pub fn handle(&self, conn_id: u32) -> Option<ConnHandle> {
        self.lock().get(&conn_id).map(|e| e.handle.clone())
    }

    pub fn token(&self, conn_id: u32) -> Option<Token> {
        self.lock().get(&conn_id).map(|e| e.token)
    }

    /// A copy of the entry of `conn_id`.
    pub fn get(&self, conn_id: u32) -> Option<ConnEntry> {
        self.lock().get(&conn_id).cloned()
    }

    /// The link `conn_id` is on.
    pub fn link_of(&self, conn_id: u32) -> Option<LinkId> {
        self.lock().get(&conn_id).map(|e| e.link)
    }

    /// Puts `conn_id` on `link`; returns the link it was on (None: no such connection).
    pub fn rebind(&self, conn_id: u32, link: LinkId) -> Option<LinkId> {
        self.lock()
            .get_mut(&conn_id)
            .map(|e| std::mem::replace(&mut e.link, link))
    }

    pub fn set_pull_period(&self, conn_id: u32, pull_period_ms: u32) {
        if let Some(e) = self.lock().get_mut(&conn_id) {
            e.pull_period_ms = pull_period_ms;
        }
    }

    pub fn remove(&self, conn_id: u32) -> Option<ConnEntry> {
        self.lock().remove(&conn_id)
    }

    /// Takes every entry out (shutdown).
    pub fn drain(&self) -> Vec<(u32, ConnEntry)> {
        self.lock().drain().collect()
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Link `link` is up again: every live connection on it resends what it has in flight.
    pub fn path_restored(&self, link: LinkId) {
        let handles: Vec<ConnHandle> = self
            .lock()
            .values()
            .filter(|e| e.link == link)
            .map(|e| e.handle.clone())
            .collect();
        // Outside the table lock: each call takes its connection's own lock.
        for handle in handles {
            handle.path_restored();
        }
    }

    /// The connections to list in the LINK_INIT of `link`: every one on it whose driver
    /// still runs (docs/protocol.md §5.2: each link announces its own connections).
    pub fn announce(&self, link: LinkId) -> Vec<AnnouncedConn> {
        let mut list: Vec<AnnouncedConn> = self
            .lock()
            .iter()
            .filter(|(_, e)| e.link == link && !e.handle.is_closed())
            .map(|(&conn_id, e)| AnnouncedConn {
                conn_id,
                token: e.token,
                pull_period_ms: e.pull_period_ms,
                client_window: e.client_window,
            })
            .collect();
        // A stable order makes link captures and tests readable.
        list.sort_by_key(|c| c.conn_id);
        list
    }
}
