//! The tokio driver over in-memory streams on tokio's paused clock: how connections end.

use bytes::{Bytes, BytesMut};
use isthmus_router::auth::{self, Capability, IslandKeys};
use isthmus_router::driver::{self, Attach, DriverConfig, Ending, SessionHandle};
use isthmus_router::ids::{ConnId, ReplicaId};
use isthmus_router::session::{JoinRequest, SessionConfig};
use isthmus_router::wire::{self, AdminCommand, ClientFrame, Code, Role, ServerFrame};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use uuid::Uuid;

fn admin() -> Capability {
    Capability::from_parts(Role::Admin, [3; 32])
}

fn keys() -> IslandKeys {
    auth::island_keys(&admin()).expect("an admin capability")
}

type Endings = Arc<Mutex<Vec<Ending>>>;

fn spawn(cfg: DriverConfig) -> (SessionHandle, tokio::task::JoinHandle<()>, Endings) {
    let keys = keys();
    let endings: Endings = Arc::default();
    let seen = endings.clone();
    let retire: driver::Retire = Box::new(move |ending, _| {
        seen.lock().expect("not poisoned").push(ending);
        true
    });
    let (handle, join) = driver::spawn_session(keys.session_id(), keys, cfg, retire);
    (handle, join, endings)
}

/// Attaches a replica over an in-memory pipe of `pipe` bytes; returns the replica's end.
fn attach(
    handle: &SessionHandle,
    n: u64,
    role: Role,
    control: bool,
    pipe: usize,
) -> (DuplexStream, [u8; 32]) {
    let (ours, theirs) = tokio::io::duplex(pipe);
    let nonce = [n as u8; 32];
    let request = JoinRequest {
        replica: ReplicaId(Uuid::from_u128(u128::from(n))),
        name: format!("r{n}"),
        role,
        resume_from: None,
        contacts: wire::Contacts::default(),
        created: n == 1,
        nonce,
        control,
        recover: None,
        cluster: Vec::new(),
    };
    let attach = Attach {
        conn: ConnId(n),
        request,
        stream: Box::new(theirs),
        leftover: BytesMut::new(),
        guard: None,
    };
    assert!(handle.attach(attach).is_ok(), "the session is running");
    (ours, nonce)
}

/// Reads to the end of the stream and splits it into frames; fails on a partial frame.
async fn read_all_frames(stream: &mut DuplexStream) -> Vec<ServerFrame> {
    let mut bytes = Vec::new();
    stream.read_to_end(&mut bytes).await.expect("read");
    let mut buf = BytesMut::from(&bytes[..]);
    let mut frames = Vec::new();
    while let Some(frame) = wire::decode::<ServerFrame>(&mut buf, usize::MAX).expect("whole frames")
    {
        frames.push(frame);
    }
    assert!(
        buf.is_empty(),
        "the stream ends with {} bytes of a cut frame",
        buf.len()
    );
    frames
}

async fn send(stream: &mut DuplexStream, frame: &ClientFrame) {
    stream.write_all(&wire::encode(frame)).await.expect("write");
}

#[tokio::test(start_paused = true)]
async fn a_slow_consumer_gets_whole_frames_and_then_its_goodbye() {
    let cfg = DriverConfig {
        session: SessionConfig {
            // Above one event batch of sends (64 of them), which the session stamps before
            // the fast replica's writer can report anything flushed.
            max_outbound_bytes: 256 * 1024,
            ..SessionConfig::default()
        },
        ..DriverConfig::default()
    };
    let (handle, _join, _) = spawn(cfg);
    // The fast replica reads everything as it comes.
    let (fast, _) = attach(&handle, 1, Role::Replica, false, 64 * 1024);
    let (fast_read, mut fast_write) = tokio::io::split(fast);
    let reader = tokio::spawn(async move {
        let mut r = fast_read;
        let mut sink = Vec::new();
        let _ = r.read_to_end(&mut sink).await;
    });
    // The slow one's pipe holds a little over two messages; it reads nothing for now.
    let (mut slow, _) = attach(&handle, 2, Role::Replica, false, 2500);
    tokio::time::sleep(Duration::from_millis(10)).await;
    const SENDS: u64 = 600;
    let payload = Bytes::from(vec![5u8; 1000]);
    for client_seq in 1..=SENDS {
        let frame = ClientFrame::Send {
            client_seq,
            payload: payload.clone(),
        };
        fast_write
            .write_all(&wire::encode(&frame))
            .await
            .expect("write");
    }
    // Let the session stamp them all and give up on the slow replica.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let frames = read_all_frames(&mut slow).await;
    let last = frames.last().expect("some frames");
    assert!(
        matches!(last, ServerFrame::Goodbye { code, .. } if *code == Code::SLOW_CONSUMER),
        "ends with a slow-consumer goodbye: {last:?}"
    );
    let seqs: Vec<u64> = frames
        .iter()
        .filter_map(|f| match f {
            ServerFrame::Message(m) => Some(m.seq.0),
            _ => None,
        })
        .collect();
    assert!(!seqs.is_empty(), "some messages arrived before the goodbye");
    assert!(
        seqs.len() < SENDS as usize,
        "it was cut off: {}",
        seqs.len()
    );
    assert!(
        seqs.iter().copied().eq(1..=seqs.len() as u64),
        "gap-free from 1: {seqs:?}"
    );
    drop(fast_write);
    let _ = reader.await;
}

#[tokio::test(start_paused = true)]
async fn an_admin_close_says_goodbye_to_everyone_and_ends_the_session() {
    let (handle, join, endings) = spawn(DriverConfig::default());
    let (mut member, _) = attach(&handle, 1, Role::Replica, false, 64 * 1024);
    let (mut control, nonce) = attach(&handle, 2, Role::Admin, true, 64 * 1024);
    tokio::time::sleep(Duration::from_millis(10)).await;
    let command = AdminCommand::Close;
    let transcript = auth::admin_transcript(&nonce, handle.id(), 1, &command);
    let sig = admin().key_pair().sign(&transcript);
    send(
        &mut control,
        &ClientFrame::Admin {
            seq: 1,
            command,
            sig,
        },
    )
    .await;
    let frames = read_all_frames(&mut control).await;
    assert!(matches!(frames[0], ServerFrame::Welcome(_)));
    assert!(matches!(
        frames[1],
        ServerFrame::AdminDone {
            seq: 1,
            ok: true,
            ..
        }
    ));
    assert!(matches!(&frames[2], ServerFrame::Goodbye { code, .. } if *code == Code::CLOSED));
    assert_eq!(frames.len(), 3);
    let frames = read_all_frames(&mut member).await;
    assert!(
        matches!(frames.last(), Some(ServerFrame::Goodbye { code, .. }) if *code == Code::CLOSED),
        "{frames:?}"
    );
    tokio::time::timeout(Duration::from_secs(10), join)
        .await
        .expect("the session task ends")
        .expect("without panicking");
    assert_eq!(*endings.lock().expect("not poisoned"), vec![Ending::Closed]);
}
