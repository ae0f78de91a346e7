//! The demo island: a replicated chat log. State is the ordered lines plus a running digest
//! of every line ever applied; the snapshot is the serialized state. Deterministic by
//! construction: it only ever looks at the messages it is given.

use crate::Island;
use bytes::Bytes;
use isthmus_router::ids::ReplicaId;
use isthmus_router::wire::{Message, Origin};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::VecDeque;

/// Lines kept in the state (and so in snapshots); the digest still covers every line.
pub const DEFAULT_MAX_LINES: usize = 10_000;

/// One chat line.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatLine {
    /// Position in the island's order.
    pub seq: u64,
    /// Router time of the message.
    pub time_us: u64,
    /// The sending replica (None for router messages).
    pub from: Option<ReplicaId>,
    /// The sender's display name.
    pub name: String,
    /// What was said.
    pub text: String,
}

#[derive(Serialize, Deserialize)]
struct Payload {
    name: String,
    text: String,
}

/// The chat island.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatIsland {
    lines: VecDeque<ChatLine>,
    digest: [u8; 32],
    last_seq: u64,
    max_lines: usize,
}

impl Default for ChatIsland {
    fn default() -> Self {
        ChatIsland {
            lines: VecDeque::new(),
            digest: [0; 32],
            last_seq: 0,
            max_lines: DEFAULT_MAX_LINES,
        }
    }
}

fn config() -> impl bincode::config::Config {
    bincode::config::standard()
}

impl ChatIsland {
    /// The payload of a chat message.
    pub fn payload(name: &str, text: &str) -> Bytes {
        let p = Payload {
            name: name.to_string(),
            text: text.to_string(),
        };
        Bytes::from(bincode::serde::encode_to_vec(&p, config()).unwrap_or_default())
    }

    /// Reads a chat payload; anything else is shown as (lossy) text from nobody in particular.
    pub fn parse(payload: &[u8]) -> (String, String) {
        match bincode::serde::decode_from_slice::<Payload, _>(payload, config()) {
            Ok((p, used)) if used == payload.len() => (p.name, p.text),
            _ => (String::new(), String::from_utf8_lossy(payload).into_owned()),
        }
    }

    /// The lines kept, oldest first.
    pub fn lines(&self) -> impl Iterator<Item = &ChatLine> {
        self.lines.iter()
    }

    /// The running digest as hex.
    pub fn digest_hex(&self) -> String {
        hex::encode(self.digest)
    }

    /// The last seq applied.
    pub fn last_seq(&self) -> u64 {
        self.last_seq
    }
}

impl Island for ChatIsland {
    fn apply(&mut self, m: &Message) {
        let from = match m.origin {
            Origin::Replica(r) => r,
            Origin::Router => {
                // The router's own messages (membership events) are not sealed, so the router
                // could write anything there: they never become chat lines in anyone's name.
                // They still count in the digest, the same for every replica.
                let mut h = Sha256::new();
                h.update(self.digest);
                h.update(m.seq.0.to_le_bytes());
                h.update([0u8; 16]);
                h.update((m.payload.len() as u64).to_le_bytes());
                h.update(&m.payload);
                self.digest = h.finalize().into();
                self.last_seq = m.seq.0;
                return;
            }
        };
        let from = Some(from);
        let (name, text) = Self::parse(&m.payload);
        let mut h = Sha256::new();
        h.update(self.digest);
        h.update(m.seq.0.to_le_bytes());
        h.update(from.map_or([0u8; 16], |r| *r.0.as_bytes()));
        h.update((name.len() as u64).to_le_bytes());
        h.update(name.as_bytes());
        h.update((text.len() as u64).to_le_bytes());
        h.update(text.as_bytes());
        self.digest = h.finalize().into();
        self.last_seq = m.seq.0;
        self.lines.push_back(ChatLine {
            seq: m.seq.0,
            time_us: m.time.0,
            from,
            name,
            text,
        });
        while self.lines.len() > self.max_lines {
            self.lines.pop_front();
        }
    }

    fn snapshot(&self) -> Vec<u8> {
        bincode::serde::encode_to_vec(self, config()).unwrap_or_default()
    }

    fn restore(&mut self, snapshot: &[u8]) -> Result<(), String> {
        let (state, used): (ChatIsland, usize) =
            bincode::serde::decode_from_slice(snapshot, config()).map_err(|e| e.to_string())?;
        if used != snapshot.len() {
            return Err("trailing bytes after the chat state".into());
        }
        *self = state;
        Ok(())
    }

    fn reset(&mut self) {
        *self = ChatIsland {
            max_lines: self.max_lines,
            ..ChatIsland::default()
        };
    }

    fn digest(&self) -> Vec<u8> {
        self.digest.to_vec()
    }
}
