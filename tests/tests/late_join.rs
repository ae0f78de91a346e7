//! Streaming late join over real sockets: a real router, a real island client providing a
//! multi-MiB snapshot and another joining late; the joiner's state must be the provider's.

use isthmus_contact::{ContactPoint, Postcard};
use isthmus_dispatcher::DispatcherConfig;
use isthmus_island_client::client;
use isthmus_island_client::{ClientConfig, Event, Island, ReplicaConfig};
use isthmus_router::auth::Capability;
use isthmus_router::ids::{Seq, SessionId};
use isthmus_router::wire::{CreateOptions, Message};
use isthmus_tests::{start_router, PATIENCE};
use std::time::Duration;
use tokio::sync::mpsc;

/// An island whose state is every payload applied, concatenated: its snapshot is as big as
/// everything sent.
#[derive(Default)]
struct Blob(Vec<u8>);

impl Island for Blob {
    fn apply(&mut self, message: &Message) {
        self.0.extend_from_slice(&message.payload);
    }
    fn snapshot(&self) -> Vec<u8> {
        self.0.clone()
    }
    fn restore(&mut self, snapshot: &[u8]) -> Result<(), String> {
        self.0 = snapshot.to_vec();
        Ok(())
    }
    fn reset(&mut self) {
        self.0.clear();
    }
    fn digest(&self) -> Vec<u8> {
        // FNV-1a: only compared between replicas of this test.
        let h = self.0.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3)
        });
        h.to_le_bytes().to_vec()
    }
}

fn config(addr: std::net::SocketAddr, card: &Postcard, create: bool) -> ClientConfig {
    let mut replica = ReplicaConfig::from_postcard(card, "t");
    replica.create = create.then(CreateOptions::default);
    let mut cfg = ClientConfig::new(vec![addr], replica);
    cfg.backoff_initial = Duration::from_millis(50);
    cfg.backoff_max = Duration::from_millis(400);
    cfg
}

/// Waits for an event `want` picks, returning every event seen up to it.
async fn until(events: &mut mpsc::Receiver<Event>, want: impl Fn(&Event) -> bool) -> Vec<Event> {
    let mut all = Vec::new();
    tokio::time::timeout(PATIENCE, async {
        while let Some(e) = events.recv().await {
            let done = want(&e);
            all.push(e);
            if done {
                return;
            }
        }
        panic!("events ended early: {all:?}");
    })
    .await
    .unwrap_or_else(|_| panic!("timed out; saw {all:?}"));
    all
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_joiner_streams_a_multi_mib_snapshot_and_ends_with_the_providers_state() {
    let router = start_router(DispatcherConfig::default()).await;
    let contact = ContactPoint::new(SessionId::random(), "t", vec![]);
    let card = Postcard::for_new_island(contact, Capability::new_island()).expect("postcard");
    let (a, mut a_events) = client::connect(config(router.addr, &card, true), Blob::default())
        .await
        .expect("provider connects");
    // 24 sends of 200 KiB: a state (and snapshot) of about 4.7 MiB, uploaded in 38 pieces.
    let sends = 24u64;
    for k in 0..sends {
        let payload: Vec<u8> = (0..200 * 1024u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8 ^ k as u8)
            .collect();
        a.send(bytes::Bytes::from(payload)).await.expect("send");
    }
    until(
        &mut a_events,
        |e| matches!(e, Event::Message(m) if m.seq == Seq(sends)),
    )
    .await;
    let (b, mut b_events) = client::connect(config(router.addr, &card, false), Blob::default())
        .await
        .expect("joiner connects");
    // Messages stamped while the snapshot streams come after it, in the backlog or live.
    for k in 0..3u8 {
        a.send(bytes::Bytes::from(vec![k; 1000]))
            .await
            .expect("send");
    }
    let seen = until(
        &mut b_events,
        |e| matches!(e, Event::Message(m) if m.seq == Seq(sends + 3)),
    )
    .await;
    let restored = seen.iter().find_map(|e| match e {
        Event::Restored { at } => Some(*at),
        _ => None,
    });
    assert!(
        restored.is_some_and(|at| at.0 >= sends),
        "the joiner was synced from the provider's snapshot, not replayed: {restored:?}"
    );
    assert!(
        !seen.iter().any(|e| matches!(e, Event::StartedFresh)),
        "no fresh start"
    );
    let state = |c: &Blob, seq: Seq| (seq, c.0.len(), c.digest(), c.0.clone());
    let (sa, la, da, ba) = a.inspect(state).await.expect("inspect a");
    let (sb, lb, db, bb) = b.inspect(state).await.expect("inspect b");
    assert!(la > 4 << 20, "a multi-MiB state: {la} bytes");
    assert_eq!(
        (sb, lb, &db),
        (sa, la, &da),
        "the joiner's state is the provider's"
    );
    assert!(ba == bb, "byte for byte");
    a.leave().await;
    b.leave().await;
}
