//! Relay pools (docs/protocol.md §5.2): ids that carry this relay's id, and the moves this
//! relay asked its brokers for.
//!
//! When a client's session reaches this relay because the relay that held it is gone, the
//! client re-attaches its connections here. A connection this relay does not hold may live on
//! another relay's link of one of its brokers: the relay asks every instance of the name, over
//! its links, to move it here (CONN_MOVE), and answers the client's ATTACH once an instance
//! says *moved* (or with CONN_ABORT once all said *unknown*). [`PendingMoves`] remembers what
//! was asked; the table applies the answers.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tunnel_proto::payload::InstanceId;
use tunnel_proto::Token;

/// A move not answered within this long is asked again at the client's next ATTACH: a link
/// may have been replaced and the question lost with it.
pub(crate) const MOVE_RETRY: Duration = Duration::from_secs(2);

/// *Unknown* from every instance asked is final only this long after the first question:
/// instances that link meanwhile are asked too. A relay that just started (a rolling
/// restart, a relay taking over a dead one's sessions) sees its brokers link one after the
/// other within their redial back-off; the first to answer *unknown* must not condemn a
/// connection that the next one holds.
pub(crate) const MOVE_SETTLE: Duration = Duration::from_secs(5);

/// A move nobody asks about any more (its client gave up) is forgotten after this long.
pub(crate) const MOVE_FORGET: Duration = Duration::from_secs(30);

/// A fresh id that `taken` does not hold: relay `relay_id` ≠ 0 puts its id in the top byte
/// (docs/protocol.md §5.2), a relay outside a pool uses all 32 bits; never 0.
pub(crate) fn draw_id(relay_id: u8, taken: impl Fn(u32) -> bool) -> u32 {
    use rand::Rng;
    // ThreadRng is a CSPRNG (ChaCha, reseeded from the OS).
    let mut rng = rand::rng();
    let prefix = u32::from(relay_id) << 24;
    let mask = if relay_id == 0 { u32::MAX } else { 0x00ff_ffff };
    loop {
        let id = prefix | (rng.random::<u32>() & mask);
        // The table's limits (connections, sessions) keep far below 2^24 entries, so this
        // ends after a try or two.
        if id != 0 && !taken(id) {
            return id;
        }
    }
}

/// The relay whose id is in the top byte of `id`, or 0 for an id of a relay outside a pool
/// (whose ids may have any top byte: only meaningful within a pool).
#[cfg(test)]
pub(crate) fn relay_of(id: u32) -> u8 {
    (id >> 24) as u8
}

/// One connection this relay asked its brokers to move here.
#[derive(Debug)]
pub(crate) struct PendingMove {
    /// The token the client proved in its ATTACH.
    pub(crate) token: Token,
    /// The ATTACH's server name.
    pub(crate) server: Arc<str>,
    /// The session whose ATTACH asked last: the connection joins it once moved.
    pub(crate) session: u32,
    /// The instances asked that have not answered yet.
    pub(crate) waiting: Vec<InstanceId>,
    /// The instances that answered *unknown*.
    pub(crate) unknown: Vec<InstanceId>,
    /// When the last question went out.
    pub(crate) asked_at: Instant,
    /// When the first question went out.
    pub(crate) first_asked_at: Instant,
}

/// What to do with an ATTACH of a connection this relay does not hold.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum MoveStep {
    /// Ask these instances (CONN_MOVE on their links); the ATTACH waits.
    Ask(Vec<InstanceId>),
    /// Asked already, answers still due: the ATTACH waits.
    Wait,
    /// Every instance asked said *unknown*, or the token is not the one being moved: the
    /// ATTACH is answered CONN_ABORT "unknown connection".
    Unknown,
}

/// The moves under way, by conn_id. Bounded by the caller (see [`PendingMoves::len`]).
#[derive(Debug, Default)]
pub(crate) struct PendingMoves {
    moves: HashMap<u32, PendingMove>,
}

impl PendingMoves {
    pub(crate) fn len(&self) -> usize {
        self.moves.len()
    }

    /// Whether a move of connection `id` is under way.
    pub(crate) fn contains(&self, id: u32) -> bool {
        self.moves.contains_key(&id)
    }

    /// An ATTACH of connection `id` (not held here) came in session `session`; `movers` are
    /// the linked instances of its name that can move connections.
    pub(crate) fn on_attach(
        &mut self,
        id: u32,
        token: &Token,
        server: &Arc<str>,
        session: u32,
        movers: Vec<InstanceId>,
        now: Instant,
    ) -> MoveStep {
        let Some(pending) = self.moves.get_mut(&id) else {
            self.moves.insert(
                id,
                PendingMove {
                    token: *token,
                    server: server.clone(),
                    session,
                    waiting: movers.clone(),
                    unknown: Vec::new(),
                    asked_at: now,
                    first_asked_at: now,
                },
            );
            return MoveStep::Ask(movers);
        };
        if !pending.token.ct_eq(token) || pending.server != *server {
            return MoveStep::Unknown;
        }
        pending.session = session;
        // Instances linked since the last question are asked at once.
        let new: Vec<InstanceId> = movers
            .iter()
            .filter(|m| !pending.waiting.contains(m) && !pending.unknown.contains(m))
            .copied()
            .collect();
        if !new.is_empty() {
            pending.waiting.extend(&new);
            pending.asked_at = now;
            return MoveStep::Ask(new);
        }
        if now.saturating_duration_since(pending.asked_at) >= MOVE_RETRY {
            // Unanswered questions may have been lost with a link: ask the instances still
            // linked again; those gone are not waited for.
            pending.waiting.retain(|i| movers.contains(i));
            if !pending.waiting.is_empty() {
                pending.asked_at = now;
                return MoveStep::Ask(pending.waiting.clone());
            }
        }
        let settled = now.saturating_duration_since(pending.first_asked_at) >= MOVE_SETTLE;
        if pending.waiting.is_empty() && settled {
            self.moves.remove(&id);
            return MoveStep::Unknown;
        }
        MoveStep::Wait
    }

    /// Instance `instance` of `server` does not hold connection `id`.
    pub(crate) fn on_unknown(&mut self, id: u32, server: &str, instance: InstanceId) {
        if let Some(pending) = self.moves.get_mut(&id) {
            if &*pending.server == server && pending.waiting.contains(&instance) {
                pending.waiting.retain(|i| *i != instance);
                pending.unknown.push(instance);
            }
        }
    }

    /// Connection `id` was moved here: what was pending for it, if anything.
    pub(crate) fn take(&mut self, id: u32) -> Option<PendingMove> {
        self.moves.remove(&id)
    }

    /// Forgets moves that nobody asked about for [`MOVE_FORGET`].
    pub(crate) fn sweep(&mut self, now: Instant) {
        self.moves
            .retain(|_, m| now.saturating_duration_since(m.asked_at) < MOVE_FORGET);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inst(n: u8) -> InstanceId {
        InstanceId([n; 16])
    }

    #[test]
    fn ids_carry_the_relay_id_in_their_top_byte() {
        for _ in 0..1000 {
            let id = draw_id(7, |_| false);
            assert_eq!(relay_of(id), 7);
            assert_ne!(id, 0);
        }
        // A relay outside a pool never draws 0 and skips taken ids.
        let taken = draw_id(0, |_| false);
        for _ in 0..1000 {
            let id = draw_id(0, |i| i == taken);
            assert!(id != 0 && id != taken);
        }
        // Taken ids are skipped within the relay's range too.
        for _ in 0..1000 {
            let id = draw_id(1, |i| i % 2 == 0);
            assert!(id % 2 == 1 && relay_of(id) == 1);
        }
    }

    #[test]
    fn a_move_asks_once_waits_then_asks_again_after_the_retry_delay() {
        let mut moves = PendingMoves::default();
        let server: Arc<str> = "echo".into();
        let token = Token([1; 16]);
        let t0 = Instant::now();
        let step = moves.on_attach(5, &token, &server, 9, vec![inst(1), inst(2)], t0);
        assert_eq!(step, MoveStep::Ask(vec![inst(1), inst(2)]));
        let step = moves.on_attach(5, &token, &server, 9, vec![inst(1), inst(2)], t0);
        assert_eq!(step, MoveStep::Wait);
        // After the retry delay the instances still linked are asked again.
        let later = t0 + MOVE_RETRY;
        let step = moves.on_attach(5, &token, &server, 10, vec![inst(2)], later);
        assert_eq!(step, MoveStep::Ask(vec![inst(2)]));
        // An instance that links meanwhile is asked at once.
        let step = moves.on_attach(5, &token, &server, 10, vec![inst(2), inst(3)], later);
        assert_eq!(step, MoveStep::Ask(vec![inst(3)]));
        let pending = moves.take(5).expect("pending");
        assert_eq!(pending.session, 10);
        assert!(moves.take(5).is_none());
    }

    #[test]
    fn all_unknown_answers_make_the_next_attach_unknown() {
        let mut moves = PendingMoves::default();
        let server: Arc<str> = "echo".into();
        let token = Token([1; 16]);
        let t0 = Instant::now();
        moves.on_attach(5, &token, &server, 9, vec![inst(1), inst(2)], t0);
        moves.on_unknown(5, "echo", inst(1));
        // Another name's answer does not count.
        moves.on_unknown(5, "other", inst(2));
        assert_eq!(
            moves.on_attach(5, &token, &server, 9, vec![], t0),
            MoveStep::Wait
        );
        moves.on_unknown(5, "echo", inst(2));
        // Before the settle time an instance that links now may still hold it.
        assert_eq!(
            moves.on_attach(5, &token, &server, 9, vec![inst(1), inst(2)], t0),
            MoveStep::Wait
        );
        let step = moves.on_attach(5, &token, &server, 9, vec![inst(1), inst(3)], t0);
        assert_eq!(step, MoveStep::Ask(vec![inst(3)]));
        moves.on_unknown(5, "echo", inst(3));
        assert_eq!(
            moves.on_attach(5, &token, &server, 9, vec![inst(3)], t0 + MOVE_SETTLE),
            MoveStep::Unknown
        );
        assert_eq!(moves.len(), 0);
    }

    #[test]
    fn a_wrong_token_is_unknown_and_leaves_the_move_alone() {
        let mut moves = PendingMoves::default();
        let server: Arc<str> = "echo".into();
        let t0 = Instant::now();
        moves.on_attach(5, &Token([1; 16]), &server, 9, vec![inst(1)], t0);
        assert_eq!(
            moves.on_attach(5, &Token([2; 16]), &server, 9, vec![inst(1)], t0),
            MoveStep::Unknown
        );
        assert_eq!(moves.len(), 1);
        moves.sweep(t0 + MOVE_FORGET);
        assert_eq!(moves.len(), 0);
    }
}
